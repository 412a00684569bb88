from pathlib import Path

from prefect import get_run_logger, task

from sparcom.provenance import curation_key
from tasks.caching import cached
from prefect.artifacts import create_markdown_artifact

from sparcom.config import CurationSettings, DatasetSettings
from sparcom.curation import Curation, balance_markdown, curate, save_curation
from sparcom.dataset import prepare_dataset
from sparcom.hexainst import authored_pool
from sparcom.packaged_sources import public_pool
from sparcom.record_files import file_pool
from sparcom.records import OnError, Pool
from sparcom.sources import SourceSpec


@task(name="curate dataset", **cached(lambda settings, work_dir: (
    curation_key(settings.path), str(Path(work_dir).resolve()))))
def curate_dataset(settings: DatasetSettings, work_dir: Path) -> Path:
    return prepare_dataset(settings.path, Path(work_dir) / "datasets")


@task(name="shipped AI-authored records")
def load_authored() -> Pool:
    return authored_pool()


@task(task_run_name="read {path}")
def load_user_dataset(path: Path, on_error: OnError) -> Pool:
    return file_pool(path, on_error)


@task(task_run_name="load public set {spec.name}")
def load_public_set(spec: SourceSpec) -> Pool:
    pool = public_pool(spec)  # offline, a packaged copy where one is named
    if pool.unavailable:
        get_run_logger().warning(pool.unavailable)
    return pool


@task(name="validate, deduplicate, limit and sample")
def curate_records(pools: list[Pool], settings: CurationSettings) -> Curation:
    return curate(pools, settings)


@task(name="save curated dataset")
def save_curated(curation: Curation, out: Path | None, work_dir: Path) -> Path:
    return save_curation(curation, out, Path(work_dir) / "datasets")


@task(name="publish balance report")
def publish_balance_report(curation: Curation) -> str:
    report = balance_markdown(curation)
    create_markdown_artifact(report, key="hexainst-balance",
                             description="HexaInst curation: balance and records in and out per input")
    return report
