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
    assert sorted(p.name for p in users_folder.parent.iterdir() if not p.name.endswith(".lock")) == ["mine"]


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
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["out"]
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
    assert not [p for p in tmp_path.iterdir() if ".building" in p.name or ".replaced" in p.name]


def test_curate_refuses_a_users_out_folder_before_any_work(users_folder, tmp_path):
    before = folder_digest(users_folder)
    result = CliRunner().invoke(app, ["curate", "--no-hub", "--out", str(users_folder), "--work-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert str(users_folder) in result.output and "not written by sparcom" in result.output
    assert folder_digest(users_folder) == before


def test_identify_refuses_a_users_out_folder(users_folder, tmp_path):
    from sparcom.extraction.store import create_store, finalize_store, write_shard

    import numpy as np

    records = [make_record(i, "QA", f"Question {i}") for i in range(4)]
    store = tmp_path / "s.zarr"
    create_store(store, records, {"act_count": (("layer", "neuron"), (2, 3))}, {"layer": [0, 1]}, 2, 8,
                 {"extraction_key": "k"})
    for shard in (0, 1):
        write_shard(store, shard, {"token_count": np.full(2, 4, np.uint32),
                                   "act_count": np.ones((2, 2, 3), np.uint32)})
    finalize_store(store)
    before = folder_digest(users_folder)
    result = CliRunner().invoke(app, ["identify", "--store", str(store), "--out", str(users_folder),
                                      "--dask-workers", "1"])
    assert result.exit_code == 2, result.output
    assert "mine" in result.output and "Traceback" not in result.output
    assert folder_digest(users_folder) == before
