"""Extraction speed and memory on the default model (or any model), against references.

    python benchmarks/extract.py [--model default|mixtral-random|PATH] [--records 300] [--device auto]
                                 [--workers N]

Each approach runs in its own process over the same length-sorted batches, so peak memory
(max RSS, and CUDA peak on a GPU) is its own:
  plain      the model's full forward pass with its LM head, nothing counted (the baseline);
  sparcom    `extract_to_store`: tokenizing, counting in hooks, writing the Zarr store;
  naive      a forward pass whose hooks keep every activation, counted after the pass.
The cost of counting itself: one process alternates, round by round, a forward pass that stops
after the last MLP with no counting hook (`uncounted`, the same stop: a hook that raises) and
the counting pass (`counted`, `FFNCounter.count`), best round of each; on a MoE model also the
counting pass with the routed experts counted by the pre-hook (the path before the counting
experts backend), every pass with the experts computing as eager does.
With `--workers N`: the whole extraction of the same records by one process with one torch
thread, one process with all cores, and N local Dask workers of one thread each (models loaded
before the clock starts), in `--rounds` alternating rounds (default 3; medians printed): on a
shared machine the speed drifts by 10% within minutes. `--model mixtral-random` is a randomly initialised Mixtral-like MoE
(8 layers, hidden 512, 8 experts, top-2) with the default tokenizer, built once into the cache.
The machine's load average is printed beside the figures: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparcom.extraction.architectures import ffn_sites
from sparcom.core.settings import DaskSettings, default_cache_dir
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.counting import FFNCounter, expert_counting_path
from sparcom.extraction.batching import padded_batches
from sparcom.extraction.extract import SORT_WINDOW_SHARDS, extract_to_store
from sparcom.curation.hexainst import authored_records
from sparcom.core.models import default_model_file, load_model, resolve_model
from sparcom.curation.prompts import tokenize_instruction

ROUNDS = 3
UNCOVERED = "sparcom-benchmark-uncovered"  # an experts implementation the counting backend does not know
MIXTRAL_RANDOM = dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1792, num_local_experts=8,
                      num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=4096)


def mixtral_random() -> Path:
    """A Mixtral-like random MoE with the default model's tokenizer, saved once like a hub model."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    directory = default_cache_dir() / "benchmark-models" / "mixtral-random-8x512"
    if (directory / "config.json").is_file():
        return directory
    gguf = default_model_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = MixtralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           **MIXTRAL_RANDOM)
    torch.manual_seed(0)
    partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
    MixtralForCausalLM(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(directory)
    return directory


def model_path(model: str) -> str:
    return str(mixtral_random()) if model == "mixtral-random" else model


def batches_of(loaded, records, settings: ExtractionSettings):
    """The batches extraction forms: sort windows of shards, token budget inside each."""
    tokenized = [tokenize_instruction(r, loaded.tokenizer, settings.span) for r in records]
    window = settings.shard_size * SORT_WINDOW_SHARDS
    for start in range(0, len(tokenized), window):
        for _, *tensors in padded_batches(tokenized[start:start + window], loaded.tokenizer, settings,
                                          loaded.device):
            yield tensors


class _Stopped(Exception):
    pass


def uncounted_pass(loaded, batches) -> None:
    """The counting pass without counting: same call, same stop after the last MLP, no hooks."""

    def stop(module, inputs, output):
        raise _Stopped

    handle = ffn_sites(loaded.model).last_mlp.register_forward_hook(stop)
    try:
        with torch.inference_mode():
            for ids, attention, _ in batches:
                try:
                    loaded.model(input_ids=ids, attention_mask=attention, use_cache=False,
                                 position_ids=(attention.long().cumsum(-1) - 1).clamp(min=0))
                except _Stopped:
                    pass
    finally:
        handle.remove()


def counted_pass(loaded, batches) -> None:
    with FFNCounter(ffn_sites(loaded.model)) as counter:
        for ids, attention, counted in batches:
            counter.count(loaded.model, ids, attention, counted)


def pre_hook_pass(loaded, batches) -> None:
    """The counting pass as it was before the counting experts backend: the experts compute as
    eager does under a name the backend does not cover, so the pre-hook computes each routed
    token's gate projection again."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[UNCOVERED] = lambda experts, *args: type(experts).forward.__wrapped__(experts, *args)
    loaded.model.set_experts_implementation(UNCOVERED)
    try:
        assert expert_counting_path(ffn_sites(loaded.model)) == "pre_hook"
        counted_pass(loaded, batches)
    finally:
        loaded.model.set_experts_implementation("eager")
        del ALL_EXPERTS_FUNCTIONS[UNCOVERED]


def timed(function, loaded) -> float:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_mode(mode: str, model: str, n_records: int, device: str, workers: int) -> dict:
    # With workers, shards small enough that each worker gets several (counts do not depend on it).
    settings = ExtractionSettings(device=device, shard_size=min(32, max(1, n_records // (4 * workers))) if workers
                                  else 32)
    records = authored_records()[:n_records]
    if mode.startswith("dask"):
        return run_on_dask(model, records, settings, workers)
    if mode in ("sparcom-1thread", "overhead"):  # one thread: steady timings on a shared machine
        torch.set_num_threads(1)
    loaded = load_model(resolve_model(model), default_cache_dir(), settings.dtype, device)
    batches = list(batches_of(loaded, records, settings))
    result = {"mode": mode, "tokens": sum(int(attention.sum()) for _, attention, _ in batches),
              "processed": sum(ids.numel() for ids, _, _ in batches), "threads": torch.get_num_threads()}
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "plain":
        def plain():
            with torch.inference_mode():
                for ids, attention, _ in batches:
                    loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)

        result["seconds"] = timed(plain, loaded)
    elif mode.startswith("sparcom"):
        with tempfile.TemporaryDirectory() as directory:
            result["seconds"] = timed(lambda: extract_to_store(loaded, records, Path(directory) / "s.zarr", settings),
                                      loaded)
    elif mode == "naive":
        result["seconds"] = timed(lambda: naive_counts(loaded, batches), loaded)
    elif mode == "overhead":
        moe = bool(ffn_sites(loaded.model).moe_layers)
        if moe:  # the pre-hook path computes as eager does: every pass here does
            loaded.model.set_experts_implementation("eager")
        passes = {"uncounted": uncounted_pass, "counted": counted_pass, **({"pre_hook": pre_hook_pass} if moe else {})}
        rounds = [{name: timed(lambda: run(loaded, batches), loaded) for name, run in passes.items()}
                  for _ in range(ROUNDS)]
        result.update({name: min(r[name] for r in rounds) for name in passes})
        result["seconds"] = result["counted"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20 if loaded.device.type == "cuda" else 0
    return result


def run_on_dask(model: str, records, settings: ExtractionSettings, workers: int) -> dict:
    from sparcom.core.cluster import extraction_cluster
    from sparcom.extraction.distributed import extract_on_cluster, load_on_workers
    from sparcom.extraction.store import open_store

    chosen = ModelSettings(name=model)
    with extraction_cluster(DaskSettings(n_workers=workers, threads_per_worker=1), settings.device) as client, \
            tempfile.TemporaryDirectory() as directory:
        addresses = list(client.scheduler_info()["workers"])
        load_on_workers(client, chosen, settings, default_cache_dir(), addresses)
        start = time.perf_counter()
        store = extract_on_cluster(client, chosen, records, Path(directory) / "s.zarr", settings, {},
                                   default_cache_dir())
        seconds = time.perf_counter() - start
        threads = client.run(torch.get_num_threads)
        tokens = int(open_store(store).token_count.sum())
    return {"mode": f"dask-{workers}", "seconds": seconds, "tokens": tokens, "processed": 0,
            "threads": sorted(threads.values()), "peak_rss_mb": 0, "peak_cuda_mb": 0}


def naive_counts(loaded, batches) -> list[dict[str, torch.Tensor]]:
    """What a keep-everything approach does: keep every layer's activations (for routed experts,
    each expert's activations on its routed tokens), count after the pass."""
    sites = ffn_sites(loaded.model)
    results = []
    for ids, attention, counted in batches:
        dense, routed = [], []

        def keep_routing(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).reshape(-1, module.gate_up_proj.shape[-1])
            top_k = (args[1] if len(args) > 1 else kwargs["top_k_index"]).reshape(hidden.shape[0], -1)
            width = module.gate_up_proj.shape[1] // 2
            routed.append([(e, (top_k == e).any(-1), module.act_fn(F.linear(
                hidden[(top_k == e).any(-1)], module.gate_up_proj[e, :width]))) for e in range(module.num_experts)])

        hooks = [a.register_forward_hook(lambda m, i, out: dense.append(out.clone())) for a in sites.dense_activations]
        hooks += [layer.experts.register_forward_pre_hook(keep_routing, with_kwargs=True) for layer in sites.moe_layers]
        try:
            with torch.inference_mode():
                loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        mask = counted & attention.bool()
        rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
        counts = {}
        if dense:
            counts["act_count"] = torch.stack([((a > 0) & mask.unsqueeze(-1)).sum(1) for a in dense], dim=1)
        if routed:
            flat_mask = mask.reshape(-1)
            counts["expert_act_count"] = torch.stack([torch.stack([
                torch.zeros(ids.shape[0], active.shape[-1], dtype=torch.long, device=ids.device).index_add_(
                    0, rows[chosen], ((active > 0) & flat_mask[chosen].unsqueeze(-1)).long())
                for _, chosen, active in layer]) for layer in routed]).permute(2, 0, 1, 3)  # [batch, layer, expert, neuron]
        results.append(counts)
    return results


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.model, args.records, args.device, args.workers)))
        return
    results, loads, scale_out_runs = run_modes(args, model_path(args.model))
    print_approaches(args, results, loads)
    if args.workers:
        print_scale_out(args, results, scale_out_runs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="default, mixtral-random or a model path/hub id")
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="also time N one-thread Dask workers")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --workers: alternating rounds of the three scale-out runs (median)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_modes(args: argparse.Namespace, model: str) -> tuple[dict, dict, dict]:
    """(figures of each mode's first run, load average after it, scale-out modes' (seconds, load) per
    round): every mode run in its own process."""
    modes = ["plain", "sparcom", "naive", "overhead"]
    scale_out = ["sparcom-1thread", "sparcom", "dask"]
    if args.workers:
        modes += ["sparcom-1thread", "dask"] + scale_out * (args.rounds - 1)
    results, loads, scale_out_runs = {}, {}, {mode: [] for mode in scale_out}
    for mode in modes:
        output = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--model", model, "--records", str(args.records),
             "--device", args.device, "--workers", str(args.workers)],
            check=True, capture_output=True, text=True).stdout
        results.setdefault(mode, json.loads(output.strip().splitlines()[-1]))
        loads.setdefault(mode, os.getloadavg()[0])
        if mode in scale_out_runs:
            scale_out_runs[mode].append((json.loads(output.strip().splitlines()[-1])["seconds"], os.getloadavg()[0]))
    return results, loads, scale_out_runs


