"""The identification and analysis stages' keys (docs/method.md section 8).

- `IDENTIFY`: the selection's code (`sparcom.identification.identify` and all it imports);
  `ANALYSE`: generality, uniqueness and the report (`sparcom.identification.report`).
- `identification_key(store, settings)`: the store's extraction key, the one-rule settings, the
  code: a rule's key is the same whether it runs alone or beside other rules (`rules`).
- `results_dir(work_dir, store, settings)`: the content-addressed folder of a run's findings:
  same counts and identification settings, same folder, so a cached rerun points at real files.
  One folder per rule: `results_dir(work_dir, store, settings.for_rule(rule))`.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.core.code_version import StageCode
from sparcom.core.hashing import content_hash
from sparcom.extraction.store import store_attrs
from sparcom.identification.settings import IdentificationSettings

IDENTIFY = StageCode(("sparcom.identification.identify",))
ANALYSE = StageCode(("sparcom.identification.report",))


def identification_key(store: Path, settings: IdentificationSettings) -> str:
    rules = settings.selected_rules()
    if len(rules) > 1:
        raise ValueError(f"a key per rule: settings.for_rule(rule) for each of {rules}")
    return content_hash("identify", store_attrs(store)["extraction_key"], settings.for_rule(rules[0]),
                        IDENTIFY.version())


def results_dir(work_dir: Path, store: Path, settings: IdentificationSettings) -> Path:
    return Path(work_dir).resolve() / "runs" / f"{Path(store).stem}-{identification_key(store, settings)[:12]}"
