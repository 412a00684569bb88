"""Interrupted extraction resumes to the same store; separate processes fill one store safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import xarray as xr

from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.extract import extract_to_store, parse_shards
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import finished_shards, is_complete, open_store, shard_count

from builders import make_record

# One prompt per forward pass makes the counts independent of how work was split.
SETTINGS_YAML = "extraction: {max_batch_size: 1, shard_size: 4}\n"


@pytest.fixture
def many_records():
    return [make_record(i, category, f"Question number {i}: explain topic {i % 17} " * (1 + i % 5))
            for i, category in enumerate(["CLS", "CODE", "QA", "GEN", "MATH", "SUM"] * 20)]


def extract_command(model_dir, dataset, store, config, *extra):
    return [sys.executable, "-m", "cli.app", "extract", "--model", str(model_dir), "--dataset",
            str(dataset), "--out", str(store), "--config", str(config), *extra]


@pytest.fixture
def inputs(tmp_path, many_records):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in many_records))
    config = tmp_path / "settings.yaml"
    config.write_text(SETTINGS_YAML)
    return dataset, config


@pytest.fixture
def environment(cache_dir):
    return {**os.environ, "XDG_CACHE_HOME": str(cache_dir.parent)}


def reference_store(tmp_path, model_dir, cache_dir, records):
    loaded = load_model(resolve_model(str(model_dir)), cache_dir, dtype="float32", device="cpu")
    settings = ExtractionSettings(max_batch_size=1, shard_size=4)
    return open_store(extract_to_store(loaded, records, tmp_path / "reference.zarr", settings))


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_uninterrupted_store(
    tmp_path, tiny_llama_dir, cache_dir, many_records, inputs, environment
):
    dataset, config = inputs
    store = tmp_path / "s.zarr"
    total = shard_count(len(many_records), 4)
    process = subprocess.Popen(extract_command(tiny_llama_dir, dataset, store, config), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (store / "zarr.json").is_file() and len(finished_shards(store)) >= 8:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done_at_kill = len(finished_shards(store))
    assert 8 <= done_at_kill < total, "the process must be killed partway"
    assert not is_complete(store)
    finished = sorted(finished_shards(store))
    written_at = {i: (store / "token_count" / "c" / str(i)).stat().st_mtime_ns for i in finished}

    resumed = subprocess.run(extract_command(tiny_llama_dir, dataset, store, config), env=environment,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert {i: (store / "token_count" / "c" / str(i)).stat().st_mtime_ns for i in finished} == written_at
    expected = reference_store(tmp_path, tiny_llama_dir, cache_dir, many_records)
    xr.testing.assert_identical(open_store(store).drop_attrs(), expected.drop_attrs())


@pytest.mark.slow
def test_two_processes_fill_disjoint_shards_of_one_store(
    tmp_path, tiny_llama_dir, cache_dir, many_records, inputs, environment
):
    dataset, config = inputs
    store = tmp_path / "s.zarr"
    total = shard_count(len(many_records), 4)
    halves = [f"0-{total // 2 - 1}", f"{total // 2}-{total - 1}"]
    processes = [subprocess.Popen(extract_command(tiny_llama_dir, dataset, store, config, "--shards", half),
                                  env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for half in halves]
    for process in processes:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors.decode()
    assert is_complete(store)
    expected = reference_store(tmp_path, tiny_llama_dir, cache_dir, many_records)
    xr.testing.assert_identical(open_store(store).drop_attrs(), expected.drop_attrs())


def test_parse_shards():
    assert parse_shards("0-3,8") == [0, 1, 2, 3, 8]
    with pytest.raises(ValueError, match="'x'"):
        parse_shards("1,x")


def test_added_records_are_the_only_ones_counted(tmp_path, tiny_llama_dir, cache_dir, sample_records, monkeypatch):
    from sparcom.extraction.counting import FFNCounter

    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu")
    settings = ExtractionSettings(shard_size=4)
    first = extract_to_store(loaded, sample_records[:8], tmp_path / "first.zarr", settings)
    other_span = extract_to_store(loaded, sample_records, tmp_path / "response.zarr",
                                  ExtractionSettings(shard_size=4, span="response"))

    counted_rows = []
    original = FFNCounter.count

    def spy(self, model, input_ids, *args):
        counted_rows.append(input_ids.shape[0])
        return original(self, model, input_ids, *args)

    monkeypatch.setattr(FFNCounter, "count", spy)
    grown = extract_to_store(loaded, list(reversed(sample_records)), tmp_path / "grown.zarr", settings,
                             donors=[first, other_span])
    assert sum(counted_rows) == 4  # the 4 new records; the span-mismatched store is not a donor
    monkeypatch.setattr(FFNCounter, "count", original)
    fresh = extract_to_store(loaded, list(reversed(sample_records)), tmp_path / "fresh.zarr", settings)
    xr.testing.assert_identical(open_store(grown).drop_attrs(), open_store(fresh).drop_attrs())
