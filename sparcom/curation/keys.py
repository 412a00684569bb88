"""The curation stage's cache key (docs/method.md section 8).

- `CURATE`: the stage's code: `prepare_dataset` (`sparcom.curation.starter`) and what it imports.
- `curation_key(source)`: a user's file by its content; the starter set (`source` None) by the
  shipped records and the versions of the installed packaged sets it draws from.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.core.code_version import StageCode
from sparcom.core.hashing import content_hash, input_fingerprint
from sparcom.curation.hexainst import AUTHORED_DIR
from sparcom.curation.packaged_sources import installed_versions

CURATE = StageCode(("sparcom.curation.starter",))


def curation_key(source: Path | None) -> str:
    if source is None:
        return content_hash("curate", input_fingerprint(AUTHORED_DIR), installed_versions(), CURATE.version())
    return content_hash("curate", input_fingerprint(source), CURATE.version())
