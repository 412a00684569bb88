"""Findings: what holds, per rule, in one table read first (docs/method.md section 6b, "Findings").

- `rows`: one row per (rule, family, group) from a rule's run folder: set size, reproducible
  (split-half gap against its label-permutation null), causal and specific (the ablation's
  decided differences); each rule's verdict in plain words counting its groups.
- `report`: the findings as markdown, put first into each rule's report.md and under `findings`
  into its summary.json.
- `keys`: the stage's code.
"""
