"""The Dask workers that run a model: each loads it once and lends it to one task at a time;
extraction's shards and the ablation's passes run on them.

- `shard_resources(dask, extraction)`: the resources a task asks for: `dask.shard_resources`,
  or GPU=1 when the extraction device is cuda.
- `offering_workers(client, resources)`: the workers that offer them; a clear error when none does.
- `load_on_workers(client, model, settings, cache_dir, workers)`: the model loaded on each worker:
  its fingerprint and dtype, and where.
- `worker_model(model, settings, cache_dir)`: this worker process's model for these settings,
  loaded on first use and kept (one model per process: a second settings key replaces it).
- `held_model(model, settings, cache_dir)`: that model, held by one task at a time: counting
  hooks, switch-off hooks and in-place zeroed rows act on the whole model, so two tasks on one
  model (a worker of several threads) would see each other's.
- `worker_place(model, settings, cache_dir, loaded)`: which worker, host and devices ran a task.
- `ClusterError`: a cluster that cannot run the tasks.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from distributed import Client, get_worker

from sparcom.core.cluster import GPU_RESOURCE
from sparcom.core.hashing import content_hash
from sparcom.core.models import LoadedModel, load_model, resolve_model
from sparcom.core.settings import DaskSettings
from sparcom.extraction.settings import ExtractionSettings, ModelSettings

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
            f"that the tasks ask for ({len(workers)} workers; start them with `dask worker "
            f"--resources \"{wanted}\"`, or set dask.shard_resources)")
    return offering


def load_on_workers(client: Client, model: ModelSettings, settings: ExtractionSettings, cache_dir: Path,
                    workers: Sequence[str]) -> list[dict]:
    """Load (or find loaded) the model on each worker, in parallel: what each loaded, and where."""
    return client.gather([client.submit(_load, model, settings, Path(cache_dir), workers=[w],
                                        allow_other_workers=True, pure=False, key=f"sparcom-load-{w}")
                          for w in workers])
