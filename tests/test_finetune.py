"""Fine-tuning on a tiny random LLaMA: label masking, weights change, the checkpoint loads and
names its base, seeded runs agree, reruns hit the cache, LoRA merges, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

import sparcom.comparison.finetune as finetune_module
from sparcom.comparison.settings import FinetuneSettings
from sparcom.extraction.settings import ModelSettings
from sparcom.comparison.finetune import (
    IGNORED, FinetuneError, collate, encode_example, read_provenance, total_steps, train_checkpoint,
    training_loss, training_records,
)
from sparcom.curation.hexainst import authored_records
from sparcom.curation.starter import starter_set
from sparcom.core.models import load_model, model_fingerprint, resolve_model
from sparcom.curation.prompts import prompt_ids
from sparcom.comparison.keys import finetune_key, planned_finetune_key
from sparcom.curation.records import RecordError

QUICK = FinetuneSettings(categories=["MATH"], steps=3, batch_size=2, max_tokens=96, learning_rate=1e-2)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory, tiny_llama_dir, cache_dir) -> Path:
    return train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), QUICK,
                    tmp_path_factory.mktemp("checkpoints"), cache_dir)


def test_labels_cover_exactly_the_response(tokenizer, sample_records):
    for record in sample_records:
        example = encode_example(record, tokenizer, max_tokens=4096)
        prompt = prompt_ids(record, tokenizer)
        n = len(prompt)
        assert list(example.input_ids[:n]) == prompt
        assert all(label == IGNORED for label in example.labels[:n])
        assert list(example.labels[n:]) == list(example.input_ids[n:]) and len(example.labels) > n
        response = tokenizer.decode(example.input_ids[n:])
        assert response.startswith(record.response) and "<|im_end|>" in response
        assert example.response_tokens == len(example.input_ids) - n


def test_labels_are_cut_with_the_tokens(tokenizer, sample_records):
    record = sample_records[5]  # a long prompt (SUM with a passage)
    n = len(prompt_ids(record, tokenizer))
    longer = encode_example(record, tokenizer, max_tokens=n + 3)
    assert len(longer.input_ids) == n + 3 and longer.response_tokens == 3
    cut = encode_example(record, tokenizer, max_tokens=n - 5)
    assert len(cut.input_ids) == n - 5 and cut.response_tokens == 0


def test_plain_text_without_chat_template(tokenizer, sample_records):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    record = sample_records[2]
    example = encode_example(record, plain, max_tokens=4096)
    n = len(plain(record.user_turn())["input_ids"])
    assert all(label == IGNORED for label in example.labels[:n])
    assert example.input_ids[-1] == plain.eos_token_id
    assert plain.decode(example.input_ids[n:-1]).strip() == record.response


def test_collate_masks_padding(tokenizer, sample_records):
    examples = [encode_example(r, tokenizer, 4096) for r in sample_records[:3]]
    batch = collate(examples, pad_id=0)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, width)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["labels"][row, :n].tolist() == list(example.labels)
        assert (batch["labels"][row, n:] == IGNORED).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["attention_mask"][row, :n] == 1).all()


def test_loss_counts_only_response_tokens(tiny_llama_dir, tokenizer, sample_records, cache_dir):
    """The model's loss equals a hand-computed mean cross-entropy over the response tokens alone."""
    model = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, "float64", "cpu").model
    example = encode_example(sample_records[4], tokenizer, 4096)
    batch = collate([example], pad_id=0)
    with torch.no_grad():
        output = model(**batch)
    log_probs = torch.log_softmax(output.logits[0], dim=-1)
    n = len(prompt_ids(sample_records[4], tokenizer))
    targets = range(n, len(example.input_ids))
    expected = -sum(log_probs[t - 1, example.input_ids[t]] for t in targets) / len(targets)
    assert float(output.loss) == pytest.approx(float(expected), rel=1e-6)  # HF computes the loss in float32


def test_the_training_loss_is_the_models_over_a_padded_batch(tiny_llama_dir, tokenizer, sample_records, cache_dir):
    """Response tokens of records of different lengths, right-padded: the mean over every response
    token of the batch (not the mean of the records' means), as the model's own loss."""
    model = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, "float64", "cpu").model
    examples = [encode_example(r, tokenizer, 4096) for r in sample_records[:3]]
    assert len({len(e.input_ids) for e in examples}) > 1 and len({e.response_tokens for e in examples}) > 1
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        reference, loss = model(**batch).loss, training_loss(model, batch)
    # both take the cross-entropy of float32 logits
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)


def test_training_records_choice(tmp_path, sample_records):
    math_only = training_records(FinetuneSettings(categories=["MATH"]))
    assert {r.category for r in math_only} == {"MATH"} and len(math_only) == 100
    held_out = {r.id for r in starter_set()}
    held_out_ai = sum(r.origin == "ai" and r.category in ("CODE", "MATH") for r in starter_set())
    kept = training_records(FinetuneSettings(categories=["CODE", "MATH"]), held_out)
    assert len(kept) == 200 - held_out_ai and not held_out & {r.id for r in kept}
    assert len(training_records(FinetuneSettings(categories=[]))) == len(authored_records())
    user = tmp_path / "mine.jsonl"
    user.write_text("".join(r.model_dump_json() + "\n" for r in sample_records))
    assert [r.id for r in training_records(FinetuneSettings(dataset=user, categories=["QA"]))] == ["t-002", "t-006"]
    with pytest.raises(RecordError, match="mine.jsonl: no training records of categories MATH"):
        training_records(FinetuneSettings(dataset=user, categories=["MATH"]), {"t-004", "t-007"})


