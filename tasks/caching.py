"""Content-addressed caching for the pipeline's tasks.

A task's result is cached under a key computed from the content it depends on (dataset hash,
model fingerprint, stage settings, the stage's code version: `sparcom.provenance`), never from
run ids, and persisted to Prefect's result storage (`PREFECT_LOCAL_STORAGE_PATH`, or any block
set as `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`), so a rerun in a new process is a cache hit.

    @task(name="extract activation counts", **cached(lambda model, dataset_dir, ...: (...)))
"""

from collections.abc import Callable
from typing import Literal

from prefect import Task

from sparcom.provenance import content_hash

Stage = Literal["curate", "extract", "identify", "analyse", "finetune", "compare", "ablate"]


def cached(key: Callable[..., object]) -> dict:
    """Task options: cache under a hash of key(**the task's parameters), persist the result."""

    def cache_key(context, parameters: dict) -> str:
        return content_hash(key(**parameters))

    return {"cache_key_fn": cache_key, "persist_result": True}


def refreshed(task: Task, stage: str, refresh: list[str]) -> Task:
    """The task, forced to recompute when its stage is named in `refresh`."""
    return task.with_options(refresh_cache=True) if stage in refresh else task
