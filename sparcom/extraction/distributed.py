"""Extraction of one store on a Dask cluster: shards counted in tasks, each worker keeps its model loaded.

- `extract_on_cluster(client, model, records, store, settings, resources, cache_dir)`: every
  missing shard of the store, counted in tasks of a few shards (`shard_tasks`). First the model
  is loaded on every worker that offers `resources` (a bad device map or a missing model fails
  there, before anything is written); then each task counts its shards' instructions with that
  worker's model and writes each whole shard with its done flag (`extract_to_store(...,
  shards=...)`). A task whose worker is lost is rerun elsewhere: the shards whose flags were not
  set are rewritten whole, those whose flags were set are skipped. The client marks the store
  complete and records, per shard, the worker, host and devices that filled it (store
  attribute `shard_fillers`). Its steps: `cluster_extraction_key` (the workers must load the
  model alike), then `fill_store_on_cluster`.
- `fill_store_on_cluster(client, records, store, settings, resources, workers, key, ...)`: any
  store of shards (counts, attribution estimates) filled on the workers by a function of the
  worker's model: `resumable_shards` (what the store holds already), `shard_submitter` (one task
  of shards to the cluster), `fill_on_workers` (one task per free worker until none is left),
  and the store finished once every shard is in. `fill_with_worker_model(model, settings,
  cache_dir, shards, fill)` runs `fill(loaded)` on a worker with its kept model.
- `loaded_alike(loads)`: the (fingerprint, dtype) every worker loaded; refused when they differ.
- `shard_tasks(costs, workers)`: the shards grouped into tasks, costliest first. A task's
  instructions are sorted by length together, as the single-process path sorts
  SORT_WINDOW_SHARDS shards together, so its batches are fuller; the tasks shrink to single
  shards at the end, so the workers finish together.
- `shard_cost(records, shard, settings)`: the characters a shard's passes read, known before any
  tokenizer loads. Tasks are handed out in order, one to each worker that is free.
- `shard_resources(dask, extraction)`: the resources a task asks for: `dask.shard_resources`,
  or GPU=1 when the extraction device is cuda.
- `load_on_workers(client, model, settings, cache_dir, workers)`: the model loaded on each worker.
- `worker_model(model, settings, cache_dir)`: this worker process's model for these settings,
  loaded on first use and kept (one model per process: a second settings key replaces it).
- `held_model(model, settings, cache_dir)`: that model, held by one task at a time (hooks and
  in-place edits act on the whole model); the ablation's passes run on it too.
- `worker_place(model, settings, cache_dir, loaded)`: which worker, host and devices ran a task.
- `task_shards(key)`: the shards of a task, from its Dask key (`sparcom-shards-...`).

    with extraction_cluster(DaskSettings(address="tcp://10.0.0.5:8786")) as client:
        extract_on_cluster(client, ModelSettings(name="..."), records, store, ExtractionSettings(), ...)
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import zarr
from distributed import Client, Future, as_completed, get_worker
from tqdm.auto import tqdm

from sparcom.core.cluster import GPU_RESOURCE
from sparcom.core.hashing import content_hash
from sparcom.core.models import LoadedModel, load_model, resolve_model
from sparcom.core.settings import DaskSettings
from sparcom.curation.records import InstructionRecord, dataset_hash
from sparcom.extraction.extract import SORT_WINDOW_SHARDS, ProgressCallback, extract_to_store, shard_range
from sparcom.extraction.keys import extraction_key
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import (
    KEY,
    StoreError,
    finalize_store,
    finished_shards,
    is_complete,
    shard_count,
    store_attrs,
)

FILLERS = "shard_fillers"
TASK_PREFIX = "sparcom-shards-"
# Each task takes at most 1 / (TASKS_PER_WORKER x workers) of the shards left. With single
# shards as tasks, 300 instructions in shards of 32 were counted in 70 batches of 4.3 rows,
# against 23 batches of 13 rows in one process; with two tasks of equal characters per worker,
# one worker of two sat idle for the last 11% of the run (the tasks took 22-27 s).
TASKS_PER_WORKER = 2
WORKER_WAIT = 30  # seconds to wait for a first worker of a freshly started or connected cluster

# One model per worker process, used by one shard at a time: the counting hooks of two shards on
# one model would see each other's forward passes.
_model_lock = threading.Lock()
_loaded: dict[str, LoadedModel] = {}
_loads: dict[str, int] = {}


class ClusterError(RuntimeError):
    pass


def shard_resources(dask: DaskSettings, extraction: ExtractionSettings) -> dict[str, float]:
    if dask.shard_resources is not None:
        return dask.shard_resources
    return {GPU_RESOURCE: 1} if extraction.device.startswith("cuda") else {}


def _model_key(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path) -> str:
    return content_hash(model, settings.dtype, settings.device, str(cache_dir))


def worker_model(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path) -> LoadedModel:
    """Call with `_model_lock` held."""
    key = _model_key(model, settings, cache_dir)
    if key not in _loaded:
        _loaded.clear()  # free the previous model before loading the next
        try:  # torch's own threads would oversubscribe a machine shared by several workers
            torch.set_num_threads(get_worker().state.nthreads)
        except ValueError:  # not on a worker
            pass
        source = resolve_model(model.name, model.revision, model.trust_remote_code)
        _loaded[key] = load_model(source, cache_dir, settings.dtype, settings.device, model.trust_remote_code,
                                  model.device_map, model.max_memory)
        _loads[key] = _loads.get(key, 0) + 1
    return _loaded[key]


@contextmanager
def held_model(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path) -> Iterator[LoadedModel]:
    with _model_lock:
        yield worker_model(model, settings, cache_dir)


def worker_place(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path, loaded: LoadedModel) -> dict:
    """Which worker, host and devices: the record of a filled shard."""
    key = _model_key(model, settings, cache_dir)
    return {"worker": get_worker().address, "host": socket.gethostname(), "pid": os.getpid(),
            "devices": loaded.devices, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "model_loads": _loads[key]}


def _load(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path) -> dict:
    with held_model(model, settings, cache_dir) as loaded:
        return {"fingerprint": loaded.fingerprint, "dtype": loaded.dtype,
                **worker_place(model, settings, cache_dir, loaded)}


def fill_with_worker_model(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path, shards: list[int],
                           fill: Callable[[LoadedModel], object]) -> dict:
    """`fill(loaded)` with this worker's model; the shards and where they were filled."""
    with held_model(model, settings, cache_dir) as loaded:
        fill(loaded)
        return {"shards": shards, **worker_place(model, settings, cache_dir, loaded)}


