"""Identification at model scale: synthetic count stores the size of a 7B dense model
(1,200 x 32 x 14,336) and of an 8-expert MoE layer stack (Mixtral-like: 32 x 8 x 14,336 expert
neurons), identified on a local Dask cluster. Prints, per selection rule, wall time, peak memory
(this process plus every worker, sampled) and throughput (GB of counts read per second), beside
the time of one plain read-and-sum of every chunk of the same store on the same cluster (the
least any identification can cost), with the ratios and the load average of the same run. The
store is read again after each rule, and the ratios are to the mean of the reads around it.

    python benchmarks/identify.py                      # both stores, 2 workers, the paper's rule
    python benchmarks/identify.py --which dense --rules global_percentile,lape,contrastive
    python benchmarks/identify.py --which dense --group-by instruction
    python benchmarks/identify.py --which moe --instructions 240 --dir /data/bench

The stores are written chunk by chunk (never whole in memory) with the extraction's chunking,
into --dir (a temporary folder by default, removed at the end unless --keep). With --reuse the
stores stay in --dir itself, and a later run with the same sizes reads them again unwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import psutil
import xarray as xr

from sparcom.core.cluster import dask_cluster
from sparcom.core.settings import DaskSettings
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify_store
from sparcom.identification.schema import FAMILIES
from sparcom.curation.records import CATEGORIES
from sparcom.core.drawing import Drawing
from sparcom.identification.report import report_generality
from sparcom.extraction.store import is_complete, open_store, seal_store, verify_store

SHARD = 32  # instructions per chunk, as extraction writes them
SHAPES = {
    "dense": {"act_count": (("layer", "neuron"), (32, 14336), 8)},
    "moe": {"expert_count": (("moe_layer", "expert"), (32, 8), 32),
            "expert_act_count": (("moe_layer", "expert", "expert_neuron"), (32, 8, 14336), 2)},
}


def _random_counts(block: np.ndarray, tokens: np.ndarray, block_id: tuple) -> np.ndarray:
    """Counts no larger than the instruction's tokens, skewed to small values like real ones."""
    rng = np.random.default_rng(abs(hash(block_id)) % 2**32)
    uniform = rng.random(block.shape, dtype=np.float32)
    np.multiply(uniform, uniform, out=uniform)
    np.multiply(uniform, tokens.reshape(-1, *[1] * (block.ndim - 1)), out=uniform)
    return uniform.astype(np.uint32)


