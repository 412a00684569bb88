"""The SPARCOM pipeline: curate -> extract (-> attribute, for the rules that read effect estimates)
-> identify -> analyse -> ablate -> compare with a fine-tune, the last three for each selection rule of
the run (`identification.rules`), each in its own run folder -> findings of every rule (first in
each rule's report and the run's first artifact)."""

from pathlib import Path

from prefect import flow, get_run_logger

from flows.compare import compare_with_tuned
from flows.identify import artifact_prefixes, identify_components
from flows.naming import run_name
from sparcom.config import PipelineSettings
from sparcom.identification.keys import results_dir
from sparcom.identification.schema import COMPONENTS, REPORT
from tasks.ablation import add_ablation_to_report, hold_out, measure_ablation
from tasks.attribution import attribute_responses
from tasks.caching import Stage, refreshed
from tasks.curation import prepare_dataset_folder
from tasks.extraction import extract_activations
from tasks.findings import add_findings, publish_findings


@flow(name="sparcom-pipeline", flow_run_name=run_name)
def sparcom_pipeline(settings: PipelineSettings = PipelineSettings(), refresh: list[Stage] = []) -> dict:  # noqa: B006
    """Every stage is cached on its content; `refresh` names stages to recompute regardless.
    Returns the first rule's summary, with every rule's under `rules`."""
    dataset = refreshed(prepare_dataset_folder, "curate", refresh)(
        settings.dataset.path, Path(settings.work_dir) / "datasets")
    if settings.ablation.enabled and settings.ablation.held_out_fraction:
        dataset, held_out = hold_out(dataset, settings.ablation.held_out_fraction, settings.ablation.seed,
                                     settings.work_dir)
        settings = settings.evaluated_on(held_out)
    store = refreshed(extract_activations, "extract", refresh)(
        settings.model, dataset, settings.extraction, settings.work_dir, settings.cache_dir, settings.dask)
    if settings.needs_attribution():
        attribution = refreshed(attribute_responses, "attribute", refresh)(
            settings.model, dataset, settings.attribution, settings.extraction, settings.work_dir,
            settings.cache_dir, settings.dask)
        settings = settings.identified_with(attribution)
    rules = settings.identification.selected_rules()
    run_dirs = {rule: results_dir(settings.work_dir, store, settings.identification.for_rule(rule)) for rule in rules}
    summaries = identify_components(store, run_dirs, settings.identification, settings.dask, refresh)
    prefixes = artifact_prefixes("sparcom", rules)
    for rule, run_dir in run_dirs.items():
        if settings.ablation.enabled:
            summaries[rule]["ablation"] = refreshed(measure_ablation, "ablate", refresh)(
                run_dir / COMPONENTS, store, settings.ablation, settings.extraction, settings.cache_dir, run_dir,
                prefix=prefixes[rule], model=settings.model, dask=settings.dask, passes_dir=settings.passes_dir())
            add_ablation_to_report(run_dir / REPORT, summaries[rule]["ablation"])
    if settings.comparison.enabled:
        for rule, comparison in compare_with_tuned(settings, dataset, store, run_dirs, refresh).items():
            summaries[rule]["comparison"] = comparison
    findings = refreshed(add_findings, "findings", refresh)(list(run_dirs.values()))
    publish_findings(findings)
    get_run_logger().info("Results are in %s", ", ".join(map(str, run_dirs.values())))
    return {**summaries[rules[0]], "rules": summaries, "findings": findings}
