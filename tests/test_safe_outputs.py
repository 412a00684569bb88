"""Outputs never destroy what the tool did not write; concurrent writers never mix a result."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from sparcom.core.outputs import MARKER, OutputError, building, check_output, claimed

from builders import make_record


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def users_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("months of work")
    (folder / "notes" / "a.txt").write_text("keep me")
    return folder


def test_a_users_folder_is_refused_and_untouched(users_folder):
    before = folder_digest(users_folder)
    with pytest.raises(OutputError, match="mine: exists, is not empty and was not written by sparcom"):
        with building(users_folder, "dataset") as partial:
            (partial / "x").write_text("new")
    with pytest.raises(OutputError, match="mine"):
        with claimed(users_folder, "run"):
            pass
    assert folder_digest(users_folder) == before
    assert sorted(p.name for p in users_folder.parent.iterdir()) == ["mine"]


def test_an_earlier_output_is_replaced_whole_and_a_failed_build_changes_nothing(tmp_path):
    target = tmp_path / "out"
    with building(target, "dataset") as partial:
        (partial / "old.txt").write_text("first")
    with building(target, "dataset") as partial:
        (partial / "new.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new.txt"]
    before = folder_digest(target)
    with pytest.raises(RuntimeError):
        with building(target, "dataset") as partial:
            (partial / "half.txt").write_text("half")
            raise RuntimeError("killed halfway")
    assert folder_digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file stays behind
    with pytest.raises(OutputError, match="as a run"):  # another command's output
        check_output(target, "run")


def test_empty_and_missing_folders_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "dataset")
    check_output(tmp_path / "missing", "dataset")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "file", "dataset")


WRITER = """
import sys, time
from pathlib import Path
from sparcom.core.outputs import building
with building(Path(sys.argv[1]), "run") as partial:
    for i in range(20):
        (partial / f"part{i}").write_text(sys.argv[2])
        time.sleep(0.01)
"""


def test_concurrent_writers_into_one_output_never_mix(tmp_path):
    target = tmp_path / "out"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name]) for name in ("A", "B", "C")]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    contents = {p.read_text() for p in target.glob("part*")}
    assert len(contents) == 1 and len(list(target.glob("part*"))) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_curate_refuses_a_users_out_folder_before_any_work(users_folder, tmp_path):
    before = folder_digest(users_folder)
    result = CliRunner().invoke(app, ["curate", "--no-hub", "--out", str(users_folder), "--work-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert str(users_folder) in result.output and "not written by sparcom" in result.output
    assert folder_digest(users_folder) == before


def test_identify_refuses_a_users_out_folder(users_folder, tmp_path):
    store = small_store(tmp_path / "s.zarr")
    before = folder_digest(users_folder)
    result = CliRunner().invoke(app, ["identify", "--store", str(store), "--out", str(users_folder),
                                      "--dask-workers", "1"])
    assert result.exit_code == 2, result.output
    assert "mine" in result.output and "Traceback" not in result.output
    assert folder_digest(users_folder) == before


def small_store(path: Path) -> Path:
    import numpy as np

    from sparcom.extraction.store import create_store, finalize_store, write_shard

    records = [make_record(i, "QA", f"Question {i}") for i in range(4)]
    create_store(path, records, {"act_count": (("layer", "neuron"), (2, 3))}, {"layer": [0, 1]}, 2, 8,
                 {"extraction_key": "k"})
    for shard in (0, 1):
        write_shard(path, shard, {"token_count": np.full(2, 4, np.uint32),
                                  "act_count": np.ones((2, 2, 3), np.uint32)})
    finalize_store(path)
    return path


WRITING_COMMANDS = {  # command -> its arguments with OUT where the output goes
    "extract": ["extract", "--model", "default", "--dataset", "DATA", "--out", "OUT"],
    "identify": ["identify", "--store", "STORE", "--out", "OUT", "--dask-workers", "1"],
    "ablate": ["ablate", "--components", "STORE", "--out", "OUT"],
    "curate": ["curate", "--no-hub", "--out", "OUT", "--work-dir", "WORK"],
    "generate": ["generate", "--category", "QA", "--out", "OUT"],
}


@pytest.mark.parametrize("command", list(WRITING_COMMANDS))
def test_every_writing_command_refuses_a_users_folder_before_any_work(command, users_folder, tmp_path,
                                                                      no_model_loading):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(make_record(i, "QA", f"Question {i}").model_dump_json() + "\n" for i in range(4)))
    store = small_store(tmp_path / "s.zarr") if command in ("identify", "ablate") else tmp_path / "s.zarr"
    given = {"DATA": str(data), "STORE": str(store), "OUT": str(users_folder), "WORK": str(tmp_path / "work")}
    before = folder_digest(users_folder)
    result = CliRunner().invoke(app, [given.get(arg, arg) for arg in WRITING_COMMANDS[command]])
    assert result.exit_code == 2, result.output
    assert "mine" in result.output and len(result.output.strip().splitlines()) == 1
    assert folder_digest(users_folder) == before
    assert not [p.name for p in users_folder.parent.iterdir() if p.name.startswith(".")]  # no lock file


def test_ablate_refuses_a_users_folder_in_place_of_its_ablation_store(tmp_path, no_model_loading):
    out = tmp_path / "run"
    with claimed(out, "run"):  # an earlier run folder, its ablation.zarr a user's folder
        (out / "ablation.zarr").mkdir()
        (out / "ablation.zarr" / "mine.txt").write_text("keep me")
    store = small_store(tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["ablate", "--components", str(store), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "ablation.zarr: exists, is not empty and was not written by sparcom" in result.output
    assert (out / "ablation.zarr" / "mine.txt").read_text() == "keep me"


HOLDER = """
import sys, time
from pathlib import Path
from sparcom.core.outputs import claimed
with claimed(Path(sys.argv[1]), "run"):
    Path(sys.argv[2]).write_text("holding")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def test_two_ablations_into_one_folder_take_turns(tmp_path, monkeypatch):
    """While another process writes into the folder, ablate waits for it before any of its work."""
    import threading
    import time

    import sparcom.ablation.ablate
    import sparcom.ablation.report

    out, holding, release = tmp_path / "out", tmp_path / "holding", tmp_path / "release"
    order: list[str] = []

    def ablation(components, store, *args, **kwargs):
        order.append("ablation ran" if release.exists() else "ablation ran while the other held the folder")
        return components

    monkeypatch.setattr(sparcom.ablation.ablate, "run_ablation", ablation)
    monkeypatch.setattr(sparcom.ablation.report, "report_ablation", lambda result, out: {})
    monkeypatch.setattr(sparcom.ablation.report, "ablation_markdown", lambda summary, plot: "report")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(holding), str(release)])
    deadline = time.monotonic() + 300
    while not holding.exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holding.exists()
    results = []
    command = threading.Thread(target=lambda: results.append(CliRunner().invoke(
        app, ["ablate", "--components", str(tmp_path), "--store", str(tmp_path), "--out", str(out)])))
    command.start()
    command.join(timeout=1.0)  # it must still be waiting
    release.write_text("done")
    assert holder.wait(timeout=300) == 0
    command.join(timeout=300)
    assert results and results[0].exit_code == 0, results and results[0].output
    assert order == ["ablation ran"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("where, message", [
    ("under a file", "is a file, not a folder"),
    ("under /proc", "cannot write in /proc"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out" if where == "under a file" else Path("/proc/sparcom-out")
    with pytest.raises(OutputError, match=message):
        check_output(target, "dataset")
    result = CliRunner().invoke(app, ["curate", "--no-hub", "--out", str(target), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
