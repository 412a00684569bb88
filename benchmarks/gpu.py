"""Extraction on one NVIDIA GPU: a 7B-layout dense model and a Mixtral-like MoE, both random.

    python benchmarks/gpu.py            # on a machine with an NVIDIA GPU, about 3-6 minutes
    python benchmarks/gpu.py --smoke    # tiny models on CPU: checks the script itself

Builds from configs (no download, no install) a randomly initialised LLaMA with the 7B layout
(32 layers, hidden 4,096, FFN 14,336, bfloat16) and a Mixtral-like MoE (hidden 4,096, 8 experts of
14,336, top-2) with as many layers as fit in half the free GPU memory, and prints for each, on
the same length-sorted batches of the shipped HexaInst records: plain forward tokens/s (full
model, LM head), extraction tokens/s (`extract_to_store`: tokenizing, counting, writing the store)
and their ratio, counting pass / uncounted pass (the same pass stopping after the last MLP with no
counting hook), peak GPU memory and the padded fraction, and the ablation's passes/s, intact and
with 1% of each family switched off (`benchmarks/ablate.py`'s GPU mode). Then it checks, in float32 on a 4-layer
model of each layout, the batched counts of a few records against a per-record reference (one
unpadded record at a time, hooks on other modules: the gate projection, the router), and the same
model split by a device map between the GPU and the CPU against the single-device counts.
Exit status 1 when a check fails, 2 without CUDA (unless --smoke).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import pass_rates  # noqa: E402 - the ablation benchmark's GPU mode
from extract import batches_of, counted_pass, timed, uncounted_pass  # noqa: E402 - the CPU benchmark's passes

from sparcom.extraction.architectures import ffn_sites  # noqa: E402
from sparcom.extraction.settings import ExtractionSettings  # noqa: E402
from sparcom.extraction.counting import FFNCounter  # noqa: E402
from sparcom.extraction.extract import extract_to_store  # noqa: E402
from sparcom.curation.hexainst import authored_records  # noqa: E402
from sparcom.core.models import LoadedModel, ModelSource, default_model_file  # noqa: E402
from sparcom.curation.prompts import tokenize_instruction  # noqa: E402
from sparcom.extraction.store import open_store  # noqa: E402

DENSE_7B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=8192)
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
SMOKE_DENSE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)
SMOKE_MOE = dict(hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
CHECK_LAYERS = 4
CHECK_RECORDS = 6
ABLATION_RECORDS = 96  # records per ablation pass timed (the stage's passes each read all of them)


def tokenizer():
    gguf = default_model_file()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build(kind: str, layout: dict, layers: int, dtype: torch.dtype, device: str, tok) -> LoadedModel:
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "dense" else (MixtralConfig, MixtralForCausalLM)
    config = config_class(**{**layout, "num_hidden_layers": layers}, vocab_size=len(tok),
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype).eval()
    source = ModelSource(f"random-{kind}-{layers}L", "directory", Path(tempfile.gettempdir()))
    return LoadedModel(source, f"random-{kind}-{layers}", model, tok, dtype, torch.device(device))


def moe_layers_that_fit(layout: dict, dtype: torch.dtype) -> int:
    """Layers whose weights take at most half the free GPU memory: room for activations."""
    hidden, ffn, experts = layout["hidden_size"], layout["intermediate_size"], layout["num_local_experts"]
    per_layer = (3 * experts * hidden * ffn + 2 * hidden * hidden + 2 * hidden * hidden // 4) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(32, int(free * 0.5 // per_layer)))


def measure(loaded: LoadedModel, records, settings: ExtractionSettings) -> dict:
    batches = list(batches_of(loaded, records, settings))
    real = sum(int(attention.sum()) for _, attention, _ in batches)
    processed = sum(ids.numel() for ids, _, _ in batches)

    def plain():
        with torch.inference_mode():
            for ids, attention, _ in batches:
                loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)

    uncounted_pass(loaded, batches[:1])  # warm-up: kernels, allocator
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"tokens": real, "padded": 1 - real / processed, "plain": timed(plain, loaded),
              "uncounted": timed(lambda: uncounted_pass(loaded, batches), loaded),
              "counted": timed(lambda: counted_pass(loaded, batches), loaded)}
    with tempfile.TemporaryDirectory() as directory:
        result["extraction"] = timed(lambda: extract_to_store(loaded, records, Path(directory) / "s.zarr", settings),
                                     loaded)
    result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if loaded.device.type == "cuda" else 0.0
    return result


def reference_counts(loaded: LoadedModel, record, span: str) -> dict[str, np.ndarray]:
    """One record, unpadded, the full model: gates read from the gate projection (dense) or
    recomputed from the router's choice and the MoE block's input (experts)."""
    item = tokenize_instruction(record, loaded.tokenizer, span)
    counted = torch.tensor(item.counted, device=loaded.device)
    gates, routed, hooks = {}, {}, []
    for index, layer in enumerate(loaded.model.model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            hooks.append(mlp.register_forward_pre_hook(
                lambda m, args, i=index: routed.__setitem__(i, [args[0][0]])))
            hooks.append(mlp.gate.register_forward_hook(
                lambda m, args, out, i=index: routed[i].append(out[2])))
        else:
            hooks.append(mlp.gate_proj.register_forward_hook(lambda m, args, out, i=index: gates.__setitem__(i, out[0])))
    try:
        with torch.inference_mode():
            loaded.model(torch.tensor([item.input_ids], device=loaded.device))
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    if gates:
        act = loaded.model.model.layers[0].mlp.act_fn
        result["act_count"] = np.stack([((act(gates[i]) > 0) & counted[:, None]).sum(0).cpu().numpy()
                                        for i in sorted(gates)])
    if routed:
        expert_act = []
        for i in sorted(routed):
            hidden, choice = routed[i]
            experts = loaded.model.model.layers[i].mlp.experts
            width = experts.gate_up_proj.shape[1] // 2
            rows = []
            for e in range(experts.gate_up_proj.shape[0]):
                tokens = (choice == e).any(-1) & counted
                gate = F.linear(hidden[tokens], experts.gate_up_proj[e, :width])
                rows.append((experts.act_fn(gate) > 0).sum(0).cpu().numpy())
            expert_act.append(np.stack(rows))
        result["expert_act_count"] = np.stack(expert_act)
    return result


def batched_counts(loaded: LoadedModel, records, settings: ExtractionSettings) -> dict[str, np.ndarray]:
    rows: dict[int, dict[str, np.ndarray]] = {}
    with FFNCounter(ffn_sites(loaded.model)) as counter:
        tokenized = [tokenize_instruction(r, loaded.tokenizer, settings.span) for r in records]
        from sparcom.extraction.batching import padded_batches

        for batch, ids, attention, counted in padded_batches(tokenized, loaded.tokenizer, settings, loaded.device):
            counts = counter.count(loaded.model, ids, attention, counted)
            for row, b in enumerate(batch):
                rows[b] = {name: values[row].cpu().numpy() for name, values in counts.items()}
    return {name: np.stack([rows[b][name] for b in range(len(records))]) for name in rows[0]}


def compare(label: str, got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    """Within float32 rounding: counts move by at most 2 and almost never (docs/method.md section 7)."""
    ok = True
    for name, want in expected.items():
        difference = np.abs(got[name].astype(np.int64) - want)
        moved = (difference > 0).mean()
        passed = difference.max() <= 2 and moved <= 1e-3 and want.sum() > 0
        ok &= passed
        print(f"  {label} {name}: max difference {difference.max()}, {moved:.2e} of counts moved, "
              f"{'ok' if passed else 'FAILED'}")
    return ok


def check(kind: str, layout: dict, device: str, tok, records, settings: ExtractionSettings) -> bool:
    loaded = build(kind, layout, CHECK_LAYERS, torch.float32, device, tok)
    settings = settings.model_copy(update={"dtype": "float32"})
    expected = [reference_counts(loaded, r, settings.span) for r in records]
    expected = {name: np.stack([e[name] for e in expected]) for name in expected[0]}
    ok = compare(f"{kind} batched float32 vs per record", batched_counts(loaded, records, settings), expected)
    if device == "cuda":  # a device map over the GPU and the CPU: hooks count on each layer's device
        from accelerate import dispatch_model

        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": 0 if i < CHECK_LAYERS // 2 else "cpu" for i in range(CHECK_LAYERS)}}
        split = replace(loaded, model=dispatch_model(loaded.model, device_map=device_map))
        ok &= compare(f"{kind} split GPU+CPU vs per record", batched_counts(split, records, settings), expected)
    del loaded
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script itself")
    parser.add_argument("--records", type=int, default=600, help="HexaInst records timed (600 shipped)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False here); "
              "--smoke runs its tiny CPU check", file=sys.stderr)
        return 2
    started = time.monotonic()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tok = tokenizer()
    records = authored_records()[:24 if args.smoke else args.records]
    settings = ExtractionSettings(device=device, dtype="float32" if args.smoke else "bfloat16",
                                  batch_tokens=4096 if args.smoke else 32768)
    dense, moe = (SMOKE_DENSE, SMOKE_MOE) if args.smoke else (DENSE_7B, MIXTRAL)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}, "
          f"{len(records)} records, batch_tokens {settings.batch_tokens}, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'model':<28}{'plain tok/s':>12}{'extract tok/s':>14}{'extract/plain':>14}{'counted/uncounted':>19}"
          f"{'peak GB':>9}{'padded':>8}")
    for kind, layout in (("dense", dense), ("moe", moe)):
        layers = layout.get("num_hidden_layers") or (2 if args.smoke else moe_layers_that_fit(layout, dtype))
        loaded = build(kind, layout, layers, dtype, device, tok)
        r = measure(loaded, records, settings)
        label = f"{kind} {layers}L h{layout['hidden_size']} ffn{layout['intermediate_size']}" + (
            f" {layout['num_local_experts']}e top{layout['num_experts_per_tok']}" if kind == "moe" else "")
        print(f"{label:<28}{r['tokens'] / r['plain']:>12.0f}{r['tokens'] / r['extraction']:>14.0f}"
              f"{r['extraction'] / r['plain']:>14.2f}{r['counted'] / r['uncounted']:>19.3f}{r['peak_gb']:>9.1f}"
              f"{r['padded']:>8.1%}", flush=True)
        timed_records = records[:ABLATION_RECORDS]
        rates = pass_rates(loaded, timed_records, settings)
        print(f"{'':<28}ablation passes/s over {len(timed_records)} records: "
              + ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items()), flush=True)
        del loaded
        if device == "cuda":
            torch.cuda.empty_cache()
    ok = all([check(kind, layout, device, tok, records[:CHECK_RECORDS], settings)
              for kind, layout in (("dense", dense), ("moe", moe))])
    print(f"checks {'passed' if ok else 'FAILED'}; {time.monotonic() - started:.0f} s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