def test_key_depends_on_what_training_depends_on():
    key = finetune_key("f" * 64, "d" * 64, QUICK)
    assert key == finetune_key("f" * 64, "d" * 64, QUICK.model_copy(update={"device": "cuda"}))
    for other in (finetune_key("e" * 64, "d" * 64, QUICK), finetune_key("f" * 64, "c" * 64, QUICK),
                  finetune_key("f" * 64, "d" * 64, QUICK.model_copy(update={"seed": 1})),
                  finetune_key("f" * 64, "d" * 64, QUICK.model_copy(update={"method": "lora"}))):
        assert other != key


def test_steps_or_epochs():
    assert total_steps(100, FinetuneSettings(steps=7)) == 7
    assert total_steps(100, FinetuneSettings(epochs=2, batch_size=4, gradient_accumulation=2)) == 25


def test_finetune_changes_weights_and_writes_a_loadable_checkpoint(tuned_dir, tiny_llama_dir, cache_dir):
    before, after = weights(tiny_llama_dir), weights(tuned_dir)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.mlp.gate_proj.weight" in changed and len(changed) > len(before) // 2

    provenance = read_provenance(tuned_dir)
    base_fingerprint = model_fingerprint(resolve_model(str(tiny_llama_dir)), cache_dir)
    assert provenance["base_fingerprint"] == base_fingerprint
    assert provenance["settings"]["steps"] == 3 and provenance["steps"] == 3 and len(provenance["losses"]) == 3
    assert provenance["training_data"]["per_category"] == {"MATH": 100}
    assert tuned_dir.name.endswith(provenance["finetune_key"][:16])
    # one key: the task's cache key, computed before training, is the checkpoint's own
    assert provenance["finetune_key"] == planned_finetune_key(ModelSettings(name=str(tiny_llama_dir)), QUICK,
                                                              None, cache_dir)

    loaded = load_model(resolve_model(str(tuned_dir)), cache_dir, "float32", "cpu")
    assert loaded.fingerprint != base_fingerprint
    assert torch.equal(loaded.model.state_dict()["model.layers.0.mlp.gate_proj.weight"],
                       after["model.layers.0.mlp.gate_proj.weight"])
    assert loaded.tokenizer.chat_template is not None


def test_rerun_hits_the_cache(tuned_dir, tiny_llama_dir, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reusing the checkpoint")

    monkeypatch.setattr(finetune_module, "train", no_training)
    again = train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), QUICK, tuned_dir.parent, cache_dir)
    assert again == tuned_dir
    with pytest.raises(AssertionError, match="trained again"):
        train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), QUICK.model_copy(update={"seed": 5}),
                 tuned_dir.parent, cache_dir)


def test_same_seed_same_weights(tuned_dir, tiny_llama_dir, tmp_path, cache_dir):
    repeat = train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), QUICK, tmp_path, cache_dir)
    first, second = weights(tuned_dir), weights(repeat)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lora_trains_and_merges(tiny_llama_dir, tmp_path, cache_dir):
    settings = QUICK.model_copy(update={"method": "lora", "lora_rank": 4})
    checkpoint = train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), settings, tmp_path, cache_dir)
    before, after = weights(tiny_llama_dir), weights(checkpoint)
    assert before.keys() == after.keys(), "the adapters are merged into plain weights"
    assert not torch.equal(before["model.layers.1.mlp.gate_proj.weight"], after["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert read_provenance(checkpoint)["settings"]["method"] == "lora"
    load_model(resolve_model(str(checkpoint)), cache_dir, "float32", "cpu")


def test_too_short_max_tokens_is_refused(tiny_llama_dir, tmp_path, cache_dir):
    with pytest.raises(FinetuneError, match="max_tokens = 8 cuts every response away"):
        train_checkpoint(ModelSettings(name=str(tiny_llama_dir)), QUICK.model_copy(update={"max_tokens": 8}),
                 tmp_path, cache_dir)
    assert not list(tmp_path.iterdir())


def test_read_provenance_of_a_plain_model(tiny_llama_dir):
    with pytest.raises(FinetuneError, match="not a finished sparcom fine-tune"):
        read_provenance(tiny_llama_dir)


@pytest.mark.slow
def test_cli_finetune(tiny_llama_dir, tmp_path, cache_dir, monkeypatch, prefect_harness):
    from cli.app import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    result = CliRunner().invoke(app, [
        "finetune", "--model", str(tiny_llama_dir), "--categories", "QA,SUM", "--steps", "2",
        "--batch-size", "2", "--max-tokens", "200", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    checkpoint = Path(result.output.strip().splitlines()[-1].removeprefix("checkpoint: "))
    assert checkpoint.parent == tmp_path / "checkpoints"
    provenance = json.loads((checkpoint / "sparcom_finetune.json").read_text())
    assert provenance["training_data"]["per_category"] == {"QA": 100, "SUM": 100}
    assert provenance["settings"]["max_tokens"] == 200 and provenance["steps"] == 2
