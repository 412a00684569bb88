"""Switching components off and measuring response NLL, each against the test's own computation:
a plain one-record-at-a-time NLL from the full model's logits, neurons zeroed in a copy of the
weights at another place (down_proj's input columns), and experts removed by a router the test
writes itself."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from sparcom.intervention.hooks import Ablation, AblationError
from sparcom.extraction.architectures import ffn_sites
from sparcom.extraction.settings import ExtractionSettings
from sparcom.intervention.response_nll import response_nll, tokenize_responses

from builders import make_record, tiny
from references import mlps, reference_tokens, zero_down_columns

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def naive_nll(model: nn.Module, record, tokenizer) -> float:
    """The full model's logits on one unpadded record, then the mean NLL of the response tokens."""
    ids, first = reference_tokens(record, tokenizer, "response")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits[first - 1:-1], dim=-1)
    return float(-log_probs.gather(1, torch.tensor(ids[first:])[:, None]).mean())


def test_nll_equals_one_record_at_a_time_for_every_batching(sample_records, tokenizer):
    for family in ("mistral", "gpt2", "gemma2", "qwen2_moe"):
        model = tiny(family, tokenizer)
        expected = [naive_nll(model, r, tokenizer) for r in sample_records]
        tokenized = tokenize_responses(sample_records, tokenizer)
        sides = ["right"] if family == "gemma2" else ["right", "left"]
        for side in sides:
            for max_batch_size in (1, 3, 64):
                settings = ExtractionSettings(padding_side=side, max_batch_size=max_batch_size, max_padding=0.5)
                got = response_nll(model, tokenized, tokenizer, settings, DEVICE)
                np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{family} {side} {max_batch_size}")


def test_response_cap_and_empty_response(sample_records, tokenizer):
    model = tiny("mistral", tokenizer)
    record = sample_records[5]
    ids, first = reference_tokens(record, tokenizer, "response")
    capped = tokenize_responses([record], tokenizer, max_response_tokens=3)[0]
    assert list(capped.input_ids) == ids[:first + 3] and sum(capped.counted) == 3
    with torch.no_grad():
        logits = model(torch.tensor([ids[:first + 3]])).logits[0].double()
    expected = -torch.log_softmax(logits[first - 1:-1], -1).gather(1, torch.tensor(ids[first:first + 3])[:, None]).mean()
    got = response_nll(model, [capped], tokenizer, ExtractionSettings(), DEVICE)
    np.testing.assert_allclose(got, [float(expected)], atol=1e-5)
    silent = make_record(99, "QA", "Say nothing.")
    blank = silent.model_copy(update={"response": ""})
    with pytest.raises(ValueError, match="record t-099: its response has no tokens"):
        tokenize_responses([blank], tokenizer)


