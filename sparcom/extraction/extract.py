"""Activation extraction: instructions in, a finished count store out (docs/method.md sections 2 and 7).

- `model_attributes(loaded, data_hash)`, `store_attributes(...)`: what a store records of the
  model and data, and what a count store adds (hooked modules, span, keys).
- `extract_to_store(loaded, records, store, settings)`: counts every instruction into the store.
  A rerun with the same model, dataset and settings resumes: finished shards are skipped, and a
  finished store is returned as it is. `shards=` restricts one process to some shards so that
  several processes (or GPUs) can fill one store side by side.
- `parse_shards("0-3,8")`: shard lists as the command line takes them.
- `shard_range(shard, shard_size, n)`: the record indices of one shard.
- `shard_windows(wanted, shard_size, n)`, `shard_progress(n, wanted, shard_size, desc, ...)`: how
  a store's missing shards are filled (here and by the attribution store): SORT_WINDOW_SHARDS at
  a time, under one progress bar.
- `check_extraction(records, settings, shards, where)`: the inputs refused before the model loads
  (no records, shards out of range).
- `DonorRows(stores, key)`: rows of finished stores a new store copies instead of counting.

A finished store whose chunks are damaged is reopened for the damaged shards only
(`sparcom.extraction.store.repair_store`); `extract_to_store` does this itself, so a rerun repairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sparcom.core.code_version import package_version
from sparcom.core.models import LoadedModel
from sparcom.curation.prompts import tokenize_instruction
from sparcom.curation.records import InstructionRecord, dataset_hash, record_hash
from sparcom.extraction.architectures import FFNSites, ffn_sites
from sparcom.extraction.batching import padded_batches
from sparcom.extraction.counting import FFNCounter, expert_counting_path
from sparcom.extraction.keys import counts_key, extraction_key
from sparcom.extraction.schema import COUNT_FAMILIES, LAYER, MOE_LAYER, TOKEN_COUNT
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.store import (
    StoreError,
    check_store_target,
    create_store,
    finalize_store,
    finished_shards,
    finished_store,
    is_complete,
    open_store,
    shard_count,
    store_attrs,
    verify_store,
    write_shard,
)

log = logging.getLogger(__name__)

# Instructions sorted together by length: larger windows pad less, smaller ones lose less on a kill.
SORT_WINDOW_SHARDS = 8

ProgressCallback = Callable[[int, int], None]  # (instructions done, instructions in total)


def model_attributes(loaded: LoadedModel, data_hash: str) -> dict:
    """What every store says of the model and the data it ran on (docs/method.md section 7)."""
    return {
        "model": loaded.source.name,
        "model_path": str(loaded.source.path),
        "model_kind": loaded.source.kind,
        "model_fingerprint": loaded.fingerprint,
        "revision": loaded.source.revision or "",
        "architecture": loaded.model.config.model_type,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "devices": loaded.devices,
        "chat_template": loaded.tokenizer.chat_template is not None,
        "dataset_hash": data_hash,
        "sparcom_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def store_attributes(loaded: LoadedModel, data_hash: str, settings: ExtractionSettings, key: str,
                     dataset_path: Path | None = None) -> dict:
    """`dataset_path`: where the records' texts are found (the store keeps only their hashes)."""
    sites = ffn_sites(loaded.model)
    return {
        **model_attributes(loaded, data_hash),
        **({"dataset_path": str(Path(dataset_path).resolve())} if dataset_path else {}),
        "expert_counting": expert_counting_path(sites),
        "hooked_modules": [point.as_attribute() for point in FFNCounter(sites).hook_points],
        "token_span": settings.span,
        "extraction_key": key,
        "counts_key": counts_key(loaded.fingerprint, settings.span, loaded.dtype),
    }


def store_layout(sites: FFNSites) -> tuple[dict, dict]:
    """The count variables (dims and sizes after `instruction`) and layer coordinates
    (docs/method.md section 7)."""
    shapes = sites.family_shapes()
    variables = {f.count: (f.dims, shapes[f.name]) for f in COUNT_FAMILIES if f.name in shapes}
    layer_coords = {LAYER: sites.dense_layers} if sites.dense_layers else {}
    if sites.moe_layers:
        layer_coords[MOE_LAYER] = [layer.index for layer in sites.moe_layers]
    return variables, layer_coords


def extract_to_store(
    loaded: LoadedModel,
    records: Sequence[InstructionRecord],
    store: Path,
    settings: ExtractionSettings,
    shards: Iterable[int] | None = None,
    on_progress: ProgressCallback | None = None,
    donors: Sequence[Path] = (),
    finalize: bool = True,
    show_progress: bool = True,
    dataset_path: Path | None = None,
) -> Path:
    """Count every record into `store` (`dataset_path`: the file or folder the records came from,
    recorded in the store so later stages can read their texts). Records already counted in one of the `donors`
    (finished stores of the same model, span and dtype) are copied from there, not recounted.
    `finalize=False` leaves marking the store complete to the caller (the cluster's client)."""
    store = Path(store)
    data_hash = dataset_hash(records)
    key = extraction_key(loaded.fingerprint, data_hash, settings, loaded.dtype)
    check_store_target(store)
    if finished_store(store, key):
        return store
    sites = ffn_sites(loaded.model)
    if not store.exists():
        variables, layer_coords = store_layout(sites)
        create_store(store, records, variables, layer_coords, settings.shard_size, settings.layer_chunk,
                     store_attributes(loaded, data_hash, settings, key, dataset_path))

    n_shards = shard_count(len(records), settings.shard_size)
    wanted = sorted(set(range(n_shards) if shards is None else shards) - finished_shards(store))
    reusable = DonorRows(donors, counts_key(loaded.fingerprint, settings.span, loaded.dtype))
    _count_shards(loaded, sites, records, store, settings, wanted, reusable, on_progress, show_progress)
    if finalize and len(finished_shards(store)) == n_shards:
        finalize_store(store)
    return store


