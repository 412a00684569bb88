"""Two checkpoints compared: both run through the same dataset and settings (or two finished
stores are taken as they are), checked to match, identified alike, and what changed reported.

- `compare_models`: the standalone flow (`sparcom compare`).
- `compare_with_tuned`: the pipeline's last stage: the model against its tuned version,
  fine-tuned here (cached) unless the settings name one.
"""

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger

from flows.identify import identify_components
from sparcom.config import PipelineSettings
from sparcom.extraction.settings import ModelSettings
from sparcom.curation.records import CATEGORIES
from tasks.ablation import measure_ablation
from tasks.caching import Stage, refreshed
from tasks.comparison import check_comparable, compare_checkpoints
from tasks.curation import prepare_dataset_folder
from tasks.extraction import extract_activations
from tasks.finetuning import finetune_model

COMPONENTS = "components.zarr"


def comparison_run_dir(settings: PipelineSettings, base_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(settings.work_dir).resolve() / "runs" / f"{stamp}-compare-{Path(base_name).name.removesuffix('.zarr')}"


@flow(name="sparcom-compare")
def compare_models(
    settings: PipelineSettings = PipelineSettings(),
    base: ModelSettings | None = None,
    tuned: ModelSettings | None = None,
    base_store: Path | None = None,
    tuned_store: Path | None = None,
    focus_groups: list[str] | None = None,
) -> dict:
    """Each side is a model (extracted over `settings.dataset`) or a finished count store."""
    if (base is None) == (base_store is None) or (tuned is None) == (tuned_store is None):
        raise ValueError("give the base and the tuned side each as a model or as a store (one of the two)")
    run_dir = comparison_run_dir(settings, base.name if base else str(base_store))
    if base_store is None or tuned_store is None:
        dataset = prepare_dataset_folder(settings.dataset.path, Path(settings.work_dir) / "datasets")
        stores = [extract_activations(model, dataset, settings.extraction, settings.work_dir, settings.cache_dir,
                                      settings.dask)
                  for model in (base, tuned) if model is not None]
        base_store = base_store or stores.pop(0)
        tuned_store = tuned_store or stores.pop(0)
    check_comparable(base_store, tuned_store)
    identify_components(base_store, run_dir / "base", settings.identification, settings.dask,
                        artifact_prefix="sparcom-base")
    identify_components(tuned_store, run_dir / "tuned", settings.identification, settings.dask,
                        artifact_prefix="sparcom-tuned")
    summary = compare_checkpoints(run_dir / "base" / COMPONENTS, run_dir / "tuned" / COMPONENTS, run_dir,
                                  focus_groups or [], settings.comparison.top_movers)
    get_run_logger().info("Comparison is in %s", run_dir)
    return summary


@flow(name="sparcom-compare-with-tuned")
def compare_with_tuned(settings: PipelineSettings, dataset: Path, base_store: Path, run_dir: Path,
                       refresh: list[Stage] = []) -> dict:  # noqa: B006
    """`run_dir` holds the base model's components and report; the comparison goes beside them."""
    tuned = settings.comparison.tuned or refreshed(finetune_model, "finetune", refresh)(
        settings.model, settings.finetune, settings.work_dir, settings.cache_dir, held_out_dataset=dataset)
    tuned_store = refreshed(extract_activations, "extract", refresh)(
        tuned, dataset, settings.extraction, settings.work_dir, settings.cache_dir, settings.dask)
    check_comparable(base_store, tuned_store)
    identify_components(tuned_store, run_dir / "tuned", settings.identification, settings.dask, refresh,
                        artifact_prefix="sparcom-tuned")
    if settings.ablation.enabled and (run_dir / "ablation.json").exists():
        # The tuned model's own components, switched off on the tuned model, on the same records.
        refreshed(measure_ablation, "ablate", refresh)(
            run_dir / "tuned" / COMPONENTS, tuned_store, settings.ablation, settings.extraction,
            settings.cache_dir, run_dir / "tuned", prefix="sparcom-tuned", run_report=run_dir / "report.md",
            baseline=run_dir / "ablation.json")
    return refreshed(compare_checkpoints, "compare", refresh)(run_dir / COMPONENTS, run_dir / "tuned" / COMPONENTS, run_dir / "comparison",
                               fine_tuned_groups(settings), settings.comparison.top_movers,
                               run_report=run_dir / "report.md")


def fine_tuned_groups(settings: PipelineSettings) -> list[str]:
    """The groups the tuned model was trained on, where the pipeline fine-tuned it by category."""
    if settings.comparison.tuned is not None or settings.identification.group_by != "category":
        return []
    return list(settings.finetune.categories) or list(CATEGORIES)
