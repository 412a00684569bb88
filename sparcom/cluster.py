"""Where Dask computations run: an existing scheduler, or a local cluster sized to the machine.

- `dask_cluster(settings)`: a context manager yielding a `distributed.Client`, the default
  scheduler while it is open. With `settings.address` it connects to that scheduler (and on
  exit closes only the client); without, it starts a `LocalCluster` of one single-threaded
  worker process per usable core, each with an equal share of the memory, and on exit closes
  the client and the cluster, also on error.
- `usable_cores()`: the cores this process may run on.

    with dask_cluster(DaskSettings()) as client:
        identify_store(store, settings, out_dir)      # computes on the cluster
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

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
