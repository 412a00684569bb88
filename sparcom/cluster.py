"""Where Dask computations run: an existing scheduler, or a local cluster sized to the machine.

- `dask_cluster(settings)`: a context manager yielding a `distributed.Client`, the default
  scheduler while it is open. With `settings.address` it connects to that scheduler (and on
  exit closes only the client); without, it starts a `LocalCluster` of one single-threaded
  worker process per usable core, each with an equal share of the memory, and on exit closes
  the client and the cluster, also on error.
- `dask_cluster_on_demand(settings, on_start)`: the same, started by the first Dask computation
  inside it, so work that turns out to be cached (a rerun) starts no cluster; `on_start(client)`
  is called once it is up.
- `usable_cores()`: the cores this process may run on.

    with dask_cluster(DaskSettings()) as client:
        identify_store(store, settings, out_dir)      # computes on the cluster
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import dask
from distributed import Client, LocalCluster

from sparcom.config import DaskSettings



def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def dask_cluster(settings: DaskSettings = DaskSettings(), connect_timeout: str = "30s") -> Iterator[Client]:
    with ExitStack() as stack:
        if settings.address:
            try:
                client = Client(settings.address, timeout=connect_timeout)
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
        yield client


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
