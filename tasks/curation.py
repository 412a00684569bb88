"""Curation tasks: the pipeline's dataset stage, and the steps of the `curate-hexainst` flow.

- `prepare_dataset_folder(path, datasets_dir)`: `sparcom.curation.starter.prepare_dataset` as the
  pipeline's cached curate stage (a file, or the starter set, saved under its content hash).
- `load_authored`, `load_user_dataset`, `load_public_set`: one input pool each
  (`authored_pool`, `file_pool`, `public_pool`).
- `curate_records`, `save_curated`: validate, deduplicate, limit and sample; save
  (`sparcom.curation.curate.curate`, `save_curation`).
- `publish_balance_report`: the balance report as the `hexainst-balance` artifact.
"""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from sparcom.curation.curate import Curation, balance_markdown, curate, save_curation
from sparcom.curation.hexainst import authored_pool
from sparcom.curation.keys import curation_key
from sparcom.curation.packaged_sources import public_pool
from sparcom.curation.record_files import file_pool
from sparcom.curation.records import Pool
from sparcom.curation.sources import SourceSpec
from sparcom.curation.starter import prepare_dataset
from tasks.caching import cached

prepare_dataset_folder = task(prepare_dataset, name="curate dataset", **cached(lambda path, datasets_dir: (
    curation_key(path), str(Path(datasets_dir).resolve()))))


load_authored = task(authored_pool, name="shipped AI-authored records")
load_user_dataset = task(file_pool, name="load_user_dataset", task_run_name="read {path}")


@task(task_run_name="load public set {spec.name}")
def load_public_set(spec: SourceSpec) -> Pool:
    pool = public_pool(spec)  # offline, a packaged copy where one is named
    if pool.unavailable:
        get_run_logger().warning(pool.unavailable)
    return pool


curate_records = task(curate, name="validate, deduplicate, limit and sample")
save_curated = task(save_curation, name="save curated dataset")


@task(name="publish balance report")
def publish_balance_report(curation: Curation) -> str:
    report = balance_markdown(curation)
    create_markdown_artifact(report, key="hexainst-balance",
                             description="HexaInst curation: balance and records in and out per input")
    return report
