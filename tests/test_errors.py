"""One error style: a line naming what is wrong, exit 2 for bad input, 1 for failures, no traceback
unless --debug; every input checked before the model loads; nothing left behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import sparcom.extraction.model_stage
from cli.app import app
from sparcom.config import SettingsError, load_settings
from sparcom.curation.settings import CurationSettings
from sparcom.curation.curate import curate
from sparcom.curation.record_files import file_pool
from sparcom.curation.records import RecordError

from builders import make_record

runner = CliRunner()


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(make_record(i, "QA", f"Question {i}").model_dump_json() + "\n" for i in range(10)))
    return path


def extract(tmp_path, dataset, *extra):
    return runner.invoke(app, ["extract", "--model", "default", "--dataset", str(dataset),
                               "--out", str(tmp_path / "s.zarr"), *extra])


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name or "building" in p.name
                  or p.name == "s.zarr")


def test_invalid_yaml_names_its_file_and_line(tmp_path):
    bad = tmp_path / "settings.yaml"
    bad.write_text("extraction:\n  span: prompt\n  dtype: [float32\n")
    result = runner.invoke(app, ["show-config", "--config", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}, line" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_duplicate_yaml_keys_are_refused(tmp_path):
    twice = tmp_path / "settings.yaml"
    twice.write_text("identification:\n  epsilon: 0.01\n  epsilon: 0.5\n")
    with pytest.raises(SettingsError, match=r"settings.yaml, line 3: duplicate key 'epsilon'"):
        load_settings(twice)
    assert runner.invoke(app, ["show-config", "--config", str(twice)]).exit_code == 2


def test_a_bad_setting_names_the_field(tmp_path):
    bad = tmp_path / "settings.yaml"
    bad.write_text("extraction: {shard_size: 0}\n")
    result = runner.invoke(app, ["show-config", "--config", str(bad)])
    assert result.exit_code == 2 and "extraction.shard_size" in result.output and str(bad) in result.output


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "settings.yaml"
    bad.write_text("extraction: {shard_size: 0}\n")
    result = runner.invoke(app, ["--debug", "show-config", "--config", str(bad)])
    assert result.exit_code == 2  # bad input stays exit 2
    assert "Traceback" in result.output and "SettingsError" in result.output


@pytest.mark.parametrize("shards, message", [
    ("99", r"--shards: [99] out of range; 10 records in shards of 32 give shards 0-0"),
    ("3-1", "--shards: '3-1' is an empty range"),
    ("x", "--shards: 'x' is neither N nor N-M"),
])
def test_bad_shards_are_refused_before_the_model_loads(tmp_path, dataset, no_model_loading, shards, message):
    result = extract(tmp_path, dataset, "--shards", shards)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert leftovers(tmp_path) == []


def test_an_empty_dataset_is_refused_before_the_model_loads(tmp_path, no_model_loading):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = extract(tmp_path, empty)
    assert result.exit_code == 2 and f"{empty}: the dataset holds no records" in result.output
    assert leftovers(tmp_path) == []


def test_a_missing_or_bad_dataset_is_named(tmp_path, no_model_loading):
    result = extract(tmp_path, tmp_path / "nope.jsonl")
    assert result.exit_code == 2 and "nope.jsonl" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    result = extract(tmp_path, bad)
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output


def test_an_out_path_that_is_not_a_store_is_refused(tmp_path, dataset, no_model_loading):
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "mine.txt").write_text("x")
    result = extract(tmp_path, dataset)
    assert result.exit_code == 2 and "is not a sparcom count store" in result.output
    assert (tmp_path / "s.zarr" / "mine.txt").read_text() == "x"


def test_a_failure_during_work_exits_1(tmp_path, dataset, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(sparcom.extraction.model_stage, "load_model", broken)
    result = extract(tmp_path, dataset)
    assert result.exit_code == 1
    assert "RuntimeError: the disk is on fire" in result.output and "Traceback" not in result.output


def test_curation_with_every_record_quarantined_says_why(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n{"id": "b"}\n')
    with pytest.raises(RecordError, match=r"^no records left to curate: all 2 were set aside \(invalid: 2\)$"):
        curate([file_pool(bad, "quarantine")], CurationSettings(
            on_error="quarantine", inputs=[bad], sources=[], authored=False,
            max_prompt_tokens=None, max_response_tokens=None))


@pytest.mark.slow  # the curate command runs a flow: Prefect starts its temporary server
def test_curation_with_every_record_quarantined_is_one_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n{"id": "b"}\n')
    result = runner.invoke(app, ["curate", "--no-hub", "--no-authored", "--input", str(bad),
                                 "--on-error", "quarantine", "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 2, result.output
    assert "no records left to curate: all 2 were set aside (invalid: 2)" in result.output
    assert not list((tmp_path / "work").rglob("*partial*")) and not list((tmp_path / "work").rglob("*building*"))


@pytest.mark.parametrize("command", [
    ["extract", "--model", "default", "--dataset", "DATA", "--out", "OUT", "--device", "cuda"],
    ["ablate", "--components", "OUT", "--out", "OUT", "--device", "cuda"],
    ["generate", "--category", "QA", "--out", "OUT", "--device", "cuda"],
])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(tmp_path, dataset, no_model_loading, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    given = {"DATA": str(dataset), "OUT": str(tmp_path / "out")}
    result = runner.invoke(app, [given.get(arg, arg) for arg in command])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: --device: device 'cuda' does not exist on this machine "
                                     "(0 CUDA devices); use cpu or auto")


def test_flow_logs_of_bad_input_carry_no_traceback():
    """A flow's loggers report a failed task's bad input with its traceback; the command's one
    line says it, so those records are dropped; failures during work keep theirs."""
    import io
    import logging

    from cli.errors import hide_bad_input_tracebacks

    logger = logging.getLogger("sparcom-test-flow")
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    logger.propagate = False
    hide_bad_input_tracebacks("sparcom-test-flow")
    for error in (RecordError("d.jsonl: the dataset holds no records"), RuntimeError("the disk is on fire")):
        try:
            raise error
        except Exception:  # noqa: BLE001
            logger.exception("Task run failed with exception: %r", error)
    assert "RecordError" not in stream.getvalue()
    assert stream.getvalue().count("Traceback") == 1 and "RuntimeError: the disk is on fire" in stream.getvalue()