@pytest.mark.parametrize("family", ["mistral", "gemma", "phi3", "gpt2", "gpt_neox"])
def test_dense_neurons_off_equals_zeroed_down_projection(sample_records, tokenizer, family):
    model = tiny(family, tokenizer)
    sites = ffn_sites(model)
    rng = np.random.default_rng(0)
    mask = rng.random((len(sites.dense_layers), sites.dense_neurons)) < 0.2
    copied = copy.deepcopy(model)
    for mlp, row in zip(mlps(copied), mask):
        zero_down_columns(mlp, np.flatnonzero(row).tolist(), family)
    expected = [naive_nll(copied, r, tokenizer) for r in sample_records]
    plain = [naive_nll(model, r, tokenizer) for r in sample_records]
    tokenized = tokenize_responses(sample_records, tokenizer)
    with Ablation(model, {"neurons": mask}):
        got = response_nll(model, tokenized, tokenizer, ExtractionSettings(max_batch_size=4), DEVICE)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(np.array(expected) - plain).max() > 1e-2  # the switch changed something
    # the hooks are gone: the model is itself again
    np.testing.assert_allclose([naive_nll(model, r, tokenizer) for r in sample_records], plain, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe"])
def test_expert_and_shared_neurons_off_equal_zeroed_down_projection(sample_records, tokenizer, family):
    model = tiny(family, tokenizer)
    sites = ffn_sites(model)
    rng = np.random.default_rng(1)
    expert_mask = rng.random((len(sites.moe_layers), sites.experts, sites.expert_neurons)) < 0.25
    off = {"expert_neurons": expert_mask}
    copied = copy.deepcopy(model)
    for layer, mask in zip(sites.moe_layers, expert_mask):
        experts = copied.model.layers[layer.index].mlp.experts
        with torch.no_grad():
            for e, i in zip(*np.nonzero(mask)):
                experts.down_proj[e, :, i] = 0  # expert e's own down projection only
    if sites.has_shared_experts:
        off["shared_neurons"] = rng.random((len(sites.moe_layers), sites.shared_neurons)) < 0.25
        for layer, mask in zip(sites.moe_layers, off["shared_neurons"]):
            mlp = copied.model.layers[layer.index].mlp
            shared = getattr(mlp, "shared_expert", None) or mlp.shared_experts
            zero_down_columns(shared, np.flatnonzero(mask).tolist(), family)
    expected = [naive_nll(copied, r, tokenizer) for r in sample_records]
    plain = [naive_nll(model, r, tokenizer) for r in sample_records]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokenized = tokenize_responses(sample_records, tokenizer)
    with Ablation(model, off):
        got = response_nll(model, tokenized, tokenizer, ExtractionSettings(max_batch_size=5), DEVICE)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(np.array(expected) - plain).max() > 1e-2
    for name, parameter in model.named_parameters():  # every weight written back exactly
        assert torch.equal(parameter, before[name]), name


class ExcludingRouter(nn.Module):
    """The test's own router that cannot choose some experts: softmax over the allowed experts,
    top-k, then the model's normalisation (Mixtral always; Qwen2-MoE and OLMoE by norm_topk_prob)."""

    def __init__(self, router: nn.Module, removed: list[int], normalise: bool):
        super().__init__()
        self.weight, self.top_k, self.removed, self.normalise = router.weight, router.top_k, removed, normalise

    def forward(self, hidden):
        hidden = hidden.reshape(-1, self.weight.shape[1])
        logits = hidden @ self.weight.T
        allowed = [e for e in range(self.weight.shape[0]) if e not in self.removed]
        probs = torch.zeros_like(logits)
        probs[:, allowed] = torch.softmax(logits[:, allowed].double(), dim=-1).float()
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, indices


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_removed_expert_equals_a_router_that_cannot_choose_it(sample_records, tokenizer, family):
    model = tiny(family, tokenizer)
    sites = ffn_sites(model)
    mask = np.zeros((len(sites.moe_layers), sites.experts), dtype=bool)
    mask[0, 1] = True
    mask[-1, [0, 3]] = True
    copied = copy.deepcopy(model)
    normalise = family == "mixtral" or bool(model.config.norm_topk_prob)
    for layer, row in zip(sites.moe_layers, mask):
        mlp = copied.model.layers[layer.index].mlp
        mlp.gate = ExcludingRouter(mlp.gate, np.flatnonzero(row).tolist(), normalise)
    expected = [naive_nll(copied, r, tokenizer) for r in sample_records]
    plain = [naive_nll(model, r, tokenizer) for r in sample_records]
    tokenized = tokenize_responses(sample_records, tokenizer)
    chosen = []
    hook = model.model.layers[sites.moe_layers[-1].index].mlp.experts.register_forward_pre_hook(
        lambda m, args: chosen.append(args[1].clone()))
    try:
        with Ablation(model, {"experts": mask}):
            got = response_nll(model, tokenized, tokenizer, ExtractionSettings(max_batch_size=4), DEVICE)
    finally:
        hook.remove()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(np.array(expected) - plain).max() > 1e-2
    routed = torch.cat([c.reshape(-1) for c in chosen])
    assert not torch.isin(routed, torch.tensor([0, 3])).any()


def test_deepseek_v3_removed_expert_is_never_chosen(sample_records, tokenizer):
    model = tiny("deepseek_v3", tokenizer)
    sites = ffn_sites(model)
    mask = np.zeros((len(sites.moe_layers), sites.experts), dtype=bool)
    mask[:, 0] = True  # the expert the correction bias favours most
    chosen = []
    hooks = [model.model.layers[layer.index].mlp.experts.register_forward_pre_hook(
        lambda m, args: chosen.append(args[1].clone())) for layer in sites.moe_layers]
    try:
        with Ablation(model, {"experts": mask}):
            response_nll(model, tokenize_responses(sample_records[:3], tokenizer), tokenizer,
                         ExtractionSettings(), DEVICE)
    finally:
        for hook in hooks:
            hook.remove()
    routed = torch.cat([c.reshape(-1) for c in chosen])
    assert len(routed) and not (routed == 0).any()


def test_bad_masks_are_refused(tokenizer):
    model = tiny("mixtral", tokenizer)
    with pytest.raises(AblationError, match="unknown component family 'neuron'"):
        Ablation(model, {"neuron": np.zeros((3, 24), dtype=bool)})
    with pytest.raises(AblationError, match=r"experts: the mask has shape \(3, 5\)"):
        Ablation(model, {"experts": np.zeros((3, 5), dtype=bool)})
    too_many = np.zeros((3, 4), dtype=bool)
    too_many[0, :3] = True
    with pytest.raises(AblationError, match="leaves 1, fewer than the 2"):
        with Ablation(model, {"experts": too_many}):
            pass
    assert not model.model.layers[0].mlp.gate._forward_hooks  # nothing left behind