def _count_shards(loaded: LoadedModel, sites: FFNSites, records: Sequence[InstructionRecord], store: Path,
                  settings: ExtractionSettings, wanted: list[int], reusable: DonorRows,
                  on_progress: ProgressCallback | None, show_progress: bool) -> None:
    """The `wanted` shards written whole, SORT_WINDOW_SHARDS at a time: rows the donors hold
    copied, the others counted."""
    with (shard_progress(len(records), wanted, settings.shard_size, "extracting", on_progress, show_progress)
          as advance, FFNCounter(sites) as counter):
        for window, indices in shard_windows(wanted, settings.shard_size, len(records)):
            counts = reusable.take({i: record_hash(records[i]) for i in indices})
            advance(len(counts))
            fresh = [i for i in indices if i not in counts]
            counts.update(_count(counter, loaded, [records[i] for i in fresh], fresh, settings, advance))
            for shard in window:
                rows = shard_range(shard, settings.shard_size, len(records))
                write_shard(store, shard, {name: np.stack([counts[i][name] for i in rows]).astype(np.uint32)
                                           for name in counts[rows[0]]})


def _count(
    counter: FFNCounter,
    loaded: LoadedModel,
    records: Sequence[InstructionRecord],
    indices: Sequence[int],
    settings: ExtractionSettings,
    advance: Callable[[int], None],
) -> dict[int, dict[str, np.ndarray]]:
    """Counts per record index: every store variable of one row, token_count included."""
    tokenized = [tokenize_instruction(record, loaded.tokenizer, settings.span) for record in records]
    counts: dict[int, dict[str, np.ndarray]] = {}
    for batch, ids, attention, counted in padded_batches(tokenized, loaded.tokenizer, settings, loaded.device):
        result = {name: values.cpu().numpy()
                  for name, values in counter.count(loaded.model, ids, attention, counted).items()}
        for row, b in enumerate(batch):
            counts[indices[b]] = {name: values[row] for name, values in result.items()}
            counts[indices[b]][TOKEN_COUNT] = np.uint32(sum(tokenized[b].counted))
        advance(len(batch))
    return counts


def check_extraction(records: Sequence[InstructionRecord], settings: ExtractionSettings,
                     shards: Iterable[int] | None, where: object) -> None:
    """Refuse, before any model is loaded, what cannot give a store."""
    if not records:
        raise ValueError(f"{where}: the dataset holds no records; nothing to count")
    n_shards = shard_count(len(records), settings.shard_size)
    outside = sorted(set(shards or ()) - set(range(n_shards)))
    if outside:
        raise ValueError(f"--shards: {outside} out of range; {len(records)} records in shards of "
                         f"{settings.shard_size} give shards 0-{n_shards - 1}")


class DonorRows:
    """Rows of finished stores that a new store can copy, found by record content hash.
    Stores that do not verify give nothing."""

    def __init__(self, stores: Sequence[Path], key: str):
        self._where: dict[str, tuple[Path, int]] = {}
        for path in stores:
            if not is_complete(path) or store_attrs(path).get("counts_key") != key:
                continue
            try:
                verify_store(path)
            except StoreError as error:
                log.warning("not copying counts from %s: %s", path, error)
                continue
            for row, digest in enumerate(open_store(path).record_hash.values):
                self._where.setdefault(str(digest), (Path(path), row))

    def take(self, wanted: dict[int, str]) -> dict[int, dict[str, np.ndarray]]:
        found = {i: self._where[digest] for i, digest in wanted.items() if digest in self._where}
        rows: dict[int, dict[str, np.ndarray]] = {}
        for path in {path for path, _ in found.values()}:
            mine = {i: row for i, (p, row) in found.items() if p == path}
            dataset = open_store(path)
            names = [n for n in dataset.data_vars]
            values = dataset[names].isel(instruction=list(mine.values())).compute()
            for position, i in enumerate(mine):
                rows[i] = {name: values[name].values[position] for name in names}
        return rows


def parse_shards(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]."""
    shards: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--shards: {part!r} is neither N nor N-M")
        if int(last or first) < int(first):
            raise ValueError(f"--shards: {part!r} is an empty range (write the smaller shard first)")
        shards.extend(range(int(first), int(last or first) + 1))
    return shards


def shard_range(shard: int, shard_size: int, n: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, n))


def shard_windows(wanted: Sequence[int], shard_size: int, n: int) -> Iterator[tuple[list[int], list[int]]]:
    """The `wanted` shards SORT_WINDOW_SHARDS at a time (their records are sorted by length
    together), each window with its record indices."""
    for window_start in range(0, len(wanted), SORT_WINDOW_SHARDS):
        window = list(wanted[window_start:window_start + SORT_WINDOW_SHARDS])
        yield window, [i for s in window for i in shard_range(s, shard_size, n)]


@contextmanager
def shard_progress(n: int, wanted: Sequence[int], shard_size: int, desc: str, on_progress: ProgressCallback | None,
                   show_progress: bool) -> Iterator[Callable[[int], None]]:
    """The progress bar of filling the `wanted` shards of a store of `n` records (the others are
    done), and `advance(k)`: k more records done, told to `on_progress` too."""
    done_before = n - sum(len(shard_range(s, shard_size, n)) for s in wanted)
    with tqdm(total=n, initial=done_before, unit="instr", desc=desc, disable=not show_progress) as progress:
        def advance(k: int) -> None:
            progress.update(k)
            if on_progress:
                on_progress(progress.n, n)

        yield advance