def write_synthetic_store(path: Path, kind: str, n: int) -> int:
    """The store in the contract's layout; returns the bytes of its count variables."""
    tokens = np.random.default_rng(0).integers(40, 600, n).astype(np.uint32)
    token_chunks = da.from_array(tokens, chunks=SHARD)
    variables = {"token_count": (("instruction",), token_chunks)}
    for name, (dims, sizes, layer_chunk) in SHAPES[kind].items():
        template = da.empty((n, *sizes), dtype=np.uint32, chunks=(SHARD, layer_chunk, *sizes[1:]))
        counts = da.map_blocks(_random_counts, template, token_chunks.reshape(-1, *[1] * len(sizes)),
                               dtype=np.uint32)
        variables[name] = (("instruction", *dims), counts)
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731
    store = xr.Dataset(variables, coords={
        "instruction_id": ("instruction", strings([f"b-{i:05d}" for i in range(n)])),
        "category": ("instruction", strings([CATEGORIES[i % len(CATEGORIES)] for i in range(n)])),
        "origin": ("instruction", strings(["ai", "human"] * (n // 2) + ["ai"] * (n % 2))),
    }, attrs={"model": f"synthetic-{kind}", "model_fingerprint": "0" * 64, "dataset_hash": "0" * 64,
              "token_span": "prompt", "sparcom_status": "complete"})
    with warnings.catch_warnings(), dask.config.set(scheduler="threads"):
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        store.to_zarr(path, mode="w", zarr_format=3, consolidated=True)
    seal_store(path)
    return sum(store[f.count].nbytes for f in FAMILIES if f.count in store)


class PeakMemory:
    """Peak resident memory of this process and all its children, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a process that just ended
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakMemory:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_read(store: Path) -> None:
    """Read and sum every chunk of every count variable once, on the current Dask scheduler."""
    opened = open_store(store)
    dask.compute(*[opened[f.count].data.sum(axis=0, dtype=np.uint64) for f in FAMILIES if f.count in opened])


@contextlib.contextmanager
def plot_wait():
    """Seconds the stage waits for its plots (drawn on the workers while it writes its data),
    measured in the stage's own run."""
    spent = [0.0]
    write = Drawing.write

    def timed_write(*args):
        started = time.perf_counter()
        try:
            return write(*args)
        finally:
            spent[0] += time.perf_counter() - started

    Drawing.write = timed_write
    try:
        yield spent
    finally:
        Drawing.write = write


def timed(work) -> tuple[float, int]:
    """(seconds, peak memory of this process and the workers) of one call."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started, memory.peak


def bench(kind: str, n: int, folder: Path, args: argparse.Namespace) -> None:
    store = folder / f"{kind}-{n}.zarr"
    started = time.perf_counter()
    if args.reuse and is_complete(store):
        opened = open_store(store)
        count_bytes, how = sum(opened[f.count].nbytes for f in FAMILIES if f.count in opened), "reused"
    else:
        count_bytes, how = write_synthetic_store(store, kind, n), "written"
    written = time.perf_counter() - started
    gb = count_bytes / 1e9
    print(f"\n== {kind}: {n} instructions, counts {gb:.2f} GB uint32 "
          f"({disk_bytes(store) / 1e9:.2f} GB on disk, {how} in {written:.1f} s)", flush=True)
    started = time.perf_counter()
    verify_store(store)  # the full check (every chunk's CRC-32); identify_store then finds it memoised
    verified = time.perf_counter() - started
    dask_settings = DaskSettings(n_workers=args.workers, memory_limit=args.memory_limit)
    with dask_cluster(dask_settings) as client:
        workers = len(client.scheduler_info()["workers"])
        print(f"   cluster: {workers} workers x 1 thread, memory limit {args.memory_limit} each; "
              f"group_by={args.group_by}, split-half seeds {args.split_half_seeds}")
        idle = PeakMemory.now()
        read, read_peak = timed(lambda: one_read(store))
        print(f"   one plain read-and-sum of every chunk:       {read:8.1f} s  {gb / read:6.3f} GB/s  "
              f"peak {read_peak / 2**30:.2f} GiB (idle {idle / 2**30:.2f} GiB)", flush=True)
        first = None
        for rule in args.rules.split(","):
            settings = IdentificationSettings(rule=rule, group_by=args.group_by, epsilon=args.epsilon,
                                              split_half_seeds=args.split_half_seeds)
            out = folder / f"{kind}-{rule}"
            identified, peak = timed(lambda: identify_store(store, settings, out))
            with plot_wait() as plotting:
                analysed, analysis_peak = timed(lambda: report_generality(out / "components.zarr", out))
            first = first or identified
            # Another read after it: on a shared machine the load drifts, so the base of the
            # ratios is the mean of the reads just before and just after.
            again, _ = timed(lambda: one_read(store))
            base = (read + again) / 2
            print(f"   {rule:>17}: identify {identified:6.1f} s = {identified / base:4.2f} x one read "
                  f"({identified / first:4.2f} x {args.rules.split(',')[0]}); + generality "
                  f"{analysed:5.1f} s = {analysed / base:4.2f} x one read, of which waiting for the plots "
                  f"{plotting[0]:4.1f} s; peak "
                  f"{max(peak, analysis_peak) / 2**30:.2f} GiB; reads before and after "
                  f"{read:.1f} s, {again:.1f} s", flush=True)
            read = again
        print(f"   verify (chunk manifest, every byte's CRC-32): {verified:6.1f} s = "
              f"{100 * verified / first:5.1f}% of one identification ({args.rules.split(',')[0]})")
    load = psutil.getloadavg()
    print(f"   load average (1, 5, 15 min) after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {psutil.cpu_count()} cores")
    if not (args.keep or args.reuse):
        shutil.rmtree(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=["dense", "moe", "all"], default="all")
    parser.add_argument("--instructions", type=int, default=1200)
    parser.add_argument("--moe-instructions", type=int, default=None,
                        help="instructions of the MoE store (default: --instructions)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GB", help="per worker")
    parser.add_argument("--group-by", default="category", choices=["category", "origin", "instruction"])
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--rules", default="global_percentile",
                        help="comma-separated selection rules, timed in turn (the first is the reference)")
    parser.add_argument("--split-half-seeds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and outputs")
    parser.add_argument("--reuse", action="store_true",
                        help="stores in --dir itself, reused by a later run of the same sizes")
    args = parser.parse_args()
    if args.reuse and args.dir is None:
        parser.error("--reuse needs --dir")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    folder = args.dir if args.reuse else Path(tempfile.mkdtemp(prefix="sparcom-bench-", dir=args.dir))
    try:
        for kind in ("dense", "moe") if args.which == "all" else (args.which,):
            bench(kind, args.moe_instructions or args.instructions if kind == "moe" else args.instructions,
                  folder, args)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
