"""Curation: the offline HexaInst, the full 1,200 from stand-ins, every bad-input case, the steps
checked against naive computations, the saved artifact, the Prefect flow and the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_standins import FAULTS, words, write_standins
from transformers import AutoTokenizer
from typer.testing import CliRunner

from sparcom.curation import sources
from cli.app import app
from sparcom.config import PipelineSettings
from sparcom.curation.settings import CurationSettings
from sparcom.curation.curate import (
    STAGES, balance_markdown, curate, normalise, prompt_token_counts, save_curation,
)
from sparcom.curation.dataset import MANIFEST_NAME, load_records, save_dataset
from sparcom.curation.dedup import band_rows, canonical_text, jaccard, near_duplicate_pairs, shingles
from sparcom.curation.hexainst import authored_pool, authored_records
from sparcom.curation.packaged_sources import public_pool
from sparcom.curation.prompts import prompt_ids
from sparcom.curation.record_files import file_pool, read_records
from sparcom.curation.records import InstructionRecord, Pool, RecordError, dataset_hash
from sparcom.curation.sources import source_pool

GOOD = {"id": "u-1", "category": "QA", "origin": "human", "source": "mine", "instruction": "Why is ice slippery?",
        "input": "", "response": "A thin liquid-like layer on its surface.", "license": "CC0-1.0"}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No hub in tests: the probe says so; local builders cache into the test's folder."""
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "the hub cannot be reached (tests run offline)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def settings(tokenizer_dir, **changes) -> CurationSettings:
    return CurationSettings(tokenizer=str(tokenizer_dir), **changes)


