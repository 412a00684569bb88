"""Independent reference computations shared by several test files: what the code under test must
return, computed here without it (plain Python and NumPy, transformers one unpadded record at a
time), and the checks that compare its output against them. The inputs they run on are built by
tests/builders.py (kept apart: see its docstring); fixtures are in tests/conftest.py. Test files
import from here (`from references import ...`), never from each other.

Tokens and forward passes
    reference_tokens      the unpadded token ids of a record's prompt (and response), first counted position
    forward_with_hooks    one unpadded forward pass, the hooks removed even on error

Counts (extraction)
    naive_llama_counts    one record's gate counts [layer, neuron] and token count, LLaMA-style models
    naive_store           those counts stacked for a list of records, as a store holds them
    naive_counts          one prompt's counts per store variable for every supported family,
                          dense and MoE (routing from the router's weights: routed_experts)

Switching components off (ablation)
    mlps                  the MLP of every layer of a model
    zero_down_columns     neurons switched off the test's own way: down projection input columns zeroed

Attribution
    attribution_reference -dL/dalpha at alpha = 1 for every component of one record, by autograd on
                          alpha scaling each component in the test's own forward pass (own_router,
                          own_experts: MoE routing and experts computed token by token)

Selection rules and components (identification)
    top_m, naive_rule     every selection rule of docs/method.md on p[group, layer, neuron]
    naive_frequency, naive_global_selection, naive_selection, group_rows
                          group frequencies and the percentile and threshold sets
    assert_components_match   stored components against those, family by family

Generality (identification reports)
    naive_generality      general and unique sets and Jaccard indices by set arithmetic
    assert_summary_matches_sets   a report summary against set arithmetic on the selected sets
    assert_moe_store_report_matches_set_arithmetic
                          identify and report a constructed MoE store, every figure and file
                          against set arithmetic (run by two tests: in memory and lazily)

Hook points (extraction)
    hooked, in_model_order, llama_hooked_modules
                          the `hooked_modules` entries a store must list, from the model's config
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from builders import CATEGORIES, moe_store, write_store
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.generality import family_part
from sparcom.identification.identify import identify_store
from sparcom.identification.schema import FAMILIES
from sparcom.identification.report import report_generality

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sparcom.curation.records import InstructionRecord


# --- tokens and forward passes -----------------------------------------------------------------

def reference_tokens(record: InstructionRecord, tokenizer, span: str) -> tuple[list[int], int]:
    """The unpadded token ids a naive reference feeds the model, and the first counted position."""
    prompt = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": record.user_turn()}], add_generation_prompt=True)["input_ids"])
    if span == "response":
        return prompt + tokenizer(record.response, add_special_tokens=False)["input_ids"], len(prompt)
    return prompt, 0


def forward_with_hooks(model, ids: list[int], hooks: list) -> None:
    """One unpadded forward pass of the full model; the hooks are removed even on error."""
    import torch

    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()


# --- counts (extraction) -------------------------------------------------------------------------

def naive_llama_counts(model, tokenizer, record, span: str) -> tuple[np.ndarray, int]:
    """Counts [layer, neuron] and T for one record, straight from transformers."""
    import torch.nn.functional as F

    ids, first_counted = reference_tokens(record, tokenizer, span)
    gates = []
    forward_with_hooks(model, ids, [layer.mlp.gate_proj.register_forward_hook(
        lambda m, i, out: gates.append(out[0])) for layer in model.model.layers])
    counts = np.stack([(F.silu(g[first_counted:]) > 0).sum(0).numpy() for g in gates])
    return counts, len(ids) - first_counted


def naive_store(model_dir, dtype, records, span):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [naive_llama_counts(model, tokenizer, r, span) for r in records]
    return np.stack([c for c, _ in pairs]), np.array([t for _, t in pairs])


# The module whose output is the gate (or fc_in) projection, and how to take the gate from it.
GATE_PROJECTION = {"phi3": "gate_up_proj", "gpt2": "c_fc", "gpt_neox": "dense_h_to_4h"}


def routed_experts(family: str, router, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token's top-k experts by the family's routing rule, from the router's own weights
    (the test configs have one expert group, so DeepSeek's group limit keeps every expert)."""
    if family.startswith("deepseek"):  # DeepSeek routes in float32
        logits = hidden.float() @ router.weight.float().T
        scores = logits.softmax(-1) if family == "deepseek_v2" else logits.sigmoid() + router.e_score_correction_bias
    else:
        scores = (hidden @ router.weight.T).softmax(-1)
    return scores.topk(top_k, dim=-1).indices


