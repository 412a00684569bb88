"""A cached stage whose output is gone or damaged is recomputed, saying so; reruns then hit again."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from prefect import flow, task

from sparcom.stages import unusable_output
from tasks.caching import cached

from builders import make_record

CALLS: list[str] = []


@task(name="write a folder", **cached(lambda out: str(out)))
def write_folder(out: Path) -> Path:
    CALLS.append(str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "done.txt").write_text("done")
    return out


@flow
def folder_flow(out: Path) -> Path:
    return write_folder(out)


@pytest.fixture(scope="module")
def prefect_harness(prefect_harness, tmp_path_factory):
    """The shared test server, with results stored apart: this module counts cache hits."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
        yield


@pytest.mark.slow  # a Prefect server
def test_a_deleted_output_is_recomputed_and_said(tmp_path, prefect_harness, caplog):
    out = tmp_path / "out"
    CALLS.clear()
    assert folder_flow(out) == out and folder_flow(out) == out
    assert len(CALLS) == 1  # the second run was a cache hit
    shutil.rmtree(out)
    with caplog.at_level(logging.WARNING):
        assert folder_flow(out) == out
    assert (out / "done.txt").is_file() and len(CALLS) == 2
    assert "the cached result cannot be used" in caplog.text and f"{out} is gone" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        folder_flow(out)
    assert len(CALLS) == 2 and "cannot be used" not in caplog.text  # a plain hit again


def small_store(path: Path) -> Path:
    import numpy as np

    from sparcom.extraction.store import create_store, finalize_store, write_shard

    records = [make_record(i, "QA", f"Question {i}") for i in range(4)]
    create_store(path, records, {"act_count": (("layer", "neuron"), (2, 3))}, {"layer": [0, 1]}, 2, 8,
                 {"extraction_key": "k", "model_fingerprint": "f"})
    for shard in (0, 1):
        write_shard(path, shard, {"token_count": np.full(2, 4, np.uint32),
                                  "act_count": np.ones((2, 2, 3), np.uint32)})
    finalize_store(path)
    return path


@pytest.mark.slow  # a Prefect server
def test_compare_refuses_a_damaged_store(tmp_path, prefect_harness):
    from typer.testing import CliRunner

    from cli.app import app

    base, tuned = small_store(tmp_path / "base.zarr"), small_store(tmp_path / "tuned.zarr")
    (tuned / "token_count" / "c" / "1").unlink()
    result = CliRunner().invoke(app, ["compare", "--base-store", str(base), "--tuned-store", str(tuned),
                                      "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 2, result.output
    assert "tuned.zarr: damaged store: shard 1 (records t-002, t-003)" in result.output


def test_unusable_output_names_what_is_wrong(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    assert unusable_output({"store": store, "files": {"a": str(store)}}) is None
    (store / "act_count" / "c" / "1" / "0" / "0").unlink()
    assert "shard 1 (records t-002, t-003)" in unusable_output(store)
    assert unusable_output({"files": {"report.md": str(tmp_path / "gone.md")}}) == f"{tmp_path / 'gone.md'} is gone"


def test_a_damaged_run_output_is_refused_by_its_readers_and_not_answered_from_cache(tmp_path):
    import pytest

    from sparcom.extraction.store import StoreError
    from sparcom.identification.identify import identify_store
    from sparcom.identification.report import report_generality
    from sparcom.identification.settings import IdentificationSettings

    store = small_store(tmp_path / "s.zarr")
    components = identify_store(store, IdentificationSettings(epsilon=0.5, split_half_seeds=0), tmp_path / "run")
    assert unusable_output({"components": components}) is None
    shutil.rmtree(components / "isn")
    assert "components.zarr: damaged: {'isn': ['zarr.json']}" in unusable_output({"components": components})
    with pytest.raises(StoreError, match="components.zarr: damaged.*isn.*rerun the stage"):
        report_generality(components, tmp_path / "run")


def test_a_run_output_without_manifest_is_not_answered_from_cache(tmp_path):
    import xarray as xr

    from sparcom.extraction.store import save_zarr

    output = save_zarr(xr.Dataset({"delta": ("group", [0.5, 0.25])}), tmp_path / "ablation.zarr")
    assert unusable_output(output) is None
    (output / "sparcom_manifest.json").unlink()
    assert "no chunk manifest" in unusable_output(output)
