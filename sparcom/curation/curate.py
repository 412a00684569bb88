"""Curation: from pools of candidate records to a balanced, deduplicated, length-checked dataset.

- `normalise(record)`: NFC Unicode, LF line ends, no control characters, no surrounding blanks.
- `prompt_token_counts(records, tokenizer)`: tokens of each chat-templated prompt, as extracted.
- `curate(pools, settings, tokenizer)`: every step in order (validation, normalisation, length,
  exact and near duplicates, balanced sampling) with every record in and out counted.
- `Curation`: the kept records, the rejections with reasons, counts per pool and the balance.
- `balance_markdown(curation)`: the report: each input's counts and the category x origin table.
- `save_curation(curation, directory, datasets_dir)`: the dataset, manifest, report, quarantine.

Bad input (unparseable or invalid rows, duplicate ids, over-long records) from the user's own
inputs follows `on_error`: a RecordError naming the record, or quarantine. Public pools always
have theirs set aside. Duplicates and sampling are choices, never errors; the first of several
duplicates (in input order: shipped records, user files, public sets) is kept.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparcom.core.markdown import table
from sparcom.curation.dedup import canonical_text, near_duplicate_pairs
from sparcom.curation.records import (
    CATEGORIES,
    ORIGINS,
    InstructionRecord,
    Pool,
    RecordError,
    Rejection,
    dataset_hash,
    record_problem,
)

# Stages a record can leave by, in the order they are applied; each record leaves by one or is kept.
STAGES = ("invalid", "duplicate id", "too long", "duplicate", "near duplicate", "sampled out")
BAD_INPUT = ("invalid", "duplicate id", "too long")
TEXT_FIELDS = ("instruction", "input", "response")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalise(record: InstructionRecord) -> InstructionRecord:
    """Same text, one spelling: a record that only differed in such details is an exact duplicate.

    Raises RecordError when a field is left empty (it held only control characters, say).
    """
    def clean(text: str) -> str:
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        return CONTROL.sub("", text).strip()

    cleaned = {name: clean(getattr(record, name)) for name in TEXT_FIELDS}
    if all(cleaned[name] == getattr(record, name) for name in TEXT_FIELDS):
        return record
    normalised, problem = record_problem({**record.model_dump(), **cleaned})
    if normalised is None:
        raise RecordError(f"after normalisation: {problem}")
    return normalised


def prompt_token_counts(records: Sequence[InstructionRecord], tokenizer) -> list[int]:
    """Equal to len(prompts.prompt_ids(r, tokenizer)), in one batched tokenizer call."""
    from sparcom.curation.prompts import prompt_text

    texts = [prompt_text(r, tokenizer) for r in records]
    templated = tokenizer.chat_template is not None
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=not templated)["input_ids"]]


def response_token_counts(records: Sequence[InstructionRecord], tokenizer) -> list[int]:
    responses = [r.response for r in records]
    return [len(ids) for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]


@dataclass
class PoolReport:
    name: str
    description: str
    unavailable: str | None
    read: int
    group: tuple[str, str] | None = None  # (category, origin) a public set supplies
    left: Counter = field(default_factory=Counter)  # stage -> records that left by it

    @property
    def kept(self) -> int:
        return self.read - sum(self.left.values())


@dataclass
class Curation:
    records: list[InstructionRecord]
    rejections: list[Rejection]
    pools: list[PoolReport]
    per_group: int | None
    settings: dict

    def balance(self) -> dict[str, dict[str, int]]:
        counts = Counter((r.category, r.origin) for r in self.records)
        return {c: {o: counts[c, o] for o in ORIGINS} for c in CATEGORIES}

    def shortfalls(self) -> list[str]:
        """Each group under `per_group`, and why: its public sets were unavailable, or fewer
        candidates than that passed the checks (all of them are kept then)."""
        if self.per_group is None:
            return []
        return [f"{c} {o}: {n} of {self.per_group} ({self._why_short(c, o, n)})"
                for c, row in self.balance().items() for o, n in row.items() if n < self.per_group]

    def _why_short(self, category: str, origin: str, kept: int) -> str:
        supplying = [p for p in self.pools if p.group == (category, origin)]
        unavailable = [p.name for p in supplying if p.unavailable]
        reasons = [f"unavailable: {', '.join(unavailable)}"] if unavailable else []
        if kept:
            reasons.append(f"only {kept} candidates passed the checks, all kept")
        elif not supplying:
            reasons.append("no public set supplies it")
        return "; ".join(reasons) or "no candidates passed the checks"

    def summary(self) -> dict:
        return {
            "dataset_hash": dataset_hash(self.records),
            "kept": len(self.records),
            "balance": self.balance(),
            "shortfalls": self.shortfalls(),
            "pools": [{"name": p.name, "description": p.description, "unavailable": p.unavailable,
                       "read": p.read, **{s: p.left[s] for s in STAGES}, "kept": p.kept}
                      for p in self.pools],
        }


class _Ledger:
    """Where each candidate came from, and the rejections, applying the error policy."""

    def __init__(self, pools: Sequence[Pool], on_error: str):
        self.on_error = on_error
        self.reports = [PoolReport(p.name, p.description, p.unavailable, p.rows_read, p.group) for p in pools]
        self.rejections: list[Rejection] = []
        self.candidates: list[tuple[int, InstructionRecord]] = []
        for index, pool in enumerate(pools):
            for rejection in pool.rejected:
                self._count(index, rejection)
            self.candidates.extend((index, record) for record in pool.records)
        self.strict = [p.strict for p in pools]

    def _count(self, pool: int, rejection: Rejection) -> None:
        self.reports[pool].left[rejection.stage] += 1
        self.rejections.append(rejection)

    def reject(self, pool: int, rejection: Rejection) -> None:
        if rejection.stage in BAD_INPUT and self.strict[pool] and self.on_error == "raise":
            raise RecordError(rejection.message())
        self._count(pool, rejection)

    def filter(self, stage: str, problems: dict[int, str]) -> None:
        """Drop the candidates at these positions, each with its reason."""
        kept = []
        for position, (pool, record) in enumerate(self.candidates):
            if position in problems:
                self.reject(pool, Rejection(self.reports[pool].name, record.id, stage, problems[position],
                                            record.model_dump()))
            else:
                kept.append((pool, record))
        self.candidates = kept


def curate(pools: Sequence[Pool], settings, tokenizer=None) -> Curation:
    """`settings` is a `config.CurationSettings`; the tokenizer defaults to `settings.tokenizer`."""
    if tokenizer is None and (settings.max_prompt_tokens or settings.max_response_tokens):
        from sparcom.core.models import load_tokenizer  # transformers only where lengths are counted

        tokenizer = load_tokenizer(settings.tokenizer)
    ledger = _Ledger(pools, settings.on_error)
    ledger.filter("duplicate id", _duplicate_ids(ledger.candidates))
    ledger.filter("invalid", _normalise_all(ledger))
    ledger.filter("too long", _over_long(ledger.candidates, settings, tokenizer))
    ledger.filter("duplicate", _exact_duplicates(ledger.candidates))
    ledger.filter("near duplicate", _near_duplicates(ledger.candidates, settings))
    if not ledger.candidates:  # nothing to balance or save: say why, write nothing
        left = Counter(r.stage for r in ledger.rejections)
        raise RecordError("no records left to curate: " + (
            f"all {len(ledger.rejections)} were set aside ("
            + ", ".join(f"{stage}: {n}" for stage, n in left.items()) + ")" if left else "the inputs hold none"))
    records = _sample(ledger, settings.per_group, settings.seed)
    return Curation(records, ledger.rejections, ledger.reports, settings.per_group,
                    settings.model_dump(mode="json"))


def _duplicate_ids(candidates) -> dict[int, str]:
    first: dict[str, int] = {}
    problems = {}
    for position, (pool, record) in enumerate(candidates):
        if record.id in first:
            problems[position] = f"duplicate id {record.id!r}, already given by an earlier input"
        else:
            first[record.id] = position
    return problems


def _normalise_all(ledger: _Ledger) -> dict[int, str]:
    problems = {}
    for position, (pool, record) in enumerate(ledger.candidates):
        try:
            ledger.candidates[position] = (pool, normalise(record))
        except RecordError as error:
            problems[position] = str(error)
    return problems


def _over_long(candidates, settings, tokenizer) -> dict[int, str]:
    limits = [(name, limit, counter) for name, limit, counter in (
        ("prompt", settings.max_prompt_tokens, prompt_token_counts),
        ("response", settings.max_response_tokens, response_token_counts)) if limit is not None]
    if not limits or not candidates:
        return {}
    records = [record for _, record in candidates]
    problems: dict[int, str] = {}
    for name, limit, counter in limits:
        for position, tokens in enumerate(counter(records, tokenizer)):
            if tokens > limit and position not in problems:
                problems[position] = f"{name} has {tokens} tokens, over the limit of {limit}"
    return problems


def _exact_duplicates(candidates) -> dict[int, str]:
    first: dict[str, str] = {}
    problems = {}
    for position, (_, record) in enumerate(candidates):
        key = canonical_text(record.user_turn())
        if key in first:
            problems[position] = f"same instruction and input as {first[key]!r}"
        else:
            first[key] = record.id
    return problems


def _near_duplicates(candidates, settings) -> dict[int, str]:
    """Greedy in input order: a record goes when it is close to an earlier record that stays."""
    texts = [record.user_turn() for _, record in candidates]
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for first, second, similarity in near_duplicate_pairs(
            texts, settings.near_duplicate_threshold, settings.shingle_words):
        neighbours.setdefault(second, []).append((first, similarity))
    problems: dict[int, str] = {}
    for position in sorted(neighbours):
        for earlier, similarity in neighbours[position]:
            if earlier not in problems:
                problems[position] = (f"near duplicate of {candidates[earlier][1].id!r} "
                                      f"(Jaccard {similarity:.2f})")
                break
    return problems


def _sample(ledger: _Ledger, per_group: int | None, seed: int) -> list[InstructionRecord]:
    """Per category x origin, keep `per_group` records drawn by a seeded hash of their ids.

    Ranking by hash(seed, id) rather than shuffling keeps a record's chance of selection
    independent of what else is in the pool; the kept records stay in input order.
    """
    kept: list[InstructionRecord] = []
    for category in CATEGORIES:
        for origin in ORIGINS:
            group = [(pool, r) for pool, r in ledger.candidates
                     if r.category == category and r.origin == origin]
            if per_group is not None and len(group) > per_group:
                ranked = sorted(range(len(group)), key=lambda i: _draw(seed, group[i][1].id))
                for position in ranked[per_group:]:
                    ledger.reports[group[position][0]].left["sampled out"] += 1
                group = [group[i] for i in sorted(ranked[:per_group])]
            kept.extend(record for _, record in group)
    return kept


def _draw(seed: int, record_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{record_id}".encode()).hexdigest()


def balance_markdown(curation: Curation) -> str:
    summary = curation.summary()
    lines = ["# HexaInst curation", "",
             f"Kept **{summary['kept']}** records, dataset hash `{summary['dataset_hash'][:16]}`.", "",
             "## Balance (kept per category x origin)", ""]
    balance = [[category, *(f"{n}" if curation.per_group is None or n >= curation.per_group
                            else f"**{n}** (short by {curation.per_group - n})" for n in row.values()),
                sum(row.values())] for category, row in summary["balance"].items()]
    lines.append(table(["category", *ORIGINS, "total"], balance, align_numbers=True))
    if summary["shortfalls"]:
        lines += ["", f"Short of the target of {curation.per_group}: " + "; ".join(summary["shortfalls"]) + "."]
    lines += ["", "## Records in and out, per input", ""]
    columns = ("read", *STAGES, "kept")
    flow = [[f"{pool['name']} (unavailable)" if pool["unavailable"] else pool["name"],
             *(pool[column] for column in columns)] for pool in summary["pools"]]
    flow.append(["**all**", *(f"**{sum(p[column] for p in summary['pools'])}**" for column in columns)])
    lines.append(table(["input", *columns], flow, align_numbers=True))
    unavailable = [p for p in summary["pools"] if p["unavailable"]]
    if unavailable:
        lines += ["", "## Unavailable inputs", ""] + [f"- {p['unavailable']}" for p in unavailable]
    lines += ["", "## Inputs", ""] + [f"- `{p['name']}`: {p['description']}" for p in summary["pools"]]
    return "\n".join(lines) + "\n"


def save_curation(curation: Curation, directory: Path | None, datasets_dir: Path) -> Path:
    """Save with `dataset.save_dataset` into `directory`, or `datasets_dir/<dataset hash>`.

    Next to the data: `report.md` and `quarantine.jsonl`, every record set aside (at any stage
    but sampling) with its reason; the manifest holds the settings and the counts."""
    from sparcom.curation.dataset import save_dataset

    directory = Path(directory or Path(datasets_dir) / dataset_hash(curation.records)[:16])
    save_dataset(
        curation.records, directory, settings=curation.settings, report=curation.summary(),
        attachments={"report.md": balance_markdown(curation),
                     "quarantine.jsonl": "".join(r.to_json() + "\n" for r in curation.rejections)})
    return directory