def naive_counts(model, ids: list[int], first_counted: int) -> dict[str, np.ndarray]:
    """Per variable, the counts of one unpadded prompt, token by token."""
    family = model.config.model_type
    gates, moe_inputs, shared_gates = {}, {}, {}
    hooks = []
    for index, layer in enumerate(model.get_submodule("transformer.h" if family == "gpt2" else
                                                      "gpt_neox.layers" if family == "gpt_neox" else
                                                      "model.layers")):
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            hooks.append(mlp.register_forward_pre_hook(
                lambda m, args, i=index: moe_inputs.__setitem__(i, args[0].clone())))
            shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
            if shared is not None:
                hooks.append(shared.gate_proj.register_forward_hook(
                    lambda m, a, out, i=index: shared_gates.__setitem__(i, (out, m))))
        else:
            projection = getattr(mlp, GATE_PROJECTION.get(family, "gate_proj"))
            hooks.append(projection.register_forward_hook(lambda m, a, out, i=index: gates.__setitem__(i, out)))
    forward_with_hooks(model, ids, hooks)
    counted = slice(first_counted, len(ids))
    result = {}
    if gates:
        rows = []
        for index in sorted(gates):
            mlp = model.get_submodule(f"{'transformer.h' if family == 'gpt2' else 'gpt_neox.layers' if family == 'gpt_neox' else 'model.layers'}.{index}.mlp")
            gate = gates[index][0, counted]
            if family == "phi3":
                gate = gate.chunk(2, dim=-1)[0]
            activation = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None) or mlp.act
            rows.append((activation(gate) > 0).sum(0).numpy())
        result["act_count"] = np.stack(rows)
    if moe_inputs:
        expert_count, expert_act, shared_act = [], [], []
        for index in sorted(moe_inputs):
            moe = model.get_submodule(f"model.layers.{index}.mlp")
            experts = moe.experts
            hidden = moe_inputs[index].reshape(len(ids), -1)[counted]
            top_k = routed_experts(family, moe.gate, hidden, model.config.num_experts_per_tok)
            n_experts, width = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2
            count = np.zeros(n_experts, dtype=np.int64)
            act = np.zeros((n_experts, width), dtype=np.int64)
            for token in range(hidden.shape[0]):
                for e in top_k[token].tolist():
                    count[e] += 1
                    gate = experts.gate_up_proj[e, :width] @ hidden[token]
                    act[e] += (experts.act_fn(gate) > 0).numpy()
            expert_count.append(count)
            expert_act.append(act)
            if index in shared_gates:
                out, projection = shared_gates[index]
                shared_mlp = model.get_submodule(f"model.layers.{index}.mlp")
                shared = getattr(shared_mlp, "shared_expert", None) or shared_mlp.shared_experts
                gate = out.reshape(len(ids), -1)[counted]
                shared_act.append((shared.act_fn(gate) > 0).sum(0).numpy())
        result["expert_count"] = np.stack(expert_count)
        result["expert_act_count"] = np.stack(expert_act)
        if shared_act:
            result["shared_act_count"] = np.stack(shared_act)
    return result


# --- switching components off (ablation) ---------------------------------------------------------

def mlps(model):
    """The MLP module of every layer, in order, for the dense families of builders.CONFIGS."""
    family = model.config.model_type
    layers = model.transformer.h if family == "gpt2" else (
        model.gpt_neox.layers if family == "gpt_neox" else model.model.layers)
    return [layer.mlp for layer in layers]