def _fill_shards(model: ModelSettings, settings: ExtractionSettings, cache_dir: Path, donors: Sequence[Path],
                 records: Sequence[InstructionRecord], store: Path, shards: list[int]) -> dict:
    return fill_with_worker_model(model, settings, cache_dir, shards, lambda loaded: extract_to_store(
        loaded, records, store, settings, shards=shards, donors=donors, finalize=False, show_progress=False))


def offering_workers(client: Client, resources: dict[str, float]) -> list[str]:
    """Addresses of the workers that offer `resources`; a clear error when none does."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT)
    except TimeoutError:
        raise ClusterError(f"the Dask cluster at {client.scheduler.address} has no workers "
                           f"(none joined within {WORKER_WAIT} s)") from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    offering = [address for address, info in workers.items()
                if all(info.get("resources", {}).get(name, 0) >= amount for name, amount in resources.items())]
    if not offering:
        wanted = " ".join(f"{name}={amount:g}" for name, amount in resources.items())
        raise ClusterError(
            f"no worker of the Dask cluster at {client.scheduler.address} offers the resources {wanted} "
            f"that extraction shards ask for ({len(workers)} workers; start them with `dask worker "
            f"--resources \"{wanted}\"`, or set dask.shard_resources)")
    return offering


def load_on_workers(client: Client, model: ModelSettings, settings: ExtractionSettings, cache_dir: Path,
                    workers: Sequence[str]) -> list[dict]:
    """Load (or find loaded) the model on each worker, in parallel: what each loaded, and where."""
    return client.gather([client.submit(_load, model, settings, Path(cache_dir), workers=[w],
                                        allow_other_workers=True, pure=False, key=f"sparcom-load-{w}")
                          for w in workers])


def extract_on_cluster(
    client: Client,
    model: ModelSettings,
    records: Sequence[InstructionRecord],
    store: Path,
    settings: ExtractionSettings,
    resources: dict[str, float],
    cache_dir: Path,
    donors: Sequence[Path] = (),
    on_progress: ProgressCallback | None = None,
    shards: Iterable[int] | None = None,
) -> Path:
    """The store, complete unless `shards` left some out."""
    store = Path(store).resolve()  # workers may run in other directories
    workers = offering_workers(client, resources)
    key = cluster_extraction_key(load_on_workers(client, model, settings, cache_dir, workers), records, settings)
    return fill_store_on_cluster(
        client, records, store, settings, resources, workers, key, KEY, _fill_shards,
        (model, settings, Path(cache_dir), [Path(d).resolve() for d in donors]), on_progress, shards)


def fill_store_on_cluster(client: Client, records: Sequence[InstructionRecord], store: Path,
                          settings: ExtractionSettings, resources: dict[str, float], workers: Sequence[str],
                          key: str, key_name: str, fill: Callable[..., dict], arguments: tuple,
                          on_progress: ProgressCallback | None = None, shards: Iterable[int] | None = None) -> Path:
    """Every missing shard of `store` (whose `key_name` attribute is `key`), filled in tasks
    `fill(*arguments, records, store, shards)`; the store finished once every shard is in."""
    n_shards = shard_count(len(records), settings.shard_size)
    done = resumable_shards(store, key, key_name)
    if done is None:
        return store
    wanted = sorted(set(range(n_shards) if shards is None else shards) - done)
    submit = shard_submitter(client, records, store, resources, key, fill, arguments)
    tasks = shard_tasks({shard: shard_cost(records, shard, settings) for shard in wanted}, len(workers))
    fill_on_workers(client, submit, tasks, len(workers), store, records, settings, done, on_progress)
    if len(finished_shards(store)) == n_shards:
        finalize_store(store)
    return store


def loaded_alike(loads: Sequence[dict]) -> tuple[str, object]:
    """The (fingerprint, dtype) every worker loaded; refused when they loaded the model differently."""
    kinds = {(load["fingerprint"], str(load["dtype"])) for load in loads}
    if len(kinds) > 1:  # e.g. bfloat16 on GPU workers beside float32 on CPU ones: results would mix
        raise ClusterError(f"workers load the model differently (fingerprint, dtype): {sorted(kinds)}; "
                           "set the dtype, or restrict shards with dask.shard_resources")
    return loads[0]["fingerprint"], loads[0]["dtype"]


def cluster_extraction_key(loads: Sequence[dict], records: Sequence[InstructionRecord],
                           settings: ExtractionSettings) -> str:
    """The store's extraction key, from what the workers loaded."""
    fingerprint, dtype = loaded_alike(loads)
    return extraction_key(fingerprint, dataset_hash(records), settings, dtype)


