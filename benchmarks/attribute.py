"""Attribution pass time on the default model (or any model), against a plain forward and backward pass.

    python benchmarks/attribute.py [--model default] [--records 30] [--max-response-tokens 16] [--repeats 2]
                                   [--device auto] [--dtype auto]

Over the same records and the same padding-capped batches (`padded_batches`), parameters frozen,
the graph started at the input embeddings, alternately:
  plain       the model's full forward pass with its LM head on every position, the mean NLL of
              the scored response tokens, backward (the baseline);
  scored      `batch_response_nll` (LM head on the scored positions only), backward;
  attribution `AttributionHooks.estimate`: the same forward and backward with every family's
              estimate taken on the way (the stage's pass, store writing aside).
Prints records per second, each time relative to plain (target: attribution <= 1.15x) and to
scored, the same ratios of the process's CPU time (on a shared CPU machine, with one torch
thread, less moved by other processes than wall time), the peak memory of each mode (GPU:
allocated by torch; CPU: the process's peak resident size so far, which only grows), and the
load average: on a shared machine only ratios mean something.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sparcom.attribution.estimate import AttributionHooks
from sparcom.core.models import load_model, resolve_model
from sparcom.core.settings import default_cache_dir
from sparcom.curation.hexainst import authored_records
from sparcom.extraction.architectures import ffn_sites
from sparcom.extraction.batching import padded_batches
from sparcom.extraction.settings import ExtractionSettings
from sparcom.intervention.response_nll import batch_response_nll, tokenize_responses


def main() -> None:
    args = parse_args()
    settings = ExtractionSettings(device=args.device, dtype=args.dtype)
    loaded = load_model(resolve_model(args.model), default_cache_dir(), settings.dtype, args.device)
    records = authored_records(per_category=max(1, args.records // 6))
    tokenized = tokenize_responses(records, loaded.tokenizer, args.max_response_tokens)
    batches = list(padded_batches(tokenized, loaded.tokenizer, settings, loaded.device))
    times, cpu_times, peaks = timed(passes(loaded.model, batches), args.repeats, loaded.device)
    tokens = sum(len(t) for t in tokenized)
    print(f"{loaded.source.name} {loaded.dtype} on {loaded.device}: {len(tokenized)} records, {tokens} tokens "
          f"({sum(sum(t.counted) for t in tokenized)} scored), {len(batches)} batches, "
          f"load average {os.getloadavg()}")
    for name, values in times.items():
        best = min(values)
        print(f"{name:>12}: {len(tokenized) / best:8.2f} records/s  {best:7.2f} s  "
              f"{best / min(times['plain']):5.2f}x plain  {best / min(times['scored']):5.2f}x scored  "
              f"CPU time {min(cpu_times[name]) / min(cpu_times['plain']):5.2f}x plain "
              f"{min(cpu_times[name]) / min(cpu_times['scored']):5.2f}x scored  peak {peaks[name] / 2**30:6.2f} GiB")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--records", type=int, default=30)
    parser.add_argument("--max-response-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    return parser.parse_args()


@contextmanager
def frozen(model):
    """The baselines' setting, as the attribution pass has it: parameters frozen, the graph
    started at the input embeddings."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    try:
        yield
    finally:
        handle.remove()
        for parameter, wanted in flags:
            parameter.requires_grad_(wanted)


def passes(model, batches) -> dict[str, Callable[[], None]]:
    sites = ffn_sites(model)

    def plain() -> None:
        with frozen(model):
            for _, ids, attention, counted in batches:
                position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                               use_cache=False).logits
                predicts = torch.zeros_like(counted)
                predicts[:, :-1] = counted[:, 1:]
                rows, columns = predicts.nonzero(as_tuple=True)
                losses = F.cross_entropy(logits[rows, columns].float(), ids[rows, columns + 1], reduction="none")
                totals = torch.zeros(len(ids), dtype=torch.float64, device=ids.device).index_add(
                    0, rows, losses.double())
                (totals / predicts.sum(dim=1)).sum().backward()

    def scored() -> None:
        with frozen(model):
            for _, ids, attention, counted in batches:
                batch_response_nll(model, ids, attention, counted).sum().backward()

    def attribution() -> None:
        with AttributionHooks(model, sites) as estimating:
            for _, ids, attention, counted in batches:
                estimating.estimate(ids, attention, counted)

    return {"plain": plain, "scored": scored, "attribution": attribution}


def timed(modes: dict[str, Callable[[], None]], repeats: int, device: torch.device
          ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Wall and process CPU seconds of each mode per repeat, the modes interleaved (the plain pass
    warms up first), and each mode's peak memory in bytes."""
    cuda = device.type == "cuda"
    times = {name: [] for name in modes}
    cpu_times = {name: [] for name in modes}
    peaks = dict.fromkeys(modes, 0)
    modes["plain"]()  # warm-up
    for _ in range(repeats):
        for name, run in modes.items():  # interleaved, so load changes hit every mode alike
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.enable_grad():
                run()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss * 1024
            peaks[name] = max(peaks[name], peak)
    return times, cpu_times, peaks


if __name__ == "__main__":
    main()