def zero_down_columns(mlp: nn.Module, columns: list[int], family: str) -> None:
    """The test's own switch: the columns of the down projection's input, in a weight copy."""
    import torch

    with torch.no_grad():
        if family == "gpt2":
            mlp.c_proj.weight[columns, :] = 0  # Conv1D: weight[in, out]
        elif family == "gpt_neox":
            mlp.dense_4h_to_h.weight[:, columns] = 0
        else:
            mlp.down_proj.weight[:, columns] = 0


# --- attribution: the estimate's definition ------------------------------------------------------

def down_projection(mlp):
    return mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj


def own_router(mlp, family: str, x: torch.Tensor, removed: int | None):
    """Mixtral, Qwen2-MoE, OLMoE: softmax over the experts allowed, top-k, then the model's normalisation."""
    import torch

    logits = x @ mlp.gate.weight.T
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    if removed is not None:
        allowed[removed] = False
    probs = torch.zeros_like(logits)
    probs[:, allowed] = torch.softmax(logits[:, allowed], dim=-1)
    weights, index = torch.topk(probs, mlp.gate.top_k, dim=-1)
    if family == "mixtral" or mlp.gate.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, index


def own_experts(experts, x: torch.Tensor, weights, index, scale: torch.Tensor | None) -> torch.Tensor:
    """Token by token: sum over the chosen experts of w * W_down[e] (act(x W_gate[e]) * (x W_up[e]) * scale[e])."""
    import torch

    width = experts.down_proj.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate_up = experts.gate_up_proj[e] @ x[t]
            h = experts.act_fn(gate_up[:width]) * gate_up[width:]
            if scale is not None:
                h = h * scale[e]
            y = y + weights[t, j] * (experts.down_proj[e] @ h)
        rows.append(y)
    return torch.stack(rows)


