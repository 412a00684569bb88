"""The SPARCOM pipeline: curate -> extract -> identify -> analyse."""

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.config import PipelineSettings
from tasks.analysis import analyze_generality
from tasks.curation import curate_dataset
from tasks.extraction import extract_activations
from tasks.identification import identify_components


def new_run_dir(settings: PipelineSettings) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(settings.work_dir).resolve() / "runs" / f"{stamp}-{Path(settings.model.name).name}"


@flow(name="sparcom-pipeline")
def sparcom_pipeline(settings: PipelineSettings = PipelineSettings()) -> dict:
    run_dir = new_run_dir(settings)
    dataset = curate_dataset(settings.dataset, settings.work_dir)
    store = extract_activations(settings.model, dataset, settings.extraction, settings.work_dir,
                                settings.cache_dir)
    components = identify_components(store, settings.identification, run_dir)
    summary = analyze_generality(components, run_dir)
    get_run_logger().info("Results are in %s", run_dir)
    return summary
