"""A damaged count store is never read as zeros: refused by its readers, repaired by extraction."""

from __future__ import annotations

import hashlib
import json
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


@pytest.mark.parametrize("manifest", ["missing", "unparsable"])
def test_a_store_without_a_readable_manifest_is_recounted(tmp_path, intact, loaded, records, manifest):
    store = tmp_path / "old.zarr"
    shutil.copytree(intact, store)
    if manifest == "missing":
        (store / "sparcom_manifest.json").unlink()
    else:
        (store / "sparcom_manifest.json").write_text('{"format": 2}{"extra": 1}')
    with pytest.raises(StoreError, match=r"old.zarr.*manifest.*`sparcom run --refresh extract`.*or delete .*old.zarr$"):
        verify_store(store)
    extract_to_store(loaded, records, store, SETTINGS)  # every shard recounted
    verify_store(store)
    xr.testing.assert_identical(open_store(store).compute(), open_store(intact).compute())


def test_a_chunk_removed_from_both_store_and_manifest_is_found(tmp_path, intact):
    store = tmp_path / "s.zarr"
    shutil.copytree(intact, store)
    (store / "act_count" / "c" / "1" / "0" / "0").unlink()
    manifest = json.loads((store / "sparcom_manifest.json").read_text())
    del manifest["arrays"]["act_count"]["files"]["c/1/0/0"]
    (store / "sparcom_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard 1 \(records t-004"):
        verify_store(store)


def test_a_changed_root_attribute_is_found(tmp_path, intact):
    import zarr

    store = tmp_path / "s.zarr"
    shutil.copytree(intact, store)
    zarr.open_group(store, mode="r+").attrs["shard_size"] = 3
    with pytest.raises(StoreError, match=r"'root attributes': \['shard_size'\].*delete .*s.zarr and run `sparcom extract` again"):
        verify_store(store)


def test_a_manifest_of_the_first_format_is_upgraded_without_a_recount(tmp_path, intact):
    from sparcom.extraction.integrity import chunk_files

    store = tmp_path / "s.zarr"
    shutil.copytree(intact, store)
    current = json.loads((store / "sparcom_manifest.json").read_text())
    first = {"format": 1, "arrays": {name: {key: entry for key, entry in array["files"].items() if entry}
                                     for name, array in current["arrays"].items()}}
    (store / "sparcom_manifest.json").write_text(json.dumps(first))
    written = {p: p.stat().st_mtime_ns for p in store.rglob("c/*") if p.is_file()}
    verify_store(store)
    assert json.loads((store / "sparcom_manifest.json").read_text()) == current
    assert {p: p.stat().st_mtime_ns for p in store.rglob("c/*") if p.is_file()} == written
    assert chunk_files(store, "act_count")  # still the same chunks
    (store / "sparcom_manifest.json").write_text(json.dumps(first))
    (store / "token_count" / "c" / "2").unlink()
    with pytest.raises(StoreError, match="shard 2"):  # an old manifest with damage is not upgraded
        verify_store(store)
    assert json.loads((store / "sparcom_manifest.json").read_text())["format"] == 1


@pytest.mark.parametrize("path, message", [
    ("missing.zarr", "missing.zarr: no such store"),
    ("d.jsonl", "d.jsonl: is a file, not a Zarr store"),
    ("empty", "empty: not a Zarr store (no zarr.json)"),
    ("truncated.zarr", "truncated.zarr: its Zarr metadata cannot be read"),
])
def test_verify_names_what_is_not_a_store(tmp_path, intact, path, message):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "empty").mkdir()
    shutil.copytree(intact, tmp_path / "truncated.zarr")
    meta = tmp_path / "truncated.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:200])
    result = CliRunner().invoke(app, ["verify", str(tmp_path / path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    if path == "truncated.zarr":
        assert "delete" in result.output
