"""The ablation's unit of work: one pass over the evaluation records with one set switched off
(docs/method.md section 6), named by what decides its numbers, kept on disk once finished.

- `AblationPass(measure, family, off, records)`: `measure` is `nll` (each record's response NLL) or
  `answers` (greedy-decoded answers of the records with a checkable answer, "" for the others);
  `off` the switched-off set of `family` (a boolean array over the family's dims), None for the
  intact model; `records` the indices of the evaluation records an NLL pass measures (the others
  are NaN), None for all. An empty set is the intact pass (`AblationPass.of`), so it runs once.
- `PassInputs(records, checked, max_response_tokens, max_new_tokens, extraction)`: what every
  pass reads besides the model; `prepared(inputs, tokenizer)` tokenizes it once per model.
- `pass_key(ablation_pass, inputs, fingerprint, dtype)`: the pass's name: the model fingerprint,
  the evaluation records (dataset hash), the measure, the switched-off set (family, shape and
  bits), the records measured where not all, K (the scored response tokens, or the
  greedy-decoded new tokens), the dtype and the batching that pads the records. Two passes with
  one key give the same numbers.
- `measure_pass(loaded, ablation_pass, prepared, extraction)`: the pass on a loaded model.
- `FinishedPasses(folder)`: finished passes as `<key>.json` in `folder` (written whole, then
  renamed, so a killed run leaves none half-written): `get(key)`, `put(key, values)`.

The stage's pass list is any list of passes: the groups' sets, their controls, and any other
set a caller switches off run alike, on the cluster or here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sparcom.core.hashing import content_hash
from sparcom.curation.records import InstructionRecord, dataset_hash
from sparcom.extraction.settings import ExtractionSettings

if TYPE_CHECKING:  # measuring needs torch: imported where a pass runs
    from sparcom.core.models import LoadedModel

Measure = Literal["nll", "answers"]
MEASURES: tuple[Measure, ...] = ("nll", "answers")


@dataclass(frozen=True, eq=False)
class AblationPass:
    measure: Measure
    family: str
    off: np.ndarray | None  # None: nothing switched off
    records: tuple[int, ...] | None = None  # None: every evaluation record

    @classmethod
    def of(cls, measure: Measure, family: str, off: np.ndarray | None,
           records: Sequence[int] | None = None) -> AblationPass:
        if records is not None and measure != "nll":
            raise ValueError("only NLL passes measure a part of the records: accuracy counts every record")
        off = None if off is None or not np.asarray(off).any() else np.asarray(off, dtype=bool)
        return cls(measure, family, off, None if records is None else tuple(sorted(int(i) for i in records)))

    def set_digest(self) -> str | None:
        if self.off is None:
            return None
        return hashlib.sha256(repr(self.off.shape).encode() + np.packbits(self.off).tobytes()).hexdigest()


@dataclass(frozen=True)
class PassInputs:
    records: list[InstructionRecord]
    checked: list[int]                  # the records whose answers are decoded (measure `answers`)
    max_response_tokens: int | None
    max_new_tokens: int
    extraction: ExtractionSettings

    def digest(self) -> str:
        return content_hash(dataset_hash(self.records), self.checked, self.max_response_tokens, self.max_new_tokens,
                            self.extraction.batch_tokens, self.extraction.max_batch_size,
                            self.extraction.max_padding)


def pass_key(ablation_pass: AblationPass, inputs: PassInputs, fingerprint: str, dtype: str) -> str:
    k = inputs.max_response_tokens if ablation_pass.measure == "nll" else inputs.max_new_tokens
    # A pass of every record keeps the key it had before passes could measure a part of them.
    part = () if ablation_pass.records is None else (list(ablation_pass.records),)
    return content_hash("ablation-pass", fingerprint, dataset_hash(inputs.records), ablation_pass.measure,
                        ablation_pass.family, ablation_pass.set_digest(), *part, k, str(dtype),
                        inputs.checked if ablation_pass.measure == "answers" else None,
                        inputs.extraction.batch_tokens, inputs.extraction.max_batch_size,
                        inputs.extraction.max_padding)


@dataclass(frozen=True)
class Prepared:
    responses: list    # TokenizedInstruction per record
    prompts: list      # TokenizedInstruction per checked record


def prepared(inputs: PassInputs, tokenizer) -> Prepared:
    from sparcom.ablation.accuracy import tokenize_prompts
    from sparcom.intervention.response_nll import tokenize_responses

    return Prepared(tokenize_responses(inputs.records, tokenizer, inputs.max_response_tokens),
                    tokenize_prompts([inputs.records[i] for i in inputs.checked], tokenizer))


def measure_pass(loaded: LoadedModel, ablation_pass: AblationPass, ready: Prepared, inputs: PassInputs) -> np.ndarray:
    """Response NLLs (float64; NaN for the records the pass does not measure) or answers (object)
    per record, the set switched off during the pass."""
    from contextlib import nullcontext

    from sparcom.ablation.accuracy import greedy_generate
    from sparcom.intervention.hooks import Ablation
    from sparcom.intervention.response_nll import response_nll

    off = nullcontext() if ablation_pass.off is None else Ablation(loaded.model, {ablation_pass.family: ablation_pass.off})
    with off:
        if ablation_pass.measure == "nll":
            rows = list(range(len(inputs.records)) if ablation_pass.records is None else ablation_pass.records)
            nll = np.full(len(inputs.records), np.nan)
            nll[rows] = response_nll(loaded.model, [ready.responses[i] for i in rows], loaded.tokenizer,
                                     inputs.extraction, loaded.device)
            return nll
        texts = np.full(len(inputs.records), "", dtype=object)
        texts[inputs.checked] = greedy_generate(loaded.model, ready.prompts, loaded.tokenizer, inputs.extraction,
                                                loaded.device, inputs.max_new_tokens)
        return texts


class FinishedPasses:
    """`<key>.json` per finished pass: {"values": [...], "kind": "nll" | "answers"}."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def get(self, key: str) -> np.ndarray | None:
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        return np.array(stored["values"], dtype=np.float64 if stored["kind"] == "nll" else object)

    def put(self, key: str, values: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        kind = "answers" if values.dtype == object else "nll"
        # json writes floats by repr (NaN as NaN), which reads back to the same float64
        text = json.dumps({"kind": kind, "values": [float(v) if kind == "nll" else str(v) for v in values]})
        partial = self.folder / f".{key}.{os.getpid()}.partial"
        partial.write_text(text)
        os.replace(partial, self.folder / f"{key}.json")
