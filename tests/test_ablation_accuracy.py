"""Accuracy under ablation: answers extracted from constructed strings with known answers, greedy
decoding against Hugging Face's own `generate(do_sample=False)` one record at a time, accuracy
against plain means in the test, a no-op ablation, the stage with the flag on and off, the
settings, the CLI flags and the cache key."""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli.app import app
from sparcom.ablation.ablate import AblationInputError, run_ablation
from sparcom.ablation.accuracy import accuracy_dataset, answers_correct, greedy_generate, tokenize_prompts
from sparcom.intervention.hooks import Ablation
from sparcom.ablation.report import ablation_markdown, report_ablation, summarize_ablation
from sparcom.ablation.answers import is_correct, numbers, reference_answer
from sparcom.extraction.architectures import ffn_sites
from sparcom.ablation.settings import AblationSettings
from sparcom.config import load_settings
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.batching import plan_batches

from builders import SAMPLE_TEXTS, make_record, tiny, write_jsonl
from references import mlps, zero_down_columns

DEVICE = torch.device("cpu")
NEW_TOKENS = 6
# Every batch mixes prompt lengths: left padding is exercised.
PADDED = ExtractionSettings(max_batch_size=4, max_padding=0.9)
NLL_VARIABLES = {"nll_base", "nll", "nll_control", "ablated_size", "mean_frequency", "control_mean_frequency",
                 "delta", "delta_ci", "delta_other", "delta_other_ci", "delta_control", "delta_control_ci",
                 "specificity", "specificity_ci", "control_ratio", "control_ratio_ci", "control_p_value",
                 "records", "control_difference", "control_difference_ci", "control_min_p", "specific_difference",
                 "specific_difference_ci", "specific_p_value", "specific_min_p"}
ACCURACY_VARIABLES = {"answer_checkable", "reference_answer", "generation_base", "generation", "correct_base",
                      "correct", "correct_control", "accuracy_records", "accuracy_base", "accuracy",
                      "accuracy_control"}


def record(category: str, response: str, i: int = 0):
    return make_record(i, category, f"Question {i}", response=response)


@pytest.mark.parametrize(("response", "answer"), [
    ("Negative", "negative"), ("Negative.", "negative"), ("Location. The Danube is a river in Europe.", "location"),
    ("Open-ended question", "open-ended question"), ("**Spam**", "spam"),
    ("Dolphin: mammal\nPenguin: bird", None), ("A sentence of far more than four words here.", None),
])
def test_cls_reference_labels(response, answer):
    assert reference_answer(record("CLS", response)) == answer


@pytest.mark.parametrize(("response", "answer"), [
    ("14 x $2.75 = $38.50.\nAnswer: $38.50", Fraction("38.5")), ("Answer: 2/3", Fraction(2, 3)),
    ("7x - 9 = 3x + 19\nAnswer: x = 7", 7), ("d = 13 cm\nAnswer: 13 cm", 13), ("Answer: 1 7/12", Fraction(19, 12)),
    ("Answer: $6,348.67", Fraction("6348.67")), ("Answer: 15%", 15), ("Answer: -3", -3), ("Answer: 20 m/s", 20),
    ("So the total is \\boxed{\\frac{14}{3}}.", Fraction(14, 3)), ("The sum is\n391", 391),
    ("Answer: x = 7, y = 3", None), ("Answer: y = 2x - 5", None), ("Answer: 36π ≈ 113.10", None),
    ("Answer: about 39.9 years", None), ("Answer: -1 + 2i", None),
])
def test_math_reference_numbers(response, answer):
    got = reference_answer(record("MATH", response))
    assert got == (None if answer is None else str(Fraction(answer)))


def test_numbers_are_normalised():
    assert numbers("It costs $1,200.0, i.e. −3 + 7.50 or 3/4, \\frac{1}{2}, 12x and x² but (2,6)") == [
        1200, -3, Fraction("7.5"), Fraction(3, 4), Fraction(1, 2), 2, 6]