def user_rows(n: int = 12, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{**GOOD, "id": f"u-{i}", "instruction": words(rng, 10) + "?", "response": words(rng, 5)}
            for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


# -- the dataset -----------------------------------------------------------------------------------

def test_offline_curation_is_the_600_authored_records_and_the_packaged_human_sets(tokenizer_dir):
    options = settings(tokenizer_dir)
    first = curate([authored_pool()] + [public_pool(s) for s in options.sources], options)
    records = first.records
    assert len(records) == 900 and len({r.id for r in records}) == 900
    assert [r for r in records if r.origin == "ai"] == authored_records()
    packaged = {"CODE": "humaneval", "QA": "fanoutqa", "MATH": "champ"}
    assert first.balance() == {c: {"ai": 100, "human": 100 if c in packaged else 0} for c in first.balance()}
    assert {r.source.split("@")[0] for r in records if r.origin == "human"} == {
        "openai_humaneval", "fanoutqa", "champ"}
    report = balance_markdown(first)
    for spec in options.sources:
        assert f"{spec.name} ({spec.describe()}) is unavailable: the hub cannot be reached" in report
        if spec.packaged is None:
            assert f"| {spec.name} (unavailable) | 0 |" in report
        else:
            assert f"| {spec.packaged} | {len(public_pool(spec).records)} |" in report
    assert "**0** (short by 100)" in report and "MATH human: 0 of 100" not in report
    assert "CLS human: 0 of 100 (unavailable: ag_news, sst2); GEN human: 0 of 100 (unavailable: alpaca)" in report


def test_standins_give_the_full_balanced_1200_and_every_record_is_counted(tmp_path, tokenizer_dir):
    specs = write_standins(tmp_path / "hub", rows=120)
    options = settings(tokenizer_dir, sources=specs)
    curation = curate([authored_pool()] + [source_pool(s) for s in specs], options)
    assert len(curation.records) == 1200
    assert curation.balance() == {c: {"ai": 100, "human": 100} for c in curation.balance()}
    assert curation.shortfalls() == []
    pools = {p["name"]: p for p in curation.summary()["pools"]}
    for name, faults in FAULTS.items():
        pool = pools[name]
        for stage in STAGES[:-1]:
            assert pool[stage] == faults.get(stage, 0), (name, stage)
        assert pool["read"] == sum(pool[s] for s in STAGES) + pool["kept"]
    assert pools["ag_news"]["kept"] + pools["sst2"]["kept"] == 100
    reasons = {r.record_id: r.reason for r in curation.rejections}
    assert reasons["humaneval-HumanEval-120"] == "same instruction and input as 'humaneval-HumanEval-5'"
    assert reasons["trivia_qa-tq_120"].startswith("near duplicate of 'trivia_qa-tq_7' (Jaccard 0.")
    assert "over the limit of 1024" in reasons["cnn_dailymail-" + f"{2:040x}"]
    reseeded = curate([authored_pool()] + [source_pool(s) for s in specs], settings(tokenizer_dir, sources=specs, seed=1))
    assert dataset_hash(reseeded.records) != dataset_hash(curation.records) and len(reseeded.records) == 1200


def test_sampling_keeps_the_lowest_seeded_hashes_in_input_order(tokenizer_dir):
    records = [InstructionRecord(**r) for r in user_rows(30)]
    options = settings(tokenizer_dir, per_group=7, seed=5, max_prompt_tokens=None, max_response_tokens=None)
    kept = curate([Pool("p", "test", records)], options).records
    naive = sorted(records, key=lambda r: hashlib.sha256(f"5\x00{r.id}".encode()).hexdigest())[:7]
    assert [r.id for r in kept] == [r.id for r in records if r in naive]
    more = records + [InstructionRecord(**{**GOOD, "id": "other", "category": "GEN"})]
    assert curate([Pool("p", "test", more)], options).records[:7] == kept  # other groups change nothing


# -- the steps, against naive computations ---------------------------------------------------------

def test_near_duplicate_pairs_equal_brute_force():
    rng = random.Random(3)
    texts = []
    for _ in range(150):
        base = words(rng, rng.randint(4, 40)).split()
        texts.append(" ".join(base))
        for _ in range(rng.randint(0, 2)):
            edited = list(base)
            for _ in range(rng.randint(0, 5)):
                edited[rng.randrange(len(edited))] = "zz"
            texts.append(" ".join(edited))
    for threshold in (0.5, 0.8, 0.95):
        sets = [shingles(t) for t in texts]
        naive = {(a, b) for a, b in itertools.combinations(range(len(texts)), 2)
                 if jaccard(sets[a], sets[b]) >= threshold}
        found = near_duplicate_pairs(texts, threshold)
        assert {(a, b) for a, b, _ in found} == naive and len(naive) > 10
        assert all(abs(s - jaccard(sets[a], sets[b])) < 1e-12 for a, b, s in found)


def test_lsh_bands_meet_the_miss_rate():
    for threshold in (0.5, 0.8, 0.9):
        rows = band_rows(threshold)
        bands = 128 // rows
        assert 1 - (1 - threshold ** rows) ** bands >= 0.999
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.999
    assert shingles("What is the capital of Peru?") == {"what is the", "is the capital", "the capital of",
                                                      "capital of peru"}
    assert canonical_text("  Hello,\tWORLD!! ") == canonical_text("hello world") == "hello world"


def test_normalise_unifies_spelling_and_catches_emptied_fields():
    messy = InstructionRecord(**{**GOOD, "instruction": " Cafe\u0301 hours?\r\nToday\x07 ", "response": "Nine.\r"})
    clean = normalise(messy)
    assert clean.instruction == "Caf\u00e9 hours?\nToday" and clean.response == "Nine."
    assert normalise(clean) is clean
    with pytest.raises(RecordError, match="field 'response': Value error, must not be empty"):
        normalise(InstructionRecord(**{**GOOD, "response": "\x01\x02"}))


def test_prompt_token_counts_equal_the_extraction_prompt(tokenizer, sample_records):
    assert prompt_token_counts(sample_records, tokenizer) == [len(prompt_ids(r, tokenizer)) for r in sample_records]


# -- bad input -------------------------------------------------------------------------------------

BAD_JSONL = [
    ("missing field", {k: v for k, v in GOOD.items() if k != "response"}, "field 'response': Field required"),
    ("empty field", {**GOOD, "instruction": "   "}, "field 'instruction': Value error, must not be empty"),
    ("unknown category", {**GOOD, "category": "POEM"}, "field 'category': Input should be 'CLS'"),
    ("wrong type", {**GOOD, "response": 42}, "field 'response': Input should be a valid string"),
    ("not an object", ["a", "list"], "expected a JSON object, got list"),
    ("duplicate id", {**GOOD, "id": "u-0"}, "duplicate id 'u-0', first seen at .*d.jsonl:1"),
    ("invalid UTF-8", b'{"id": "u-x", "instruction": "caf\xe9"}', "invalid UTF-8 at byte 33"),
]


@pytest.mark.parametrize("case,bad,message", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_row_raises_or_is_quarantined(tmp_path, tokenizer_dir, case, bad, message):
    rows = user_rows(6)
    if isinstance(bad, dict) and bad.get("id") == GOOD["id"]:
        bad = {**bad, "id": "u-bad"}
    path = write_jsonl(tmp_path / "d.jsonl", rows[:3] + [bad] + rows[3:])
    with pytest.raises(RecordError, match=rf"d.jsonl:4.*: {message}"):
        load_records(path)
    options = settings(tokenizer_dir, on_error="quarantine", per_group=None)
    curation = curate([file_pool(path, "quarantine")], options)
    assert [r.id for r in curation.records] == [r["id"] for r in rows]
    (rejection,) = curation.rejections
    assert rejection.where.endswith("d.jsonl:4") and rejection.stage in ("invalid", "duplicate id")
    saved = save_curation(curation, tmp_path / "out", tmp_path)
    (line,) = (saved / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(line)["where"].endswith("d.jsonl:4") and json.loads(line)["reason"]
    assert f"| {path} | 7 | " in (saved / "report.md").read_text()


def test_truncated_jsonl_last_line(tmp_path, tokenizer_dir):
    path = tmp_path / "d.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in user_rows(4))
    path.write_text(text[:-25])
    with pytest.raises(RecordError, match=r"d.jsonl:4: not valid JSON .*ends in the middle of this line \(truncated\?\)"):
        load_records(path)
    records, rejected = read_records(path, "quarantine")
    assert len(records) == 3 and rejected[0].stage == "invalid" and rejected[0].data.startswith('{"id": "u-3"')


def test_csv_rows_bad_utf8_short_row_and_unterminated_quote(tmp_path):
    header = ",".join(GOOD)
    def line(row):
        return ",".join(f'"{v}"' for v in row.values())
    rows = user_rows(3)
    good_csv = tmp_path / "good.csv"
    good_csv.write_text(header + "\n" + "\n".join(line(r) for r in rows) + "\n")
    assert [r.id for r in load_records(good_csv)] == ["u-0", "u-1", "u-2"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes((header + "\n" + line(rows[0]) + "\n").encode() + line(rows[1]).replace("?", "\xff?").encode("latin-1")
                    + b"\n" + ",".join(line(rows[2]).split(",")[:5]).encode() + b"\n" + b'"u-9","QA","ai","s","unfinished')
    records, rejected = read_records(bad, "quarantine")
    assert [r.id for r in records] == ["u-0"]
    assert [(r.where.split("/")[-1], r.reason.split(" (")[0]) for r in rejected] == [
        ("bad.csv:3", "invalid UTF-8 in column 'instruction' at character 66"),
        ("bad.csv:4", "the row has 5 values, the header 8 columns"),
        ("bad.csv:5", "not valid CSV"),
    ]
    with pytest.raises(RecordError, match=r"bad.csv:3 \(id 'u-1'\): invalid UTF-8 in column 'instruction'"):
        load_records(bad)


def test_parquet_wrong_types_and_truncated_file(tmp_path, tokenizer_dir):
    path = tmp_path / "d.parquet"
    rows = user_rows(4)
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r.id for r in load_records(path)] == [r["id"] for r in rows]
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.Table.from_pylist([{**rows[0], "response": 7}]), typed)
    with pytest.raises(RecordError, match=r"typed.parquet row 0 \(id 'u-0'\): field 'response': Input should be a valid string"):
        load_records(typed)
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RecordError, match=r"cut.parquet: not a readable Parquet file .*truncated"):
        load_records(truncated)
    curation = curate([authored_pool(), file_pool(truncated, "quarantine")],
                      settings(tokenizer_dir, on_error="quarantine", max_prompt_tokens=None, max_response_tokens=None))
    assert len(curation.records) == 600
    assert f"{truncated} (unavailable)" in balance_markdown(curation)
    assert "not a readable Parquet file" in balance_markdown(curation)


def test_over_long_record_raises_names_it_or_is_quarantined(tmp_path, tokenizer_dir, tokenizer):
    rows = user_rows(5)
    rows[2] = {**rows[2], "input": "word " * 400}
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    tokens = len(prompt_ids(normalise(load_records(path)[2]), tokenizer))
    with pytest.raises(RecordError, match=rf"long.jsonl \(id 'u-2'\): prompt has {tokens} tokens, over the limit of 300"):
        curate([file_pool(path)], settings(tokenizer_dir, max_prompt_tokens=300))
    curation = curate([file_pool(path)], settings(tokenizer_dir, max_prompt_tokens=300, on_error="quarantine"))
    assert [r.id for r in curation.records] == ["u-0", "u-1", "u-3", "u-4"]
    assert curation.summary()["pools"][0]["too long"] == 1
    assert curate([file_pool(path)], settings(tokenizer_dir, max_prompt_tokens=tokens)).records[2].id == "u-2"


def test_duplicate_id_across_inputs_and_unknown_file_kinds(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "mine.jsonl", [{**GOOD, "id": "ai-qa-001"}])
    with pytest.raises(RecordError, match=r"mine.jsonl \(id 'ai-qa-001'\): duplicate id 'ai-qa-001'"):
        curate([authored_pool(), file_pool(path)], settings(tokenizer_dir))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(RecordError, match=r"d.txt: expected a .jsonl, .csv, .parquet file or a saved dataset folder"):
        load_records(tmp_path / "d.txt")
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_user_formats_and_saved_folders_load_the_same_records(tmp_path, sample_records):
    save_dataset(sample_records, tmp_path / "ours")
    assert load_records(tmp_path / "ours") == sample_records
    assert load_records(tmp_path / "ours" / "records.jsonl") == sample_records
    assert load_records(tmp_path / "ours" / "records.parquet") == sample_records
    plain = datasets.Dataset.from_list([r.model_dump() for r in sample_records])
    plain.save_to_disk(str(tmp_path / "plain"))
    assert load_records(tmp_path / "plain") == sample_records
    datasets.DatasetDict({"train": plain, "test": plain}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(RecordError, match=r"splits: holds several splits \(test, train\); pass one split's folder"):
        load_records(tmp_path / "splits")


# -- saved artifact, flow and CLI ------------------------------------------------------------------

def test_saved_curation_has_manifest_exports_report_and_quarantine(tmp_path, tokenizer_dir):
    bad = write_jsonl(tmp_path / "mine.jsonl", user_rows(3) + [{**GOOD, "id": "u-x", "category": "POEM"}])
    options = settings(tokenizer_dir, inputs=[bad], on_error="quarantine")
    curation = curate([authored_pool(), file_pool(bad, "quarantine")], options)
    directory = save_curation(curation, None, tmp_path / "datasets")
    assert directory.name == dataset_hash(curation.records)[:16]
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["record_count"] == 603 and manifest["counts"]["QA"] == {"ai": 100, "human": 3}
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["on_error"] == "quarantine"
    assert manifest["settings"]["tokenizer"] == str(tokenizer_dir)
    assert manifest["licenses"] == {"CC-BY-4.0": 600, "CC0-1.0": 3}
    assert manifest["report"]["pools"][1]["invalid"] == 1
    assert load_records(directory / "records.parquet") == load_records(directory) == curation.records
    (line,) = (directory / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(line)["record"]["category"] == "POEM"


@pytest.mark.slow
def test_flow_publishes_the_balance_artifact(tmp_path, prefect_harness, tokenizer_dir):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.curate import curate_hexainst

    specs = write_standins(tmp_path / "hub", rows=110)
    result = curate_hexainst(PipelineSettings(
        curation=settings(tokenizer_dir, sources=specs), work_dir=tmp_path / "work"))
    assert result["kept"] == 1200 and result["shortfalls"] == []
    assert load_records(result["directory"])[0].id == "ai-cls-001"

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["hexainst-balance"])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), limit=1, sort=ArtifactSort.CREATED_DESC)

    (artifact,) = asyncio.run(artifacts())
    assert "| CLS | 100 | 100 | 200 |" in artifact.data and "| **all** | **1302** |" in artifact.data


