"""Content-addressed caching for the pipeline's tasks.

A task's result is cached under a key computed from the content it depends on (dataset hash,
model fingerprint, stage settings, the stage's code version: `sparcom.stages` and each stage's `keys` module), never from
run ids, and persisted to Prefect's result storage (`PREFECT_LOCAL_STORAGE_PATH`, or any block
set as `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`), so a rerun in a new process is a cache hit.

    @task(name="extract activation counts", **cached(lambda model, dataset_dir, ...: (...)))

A cached result whose output is gone or no longer verifies (`sparcom.stages.unusable_output`)
is not used: the stage recomputes, with a warning saying why, under a key derived from the old
one, so the next plain rerun is a cache hit again.
"""

from collections.abc import Callable
from typing import Literal

from prefect import Task, get_run_logger

from sparcom.core.hashing import content_hash
from sparcom.stages import STAGES, unusable_output

MAX_HEALS = 100  # keys tried past unusable cached results before recomputing under the last

Stage = Literal[tuple(STAGES)]


def cached(key: Callable[..., object]) -> dict:
    """Task options: cache under a hash of key(**the task's parameters), persist the result."""

    def cache_key(context, parameters: dict) -> str:
        return healthy_key(context.result_store, content_hash(key(**parameters)), context.task.name)

    return {"cache_key_fn": cache_key, "persist_result": True}


def healthy_key(store, key: str, name: str) -> str:
    """`key`, or the first key derived from it whose cached result is usable or absent."""
    problem = None
    for _ in range(MAX_HEALS):
        if not store.exists(key):
            break
        try:
            unusable = unusable_output(store.read(key).result)
        except Exception as error:  # noqa: BLE001 - an unreadable record is as good as none
            unusable = f"its record cannot be read ({error})"
        if unusable is None:
            return key
        problem = problem or unusable
        key = content_hash(key, "recomputed")
    if problem:
        get_run_logger().warning("%s: the cached result cannot be used (%s); recomputing", name, problem)
    return key


def refreshed(task: Task, stage: str, refresh: list[str]) -> Task:
    """The task, forced to recompute when its stage is named in `refresh`."""
    return task.with_options(refresh_cache=True) if stage in refresh else task
