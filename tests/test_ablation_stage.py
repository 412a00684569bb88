"""The ablation stage end to end on a tiny LLaMA: the stored figures against the test's own
computations (full-model NLL, a weight copy with the set's down_proj columns zeroed, plain
means), and every refusal of bad input before the model is loaded."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparcom.ablation.ablate import AblationInputError, find_store, run_ablation
from sparcom.ablation.report import ablation_markdown, summarize_ablation
from sparcom.ablation.settings import AblationSettings
from sparcom.extraction.settings import ExtractionSettings
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify_store


from builders import HELD_OUT, SAMPLE_TEXTS, make_record, write_jsonl
from references import reference_tokens

FAST = dict(seeds=2, resamples=50, permutations=200, max_response_tokens=None)


def naive_nll(model, record, tokenizer) -> float:
    ids, first = reference_tokens(record, tokenizer, "response")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return float(-torch.log_softmax(logits[first - 1:-1], -1).gather(1, torch.tensor(ids[first:])[:, None]).mean())


def test_stage_writes_the_spec_figures(tmp_path, identified, tiny_llama_dir, cache_dir):
    work, store, components, held_out = identified
    assert find_store(components) == store
    path = run_ablation(components, store, AblationSettings(eval_dataset=held_out, **FAST),
                        ExtractionSettings(max_batch_size=4), cache_dir, tmp_path)
    result = xr.open_zarr(path).load()
    assert result.nll_base.dims == ("instruction",)
    assert result.nll.dims == ("ablated", "instruction")
    assert result.nll_control.dims == ("control", "seed", "ablated", "instruction")
    assert result.delta.dims == ("ablated", "evaluated")
    assert result.delta_control.dims == ("control", "ablated", "evaluated")
    assert result.ablated_size.dims == ("ablated",)
    assert list(result.control.values) == ["random", "frequency_matched"]
    assert {"instruction_id", "category"} <= set(result.coords)
    assert result.attrs["family"] == "neurons" and result.attrs["rule"] == "global_percentile"
    assert result.attrs["overlap"] == 0 and len(result.attrs["model_fingerprint"]) == 64

    chosen = xr.open_zarr(components).isn.load()
    np.testing.assert_array_equal(result.ablated_size.values, chosen.sum(["layer", "neuron"]).values)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = [make_record(100 + i, *texts) for i, texts in enumerate(HELD_OUT)]
    order = [list(result.instruction_id.values).index(r.id) for r in records]
    np.testing.assert_allclose(result.nll_base.values[order], [naive_nll(model, r, tokenizer) for r in records],
                               atol=1e-4)
    copied = copy.deepcopy(model)
    code = chosen.sel(group="CODE")
    with torch.no_grad():
        for layer, mlp in enumerate(layer.mlp for layer in copied.model.layers):
            mlp.down_proj.weight[:, np.flatnonzero(code.values[layer])] = 0
    np.testing.assert_allclose(result.nll.sel(ablated="CODE").values[order],
                               [naive_nll(copied, r, tokenizer) for r in records], atol=1e-4)
    # delta: plain means of nll - nll_base over each category's records
    change = result.nll.values - result.nll_base.values
    categories = result.category.values
    for g, group in enumerate(result.ablated.values):
        for evaluated in result.evaluated.values:
            assert abs(float(result.delta.sel(ablated=group, evaluated=evaluated))
                       - change[g, categories == evaluated].mean()) < 1e-9
    # each control measured on its own group's records only (control_records: own), the rest NaN
    for group in result.ablated.values:
        own = categories == group
        measured = result.nll_control.sel(ablated=group).values
        assert np.isfinite(measured[..., own]).all() and np.isnan(measured[..., ~own]).all()
        at = result.delta_control.sel(ablated=group)
        assert np.isfinite(at.sel(evaluated=group)).all()
        assert np.isnan(at.sel(evaluated=[e for e in result.evaluated.values if e != group])).all()
    assert result.attrs["control_records"] == "own"
    assert (result.specificity_ci.sel(bound="low") <= result.specificity_ci.sel(bound="high")).all()

    # control_records: all measures every record; on a group's own records the NLLs are those of
    # the own-records pass (other batches: within float32 batching)
    every = xr.open_zarr(run_ablation(components, store, AblationSettings(eval_dataset=held_out, control_records="all",
                                                                          **FAST),
                                      ExtractionSettings(max_batch_size=4), cache_dir, tmp_path / "all")).load()
    assert np.isfinite(every.nll_control.values).all() and np.isfinite(every.delta_control.values).all()
    for group in result.ablated.values:
        own = categories == group
        np.testing.assert_allclose(every.nll_control.sel(ablated=group).values[..., own],
                                   result.nll_control.sel(ablated=group).values[..., own], atol=1e-4)
    np.testing.assert_allclose(every.control_difference.values, result.control_difference.values, atol=1e-4)
    # the report says where the controls were measured
    said = "2 seeds, each measured on its own group's records"
    assert said in ablation_markdown(summarize_ablation(result), plot=None)
    assert "2 seeds. Decided" in ablation_markdown(summarize_ablation(every), plot=None)


def test_overlap_is_refused_unless_asked(tmp_path, identified, cache_dir, sample_records):
    work, store, components, _ = identified
    same = write_jsonl(sample_records, tmp_path / "same.jsonl")
    with pytest.raises(AblationInputError, match=r"same.jsonl: 12 of its records also selected the components"):
        run_ablation(components, store, AblationSettings(eval_dataset=same, **FAST), ExtractionSettings(),
                     cache_dir, tmp_path / "a")
    path = run_ablation(components, store, AblationSettings(eval_dataset=same, allow_overlap=True, seeds=1,
                                                            resamples=10, permutations=10, controls=["random"],
                                                            eval_per_group=1),
                        ExtractionSettings(), cache_dir, tmp_path / "b")
    result = xr.open_zarr(path)
    assert result.attrs["overlap"] == 6 and bool(result.attrs["allow_overlap"])


def test_default_evaluation_is_held_out_shipped_records(tmp_path, identified, cache_dir):
    from sparcom.curation.hexainst import authored_records
    from sparcom.curation.records import record_hash

    work, store, components, _ = identified
    path = run_ablation(components, store, AblationSettings(eval_per_group=1, seeds=1, resamples=10,
                                                            permutations=10, controls=["frequency_matched"],
                                                            max_response_tokens=4),
                        ExtractionSettings(), cache_dir, tmp_path)
    result = xr.open_zarr(path)
    shipped = {record_hash(r) for r in authored_records()}
    assert set(result.record_hash.values.tolist()) <= shipped
    assert sorted(result.category.values.tolist()) == sorted(["CLS", "CODE", "QA", "GEN", "MATH", "SUM"])


def test_bad_input_is_refused_before_the_model_loads(tmp_path, identified, tiny_llama_dir, cache_dir):
    work, store, components, held_out = identified
    settings = AblationSettings(eval_dataset=held_out, **FAST)
    run = lambda s=settings, c=components, **kw: run_ablation(  # noqa: E731
        c, store, s, ExtractionSettings(), cache_dir, tmp_path, **kw)
    with pytest.raises(AblationInputError, match="unknown family 'experts' for these components; they hold: neurons"):
        run(settings.model_copy(update={"family": "experts"}))
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    no_math = write_jsonl([make_record(200 + i, r["category"], r["instruction"], r["input"], r["response"])
                           for i, r in enumerate(rows) if r["category"] != "MATH"], tmp_path / "no-math.jsonl")
    with pytest.raises(AblationInputError, match="no-math.jsonl: no evaluation record of group MATH"):
        run(settings.model_copy(update={"eval_dataset": no_math}))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    model.save_pretrained(other)
    with pytest.raises(AblationInputError, match="weights are not the ones the components were found in"):
        run(model_name=str(other))
    dense = identify_store(store, IdentificationSettings(rule="threshold", tau=0.001), tmp_path / "dense")
    with pytest.raises(AblationInputError, match="allow no control of the same size per layer"):
        run(c=dense)
    narrow = identify_store(store, IdentificationSettings(epsilon=1 / 144), tmp_path / "narrow")
    with pytest.raises(AblationInputError, match="--seeds 100: group .* allow only .* use at most"):
        run(settings.model_copy(update={"seeds": 100}), c=narrow)


def test_ablate_finds_the_store_the_components_name(tmp_path, identified, cache_dir, monkeypatch):
    """`sparcom ablate --components ID_DIR` after `sparcom identify --store S --out ID_DIR`, outside
    a work dir: the components name their store; a moved or changed one is refused by name."""
    import zarr
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    work, store, _, held_out = identified
    mine = tmp_path / "mine.zarr"
    shutil.copytree(store, mine)
    runner = CliRunner()
    found = runner.invoke(app, ["identify", "--store", str(mine), "--out", str(tmp_path / "id"), "--epsilon", "0.05",
                                "--dask-workers", "1"])
    assert found.exit_code == 0, found.output
    ablate = ["ablate", "--components", str(tmp_path / "id"), "--eval-dataset", str(held_out), "--seeds", "1",
              "--controls", "random", "--eval-per-group", "1", "--max-response-tokens", "4"]
    result = runner.invoke(app, [*ablate, "--out", str(tmp_path / "ablation")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ablation" / "ablation.zarr").is_dir() and (tmp_path / "ablation" / ".sparcom-output").is_file()
    zarr.open_group(mine, mode="r+").attrs["extraction_key"] = "another"
    changed = runner.invoke(app, [*ablate, "--out", str(tmp_path / "changed")])
    assert changed.exit_code == 2, changed.output
    assert f"error: {mine}: changed since the components {tmp_path / 'id' / 'components.zarr'} were found in it" \
        in changed.output
    mine.rename(tmp_path / "moved.zarr")
    moved = runner.invoke(app, [*ablate, "--out", str(tmp_path / "moved")])
    assert moved.exit_code == 2, moved.output
    assert f"its store {mine} is gone (moved or deleted); pass --store STORE.zarr" in moved.output


def naive_near_duplicates(evaluated, identified, threshold=0.8) -> int:
    """Evaluation records whose 3-word shingles have Jaccard >= threshold with an identification
    record's, the same text excluded (that is an overlap, not a near duplicate)."""
    import re
    import unicodedata

    def words(record):
        text = record.instruction + ("\n\n" + record.input if record.input else "")
        return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())

    def grams(record):
        w = words(record)
        return {tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2))}

    count = 0
    for e in evaluated:
        if any(words(e) == words(i) for i in identified):
            continue
        count += any(len(grams(e) & grams(i)) / len(grams(e) | grams(i)) >= threshold for i in identified)
    return count