def resumable_shards(store: Path, key: str, key_name: str = KEY) -> set[int] | None:
    """The shards `store` already holds for `key` (none where there is no store yet); None when
    the store is complete. A store of other results is refused."""
    if not store.exists():
        return set()
    if store_attrs(store).get(key_name) != key:
        raise StoreError(f"{store}: holds results for other settings, model or dataset; "
                         "choose another path or delete it")
    if is_complete(store):
        return None
    return finished_shards(store)


def shard_submitter(client: Client, records: Sequence[InstructionRecord], store: Path, resources: dict[str, float],
                    key: str, fill: Callable[..., dict], arguments: tuple) -> Callable[[list[int]], Future]:
    """A function that submits one task of shards to the cluster, `fill(*arguments, records,
    store, shards)`; the records are scattered once, here."""
    shared_records = client.scatter(list(records), broadcast=False, hash=False)

    def submit(task: list[int]) -> Future:
        return client.submit(
            fill, *arguments, shared_records, store, task, resources=resources or None, pure=False,
            key=f"{TASK_PREFIX}{key[:12]}-{'_'.join(map(str, task))}")

    return submit


def fill_on_workers(client: Client, submit: Callable[[list[int]], Future], tasks: list[list[int]], workers: int,
                    store: Path, records: Sequence[InstructionRecord], settings: ExtractionSettings,
                    done: set[int], on_progress: ProgressCallback | None = None) -> None:
    """The tasks' shards filled, recording who filled each; every task left is cancelled on an error."""
    # Tasks are handed out one per free worker, in order: submitted all at once with priorities,
    # the scheduler ran single shards meant for the end first, and the costliest task last.
    pending = iter(tasks)
    futures = []
    running = as_completed()

    def submit_next() -> None:
        task = next(pending, None)
        if task is not None:
            futures.append(submit(task))
            running.add(futures[-1])

    def instructions(shards: Iterable[int]) -> int:
        return sum(len(shard_range(s, settings.shard_size, len(records))) for s in shards)

    counted = instructions(done)
    progress = tqdm(total=shard_count(len(records), settings.shard_size), initial=len(done), unit="shard",
                    desc=f"filling shards on {workers} workers")
    try:
        for _ in range(workers):
            submit_next()
        for future in running:
            filled = future.result()
            submit_next()
            _record_fillers(store, filled)
            counted += instructions(filled["shards"])
            progress.update(len(filled["shards"]))
            if on_progress:
                on_progress(counted, len(records))
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        progress.close()