@pytest.mark.slow
def test_cli_curate_offline_and_bad_input(tmp_path, prefect_harness, tokenizer_dir):
    runner = CliRunner()
    common = ["--work-dir", str(tmp_path / "work"), "--tokenizer", str(tokenizer_dir)]
    first = runner.invoke(app, ["curate", *common])
    assert first.exit_code == 0, first.output
    assert "humaneval (openai/openai_humaneval, split test) is unavailable" in first.output
    assert "Kept **900** records" in first.output
    again = runner.invoke(app, ["curate", *common])
    hash_line = [line for line in first.output.splitlines() if line.startswith("dataset: ")]
    assert hash_line and hash_line[0] in again.output
    directory = hash_line[0].removeprefix("dataset: ").split(" (hash ")[0]
    assert f"hash {dataset_hash(load_records(directory))}" in hash_line[0]
    bad = write_jsonl(tmp_path / "mine.jsonl", user_rows(2) + [{**GOOD, "id": "u-x", "response": ""}])
    failed = runner.invoke(app, ["curate", *common, "--no-hub", "--input", str(bad)])
    assert failed.exit_code == 2
    assert "mine.jsonl:3 (id 'u-x'): field 'response': Value error, must not be empty" in failed.output
    kept = runner.invoke(app, ["curate", *common, "--no-hub", "--input", str(bad), "--on-error", "quarantine",
                               "--out", str(tmp_path / "q")])
    assert kept.exit_code == 0, kept.output
    assert len(load_records(tmp_path / "q")) == 602
    assert "u-x" in (tmp_path / "q" / "quarantine.jsonl").read_text()
