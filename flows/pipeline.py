"""The SPARCOM pipeline: curate -> extract -> identify -> analyse -> compare with a fine-tune."""

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger

from flows.compare import compare_with_tuned
from flows.identify import identify_components
from sparcom.config import PipelineSettings
from tasks.curation import curate_dataset
from tasks.extraction import extract_activations


def new_run_dir(settings: PipelineSettings) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(settings.work_dir).resolve() / "runs" / f"{stamp}-{Path(settings.model.name).name}"


@flow(name="sparcom-pipeline")
def sparcom_pipeline(settings: PipelineSettings = PipelineSettings()) -> dict:
    run_dir = new_run_dir(settings)
    dataset = curate_dataset(settings.dataset, settings.work_dir)
    store = extract_activations(settings.model, dataset, settings.extraction, settings.work_dir,
                                settings.cache_dir)
    summary = identify_components(store, run_dir, settings.identification, settings.dask)
    if settings.comparison.enabled:
        summary["comparison"] = compare_with_tuned(settings, dataset, store, run_dir)
    get_run_logger().info("Results are in %s", run_dir)
    return summary
