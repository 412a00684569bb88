"""Stage 4, ablation: do a group's components matter? Switch them off on held-out records
(docs/method.md section 6).

- `controls`: random and frequency-matched control sets of the same size per layer.
- `statistics`: deltas, the differences that decide, bootstrap intervals, permutation tests,
  Holm; the ratios (specificity, control ratios) as description.
- `verdicts`: how a difference becomes yes, no or undecided (the level, reachable p).
- `answers`, `accuracy`: checkable answers, and greedy-decoded accuracy under each ablation.
- `fidelity`: do the attribution estimates predict the switch-offs? Sets and single components.
- `ablate`: the stage: plan, passes, `ablation.zarr`.
- `passes`: one pass (a set switched off, NLL or answers), its key, finished passes on disk.
- `distributed`: the passes as tasks on a Dask cluster, each worker's model loaded once.
- `report`: the ablation's markdown, JSON and plot.
- `schema`: control names, dimensions, output files.
- `settings`, `keys`: the stage's settings and code.
"""