def shard_tasks(costs: dict[int, int], workers: int) -> list[list[int]]:
    """Shards (shard -> cost) in tasks, costliest first: the costliest shards go first, in tasks
    of 1 / (TASKS_PER_WORKER x workers) of the shards left (at most SORT_WINDOW_SHARDS), so the
    tasks shrink to single shards at the end, which whichever worker is free takes; each task's
    shards in order."""
    left = sorted(costs, key=lambda s: (-costs[s], s))
    tasks: list[list[int]] = []
    while left:
        size = min(SORT_WINDOW_SHARDS, math.ceil(len(left) / (TASKS_PER_WORKER * workers)))
        tasks.append(sorted(left[:size]))
        left = left[size:]
    return tasks


def task_shards(key: str) -> list[int]:
    """'sparcom-shards-<store key>-3_7_12' -> [3, 7, 12]."""
    if not key.startswith(TASK_PREFIX):
        raise ValueError(f"{key!r} is not an extraction task's key")
    return [int(shard) for shard in key.rsplit("-", 1)[1].split("_")]


def shard_cost(records: Sequence[InstructionRecord], shard: int, settings: ExtractionSettings) -> int:
    """The characters a shard's forward passes read: its cost, known before any tokenizer loads."""
    rows = [records[i] for i in shard_range(shard, settings.shard_size, len(records))]
    with_response = settings.span == "response"
    return sum(len(r.user_turn()) + (len(r.response) if with_response else 0) for r in rows)


def _record_fillers(store: Path, filled: dict) -> None:
    """Only the client writes the store's attributes while workers write shards."""
    attrs = zarr.open_group(store, mode="r+").attrs
    fillers = dict(attrs.get(FILLERS, {}))
    where = {k: v for k, v in filled.items() if k != "shards"}
    fillers.update({str(shard): where for shard in filled["shards"]})
    attrs[FILLERS] = fillers
