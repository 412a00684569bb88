"""Ablation throughput on the default model (or any model), against a plain forward pass, and
the stage's passes spread over Dask workers.

    python benchmarks/ablate.py [--model default] [--records 30] [--max-response-tokens 32] [--repeats 2]
                                [--new-tokens 16]
    python benchmarks/ablate.py --workers 2 [--passes 8] [--load 0]

Over the same records and the same padding-capped batches (`padded_batches`), alternately:
  plain     the model's full forward pass with its LM head on every position (the baseline);
  measured  `response_nll` with nothing switched off (decoder, LM head on response positions);
  ablated   `response_nll` inside `Ablation` with 1% of the dense neurons switched off.
With `--new-tokens N`, the accuracy's greedy decoding too, of the same records' prompts:
  generate  Hugging Face's `generate(do_sample=False)` over the same left-padded batches (baseline);
  greedy    `greedy_generate` (decoder with its cache, LM head on the last position);
  greedy ablated  the same inside `Ablation`.
Prints records per second and each time relative to the plain pass (target: ablated <= 1.1x;
greedy modes relative to `generate`), with the load average beside them: on a shared machine
only the ratios mean something.

With `--workers N`, passes per second of `--passes` NLL passes (each a different 1% of the dense
neurons switched off), the stage's own functions timed after the model is loaded everywhere:
  one process   `measure_pass` one pass after another, torch on all usable cores;
  one thread    the same on one thread;
  N workers     `passes_on_cluster` on a local cluster of N single-threaded worker processes.
Targets on a CPU machine: N workers not slower than one process, and >= 1.7x one thread for 2.
`--load K` runs K `yes >/dev/null` loops while timing (contention: the throughput should fall no
more than the CPU share does). The OpenMP wait policy is passive (`sparcom.core.threads`) unless
OMP_WAIT_POLICY is set: `OMP_WAIT_POLICY=ACTIVE` gives the figures without the fix.
`pass_rates(loaded, records, settings)` is the GPU mode `benchmarks/gpu.py` calls: passes/s of
the intact pass and of switched-off passes of every family the model has, on its device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager

from sparcom.core.threads import wait_passively

wait_passively()  # before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparcom.ablation.accuracy import greedy_generate, tokenize_prompts  # noqa: E402
from sparcom.ablation.distributed import cluster_model, passes_on_cluster  # noqa: E402
from sparcom.ablation.passes import AblationPass, PassInputs, measure_pass, prepared  # noqa: E402
from sparcom.core.cluster import extraction_cluster, usable_cores  # noqa: E402
from sparcom.core.models import load_model, resolve_model  # noqa: E402
from sparcom.core.settings import DaskSettings, default_cache_dir  # noqa: E402
from sparcom.core.threads import WAIT_POLICY  # noqa: E402
from sparcom.curation.hexainst import authored_records  # noqa: E402
from sparcom.extraction.architectures import ffn_sites  # noqa: E402
from sparcom.extraction.batching import pad_batch, padded_batches, plan_batches  # noqa: E402
from sparcom.extraction.settings import ExtractionSettings, ModelSettings  # noqa: E402
from sparcom.intervention.hooks import Ablation  # noqa: E402
from sparcom.intervention.response_nll import response_nll, tokenize_responses  # noqa: E402


def main() -> None:
    args = parse_args()
    settings = ExtractionSettings(device=args.device)
    loaded = load_model(resolve_model(args.model), default_cache_dir(), settings.dtype, args.device)
    records = authored_records(per_category=max(1, args.records // 6))
    if args.workers:
        with yes_loops(args.load):
            spread_passes(args, loaded, records, settings)
        return
    tokenized = tokenize_responses(records, loaded.tokenizer, args.max_response_tokens)
    batches = list(padded_batches(tokenized, loaded.tokenizer, settings, loaded.device))
    sites = ffn_sites(loaded.model)
    rng = np.random.default_rng(0)
    mask = rng.random((len(sites.dense_layers), sites.dense_neurons)) < 0.01
    modes = scoring_modes(loaded, settings, tokenized, batches, mask, sites)
    greedy = greedy_modes(loaded, settings, records, args.new_tokens, mask, sites)
    if args.new_tokens:
        modes |= greedy
    times = timed(modes, args.repeats)
    tokens = sum(len(t) for t in tokenized)
    print(f"{len(tokenized)} records, {tokens} tokens ({sum(sum(t.counted) for t in tokenized)} response), "
          f"{len(batches)} batches, load average {os.getloadavg()}")
    for name, values in times.items():
        baseline = "generate" if name in ("generate", "greedy", "greedy ablated") else "plain"
        best = min(values)
        print(f"{name:>14}: {len(tokenized) / best:8.2f} records/s  {best:7.2f} s  "
              f"{best / min(times[baseline]):5.2f}x {baseline}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--records", type=int, default=30)
    parser.add_argument("--max-response-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=0, help="also time greedy decoding of this many tokens")
    parser.add_argument("--workers", type=int, default=0, help="passes/s: one process against this many Dask workers")
    parser.add_argument("--passes", type=int, default=0, help="with --workers: passes timed (default 4 per worker)")
    parser.add_argument("--load", type=int, default=0, help="`yes >/dev/null` loops running while timing")
    return parser.parse_args()


@contextmanager
def yes_loops(count: int):
    loops = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def random_passes(loaded, count: int, seed: int = 0) -> dict[str, AblationPass]:
    """`count` NLL passes, each with its own 1% of the dense neurons switched off, by key."""
    sites = ffn_sites(loaded.model)
    rng = np.random.default_rng(seed)
    passes = [AblationPass.of("nll", "neurons", rng.random((len(sites.dense_layers), sites.dense_neurons)) < 0.01)
              for _ in range(count)]
    return {str(i): p for i, p in enumerate(passes)}


def spread_passes(args, loaded, records, settings: ExtractionSettings) -> None:
    """passes/s: one process on all cores, on one thread, and `args.workers` single-threaded
    workers; the three timed in turn `args.repeats` times (load changes hit all alike), best kept."""
    passes = random_passes(loaded, args.passes or 4 * args.workers)
    inputs = PassInputs(records, [], args.max_response_tokens, 16, settings)
    ready = prepared(inputs, loaded.tokenizer)
    model, cache_dir, cores = ModelSettings(name=args.model), default_cache_dir(), usable_cores()

    def in_process(threads: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(threads)
            for ablation_pass in passes.values():
                measure_pass(loaded, ablation_pass, ready, inputs)
        return run

    with extraction_cluster(DaskSettings(n_workers=args.workers, threads_per_worker=1), settings.device) as client:
        cluster_model(client, model, settings, cache_dir, {})  # loaded on every worker, untimed
        warm = {f"warm-{w}": passes["0"] for w in range(2 * args.workers)}
        passes_on_cluster(client, model, settings, cache_dir, inputs, warm, {}, lambda *_: None)
        runs = 0

        def on_cluster() -> None:
            nonlocal runs
            runs += 1  # each run's tasks under keys of their own
            passes_on_cluster(client, model, settings, cache_dir, inputs,
                              {f"{runs}-{key}": p for key, p in passes.items()}, {}, lambda *_: None)

        modes = {f"one process, {cores} threads": in_process(cores), "one process, 1 thread": in_process(1),
                 f"{args.workers} Dask workers, 1 thread": on_cluster}
        measure_pass(loaded, passes["0"], ready, inputs)  # warm-up
        times = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, run in modes.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    one_process, one_thread = best[f"one process, {cores} threads"], best["one process, 1 thread"]
    print(f"{len(passes)} passes of {len(records)} records, {cores} usable cores, {args.load} yes-loops, "
          f"{WAIT_POLICY}={os.environ.get(WAIT_POLICY)}, load average {os.getloadavg()[0]:.2f}, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:>28}: {len(passes) / seconds:7.3f} passes/s  {len(passes) * len(records) / seconds:8.2f} "
              f"records/s  {one_process / seconds:5.2f}x one process  {one_thread / seconds:5.2f}x one thread")


def pass_rates(loaded, records, settings: ExtractionSettings, max_response_tokens: int | None = 32,
               repeats: int = 3) -> dict[str, float]:
    """The GPU mode: passes/s on the model's own device, intact and with 1% of each family it
    has switched off (the best of `repeats`)."""
    sites = ffn_sites(loaded.model)
    rng = np.random.default_rng(0)
    inputs = PassInputs(records, [], max_response_tokens, 16, settings)
    ready = prepared(inputs, loaded.tokenizer)
    shapes = sites.family_shapes()
    passes = {"intact": AblationPass.of("nll", "neurons", None)} | {
        f"{family} off": AblationPass.of("nll", family, rng.random(shape) < 0.01) for family, shape in shapes.items()
        if family != "experts"} | ({"experts off": AblationPass.of("nll", "experts", _one_expert_each(shapes["experts"]))}
                                   if "experts" in shapes else {})
    rates = {}
    for name, ablation_pass in passes.items():
        measure_pass(loaded, ablation_pass, ready, inputs)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            measure_pass(loaded, ablation_pass, ready, inputs)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rates[name] = 1 / best
    return rates


def _one_expert_each(shape: tuple[int, ...]) -> np.ndarray:
    """Expert 0 of every MoE layer removed from routing."""
    off = np.zeros(shape, dtype=bool)
    off[:, 0] = True
    return off


def scoring_modes(loaded, settings, tokenized, batches, mask, sites) -> dict[str, Callable[[], None]]:
    """plain (the baseline), measured and ablated: the NLL passes over the same batches."""

    def plain() -> None:
        with torch.inference_mode():
            for _, ids, attention, _ in batches:
                position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
                loaded.model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=False)

    def measured() -> None:
        response_nll(loaded.model, tokenized, loaded.tokenizer, settings, loaded.device)

    def ablated() -> None:
        with Ablation(loaded.model, {"neurons": mask}, sites):
            response_nll(loaded.model, tokenized, loaded.tokenizer, settings, loaded.device)

    return {"plain": plain, "measured": measured, "ablated": ablated}


def greedy_modes(loaded, settings, records, new_tokens, mask, sites) -> dict[str, Callable[[], None]]:
    """generate (the baseline), greedy and greedy ablated: decoding the same records' prompts."""
    prompts = tokenize_prompts(records, loaded.tokenizer)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    greedy_plan = plan_batches([len(p) + new_tokens for p in prompts], settings.batch_tokens,
                               settings.max_batch_size, settings.max_padding)
    greedy_batches = [pad_batch([prompts[b] for b in batch], pad_id, "left", loaded.device)[:2] for batch in greedy_plan]

    def generate() -> None:
        with torch.inference_mode():
            for ids, attention in greedy_batches:
                loaded.model.generate(input_ids=ids, attention_mask=attention, do_sample=False, num_beams=1,
                                      max_new_tokens=new_tokens, pad_token_id=pad_id)

    def greedy() -> None:
        greedy_generate(loaded.model, prompts, loaded.tokenizer, settings, loaded.device, new_tokens)

    def greedy_ablated() -> None:
        with Ablation(loaded.model, {"neurons": mask}, sites):
            greedy()

    return {"generate": generate, "greedy": greedy, "greedy ablated": greedy_ablated}


def timed(modes: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each mode per repeat, the modes interleaved; the plain pass warms up first."""
    times = {name: [] for name in modes}
    modes["plain"]()  # warm-up
    for _ in range(repeats):
        for name, run in modes.items():  # interleaved, so load changes hit every mode alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
