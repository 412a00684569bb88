"""Extraction speed and memory on the default model (or any model), against two references.

    python benchmarks/extract.py [--model default] [--records 300] [--device auto]

Each approach runs in its own process over the same length-sorted batches, so peak memory
(max RSS, and CUDA peak on a GPU) is its own:
  plain      the model's full forward pass with its LM head, nothing counted (the baseline);
  sparcom    `extract_to_store`: tokenizing, counting in hooks, writing the Zarr store;
  naive      a forward pass whose hooks keep every activation, counted after the pass.
Prints tokens per second, time relative to the plain pass, padded-token fraction, peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparcom.config import ExtractionSettings, default_cache_dir
from sparcom.extract import SORT_WINDOW_SHARDS, extract_to_store, padded_batches
from sparcom.hexainst import authored_records
from sparcom.models import load_model, resolve_model
from sparcom.prompts import tokenize_instruction


def batches_of(loaded, records, settings: ExtractionSettings):
    """The batches extraction forms: sort windows of shards, token budget inside each."""
    tokenized = [tokenize_instruction(r, loaded.tokenizer, settings.span) for r in records]
    window = settings.shard_size * SORT_WINDOW_SHARDS
    for start in range(0, len(tokenized), window):
        for _, *tensors in padded_batches(tokenized[start:start + window], loaded.tokenizer, settings,
                                          loaded.device):
            yield tensors


def run_mode(mode: str, model: str, n_records: int, device: str) -> dict:
    settings = ExtractionSettings(device=device)
    loaded = load_model(resolve_model(model), default_cache_dir(), settings.dtype, device)
    records = authored_records()[:n_records]
    batches = list(batches_of(loaded, records, settings))
    real = sum(int(attention.sum()) for _, attention, _ in batches)
    processed = sum(ids.numel() for ids, _, _ in batches)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "plain":
        with torch.inference_mode():
            for ids, attention, _ in batches:
                loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
    elif mode == "sparcom":
        with tempfile.TemporaryDirectory() as directory:
            extract_to_store(loaded, records, Path(directory) / "s.zarr", settings)
    elif mode == "naive":
        naive_counts(loaded, batches)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "mode": mode, "seconds": seconds, "tokens": real, "processed": processed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if loaded.device.type == "cuda" else 0,
    }


def naive_counts(loaded, batches) -> list[torch.Tensor]:
    """What a keep-everything approach does: store every layer's activations, count afterwards."""
    layers = loaded.model.model.layers
    results = []
    for ids, attention, counted in batches:
        kept = []
        hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, i, out: kept.append(out.clone()))
                 for layer in layers]
        with torch.inference_mode():
            loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
        for hook in hooks:
            hook.remove()
        mask = (counted & attention.bool()).unsqueeze(-1)
        results.append(torch.stack([((a > 0) & mask).sum(1) for a in kept], dim=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.model, args.records, args.device)))
        return
    results = {}
    for mode in ("plain", "sparcom", "naive"):
        output = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--model", args.model,
             "--records", str(args.records), "--device", args.device],
            check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    plain = results["plain"]["seconds"]
    print(f"model {args.model}, {args.records} instructions, {results['plain']['tokens']} prompt tokens, "
          f"padded tokens {1 - results['plain']['tokens'] / results['plain']['processed']:.1%} of processed")
    print(f"{'approach':<10}{'seconds':>9}{'tokens/s':>10}{'vs plain':>10}{'peak RSS MB':>13}{'peak CUDA MB':>14}")
    for mode, r in results.items():
        print(f"{mode:<10}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.0f}{r['seconds'] / plain:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_cuda_mb']:>14.0f}")


if __name__ == "__main__":
    main()
