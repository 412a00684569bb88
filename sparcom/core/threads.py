"""torch's CPU threads on a machine shared with other work (docs/method.md section 6, "Contention").

torch runs its operators on an OpenMP team of threads (libgomp), whose threads wait for each
other at the end of every operator by spinning (OMP_WAIT_POLICY active, libgomp's default). On a
loaded machine a spinning thread burns the time slice its partner needs: with two `yes` loops on
2 cores, a 2-thread forward pass fell from 99 to 12 records/s, while one thread only fell from 63
to 46. Waiting passively (threads sleep at the barrier) brought the 2-thread pass back to 43.

- `WAIT_POLICY`: the environment variable, read once, when torch loads OpenMP.
- `wait_passively()`: sets OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; effective for
  this process only before torch is imported (the command line calls it first), and for every
  process started from here afterwards (local Dask workers).
- `usable_cores()`: the cores this process may run on (its CPU affinity).
- `fit_torch_threads(wanted)`: torch's intra-op threads: `wanted` (default: torch's own choice)
  but never more than the cores this process may run on (CPU affinity, e.g. `taskset`, a
  container's cpuset): more threads than cores spin against each other.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def wait_passively() -> None:
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_torch_threads(wanted: int | None = None) -> int:
    """The threads torch uses from now on in this process."""
    import torch

    threads = max(1, min(wanted or torch.get_num_threads(), usable_cores()))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
