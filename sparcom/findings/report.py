"""The findings as a person reads them first: a table per run, one verdict per rule.

- `SECTION`: the heading of the findings in report.md (the first section there).
- `findings(run_dirs)`: the rows of every rule of a run (`sparcom.findings.rows.rule_rows` of
  each rule's run folder), each rule's verdict and the evaluated categories reported apart:
  `{"verdicts": {rule: sentence}, "rows": [...], "apart": {rule: [...]}, "level": ALPHA}`.
- `reachable(rows)`: the smallest p each ablation test of a rule could reach, alone and after Holm.
- `findings_markdown(findings)`: the section: the rules' verdicts and reachable p, then the table (set size;
  reproducible: gap, null q95, p; causal and specific: difference [interval], adjusted p,
  decision) and how to read it.
- `write_findings(run_dirs)`: the findings put first into each rule's report.md (an earlier copy
  replaced) and under `findings` into its summary.json; returns them.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparcom.ablation.verdicts import ALPHA
from sparcom.core.markdown import put_section, table
from sparcom.findings.rows import NOT, apart, rule_rows, rule_verdict
from sparcom.identification.schema import REPORT, SUMMARY

SECTION = "## Findings: what holds"


def findings(run_dirs: list[Path]) -> dict:
    rows_of = {Path(d): rule_rows(d) for d in run_dirs}
    return {"level": ALPHA,
            "verdicts": {rows[0]["rule"]: rule_verdict(rows) for rows in rows_of.values() if rows},
            "apart": {rows[0]["rule"]: apart(d) for d, rows in rows_of.items() if rows},
            "rows": [row for rows in rows_of.values() for row in rows]}


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _difference(test: dict) -> str:
    figure = test["difference"]
    if figure is None or figure["value"] is None:
        return "n/a"
    bounds = "" if figure["low"] is None else f" [{figure['low']:.3f}, {figure['high']:.3f}]"
    return f"{figure['value']:.3f}{bounds}"


def _reproducible(test: dict) -> str:
    if test["gap"] is None:
        return "n/a"
    null = "no null" if test["null_q95"] is None else f"null q95 {test['null_q95']:.3f}, p {_p(test['p_value'])}"
    return f"{test['gap']:.3f} ({null})"


def _decided(test: str, row: dict) -> str:
    """The decision in a cell; the undecided ones' reasons are in the rule's verdict."""
    if test != "reproducible" and not row["ablated"]:
        return "not ablated"
    return {"yes": test, "no": NOT[test]}.get(row[test]["decision"], "undecided")


def reachable(rows: list[dict]) -> str:
    """The smallest p each ablation test of one rule could reach, alone and after Holm."""
    parts = []
    for test in ("causal", "specific"):
        tested = [r[test] for r in rows if r["ablated"] and r[test]["min_p"] is not None]
        if tested:
            worst = max(t["min_p"] for t in tested)
            parts.append(f"{test} {worst:.2g} ({len(tested)} x {worst:.2g} = {len(tested) * worst:.2g} after Holm)")
    return f"smallest p the tests could reach: {', '.join(parts)}" if parts else "not ablated"


def findings_markdown(result: dict) -> str:
    rules = {}
    for row in result["rows"]:
        rules.setdefault(row["rule"], []).append(row)
    lines = [SECTION, "",
             *[f"- {sentence}" for sentence in result["verdicts"].values()], "",
             *[f"- `{rule}`: {reachable(rows)}." for rule, rows in rules.items()], "",
             f"Reproducible: the split-half gap (within- minus cross-group Jaccard) above the 95th "
             f"percentile of its null, the same gap with the group labels shuffled across instructions. "
             f"Causal: own delta minus the frequency-matched control's (NLL change of the group's own "
             f"held-out records, nats per token), sign-flip test over the records. Specific: own delta "
             f"minus the other groups' records', two-sample permutation test over records. Differences "
             f"with 95% bootstrap intervals; p Holm-adjusted across the groups of a rule, level "
             f"{result['level']}: yes when the adjusted p is below it and the interval above 0; no only "
             f"when the interval is at or below 0 and the records could have given a yes; else undecided, "
             f"with the reason (a sign-flip test over n records cannot go below p = 2^-n).", ""]
    rows = [[f"`{r['rule']}`", r["family"].replace("_", " "), r["group"], r["set_size"],
             _reproducible(r["reproducible"]), _decided("reproducible", r),
             _difference(r["causal"]), _p(r["causal"]["p_adjusted"]), _decided("causal", r),
             _difference(r["specific"]), _p(r["specific"]["p_adjusted"]), _decided("specific", r)]
            for r in result["rows"]]
    lines.append(table(["rule", "family", "group", "set size", "split-half gap", "reproducible",
                        "own - control", "p adj.", "causal", "own - others", "p adj.", "specific"], rows))
    apart_lines = [f"- `{rule}`: {', '.join(groups)}" for rule, groups in result["apart"].items() if groups]
    if apart_lines:
        lines += ["", "Evaluated categories without components of their own, reported apart (never among "
                      "the others):", "", *apart_lines]
    return "\n".join(lines) + "\n"


def write_findings(run_dirs: list[Path]) -> dict:
    result = findings(run_dirs)
    section = findings_markdown(result)
    for run_dir in run_dirs:
        put_section(Path(run_dir) / REPORT, section, first=True)
        path = Path(run_dir) / SUMMARY
        path.write_text(json.dumps({**json.loads(path.read_text()), "findings": result}, indent=2))
    return result