def print_approaches(args: argparse.Namespace, results: dict, loads: dict) -> None:
    """The table of plain, sparcom and naive, then the cost of counting itself."""
    plain = results["plain"]["seconds"]
    print(f"model {args.model}, {args.records} instructions, {results['plain']['tokens']} prompt tokens, "
          f"padded tokens {1 - results['plain']['tokens'] / results['plain']['processed']:.1%} of processed, "
          f"{os.cpu_count()} cores")
    print(f"{'approach':<16}{'seconds':>9}{'tokens/s':>10}{'vs plain':>10}{'peak RSS MB':>13}{'peak CUDA MB':>14}"
          f"{'load avg':>10}")
    for mode in ("plain", "sparcom", "naive"):
        r = results[mode]
        print(f"{mode:<16}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.0f}{r['seconds'] / plain:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_cuda_mb']:>14.0f}{loads[mode]:>10.2f}")
    overhead = results["overhead"]
    print(f"counting cost (best of {ROUNDS} alternating rounds, one process, one thread, load avg {loads['overhead']:.2f}): "
          f"uncounted pass {overhead['uncounted']:.2f} s, counted pass {overhead['counted']:.2f} s, "
          f"counted / uncounted = {overhead['counted'] / overhead['uncounted']:.3f}")
    if "pre_hook" in overhead:
        print(f"routed experts counted by the pre-hook instead (every pass computing as eager does): "
              f"{overhead['pre_hook']:.2f} s, pre-hook / uncounted = {overhead['pre_hook'] / overhead['uncounted']:.3f}")


