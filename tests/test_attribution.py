"""The attribution estimate against its definition, computed here one record at a time in float64:
each component's contribution scaled by its own alpha in the test's own forward pass (dense and
shared neurons: down_proj's input; routed experts: the experts recomputed token by token, with
the removed expert's output from the test's own router), then -dL/dalpha at alpha = 1 by
autograd (tests/references.py). Batched and padded float32 estimates equal it within 1e-4 x its
largest |value| per layer. Without autograd, the strongest neuron's estimate is the slope of the
loss itself; a record without a response is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sparcom.attribution.estimate import AttributionError, attribute_records
from sparcom.attribution.schema import RESPONSE_TOKENS
from sparcom.core.models import LoadedModel
from sparcom.extraction.settings import ExtractionSettings

from builders import SAMPLE_TEXTS, SMALL, make_record, tiny
from references import attribution_reference, reference_tokens

FAMILIES = ["llama", "gpt2", "mixtral", "qwen2_moe", "olmoe"]
K = 5  # response tokens scored


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def model_of(family: str, tokenizer, dtype: torch.dtype):
    """builders.tiny's families, and LLaMA itself, all with the same large random weights (clear
    effects) in either precision."""
    if family == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             initializer_range=0.2, intermediate_size=48, **SMALL)
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = tiny(family, tokenizer)
    if dtype == torch.float64:
        model = model.double()
        if hasattr(model.config, "_experts_implementation"):
            model.set_experts_implementation("eager")  # as load_model does: grouped_mm has no float64
    return model


def loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(source=None, fingerprint="test", model=model, tokenizer=tokenizer,
                       dtype=next(model.parameters()).dtype, device=torch.device("cpu"))


def per_layer_error(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """max |got - expected| over each layer, over that layer's largest |expected|."""
    axes = tuple(range(1, expected.ndim))
    return np.abs(got - expected).max(axis=axes) / np.abs(expected).max(axis=axes)


@pytest.fixture(scope="module")
def records():
    return [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS[:6])]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_equals_the_alpha_definition(family, tokenizer, records):
    """float64, one record at a time (batches of one) and all K response tokens or the first K."""
    model = model_of(family, tokenizer, torch.float64)
    for k in (K, None):
        got = attribute_records(loaded(model, tokenizer), records[:3], k, ExtractionSettings(max_batch_size=1))
        for row, record in enumerate(records[:3]):
            expected = attribution_reference(model, record, tokenizer, k)
            assert set(expected) == set(got.data_vars) - {RESPONSE_TOKENS}
            for name, values in expected.items():
                assert np.abs(values).max() > 1e-3, f"{name}: the reference is all but zero, the test decides nothing"
                np.testing.assert_allclose(got[name].values[row], values, rtol=1e-5,
                                           atol=1e-6 * np.abs(values).max(), err_msg=f"{family} {name} {record.id} K={k}")
    assert all(p.requires_grad for p in model.parameters()), "the parameters' own flags come back"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_and_padded_float32_equals_one_at_a_time(family, side, tokenizer, records):
    exact = model_of(family, tokenizer, torch.float64)
    model = model_of(family, tokenizer, torch.float32)
    settings = ExtractionSettings(max_batch_size=4, max_padding=0.9, padding_side=side)
    got = attribute_records(loaded(model, tokenizer), records, K, settings)
    tokens = [min(K, len(tokenizer(r.response, add_special_tokens=False)["input_ids"])) for r in records]
    assert got[RESPONSE_TOKENS].values.tolist() == tokens
    for row, record in enumerate(records):
        for name, values in attribution_reference(exact, record, tokenizer, K).items():
            error = per_layer_error(got[name].values[row], values)
            assert (error <= 1e-4).all(), f"{family} {side} {name} {record.id}: per layer {error}"


def test_a_record_without_a_response_is_refused_by_name(tokenizer, records):
    blank = records[0].model_copy(update={"response": "  "})
    model = model_of("llama", tokenizer, torch.float32)
    with pytest.raises(AttributionError, match=f"record {blank.id}: has no response"):
        attribute_records(loaded(model, tokenizer), [records[1], blank], K, ExtractionSettings())


def test_the_estimate_is_the_slope_of_the_loss_itself(tokenizer, records):
    """No autograd: the strongest neuron of the last layer scaled by 1 +- 1e-3 in the model's own
    forward pass, the loss's central difference (its error is of order 1e-6: LLaMA's norms compute
    in float32, so smaller steps lose precision)."""
    model = model_of("llama", tokenizer, torch.float64)
    record = records[2]
    got = attribute_records(loaded(model, tokenizer), [record], 1, ExtractionSettings())["act_attribution"].values[0]
    ids, first = reference_tokens(record, tokenizer, "response")
    ids = ids[:first + 1]
    down = model.model.layers[-1].mlp.down_proj
    neuron = int(np.abs(got[-1]).argmax())

    def loss(alpha: float) -> float:
        def scale(module, args):
            h = args[0].clone()
            h[..., neuron] *= alpha
            return (h,)

        handle = down.register_forward_pre_hook(scale)
        try:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, first - 1].double()
        finally:
            handle.remove()
        return float(-torch.log_softmax(logits, -1)[ids[first]])

    step = 1e-3
    np.testing.assert_allclose(got[-1, neuron], -(loss(1 + step) - loss(1 - step)) / (2 * step), rtol=1e-4)
    assert abs(got[-1, neuron]) > 0.1