def attribution_reference(model, record, tokenizer, k: int | None) -> dict[str, np.ndarray]:
    """-dL/dalpha at alpha = 1 for every component of one record, unpadded, by autograd on alpha:
    dense and shared neurons scale down_proj's input; the routed experts are recomputed token by
    token (`own_experts`), expert neurons scaled inside, and each expert's removal interpolated
    towards the output of the test's own router without it (`own_router`). Store variable -> [layer, ...]."""
    import torch

    family = model.config.model_type
    ids, first = reference_tokens(record, tokenizer, "response")
    if k is not None:
        ids = ids[:first + k]
    alphas: dict[str, list[torch.Tensor]] = {}
    handles = []

    def alpha(name: str, shape) -> torch.Tensor:
        value = torch.ones(shape, dtype=torch.float64, requires_grad=True)
        alphas.setdefault(name, []).append(value)
        return value

    def scale_input(scale):
        return lambda module, args: (args[0] * scale,)

    for mlp in mlps(model):
        if not hasattr(mlp, "experts"):
            down = down_projection(mlp)
            width = down.weight.shape[0] if family == "gpt2" else down.in_features  # GPT-2's Conv1D is [in, out]
            handles.append(down.register_forward_pre_hook(scale_input(alpha("act_attribution", width))))
            continue
        if hasattr(mlp, "shared_expert"):
            handles.append(mlp.shared_expert.down_proj.register_forward_pre_hook(
                scale_input(alpha("shared_act_attribution", mlp.shared_expert.down_proj.in_features))))
        experts = mlp.experts
        neuron_scale = alpha("expert_act_attribution", (experts.num_experts, experts.down_proj.shape[-1]))
        expert_scale = alpha("expert_attribution", experts.num_experts)

        def replace(module, args, output, mlp=mlp, neuron_scale=neuron_scale, expert_scale=expert_scale):
            x = args[0]
            weights, index = own_router(mlp, family, x, None)
            assert torch.equal(index, args[1])
            intact = own_experts(module, x, weights, index, None)
            torch.testing.assert_close(intact, output, rtol=1e-5, atol=1e-6)  # routers softmax in float32
            y = own_experts(module, x, weights, index, neuron_scale)
            for e in range(module.num_experts):  # alpha = 0: e removed, each token to its next-best experts
                routed = (index == e).any(dim=1, keepdim=True)
                without = own_experts(module, x, *own_router(mlp, family, x, e), None)
                y = y + routed * (1 - expert_scale[e]) * (without - intact)
            return y

        handles.append(experts.register_forward_hook(replace))
    try:
        logits = model(torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    nll = -torch.log_softmax(logits[first - 1:-1].double(), -1).gather(1, torch.tensor(ids[first:])[:, None]).mean()
    nll.backward()
    return {name: -torch.stack([a.grad for a in values]).numpy() for name, values in alphas.items()}


# --- selection rules and components (identification) --------------------------------------------

def top_m(values: np.ndarray, epsilon: float) -> np.ndarray:
    """docs/method.md section 2 on one flat list: the m-th largest is the threshold; keep >= it and > 0."""
    ordered = sorted(values.tolist(), reverse=True)
    m = max(1, math.ceil(epsilon * len(ordered) - 1e-9))
    return (values >= ordered[m - 1]) & (values > 0)


def naive_rule(p: np.ndarray, rule: str, epsilon=0.01, tau=0.5, top_rate=0.01, filter_rate=0.95,
               bar_ratio=0.95) -> np.ndarray:
    """p[group, layer, neuron] -> selected[group, layer, neuron]."""
    groups = p.shape[0]
    if rule in ("attribution", "attribution_contrastive"):  # section 6a: estimates' means, ranked alike
        return naive_rule(p, rule.replace("attribution_", "").replace("attribution", "global_percentile"), epsilon)
    if rule == "threshold":
        return (p >= tau) & (p > 0)
    if rule == "global_percentile":
        return np.stack([top_m(p[g].ravel(), epsilon).reshape(p.shape[1:]) for g in range(groups)])
    if rule == "layer_percentile":
        return np.stack([np.stack([top_m(layer, epsilon) for layer in p[g]]) for g in range(groups)])
    if rule == "contrastive":
        out = np.zeros(p.shape, bool)
        for g in range(groups):
            best_other = np.max(np.delete(p, g, axis=0), axis=0)
            out[g] = top_m((p[g] - best_other).ravel(), epsilon).reshape(p.shape[1:])
        return out
    assert rule == "lape"
    flat_p = p.reshape(groups, -1)
    n = flat_p.shape[1]
    entropy = np.zeros(n)
    for c in range(n):
        total = flat_p[:, c].sum()
        for g in range(groups):
            q = flat_p[g, c] / total if total > 0 else 0.0
            if q > 0:
                entropy[c] -= q * math.log(q)
    everything = sorted(flat_p.ravel().tolist())
    filter_value = everything[max(1, round(n * groups * filter_rate)) - 1]
    candidate = (flat_p > filter_value).any(axis=0)
    keep = max(1, round(n * top_rate))
    ranked = sorted(entropy[candidate].tolist())
    kept = candidate & (entropy <= ranked[min(keep, len(ranked)) - 1]) if ranked else candidate
    bar = everything[max(1, round(n * groups * bar_ratio)) - 1]
    return (kept[None, :] & (flat_p > bar)).reshape(p.shape)


def naive_frequency(counts: np.ndarray, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
    total = int(tokens[rows].sum())
    summed = counts[rows].astype(np.int64).sum(0)
    return summed / total if total else np.zeros(summed.shape)


def naive_global_selection(frequency: np.ndarray, epsilon: float) -> np.ndarray:
    """Sort descending, take the m-th value, keep everything at or above it that is not zero."""
    flat = sorted(frequency.ravel().tolist(), reverse=True)
    m = max(1, math.ceil(epsilon * len(flat) - 1e-9))
    return (frequency >= flat[m - 1]) & (frequency > 0)


def naive_selection(frequency: np.ndarray, rule: str, epsilon: float, tau: float) -> np.ndarray:
    """frequency[layer, ...] of one group -> its set under the rule."""
    if rule == "threshold":
        return frequency >= tau
    if rule == "layer_percentile":
        return np.stack([naive_global_selection(layer, epsilon) for layer in frequency])
    return naive_global_selection(frequency, epsilon)


def group_rows(store: xr.Dataset, by: str) -> dict[str, np.ndarray]:
    key = "instruction_id" if by == "instruction" else by
    labels = np.array(store[key].values.tolist(), dtype=str)
    return {g: labels == g for g in sorted(set(labels.tolist()))}


def assert_components_match(components: xr.Dataset, store: xr.Dataset, settings: IdentificationSettings):
    rows = group_rows(store, settings.group_by)
    tokens = store.token_count.values
    # groups are sorted labels; per instruction they keep the store's order
    expected_groups = store.instruction_id.values.tolist() if settings.group_by == "instruction" else list(rows)
    assert [str(g) for g in components.group.values] == [str(g) for g in expected_groups]
    checked = 0
    for family in FAMILIES:
        if family.count not in store:
            assert family.frequency not in components and family.selected not in components
            continue
        counts = store[family.count].values
        for group, members in rows.items():
            expected = naive_frequency(counts, tokens, members)
            got = components[family.frequency].sel(group=group).values
            np.testing.assert_array_equal(got, expected, err_msg=f"{family.frequency} {group}")
            np.testing.assert_array_equal(
                components[family.selected].sel(group=group).values,
                naive_selection(expected, settings.rule, settings.epsilon, settings.tau),
                err_msg=f"{family.selected} {group} {settings.rule}")
            assert int(components.token_total.sel(group=group)) == int(tokens[members].sum())
            checked += 1
        if settings.rule == "global_percentile":
            for group, members in rows.items():
                flat = np.sort(naive_frequency(counts, tokens, members).ravel())[::-1]
                m = max(1, math.ceil(settings.epsilon * flat.size - 1e-9))
                assert float(components[family.threshold].sel(group=group)) == flat[m - 1]
    assert checked > 0


# --- generality ----------------------------------------------------------------------------------

def naive_generality(sets: dict[str, set]) -> dict:
    groups = list(sets)
    everything = set().union(*sets.values())
    return {
        "general": {c for c in everything if all(c in sets[g] for g in groups)},
        "unique": {g: sets[g] - set().union(*(sets[o] for o in groups if o != g)) for g in groups},
        "jaccard": {(a, b): (len(sets[a] & sets[b]) / len(sets[a] | sets[b]) if sets[a] | sets[b] else None)
                    for a in groups for b in groups},
    }


def assert_summary_matches_sets(summary: dict, components: xr.Dataset) -> None:
    """Every family's set sizes, general and unique counts and Jaccard indices in a report summary
    against set arithmetic on the selected components."""
    groups = [str(g) for g in components.group.values]
    for family in FAMILIES:
        if family.selected not in components:
            continue
        sets = {g: {tuple(ix) for ix in np.argwhere(components[family.selected].sel(group=g).values)}
                for g in groups}
        naive = naive_generality(sets)
        reported = summary["families"][family.name]
        assert reported["set_size"] == {g: len(sets[g]) for g in groups}
        assert reported["general_count"] == len(naive["general"])
        assert reported["unique_count"] == {g: len(naive["unique"][g]) for g in groups}
        for (a, b), value in naive["jaccard"].items():
            assert reported["jaccard"][a][b] == (None if value is None else round(value, 4))


def assert_moe_store_report_matches_set_arithmetic(tmp_path: Path) -> None:
    """Identify a constructed MoE store (five groups, six experts) and report its generality under
    tmp_path; every family's figures, returned and on disk, the stored general and unique masks,
    the per-layer and per-expert distributions, the tables and the report's headings against set
    arithmetic on the selected sets."""
    store = moe_store(23, CATEGORIES, experts=6)
    settings = IdentificationSettings(epsilon=0.15)
    components_path = identify_store(write_store(store, tmp_path / "s.zarr"), settings, tmp_path / "out")
    summary = report_generality(components_path, tmp_path / "out")
    components = xr.open_zarr(components_path).load()
    stored = xr.open_zarr(tmp_path / "out" / "generality.zarr").load()
    groups = summary["groups"]
    assert groups == ["CLS", "CODE", "MATH", "QA", "SUM"]
    assert set(summary["families"]) == {"neurons", "experts", "expert_neurons", "shared_neurons"}
    saved = json.loads(Path(summary["files"]["summary.json"]).read_text())

    for family in FAMILIES:
        selected = components[family.selected]
        dims = [d for d in selected.dims if d != "group"]
        sets = {g: {tuple(ix) for ix in np.argwhere(selected.sel(group=g).values)} for g in groups}
        naive = naive_generality(sets)
        part = family_part(stored, family)
        for reported in (summary["families"][family.name], saved["families"][family.name]):  # returned, on disk
            assert reported["general_count"] == len(naive["general"])
            assert reported["unique_count"] == {g: len(naive["unique"][g]) for g in groups}
            assert reported["set_size"] == {g: len(sets[g]) for g in groups}
            for (a, b), value in naive["jaccard"].items():
                assert reported["jaccard"][a][b] == (None if value is None else round(value, 4))
        reported = summary["families"][family.name]
        layer_axis = dims.index(family.layer_dim)
        for g in groups:
            per_layer = np.bincount([c[layer_axis] for c in sets[g]], minlength=selected.sizes[family.layer_dim])
            assert reported["set_size_per_layer"][g] == per_layer.tolist()
            unique_mask = np.zeros(selected.sel(group=g).shape, bool)
            for c in naive["unique"][g]:
                unique_mask[c] = True
            np.testing.assert_array_equal(part.unique.sel(group=g).values, unique_mask)
            if "expert" in dims:
                expert_axis = dims.index("expert")
                per_expert = np.bincount([c[expert_axis] for c in sets[g]], minlength=selected.sizes["expert"])
                assert reported["set_size_per_expert"][g] == per_expert.tolist()
                if sets[g]:
                    np.testing.assert_allclose(part.expert_distribution.sel(group=g).values, per_expert / len(sets[g]))
        general_mask = np.zeros(selected.shape[1:], bool)
        for c in naive["general"]:
            general_mask[c] = True
        np.testing.assert_array_equal(part.general.values, general_mask)

    files = summary["files"]
    for name in ("report.md", "summary.json", "jaccard.png", "layers.png", "experts.png"):
        assert Path(files[name]).is_file(), name
    expert_sets = {g: {tuple(ix) for ix in np.argwhere(components.ise.sel(group=g).values)} for g in groups}
    sets_table = pd.read_parquet(files["experts_sets.parquet"]).set_index("group")
    assert sets_table.set_size.to_dict() == {g: len(expert_sets[g]) for g in groups}
    jaccard_table = pd.read_parquet(files["expert_neurons_jaccard.parquet"])
    assert len(jaccard_table) == len(groups) ** 2
    report = Path(files["report.md"]).read_text()
    for heading in ("General neurons", "General experts", "General expert neurons", "Distribution over experts"):
        assert heading in report


# --- what a store's `hooked_modules` should list -----------------------------------------------

def hooked(module: str, kind: str, *counts: str) -> dict:
    """One entry of a store's `hooked_modules` attribute."""
    return {"module": module, "kind": kind, "counts": list(counts)}


def in_model_order(entries: list[dict]) -> list[dict]:
    """`model.layers.<i>....` entries ordered as `named_modules()` lists them: by layer, then a
    module before its submodules (the hooked ones sort by name the way the models define them)."""
    return sorted(entries, key=lambda entry: (int(entry["module"].split(".")[2]), entry["module"]))


def llama_hooked_modules(config) -> list[dict]:
    """A LLaMA's hook points: each layer's activation module, and the last layer's MLP, whose
    hook only stops the forward pass."""
    last = config.num_hidden_layers - 1
    return in_model_order(
        [hooked(f"model.layers.{i}.mlp.act_fn", "forward_hook", "act_count") for i in range(last + 1)]
        + [hooked(f"model.layers.{last}.mlp", "forward_hook")])