def print_scale_out(args: argparse.Namespace, results: dict, scale_out_runs: dict) -> None:
    """One process with one thread, one with all cores and the Dask workers: medians and rounds."""
    single = results["sparcom-1thread"]
    print(f"scale-out, whole extraction of the same records ({single['tokens']} tokens), "
          f"{args.rounds} alternating rounds, median seconds (each round's in brackets):")
    print(f"{'how':<34}{'seconds':>9}{'tokens/s':>10}{'vs 1 thread':>13}  rounds (load avg)")
    median = {mode: statistics.median(s for s, _ in runs) for mode, runs in scale_out_runs.items()}
    for label, mode in (("1 process, 1 torch thread", "sparcom-1thread"),
                        (f"1 process, {results['sparcom']['threads']} torch threads", "sparcom"),
                        (f"{args.workers} Dask workers, 1 thread each", "dask")):
        rounds = ", ".join(f"{s:.1f} ({load:.1f})" for s, load in scale_out_runs[mode])
        print(f"{label:<34}{median[mode]:>9.2f}{single['tokens'] / median[mode]:>10.0f}"
              f"{median['sparcom-1thread'] / median[mode]:>13.2f}  {rounds}")
    print(f"Dask workers against one process with all cores: {median['sparcom'] / median['dask']:.2f}x "
          f"(median); per round: " + ", ".join(
              f"{a / d:.2f}x" for (a, _), (d, _) in zip(scale_out_runs["sparcom"], scale_out_runs["dask"])))


if __name__ == "__main__":
    main()
