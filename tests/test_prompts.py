"""Token spans (docs/method.md section 2): which tokens are counted, checked by decoding them back."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sparcom.curation.prompts import tokenize_instruction


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def counted_ids(tokenized) -> list[int]:
    return [t for t, counted in zip(tokenized.input_ids, tokenized.counted) if counted]


def test_prompt_span_counts_the_whole_templated_prompt(tokenizer, sample_records):
    for record in sample_records:
        tokenized = tokenize_instruction(record, tokenizer, "prompt")
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": record.user_turn()}], add_generation_prompt=True)["input_ids"]
        assert list(tokenized.input_ids) == list(expected) and all(tokenized.counted)


def test_content_span_counts_exactly_the_user_text(tokenizer, sample_records):
    for record in sample_records:
        tokenized = tokenize_instruction(record, tokenizer, "content")
        assert tokenized.input_ids == tokenize_instruction(record, tokenizer, "prompt").input_ids
        positions = [i for i, counted in enumerate(tokenized.counted) if counted]
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous run
        assert tokenizer.decode(counted_ids(tokenized)) == record.user_turn()
        assert len(positions) < len(tokenized)  # the template's tokens are left out


def test_response_span_counts_only_the_reference_answer(tokenizer, sample_records):
    for record in sample_records:
        tokenized = tokenize_instruction(record, tokenizer, "response")
        prompt = tokenize_instruction(record, tokenizer, "prompt")
        assert tokenized.input_ids[:len(prompt)] == prompt.input_ids
        assert not any(tokenized.counted[:len(prompt)])
        assert tokenizer.decode(counted_ids(tokenized)) == record.response


def test_model_without_chat_template_reads_plain_text(tokenizer, sample_records):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    record = sample_records[5]  # has an input passage
    tokenized = tokenize_instruction(record, plain, "content")
    assert list(tokenized.input_ids) == plain(record.user_turn())["input_ids"]
    assert plain.decode(counted_ids(tokenized)) == record.user_turn()


def test_unknown_span_is_refused(tokenizer, sample_records):
    with pytest.raises(ValueError, match="unknown token span 'answer'"):
        tokenize_instruction(sample_records[0], tokenizer, "answer")
