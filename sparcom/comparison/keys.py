"""The fine-tune's key, and the comparison's code (docs/method.md section 8).

- `FINETUNE`: the training code (`sparcom.comparison.finetune`), with torch and transformers;
  `COMPARE`: the comparison and its report.
- `finetune_key(base_fingerprint, data_hash, settings)`: what a checkpoint depends on: the base
  weights, the records trained on, the training settings (not where it trains), the code.
- `planned_finetune_key(model, settings, held_out_dataset, cache_dir)`: the same before training,
  from the base weights' fingerprint and the records the settings choose, for the caching.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.comparison.settings import FinetuneSettings
from sparcom.comparison.training_data import training_records
from sparcom.core.code_version import MODEL_LIBRARIES, StageCode
from sparcom.core.hashing import content_hash
from sparcom.core.models import model_fingerprint, resolve_model
from sparcom.curation.dataset import load_records
from sparcom.curation.records import dataset_hash
from sparcom.extraction.settings import ModelSettings

FINETUNE = StageCode(("sparcom.comparison.finetune",), MODEL_LIBRARIES)
COMPARE = StageCode(("sparcom.comparison.compare", "sparcom.comparison.report"))
# Settings that change where training runs but not what it computes.
PLACEMENT_FIELDS = {"device"}


def finetune_key(base_fingerprint: str, data_hash: str, settings: FinetuneSettings) -> str:
    training = settings.model_dump(mode="json", exclude=PLACEMENT_FIELDS | {"dataset", "categories"})
    return content_hash({"base_fingerprint": base_fingerprint, "dataset_hash": data_hash, "settings": training,
                         "code": FINETUNE.version()})


def planned_finetune_key(model: ModelSettings, settings: FinetuneSettings, held_out_dataset: Path | None,
                         cache_dir: Path) -> str:
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    held_out = {r.id for r in load_records(held_out_dataset)} if held_out_dataset else frozenset()
    data_hash = dataset_hash(training_records(settings, held_out))
    return finetune_key(model_fingerprint(source, cache_dir), data_hash, settings)
