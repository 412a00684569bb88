"""How a difference becomes a verdict (docs/method.md section 6b, "Findings").

- `ALPHA`: the one level, 0.05, after Holm's adjustment across the groups of a rule.
- `can_reach(min_p, tests)`: whether a test whose smallest reachable p is `min_p` can come out
  below ALPHA after Holm over `tests` tests: only if tests x min_p < ALPHA (the adjusted p of
  the smallest of m p-values is m times it).
- `decide(difference, p_adjusted, min_p, tests)`: ("yes" | "no" | "undecided", the reason):
  yes when the adjusted p < ALPHA and the interval lies above 0; no only when the test could have
  said yes (`can_reach`) and the interval lies at or below 0; else undecided, saying why (too few
  records, the interval spans 0, or the adjusted p is not below ALPHA).
- `add_decisions(tests)`: Holm-adjusted p-values and decisions for one test over a rule's groups
  (each a dict with `difference`, `p_value`, `min_p`), in place.
"""

from __future__ import annotations

from sparcom.ablation.statistics import holm

ALPHA = 0.05


def can_reach(min_p: float | None, tests: int) -> bool:
    return min_p is not None and tests * min_p < ALPHA


def decide(difference: dict, p_adjusted: float | None, min_p: float | None, tests: int) -> tuple[str, str]:
    value, low, high = difference.get("value"), difference.get("low"), difference.get("high")
    if value is None or low is None or high is None or p_adjusted is None:
        return "undecided", "not measured"
    if not can_reach(min_p, tests):
        return "undecided", (f"too few records: the smallest p this test can reach is {min_p:.2g}, "
                             f"{tests} x {min_p:.2g} = {tests * min_p:.2g} after Holm over {tests} groups, "
                             f"not below {ALPHA}")
    if p_adjusted < ALPHA and low > 0:
        return "yes", f"adjusted p = {p_adjusted:.2g} < {ALPHA}, interval above 0"
    if high <= 0:
        return "no", "interval at or below 0"
    if low <= 0:
        return "undecided", "interval spans 0"
    return "undecided", f"adjusted p = {p_adjusted:.2g}, not below {ALPHA}"


def add_decisions(tests: list[dict]) -> None:
    """Each test dict gets `p_adjusted`, `tests` (how many were adjusted together), `decision`, `reason`."""
    adjusted = holm([t["p_value"] for t in tests])
    count = sum(p is not None for p in adjusted)
    for test, p in zip(tests, adjusted):
        test["p_adjusted"] = p
        test["tests"] = count
        test["decision"], test["reason"] = decide(test["difference"], p, test["min_p"], count)
