"""Two checkpoints compared: both run through the same dataset and settings (or two finished
stores are taken as they are), checked to match, identified alike, and what changed reported.

- `compare_models`: the standalone flow (`sparcom compare`).
- `compare_with_tuned`: the pipeline's last stage: the model against its tuned version,
  fine-tuned here (cached) unless the settings name one.
"""

from pathlib import Path

from prefect import flow, get_run_logger

from flows.identify import artifact_prefixes, identify_components
from sparcom.comparison.compare import check_sides, comparison_run_dir
from sparcom.config import PipelineSettings
from sparcom.extraction.settings import ModelSettings
from sparcom.identification.schema import COMPONENTS, REPORT
from tasks.ablation import add_ablation_to_report, measure_ablation
from tasks.attribution import attribute_responses
from tasks.caching import Stage, refreshed
from tasks.comparison import add_comparison_to_report, check_comparable, compare_checkpoints
from tasks.curation import prepare_dataset_folder
from tasks.extraction import extract_activations
from tasks.finetuning import finetune_model


@flow(name="sparcom-compare")
def compare_models(
    settings: PipelineSettings = PipelineSettings(),
    base: ModelSettings | None = None,
    tuned: ModelSettings | None = None,
    base_store: Path | None = None,
    tuned_store: Path | None = None,
    focus_groups: list[str] | None = None,
) -> dict:
    """Each side is a model (extracted over `settings.dataset`) or a finished count store; the
    first rule of `settings.identification` selects (`sparcom compare` takes one rule)."""
    check_sides(base, tuned, base_store, tuned_store)
    run_dir = comparison_run_dir(settings.work_dir, base.name if base else str(base_store))
    if base_store is None or tuned_store is None:
        dataset = prepare_dataset_folder(settings.dataset.path, Path(settings.work_dir) / "datasets")
        base_store = base_store or extract_activations(
            base, dataset, settings.extraction, settings.work_dir, settings.cache_dir, settings.dask)
        tuned_store = tuned_store or extract_activations(
            tuned, dataset, settings.extraction, settings.work_dir, settings.cache_dir, settings.dask)
    check_comparable(base_store, tuned_store)
    one_rule = settings.identification.for_rule(settings.identification.selected_rules()[0])
    identify_components(base_store, run_dir / "base", one_rule, settings.dask, artifact_prefix="sparcom-base")
    identify_components(tuned_store, run_dir / "tuned", one_rule, settings.dask, artifact_prefix="sparcom-tuned")
    summary = compare_checkpoints(run_dir / "base" / COMPONENTS, run_dir / "tuned" / COMPONENTS, run_dir,
                                  focus_groups or [], settings.comparison.top_movers)
    get_run_logger().info("Comparison is in %s", run_dir)
    return summary


@flow(name="sparcom-compare-with-tuned")
def compare_with_tuned(settings: PipelineSettings, dataset: Path, base_store: Path, run_dirs: dict[str, Path],
                       refresh: list[Stage] = []) -> dict[str, dict]:  # noqa: B006
    """rule -> its comparison. `run_dirs[rule]` holds the base model's components and report of
    each rule; the tuned model's (one identification pass) and the comparison go beside them."""
    tuned = settings.comparison.tuned or refreshed(finetune_model, "finetune", refresh)(
        settings.model, settings.finetune, settings.work_dir, settings.cache_dir, held_out_dataset=dataset)
    tuned_store = refreshed(extract_activations, "extract", refresh)(
        tuned, dataset, settings.extraction, settings.work_dir, settings.cache_dir, settings.dask)
    check_comparable(base_store, tuned_store)
    if settings.needs_attribution():  # the tuned model's sets from its own estimates
        settings = settings.identified_with(refreshed(attribute_responses, "attribute", refresh)(
            tuned, dataset, settings.attribution, settings.extraction, settings.work_dir, settings.cache_dir,
            settings.dask))
    identify_components(tuned_store, {rule: run_dir / "tuned" for rule, run_dir in run_dirs.items()},
                        settings.identification, settings.dask, refresh, artifact_prefix="sparcom-tuned")
    prefixes = artifact_prefixes("sparcom-tuned", list(run_dirs))
    base_prefixes = artifact_prefixes("sparcom", list(run_dirs))
    comparisons = {}
    for rule, run_dir in run_dirs.items():
        base_ablation = run_dir / "ablation.json"
        if settings.ablation.enabled and base_ablation.exists():
            # The tuned model's own components, switched off on the tuned model, on the same records.
            tuned_ablation = refreshed(measure_ablation, "ablate", refresh)(
                run_dir / "tuned" / COMPONENTS, tuned_store, settings.ablation.for_tuned_model(), settings.extraction,
                settings.cache_dir, run_dir / "tuned", prefix=prefixes[rule], passes_dir=settings.passes_dir())
            add_ablation_to_report(run_dir / REPORT, tuned_ablation, baseline=base_ablation)
        comparisons[rule] = refreshed(compare_checkpoints, "compare", refresh)(
            run_dir / COMPONENTS, run_dir / "tuned" / COMPONENTS, run_dir / "comparison",
            settings.fine_tuned_groups(), settings.comparison.top_movers, prefix=base_prefixes[rule])
        add_comparison_to_report(run_dir / REPORT, comparisons[rule])
    return comparisons
