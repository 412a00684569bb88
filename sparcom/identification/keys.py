"""The identification and analysis stages' keys (docs/method.md section 8).

- `IDENTIFY`: the selection's code (`sparcom.identification.identify` and all it imports);
  `ANALYSE`: generality, uniqueness and the report (`sparcom.identification.report`).
- `identification_key(store, settings)`: the store's extraction key, the one-rule settings, the
  code: a rule's key is the same whether it runs alone or beside other rules (`rules`); for the
  attribution rules the attribution store's content key (`attribution_key`), not its path.
- `results_dir(work_dir, store, settings)`: the content-addressed folder of a run's findings:
  same counts and identification settings, same folder, so a cached rerun points at real files.
  One folder per rule: `results_dir(work_dir, store, settings.for_rule(rule))`.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.core.code_version import StageCode
from sparcom.core.hashing import content_hash
from sparcom.extraction.store import store_attrs
from sparcom.identification.schema import ATTRIBUTION_RULES
from sparcom.identification.settings import IdentificationSettings

IDENTIFY = StageCode(("sparcom.identification.identify",))
ANALYSE = StageCode(("sparcom.identification.report",))


def identification_key(store: Path, settings: IdentificationSettings) -> str:
    rules = settings.selected_rules()
    if len(rules) > 1:
        raise ValueError(f"a key per rule: settings.for_rule(rule) for each of {rules}")
    one = settings.for_rule(rules[0])
    estimates = _estimates_key(one.attribution) if one.rule in ATTRIBUTION_RULES and one.attribution else None
    return content_hash("identify", store_attrs(store)["extraction_key"], one.model_copy(update={"attribution": None}),
                        estimates, IDENTIFY.version())


def _estimates_key(attribution: Path) -> object:
    """The attribution store's content key; a store written otherwise (no key): all its attributes.
    Not the attributes of a keyed store: they also say which workers filled its shards."""
    attrs = store_attrs(attribution)
    return attrs.get("attribution_key") or attrs  # sparcom.attribution.keys.KEY, without its model imports


def results_dir(work_dir: Path, store: Path, settings: IdentificationSettings) -> Path:
    return Path(work_dir).resolve() / "runs" / f"{Path(store).stem}-{identification_key(store, settings)[:12]}"