@pytest.mark.parametrize(("category", "response", "generation", "correct"), [
    ("CLS", "Negative", "Negative", True), ("CLS", "Negative", "**negative** - the customer is unhappy", True),
    ("CLS", "Negative", "Answer: Negative.", True), ("CLS", "Negative", "Sentiment: negative", True),
    ("CLS", "Negative", "\n\nNegative\nbecause", True), ("CLS", "Negative", "Negatively charged", False),
    ("CLS", "Spam", "Not spam", False), ("CLS", "Not spam", "Spam", False),
    ("CLS", "Negative", "The review is positive, not negative", False),
    ("CLS", "Sports", "Sports, politics, technology, or health.", False), ("CLS", "Spam", "Spam or not spam?", False),
    ("CLS", "Negative", "Negative sentiment, clearly", True),
    ("CLS", "Open-ended question", "open-ended question.", True),
    ("MATH", "Answer: 38.50", "So 14 x 2.75 = 38.5", True), ("MATH", "Answer: 7", "x = 7.0", True),
    ("MATH", "Answer: 7", "Answer: 7 (since 28/4 = 7)", True), ("MATH", "Answer: 7", "The answer is 7, not 8.", True),
    ("MATH", "Answer: 7", "7 is wrong, it is 8", False), ("MATH", "Answer: 2/3", "\\boxed{\\frac{2}{3}}", True),
    ("MATH", "Answer: 2/3", "about 0.667", False), ("MATH", "Answer: 50,400", "There are 50400 ways", True),
    ("MATH", "Answer: 7", "no number at all", False),
])
def test_generations_are_judged(category, response, generation, correct):
    assert is_correct(record(category, response), generation) is correct


def test_a_record_without_a_checkable_answer_is_not_judged():
    assert np.isnan(answers_correct([record("CODE", "def f(): pass")], ["def f(): pass"])[0])
    with pytest.raises(ValueError, match="record t-000 \\(CODE\\): no checkable answer"):
        is_correct(record("CODE", "def f(): pass"), "x")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def hf_greedy(model, record_, tokenizer, new_tokens: int = NEW_TOKENS) -> str:
    """Hugging Face's own greedy decoding of one unpadded prompt, cut at the first EOS."""
    ids = tokenize_prompts([record_], tokenizer)[0].input_ids
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                                pad_token_id=tokenizer.pad_token_id)
    tokens = output[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True)


@pytest.fixture
def records(sample_records):
    """One record of each category: prompts of six lengths."""
    return sample_records[:6]


def test_greedy_batched_equals_one_at_a_time_and_hf_generate(records, tokenizer):
    """On an MoE model with a shared expert; the dense case is the ablation test's below."""
    model = tiny("qwen2_moe", tokenizer)
    prompts = tokenize_prompts(records, tokenizer)
    lengths = [len(p) + NEW_TOKENS for p in prompts]
    batches = plan_batches(lengths, PADDED.batch_tokens, PADDED.max_batch_size, PADDED.max_padding)
    assert any(len({lengths[b] for b in batch}) > 1 for batch in batches)  # padded batches
    batched = greedy_generate(model, prompts, tokenizer, PADDED, DEVICE, NEW_TOKENS)
    alone = greedy_generate(model, prompts, tokenizer, ExtractionSettings(max_batch_size=1), DEVICE, NEW_TOKENS)
    expected = [hf_greedy(model, r, tokenizer) for r in records]
    assert batched == alone == expected
    assert sum(bool(text.strip()) for text in expected) >= len(expected) // 2  # real text, not all EOS


def test_greedy_under_ablation_equals_a_zeroed_copy_and_a_no_op_changes_nothing(records, tokenizer):
    model = tiny("mistral", tokenizer)
    sites = ffn_sites(model)
    rng = np.random.default_rng(1)
    mask = rng.random((len(sites.dense_layers), sites.dense_neurons)) < 0.3
    prompts = tokenize_prompts(records, tokenizer)
    plain = greedy_generate(model, prompts, tokenizer, PADDED, DEVICE, NEW_TOKENS)
    copied = copy.deepcopy(model)
    for mlp, row in zip(mlps(copied), mask):
        zero_down_columns(mlp, np.flatnonzero(row).tolist(), "mistral")
    with Ablation(model, {"neurons": mask}):
        ablated = greedy_generate(model, prompts, tokenizer, PADDED, DEVICE, NEW_TOKENS)
    assert ablated == [hf_greedy(copied, r, tokenizer) for r in records]
    assert ablated != plain  # the hooks act during decoding
    # In the copy the masked neurons already contribute nothing: switching them off there is a no-op.
    intact = greedy_generate(copied, prompts, tokenizer, PADDED, DEVICE, NEW_TOKENS)
    with Ablation(copied, {"neurons": mask}):
        no_op = greedy_generate(copied, prompts, tokenizer, PADDED, DEVICE, NEW_TOKENS)
    assert no_op == intact
    labelled = [make_record(i, "CLS", r.instruction, r.input, response=text.strip().split("\n")[0][:20] or "x")
                for i, (r, text) in enumerate(zip(records, intact))]
    np.testing.assert_array_equal(answers_correct(labelled, no_op), answers_correct(labelled, intact))
    with pytest.raises(ValueError, match="max_new_tokens 0: greedy decoding needs at least 1 new token"):
        greedy_generate(model, prompts, tokenizer, PADDED, DEVICE, 0)


