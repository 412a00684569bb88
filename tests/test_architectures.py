"""Every supported family, dense and MoE: stored counts equal a naive per-token computation in
float64 (one prompt at a time, no padding, the full model with its LM head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparcom.extraction.architectures import UnsupportedArchitecture, ffn_sites
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.extract import extract_to_store
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import open_store

from conftest import forward_with_hooks, reference_tokens

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
MOE = dict(num_experts_per_tok=2)
CONFIGS = {
    "mistral": ("MistralConfig", dict(SMALL, intermediate_size=48)),
    "qwen2": ("Qwen2Config", dict(SMALL, intermediate_size=48)),
    "qwen3": ("Qwen3Config", dict(SMALL, intermediate_size=48, head_dim=8)),
    "gemma": ("GemmaConfig", dict(SMALL, intermediate_size=48, head_dim=8, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(SMALL, intermediate_size=48, head_dim=8)),
    "phi3": ("Phi3Config", dict(SMALL, intermediate_size=48)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=2048)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=2048)),
    "mixtral": ("MixtralConfig", dict(SMALL, **MOE, intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20, intermediate_size=40,
                                         mlp_only_layers=[0], decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                         intermediate_size=40, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(SMALL, **MOE, num_experts=4, intermediate_size=24)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        **{**SMALL, **MOE, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=40, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        **{**SMALL, **MOE, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=2, moe_intermediate_size=16,
        intermediate_size=40, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
}
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


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    built = {}

    def build(family: str):
        if family not in built:
            config_class, options = CONFIGS[family]
            config = getattr(transformers, config_class)(
                vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **options)
            torch.manual_seed(1)
            model = AutoModelForCausalLM.from_config(config)
            directory = tmp_path_factory.mktemp(family)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            built[family] = directory
        return built[family]

    return build


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


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_counts_are_exact_for_every_family(tmp_path, tiny_models, cache_dir, sample_records, family):
    directory = tiny_models(family)
    loaded = load_model(resolve_model(str(directory)), cache_dir, dtype="float64", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float64, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    spans = ["prompt", "response"] if family in ("qwen2_moe", "deepseek_v3", "mixtral") else ["prompt"]
    # Gemma2's eager attention overflows its float64 mask under left padding (NaN, refused below).
    sides = ["right"] if family == "gemma2" else ["left", "right"]
    for span in spans:
        expected = [naive_counts(model, *reference_tokens(r, tokenizer, span)) for r in sample_records]
        for max_batch_size, side in [(3, sides[0]), (64, sides[-1])]:
            settings = ExtractionSettings(span=span, max_batch_size=max_batch_size, padding_side=side,
                                          shard_size=5)
            store = open_store(extract_to_store(
                loaded, sample_records, tmp_path / f"{span}-{max_batch_size}.zarr", settings))
            assert set(expected[0]) == set(store.data_vars) - {"token_count"}
            for name in expected[0]:
                np.testing.assert_array_equal(
                    store[name].values, np.stack([e[name] for e in expected]), err_msg=f"{family} {name}")


def test_nan_activations_are_refused(tmp_path, tiny_models, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_models("gemma2"))), cache_dir, dtype="float64", device="cpu")
    with pytest.raises(FloatingPointError, match="NaN at counted tokens"):
        extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings(padding_side="left"))


def test_moe_store_layout_follows_spec(tmp_path, tiny_models, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_models("deepseek_v3"))), cache_dir, dtype="float32", device="cpu")
    store = open_store(extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings()))
    assert store.act_count.dims == ("instruction", "layer", "neuron")
    assert list(store.layer.values) == [0]
    assert store.expert_act_count.dims == ("instruction", "moe_layer", "expert", "expert_neuron")
    assert list(store.moe_layer.values) == [1, 2]
    assert dict(store.expert_count.sizes) == {"instruction": 12, "moe_layer": 2, "expert": 4}
    assert store.shared_act_count.sizes["shared_neuron"] == 32  # two shared experts of 16
    # top-2 routing: each counted token is routed to exactly two experts
    np.testing.assert_array_equal(store.expert_count.sum("expert").values,
                                  2 * np.broadcast_to(store.token_count.values[:, None], (12, 2)))


def test_unsupported_architecture_is_named(tokenizer_dir):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=32, is_decoder=True)
    model = transformers.BertLMHeadModel(config)
    with pytest.raises(UnsupportedArchitecture, match="'bert' is not supported; supported: deepseek_v2"):
        ffn_sites(model)
