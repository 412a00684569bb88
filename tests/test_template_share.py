"""The template's share of the counted tokens: tokens per prompt from the tokenizer, the share
per group as arithmetic on known numbers, and the reasons it is left out."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from transformers import AutoTokenizer

import sparcom.identification.template
from sparcom.identification.template import template_share, template_tokens


def test_template_tokens_are_the_prompt_minus_the_user_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "What is 12 times 7?"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    expected = len(prompt) - len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert template_tokens(tokenizer_dir) == expected > 0


def test_share_per_group_is_template_tokens_over_counted_tokens(monkeypatch):
    monkeypatch.setattr(sparcom.identification.template, "template_tokens", lambda path: 10)
    labels = np.array(["CLS", "CLS", "QA", "SUM"])
    tokens = xr.DataArray([80.0, 50.0, 0.0], dims="group", coords={"group": ["CLS", "QA", "SUM"]})
    share, attrs = template_share({"token_span": "prompt", "chat_template": True, "model_path": "m"},
                                  labels, tokens)
    assert attrs == {"template_tokens_per_prompt": 10}
    assert share.sel(group="CLS") == pytest.approx(20 / 80) and share.sel(group="QA") == pytest.approx(10 / 50)
    assert np.isnan(float(share.sel(group="SUM")))  # no counted tokens


@pytest.mark.parametrize("attrs, reason", [
    ({"token_span": "content"}, "no template tokens are counted"),
    ({}, "does not record its token span"),
    ({"token_span": "prompt", "chat_template": False}, "no chat template"),
    ({"token_span": "prompt", "chat_template": True, "model_path": "/nowhere/at/all"}, "not usable"),
])
def test_left_out_with_a_reason(attrs, reason):
    share, said = template_share(attrs, np.array(["a"]), xr.DataArray([1.0], dims="group"))
    assert share is None and reason in said["template_share_left_out"]