def test_accuracy_means_over_checkable_records():
    records = [record("CLS", "Negative", 0), record("CLS", "Positive", 1), record("MATH", "Answer: 4", 2),
               record("CODE", "def f(): pass", 3), record("CLS", "Dolphin: mammal\nCat: mammal", 4)]
    labels = np.array([r.category for r in records])
    base = np.array(["Negative", "negative!", "4", "", ""], dtype=object)
    ablated = np.array([["Positive", "Positive", "The answer is 5", "", ""],
                        ["Negative", "no", "4.0", "", ""]], dtype=object)
    control = np.array([[["Negative", "Positive", "4", "", ""], ["no", "no", "no", "", ""]],
                        [["no", "Positive", "3", "", ""], ["Negative", "Positive", "4", "", ""]]],
                       dtype=object)[None]  # control, seed, ablated, instruction
    data = accuracy_dataset(records, labels, ["CLS", "MATH", "CODE"], base, ablated, control)
    data = data.assign_coords(ablated=["CLS", "MATH"], control=["random"])
    np.testing.assert_array_equal(data.answer_checkable.values, [True, True, True, False, False])
    assert data.accuracy_records.values.tolist() == [2, 1, 0]
    np.testing.assert_allclose(data.accuracy_base.values, [0.5, 1.0, np.nan])
    np.testing.assert_allclose(data.accuracy.values, [[0.5, 0.0, np.nan], [0.5, 1.0, np.nan]])
    # the mean over the two seeds of each seed's accuracy
    np.testing.assert_allclose(data.accuracy_control.sel(control="random").values,
                               [[(1.0 + 0.5) / 2, (1.0 + 0.0) / 2, np.nan], [(0.0 + 1.0) / 2, (0.0 + 1.0) / 2, np.nan]])
    assert np.isnan(data.correct_base.values[3:]).all()


def eval_file(tmp_path: Path, math: str | None = None, cls: str | None = None) -> Path:
    """Held-out records of every category (new instructions, so new record hashes)."""
    rows = []
    for i, (category, text, extra, answer) in enumerate(SAMPLE_TEXTS):
        answer = {"MATH": math or answer, "CLS": cls or answer}.get(category, answer)
        rows.append(make_record(300 + i, category, f"{i} {text}", extra, answer))
    return write_jsonl(rows, tmp_path / "eval.jsonl")


FAST = dict(seeds=1, controls=["random"], resamples=20, permutations=20, max_response_tokens=4, eval_per_group=1)


def test_stage_with_and_without_accuracy(tmp_path, identified, tiny_llama_dir, cache_dir):
    work, store, components, _ = identified
    held = eval_file(tmp_path)
    settings = AblationSettings(eval_dataset=held, accuracy=True, max_new_tokens=NEW_TOKENS, **FAST)
    on = xr.open_zarr(run_ablation(components, store, settings, PADDED, cache_dir, tmp_path / "on")).load()
    off = xr.open_zarr(run_ablation(components, store, settings.model_copy(update={"accuracy": False}), PADDED,
                                    cache_dir, tmp_path / "off")).load()
    assert set(off.data_vars) == NLL_VARIABLES and "max_new_tokens" not in off.attrs  # as before the option
    assert set(on.data_vars) == NLL_VARIABLES | ACCURACY_VARIABLES
    for name in NLL_VARIABLES:
        xr.testing.assert_identical(on[name], off[name])
    assert on.accuracy.dims == ("ablated", "evaluated")
    assert on.accuracy_control.dims == ("control", "ablated", "evaluated")
    assert on.correct_control.dims == ("control", "seed", "ablated", "instruction")
    assert on.attrs["accuracy_categories"] == ["CLS", "MATH"]
    assert on.attrs["accuracy_skipped"] == ["CODE", "GEN", "QA", "SUM"] and on.attrs["max_new_tokens"] == NEW_TOKENS

    # the generations: Hugging Face's greedy decoding, one record at a time, intact and on a copy
    # whose CODE neurons have zero down_proj columns
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    copied = copy.deepcopy(model)
    code = xr.open_zarr(components).isn.sel(group="CODE").load()
    with torch.no_grad():
        for layer, mlp in enumerate(layer.mlp for layer in copied.model.layers):
            mlp.down_proj.weight[:, np.flatnonzero(code.values[layer])] = 0
    by_id = {r.id: r for r in (make_record(300 + i, c, f"{i} {t}", e, a)
                               for i, (c, t, e, a) in enumerate(SAMPLE_TEXTS))}
    checkable = on.category.isin(["CLS", "MATH"]).values
    np.testing.assert_array_equal(on.answer_checkable.values, checkable)
    for k, identifier in enumerate(on.instruction_id.values):
        if checkable[k]:
            assert on.generation_base.values[k] == hf_greedy(model, by_id[identifier], tokenizer)
            assert on.generation.sel(ablated="CODE").values[k] == hf_greedy(copied, by_id[identifier], tokenizer)
        else:
            assert on.generation_base.values[k] == "" and np.isnan(on.correct_base.values[k])
    for evaluated in ("CLS", "MATH"):
        members = on.category.values == evaluated
        assert int(on.accuracy_records.sel(evaluated=evaluated)) == members.sum() == 1
        assert float(on.accuracy_base.sel(evaluated=evaluated)) == on.correct_base.values[members].mean()
    assert np.isnan(on.accuracy_base.sel(evaluated="CODE"))

    report_ablation(tmp_path / "on" / "ablation.zarr", tmp_path / "on")
    text = (tmp_path / "on" / "ablation.md").read_text()
    assert "### Accuracy (greedy decoding)" in text and "Skipped, no checkable answer: CODE, GEN, QA, SUM." in text
    assert "CLS 1 of 1, MATH 1 of 1 records" in text and "| nothing (intact) |" in text
    assert "Accuracy" not in ablation_markdown(summarize_ablation(off))