def test_held_out_is_checked_by_the_text_the_model_reads(tmp_path, identified, sample_records):
    """Identification's records renamed (id only) are not held out; near duplicates are counted."""
    import zarr

    from sparcom.ablation.ablate import plan_ablation
    from sparcom.extraction.store import open_result, seal_store

    work, store, components, held_out = identified
    texts = write_jsonl(sample_records, tmp_path / "identification.jsonl")
    named = tmp_path / "named.zarr"  # a store naming where its records' texts are
    shutil.copytree(store, named)
    zarr.open_group(named, mode="r+").attrs["dataset_path"] = str(texts)
    seal_store(named)
    renamed = write_jsonl([make_record(500 + i, *t) for i, t in enumerate(SAMPLE_TEXTS)], tmp_path / "renamed.jsonl")
    with pytest.raises(AblationInputError, match=r"renamed.jsonl: 12 of its records also selected the components"):
        plan_ablation(open_result(components), named, AblationSettings(eval_dataset=renamed, **FAST))
    plan = plan_ablation(open_result(components), named, AblationSettings(eval_dataset=held_out, **FAST))
    held = [make_record(100 + i, *t) for i, t in enumerate(HELD_OUT)]
    assert plan.overlap == 0 and plan.attrs["identification_texts"] == str(texts)
    assert plan.attrs["near_duplicates"] == naive_near_duplicates(held, sample_records) > 0
