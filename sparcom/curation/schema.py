"""Curation's names that configuration checks before any set is read.

- `PACKAGED_SET_NAMES`: the human-written sets read from installed wheels offline
  (`sparcom.curation.packaged_sources.PACKAGED_SETS` holds one for each name).
"""

PACKAGED_SET_NAMES = ("humaneval", "champ", "fanoutqa")