def test_accuracy_without_a_checkable_answer_is_refused(tmp_path, identified, cache_dir):
    work, store, components, _ = identified
    held = eval_file(tmp_path, math="Answer: x = 1, y = 2", cls="Food: good\nService: bad")
    settings = AblationSettings(eval_dataset=held, accuracy=True, **FAST)
    with pytest.raises(AblationInputError, match=r"accuracy: none of the 6 evaluation records \(.*eval.jsonl\) "
                                                 r"has a checkable answer; categories with one: CLS .*MATH"):
        run_ablation(components, store, settings, PADDED, cache_dir, tmp_path / "out", model_name="/no/such/model")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        AblationSettings(max_new_tokens=0)


def test_settings_flags_and_cache_key(tmp_path, monkeypatch):
    assert AblationSettings().accuracy is False  # off by default
    config = tmp_path / "settings.yaml"
    config.write_text("ablation:\n  accuracy: true\n  max_new_tokens: 32\n")
    assert load_settings(config).ablation.model_dump(include={"accuracy", "max_new_tokens"}) == {
        "accuracy": True, "max_new_tokens": 32}

    import cli.server
    import flows.pipeline  # before the stand-ins below: its tasks must bind the real functions
    import sparcom.ablation.ablate
    import sparcom.ablation.report
    from tasks.ablation import _key

    seen = []
    monkeypatch.setattr(sparcom.ablation.ablate, "run_ablation", lambda *args, **kwargs: seen.append(args[2]) or "x")
    monkeypatch.setattr(sparcom.ablation.report, "report_ablation", lambda *args: {})
    monkeypatch.setattr(sparcom.ablation.report, "ablation_markdown", lambda *args, **kwargs: "")
    runner = CliRunner()
    base = ["ablate", "--components", str(tmp_path), "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o")]
    assert runner.invoke(app, base + ["--accuracy", "--max-new-tokens", "7"]).exit_code == 0
    assert runner.invoke(app, base).exit_code == 0
    assert [(s.accuracy, s.max_new_tokens) for s in seen] == [(True, 7), (False, 128)]
    bad = runner.invoke(app, base + ["--accuracy", "--max-new-tokens", "0"])
    assert bad.exit_code == 2 and "ablation.max_new_tokens" in bad.output

    report = tmp_path / "report.md"
    report.write_text("")
    monkeypatch.setattr(cli.server, "temporary_server_early", lambda: lambda: None)
    monkeypatch.setattr(flows.pipeline, "sparcom_pipeline", lambda settings, refresh: seen.append(
        settings.ablation) or {"files": {"report.md": str(report)}, "rules": {"lape": {"files": {"report.md": str(report)}}}})
    assert runner.invoke(app, ["run", "--ablation-accuracy"]).exit_code == 0
    assert seen[-1].accuracy is True

    keys = {_key(tmp_path / "c", tmp_path / "s", AblationSettings(**change), ExtractionSettings(), tmp_path, tmp_path)
            for change in ({}, {"accuracy": True}, {"accuracy": True, "max_new_tokens": 64})}
    assert len(keys) == 3  # the content-cached stage reruns when the accuracy settings change
