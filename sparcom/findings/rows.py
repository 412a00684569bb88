"""The findings of one rule's run folder as rows, and each rule's verdict in plain words.

- `rule_rows(run_dir)`: one row per (family, group) of the rule whose summary.json and (where the
  ablation ran) ablation.json are in `run_dir`:
  `{"rule", "family", "group", "set_size", "ablated", "reproducible", "causal", "specific"}`. Each of the
  last three is a test: its numbers, `decision` ("yes" | "no" | "undecided") and `reason`.
  reproducible: the split-half gap, the null's 95th percentile and p, as identification's report
  decided them (summary.json `families.<family>.split_half`): yes when gap > q95, no when gap <=
  q95, undecided with identification's reason (no null, too few permutations, not split). causal (against the frequency-matched
  control) and specific: the ablation's differences with their Holm-adjusted p and decisions
  (`sparcom.ablation.verdicts`); undecided where the family was not ablated.
- `apart(run_dir)`: evaluated categories without components, reported apart.
- `rule_verdict(rows)`: one sentence per rule counting its groups, on the ablated family (the
  first family where none was): "reproducible for 6 of 6; causal for 6 of 6; specific for 3 of 6
  (CLS, CODE, MATH)", then the groups that are "not" and the undecided ones with their reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparcom.ablation.schema import ABLATION_SUMMARY, CAUSAL_CONTROL
from sparcom.identification.schema import SUMMARY

TESTS = ("reproducible", "causal", "specific")
NOT = {"reproducible": "not above its null", "causal": "not causal", "specific": "not specific"}


def reproducibility(summary: dict, family: str, group: str) -> dict:
    """The split-half gap against its label-permutation null, as identification's report decided
    it (`sparcom.identification.report.reproducible`, docs/method.md 4b), from its summary.json."""
    row = summary["families"][family].get("split_half", {}).get(group)
    if row is None:
        return {"gap": None, "null_q95": None, "p_value": None, "decision": "undecided",
                "reason": f"split-half left out: {summary.get('split_half_left_out', 'no split-half gap')}"}
    decision = {True: "yes", False: "no"}.get(row.get("reproducible"), "undecided")
    reason = {"yes": "gap above the null's 95th percentile",
              "no": "gap at or below the null's 95th percentile"}.get(decision, row.get("undecided") or "no null")
    return {"gap": row["gap"], "null_q95": row.get("null_q95"), "p_value": row.get("p"), "decision": decision,
            "reason": reason}


def _not_ablated(reason: str) -> dict:
    return {"difference": None, "p_value": None, "p_adjusted": None, "min_p": None, "decision": "undecided",
            "reason": reason}


def _ablation_tests(ablation: dict | None, family: str, group: str) -> tuple[dict, dict]:
    """(causal, specific) of the ablation's summary for this family and group."""
    if ablation is None:
        return _not_ablated("not ablated"), _not_ablated("not ablated")
    if ablation.get("family") != family:
        reason = f"not ablated ({ablation.get('family')} were)"
        return _not_ablated(reason), _not_ablated(reason)
    entry = ablation["per_group"][group]
    if "specific" not in entry:  # written before the ablation decided on differences
        reason = "the ablation's summary is of an older version: rerun the ablation"
        return _not_ablated(reason), _not_ablated(reason)
    keys = ("difference", "p_value", "p_adjusted", "min_p", "tests", "decision", "reason")
    specific = {k: entry["specific"][k] for k in keys}
    control = entry["controls"].get(CAUSAL_CONTROL)
    causal = ({k: control[k] for k in keys} if control is not None
              else _not_ablated(f"no {CAUSAL_CONTROL} control run"))
    return causal, specific


def _read_ablation(run_dir: Path) -> dict | None:
    path = Path(run_dir) / ABLATION_SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def rule_rows(run_dir: Path) -> list[dict]:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / SUMMARY).read_text())
    ablation = _read_ablation(run_dir)
    rows = []
    for family, figures in summary["families"].items():
        for group in summary["groups"]:
            causal, specific = _ablation_tests(ablation, family, group)
            rows.append({"rule": summary["rule"], "family": family, "group": group,
                         "set_size": figures["set_size"][group],
                         "ablated": ablation is not None and ablation.get("family") == family,
                         "reproducible": reproducibility(summary, family, group),
                         "causal": causal, "specific": specific})
    return rows


def apart(run_dir: Path) -> list[str]:
    ablation = _read_ablation(run_dir)
    return [] if ablation is None else list(ablation.get("apart", []))


def verdict_family(rows: list[dict]) -> str:
    """The family a rule's verdict counts: the ablated one, else the first."""
    ablated = [r["family"] for r in rows if r["ablated"]]
    return ablated[0] if ablated else rows[0]["family"]


def _count(test: str, rows: list[dict]) -> str:
    yes = [r["group"] for r in rows if r[test]["decision"] == "yes"]
    named = f" ({', '.join(yes)})" if 0 < len(yes) < len(rows) else ""
    return f"{test} for {len(yes)} of {len(rows)}{named}"


def rule_verdict(rows: list[dict]) -> str:
    """`rows`: one rule's rows."""
    family = verdict_family(rows)
    counted = [r for r in rows if r["family"] == family]
    parts = [_count(test, counted) for test in TESTS]
    for test in TESTS:
        no = [r["group"] for r in counted if r[test]["decision"] == "no"]
        if no:
            parts.append(f"{NOT[test]}: {', '.join(no)}")
    undecided = {}
    for test in TESTS:
        for row in counted:
            if row[test]["decision"] == "undecided":
                undecided.setdefault(f"{test}: {row[test]['reason']}", []).append(row["group"])
    parts += [f"undecided, {why}: {', '.join(groups)}" for why, groups in undecided.items()]
    return f"`{rows[0]['rule']}` ({family.replace('_', ' ')}): " + "; ".join(parts) + "."
