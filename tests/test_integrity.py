"""A damaged count store is never read as zeros: refused by its readers, repaired by extraction."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from cli.app import app
from sparcom.extraction.settings import ExtractionSettings
from sparcom.identification.settings import IdentificationSettings
from sparcom.extraction.extract import extract_to_store
from sparcom.identification.identify import group_frequencies
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import StoreError, is_complete, open_store, verify_store

from builders import make_record

SHARD = 4
SETTINGS = ExtractionSettings(shard_size=SHARD, max_batch_size=1)
CATEGORIES = ["CLS", "CODE", "QA", "GEN", "MATH", "SUM"]
# (what is damaged, how): each leaves shard 1 (records t-004 .. t-007) damaged
DAMAGES = {
    "count chunk deleted": ("act_count/c/1/0/0", "delete"),
    "token_count chunk deleted": ("token_count/c/1", "delete"),
    "count chunk bytes changed": ("act_count/c/1/0/0", "corrupt"),
}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def damage(store: Path, chunk: str, how: str) -> None:
    target = store / chunk
    if how == "delete":
        target.unlink()
    else:  # same size, other bytes
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
        target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def records():
    return [make_record(i, category, f"Question {i}: explain topic {i % 7} " * (1 + i % 3))
            for i, category in enumerate(CATEGORIES * 2)]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir, cache_dir):
    return load_model(resolve_model(str(tiny_llama_dir)), cache_dir, "float64", "cpu")


@pytest.fixture(scope="module")
def intact(tmp_path_factory, loaded, records) -> Path:
    return extract_to_store(loaded, records, tmp_path_factory.mktemp("intact") / "s.zarr", SETTINGS)


@pytest.fixture(params=list(DAMAGES))
def damaged(request, tmp_path, intact) -> tuple[Path, str]:
    store = tmp_path / "s.zarr"
    shutil.copytree(intact, store)
    damage(store, *DAMAGES[request.param])
    return store, request.param


def test_the_intact_store_verifies_and_holds_a_manifest_of_every_chunk(intact, records):
    verify_store(intact)
    chunks = {p.relative_to(intact).as_posix() for p in intact.glob("act_count/c/*/*/*")}
    assert chunks == {f"act_count/c/{shard}/0/0" for shard in range(len(records) // SHARD)}


def test_a_damaged_store_is_refused_naming_shard_and_records(damaged):
    store, _ = damaged
    with pytest.raises(StoreError, match=r"shard 1 \(records t-004, t-005, t-006, t-007\)"):
        verify_store(store)
    with pytest.raises(StoreError, match="shard 1"):
        open_store(store)


def test_verify_command(intact, damaged):
    store, _ = damaged
    runner = CliRunner()
    good = runner.invoke(app, ["verify", str(intact)])
    assert good.exit_code == 0 and "verified" in good.output
    bad = runner.invoke(app, ["verify", str(store)])
    assert bad.exit_code == 2, bad.output
    assert "shard 1" in bad.output and "t-005" in bad.output and "Traceback" not in bad.output


def test_identify_refuses_a_damaged_store_and_writes_nothing(tmp_path, damaged):
    store, _ = damaged
    before = folder_digest(store)
    out = tmp_path / "findings"
    result = CliRunner().invoke(app, ["identify", "--store", str(store), "--out", str(out), "--dask-workers", "1"])
    assert result.exit_code == 2, result.output
    assert "shard 1" in result.output and "t-004" in result.output
    assert not out.exists() and folder_digest(store) == before


def test_extract_repairs_only_the_damaged_shard(tmp_path, damaged, intact, loaded, records, caplog):
    store, _ = damaged
    untouched = {p: p.stat().st_mtime_ns for p in store.glob("act_count/c/[02]/*/*")}
    with caplog.at_level(logging.WARNING):
        extract_to_store(loaded, records, store, SETTINGS)
    assert "shard 1" in caplog.text and "recounting" in caplog.text
    verify_store(store)
    assert {p: p.stat().st_mtime_ns for p in store.glob("act_count/c/[02]/*/*")} == untouched
    xr.testing.assert_identical(open_store(store).compute(), open_store(intact).compute())


def test_a_damaged_donor_gives_no_rows(tmp_path, damaged, intact, loaded, records, caplog):
    donor, _ = damaged
    extra = records + [make_record(99, "QA", "One more question, newly added.")]
    with caplog.at_level(logging.WARNING):
        store = extract_to_store(loaded, extra, tmp_path / "new.zarr", SETTINGS, donors=[donor])
    assert "not copying counts from" in caplog.text
    new, reference = open_store(store), open_store(intact)
    for name in ("act_count", "token_count"):
        np.testing.assert_array_equal(new[name].values[:len(records)], reference[name].values)


def test_frequencies_above_one_are_refused(tmp_path, intact):
    store = open_store(intact)
    inflated = store.assign(token_count=store.token_count // 4)  # fewer tokens than activations
    with pytest.raises(StoreError, match=r"outside \[0, 1\]"):
        group_frequencies(inflated, "category").frequency.compute()


def test_a_store_without_manifest_cannot_be_verified(tmp_path, intact):
    store = tmp_path / "old.zarr"
    shutil.copytree(intact, store)
    (store / "sparcom_manifest.json").unlink()
    assert is_complete(store)
    with pytest.raises(StoreError, match="no chunk manifest"):
        verify_store(store)


@pytest.mark.parametrize("shard_size", [1, 2])
def test_identification_works_for_small_shards(tmp_path, records, shard_size):
    """30 layers in chunks of 8 and one- or two-record shards leave Dask uneven chunks, which
    are rechunked before Zarr writes them."""
    from sparcom.identification.identify import identify_store
    from sparcom.extraction.store import create_store, finalize_store, write_shard

    rng = np.random.default_rng(shard_size)
    tokens = rng.integers(5, 20, len(records)).astype(np.uint32)
    counts = (rng.random((len(records), 30, 16)) * tokens[:, None, None]).astype(np.uint32)
    store = tmp_path / "s.zarr"
    create_store(store, records, {"act_count": (("layer", "neuron"), (30, 16))}, {"layer": list(range(30))},
                 shard_size, 8, {"extraction_key": "k"})
    for shard, start in enumerate(range(0, len(records), shard_size)):
        rows = slice(start, start + shard_size)
        write_shard(store, shard, {"token_count": tokens[rows], "act_count": counts[rows]})
    finalize_store(store)
    result = CliRunner().invoke(app, ["identify", "--store", str(store), "--out", str(tmp_path / "out"),
                                      "--epsilon", "0.1", "--dask-workers", "1"])
    assert result.exit_code == 0, result.output
    components = xr.open_zarr(tmp_path / "out" / "components.zarr")
    categories = np.array([r.category for r in records])
    for category in CATEGORIES:
        rows = categories == category
        expected = counts[rows].sum(0) / tokens[rows].sum()
        np.testing.assert_allclose(components.frequency.sel(group=category).values, expected)
