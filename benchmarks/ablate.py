"""Ablation throughput on the default model (or any model), against a plain forward pass.

    python benchmarks/ablate.py [--model default] [--records 30] [--max-response-tokens 32] [--repeats 2]
                                [--new-tokens 16]

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
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from sparcom.ablation.accuracy import greedy_generate, tokenize_prompts
from sparcom.intervention.hooks import Ablation
from sparcom.extraction.architectures import ffn_sites
from sparcom.core.settings import default_cache_dir
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.batching import pad_batch, padded_batches, plan_batches
from sparcom.curation.hexainst import authored_records
from sparcom.core.models import load_model, resolve_model
from sparcom.intervention.response_nll import response_nll, tokenize_responses


def main() -> None:
    args = parse_args()
    settings = ExtractionSettings(device=args.device)
    loaded = load_model(resolve_model(args.model), default_cache_dir(), settings.dtype, args.device)
    records = authored_records(per_category=max(1, args.records // 6))
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
    return parser.parse_args()


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
