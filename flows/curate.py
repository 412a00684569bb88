"""Curate HexaInst: gather the inputs -> validate, deduplicate, limit, sample -> save -> report."""

from pathlib import Path

from prefect import flow, get_run_logger

from sparcom.config import PipelineSettings
from tasks.curation import (
    curate_records,
    load_authored,
    load_public_set,
    load_user_dataset,
    publish_balance_report,
    save_curated,
)


@flow(name="curate-hexainst")
def curate_hexainst(settings: PipelineSettings = PipelineSettings()) -> dict:
    options = settings.curation
    pools = [load_authored()] if options.authored else []
    pools += [load_user_dataset(path, options.on_error) for path in options.inputs]
    pools += [load_public_set(spec) for spec in options.sources]
    curation = curate_records(pools, options)
    directory = save_curated(curation, options.out, Path(settings.work_dir) / "datasets")
    report = publish_balance_report(curation)
    get_run_logger().info("Curated dataset is in %s", directory)
    return {**curation.summary(), "directory": str(directory), "report": report}
