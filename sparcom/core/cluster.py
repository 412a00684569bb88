"""Where Dask computations run: an existing scheduler, or a local cluster sized to the machine.

- `dask_cluster(settings)`: a context manager yielding a `distributed.Client`, the default
  scheduler while it is open. With `settings.address` it connects to that scheduler (and on
  exit closes only the client); without, it starts a `LocalCluster` of one single-threaded
  worker process per usable core, each with an equal share of the memory, and on exit closes
  the client and the cluster, also on error, quietly (`CLOSING_LOGGERS` silenced meanwhile).
- `dask_cluster_on_demand(settings, on_start)`: the same, started by the first Dask computation
  inside it, so work that turns out to be cached (a rerun) starts no cluster; `on_start(client)`
  is called once it is up.
- `usable_cores()`: the cores this process may run on (`sparcom.core.threads`).
- `extraction_cluster(settings, device, spread)`: where extraction shards run, as a context
  manager yielding a Client, or None for the single-process path: the scheduler at
  `settings.address`; else, with more than one visible GPU (or `n_workers` asked for), a local
  cluster of one worker per GPU, each pinned to its own device and declaring the resource
  `GPU=1` (dask-cuda's `LocalCUDACluster` where installed, else Nanny workers with their own
  `CUDA_VISIBLE_DEVICES`); else, with `n_workers` asked for, local CPU workers; else None.
  A model spread over several devices (`spread`) runs in one process. Local workers it starts
  keep glibc's adaptive allocator (Dask's memory trimming slows torch down) and wait passively
  in torch's OpenMP barriers (`sparcom.core.threads`: spinning threads collapse under load).
- `gpu_cluster_spec(devices, settings)`: the worker specs of that local GPU cluster.

    with dask_cluster(DaskSettings()) as client:
        identify_store(store, settings, out_dir)      # computes on the cluster
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster
from distributed.system import MEMORY_LIMIT

from sparcom.core.settings import DaskSettings
from sparcom.core.threads import WAIT_POLICY, usable_cores

GPU_RESOURCE = "GPU"
# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_ set, which fixes glibc's mmap
# threshold: every activation tensor of a forward pass is then mapped and faulted in afresh, and
# a one-thread extraction worker ran 1.3x slower than a plain process. Extraction workers get
# glibc's own adaptive allocator; identification workers keep Dask's memory trimming.
TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
# Read before any nanny starts here: nannies also write their value into this process's
# environment, from which every later worker would inherit it.
USER_TRIM_THRESHOLD = os.environ.get(TRIM_VARIABLE)


# Closing a cluster can log connections closing under pending heartbeats (CommClosedError, with
# a traceback) although nothing failed: these loggers of this process are silenced while it closes.
CLOSING_LOGGERS = ("distributed", "tornado", "asyncio")


@contextmanager
def _levels_restored(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _silence(names: tuple[str, ...]) -> None:
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@contextmanager
def dask_cluster(settings: DaskSettings = DaskSettings(), connect_timeout: str | None = None) -> Iterator[Client]:
    with ExitStack() as stack:
        stack.enter_context(_levels_restored(CLOSING_LOGGERS))  # entered first: left last
        if settings.address:
            try:
                client = Client(settings.address, timeout=connect_timeout or settings.connect_timeout)
            except OSError as error:
                raise ConnectionError(
                    f"no Dask scheduler answers at {settings.address} ({error})") from error
        else:
            cluster = stack.enter_context(LocalCluster(
                n_workers=settings.n_workers or usable_cores(),
                threads_per_worker=settings.threads_per_worker,
                memory_limit=settings.memory_limit,
                processes=True,
                host="127.0.0.1",
                dashboard_address=":0",  # a free port: never collides with another cluster
            ))
            client = Client(cluster)
        stack.enter_context(client)
        stack.callback(_silence, CLOSING_LOGGERS)  # registered last: runs first, before the closing
        yield client


@contextmanager
def extraction_cluster(settings: DaskSettings, device: str = "auto", spread: bool = False) -> Iterator[Client | None]:
    gpus = _visible_gpus() if device in ("auto", "cuda") and not spread else []
    with _worker_environment():
        yield from _extraction_client(settings, gpus)


@contextmanager
def _worker_environment() -> Iterator[None]:
    """Workers started inside it wait passively in OpenMP barriers and do not trim memory, unless
    the user's environment asks otherwise."""
    spawned = {f"distributed.nanny.pre-spawn-environ.{WAIT_POLICY}": os.environ.get(WAIT_POLICY, "PASSIVE")}
    if USER_TRIM_THRESHOLD is not None:
        with dask.config.set(spawned):
            yield
        return
    set_by_a_nanny = os.environ.pop(TRIM_VARIABLE, None)
    try:
        with dask.config.set({**spawned, f"distributed.nanny.pre-spawn-environ.{TRIM_VARIABLE}": None}):
            yield
    finally:
        if set_by_a_nanny is not None:
            os.environ[TRIM_VARIABLE] = set_by_a_nanny


def _extraction_client(settings: DaskSettings, gpus: list[str]) -> Iterator[Client | None]:
    if settings.address or (settings.n_workers and not gpus):
        with dask_cluster(settings) as client:
            yield client
    elif len(gpus) > 1 or (gpus and settings.n_workers):
        devices = gpus[:settings.n_workers or len(gpus)]
        with _local_gpu_cluster(devices, settings) as cluster, Client(cluster) as client:
            yield client
    else:
        yield None


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (named or [str(i) for i in range(count)])[:count]


def gpu_cluster_spec(devices: list[str], settings: DaskSettings) -> tuple[dict, dict]:
    """(scheduler, workers) of a SpecCluster: one Nanny per device, seeing only that device."""
    memory = settings.memory_limit if settings.memory_limit != "auto" else MEMORY_LIMIT // len(devices)
    workers = {f"gpu-{device}": {"cls": Nanny, "options": {
        "nthreads": settings.threads_per_worker, "memory_limit": memory, "host": "127.0.0.1",
        "resources": {GPU_RESOURCE: 1}, "env": {"CUDA_VISIBLE_DEVICES": device}, "dashboard": False,
    }} for device in devices}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return scheduler, workers


def _local_gpu_cluster(devices: list[str], settings: DaskSettings):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        scheduler, workers = gpu_cluster_spec(devices, settings)
        return SpecCluster(workers=workers, scheduler=scheduler)
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices, n_workers=len(devices), threads_per_worker=settings.threads_per_worker,
        memory_limit=settings.memory_limit, resources={GPU_RESOURCE: 1}, host="127.0.0.1",
        dashboard_address=":0")


@contextmanager
def dask_cluster_on_demand(settings: DaskSettings = DaskSettings(),
                           on_start: Callable[[Client], None] = lambda client: None) -> Iterator[None]:
    """Until the first computation the default scheduler is a stand-in that opens the cluster;
    the cluster's client is the default scheduler from then on."""
    previous = dask.config.get("scheduler", None)
    with ExitStack() as stack:
        started: list[Client] = []

        def start_and_compute(graph, keys, **kwargs):
            if not started:
                with dask.config.set(scheduler=previous):  # workers are sent the config: no closures in it
                    started.append(stack.enter_context(dask_cluster(settings)))
                on_start(started[0])
            return started[0].get(graph, keys, **kwargs)

        # Entered first, left last: the client restores this stand-in when it closes, then it goes too.
        stack.enter_context(dask.config.set(scheduler=start_and_compute))
        yield
