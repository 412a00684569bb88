"""Stage 4, ablation: do a group's components matter? Switch them off on held-out records
(docs/method.md section 6).

- `controls`: random and frequency-matched control sets of the same size per layer.
- `statistics`: deltas, the differences that decide, bootstrap intervals, permutation tests,
  Holm; the ratios (specificity, control ratios) as description.
- `verdicts`: how a difference becomes yes, no or undecided (the level, reachable p).
- `answers`, `accuracy`: checkable answers, and greedy-decoded accuracy under each ablation.
- `ablate`: the stage: plan, passes, `ablation.zarr`.
- `report`: the ablation's markdown, JSON and plot.
- `schema`: control names, dimensions, output files.
- `settings`, `keys`: the stage's settings and code.
"""
