"""Stage 3, identification and analysis: each group's components, how stable they are, which
are general and which unique (docs/method.md sections 2-4 and 8).

- `rules`: the selection rules (the paper's percentile, per layer, threshold, lape, contrastive).
- `identify`: the one pass over the store on Dask, frequencies, sets, `components.zarr`.
- `split_half`: split-half reliability of the sets.
- `template`: the chat template's share of the counted tokens.
- `generality`: general and unique sets, Jaccard overlaps, distributions over layers and experts.
- `report`: `generality.zarr`, tables, `summary.json`, `report.md` and plots.
- `schema`: rule names, groupings, families' output names, output files.
- `settings`, `keys`: the stage's settings and cache keys.
"""
