"""The ablation as a person reads it: per group, in plain words, whether switching its components
off hurts its own records more than other groups' records and more than each control.

- `summarize_ablation(ablation)`: the figures of `ablation.zarr` as plain data, per group, with
  a decision for each difference (own - others, own - each control; `sparcom.ablation.verdicts`),
  and each own record's NLL change by record hash.
- `decision_words(test, yes, no)`: a decision in words, "undecided (why)" where the data cannot decide.
- `ablation_markdown(summary)`: the section: one sentence per group and the table; where the
  accuracy ran, its tables too (`accuracy_markdown`).
- `fidelity_summary(ablation)`, `fidelity_markdown(fidelity)`: where the ablation measured it, how
  well the attribution estimates predicted the switch-offs (`sparcom.ablation.fidelity`): each set's
  summed estimate beside its measured delta, and within the single components switched off one at
  a time the rank correlation and sign agreement, with their intervals.
- `plot_ablation(ablation, path)`: heatmap of delta[ablated, evaluated] beside each group's own
  delta against its controls' (95% intervals).
- `report_ablation(ablation_path, out_dir)`: `ablation.md`, `ablation.json`, `ablation.png`.
- `criticality_tests(base, tuned)`, `criticality_change(base, tuned)`: did fine-tuning make each
  group's components more or less critical to their own category (the tuned model's components on
  the tuned model against the base model's on the base model): a paired bootstrap and sign-flip
  test over the shared records, "undecided" unless the adjusted p < ALPHA and the interval
  excludes 0.
- `link_into_report(report, summary, baseline)`: the ablation's section in a run's report.md
  (replaced on a rerun): with `baseline` (the ablation.json of the model before fine-tuning)
  whether fine-tuning made the components more or less critical, else the section and its plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from sparcom.ablation.schema import CAUSAL_CONTROL
from sparcom.ablation.statistics import holm, paired_difference
from sparcom.ablation.verdicts import ALPHA, add_decisions, can_reach
from sparcom.core.markdown import put_section, table
from sparcom.extraction.store import open_result

SECTION = "## Do the components matter? (ablation)"
CONTROL_WORDS = {"random": "random components", "frequency_matched": "components of matched frequency"}


def _value(values: xr.DataArray) -> float | None:
    value = float(values)
    return None if np.isnan(value) else round(value, 5)


def _with_interval(point: xr.DataArray, interval: xr.DataArray) -> dict:
    return {"value": _value(point), "low": _value(interval.sel(bound="low")),
            "high": _value(interval.sel(bound="high"))}


def _test(difference: dict, p_value: xr.DataArray, min_p: xr.DataArray) -> dict:
    """A difference that decides, its one-sided p and the smallest p its test can reach."""
    p, smallest = float(p_value), float(min_p)
    return {"difference": difference, "p_value": None if np.isnan(p) else p,
            "min_p": None if np.isnan(smallest) else smallest}


def _labels(ablation: xr.Dataset) -> xr.DataArray:
    return ablation.category if ablation.attrs.get("group_by") == "category" else ablation.origin


def summarize_ablation(ablation: xr.Dataset) -> dict:
    """Per group: the deltas, the two differences that decide (against each control, against
    the other groups) with Holm-adjusted p-values and decisions (`sparcom.ablation.verdicts`), the
    ratios as description, and each own record's NLL change by record hash (for a paired
    comparison of two models on the same records)."""
    groups = [str(g) for g in ablation.ablated.values]
    controls = [str(c) for c in ablation.control.values]
    labels = np.array([str(label) for label in _labels(ablation).values])
    change = ablation.nll - ablation.nll_base
    per_group = {}
    for group in groups:
        at = {"ablated": group}
        own = {"ablated": group, "evaluated": group}
        entry = {
            "size": int(ablation.ablated_size.sel(at)),
            "records": int((labels == group).sum()),
            "own_delta": _with_interval(ablation.delta.sel(own), ablation.delta_ci.sel(own)),
            "other_delta": _with_interval(ablation.delta_other.sel(at), ablation.delta_other_ci.sel(at)),
            "specificity": _with_interval(ablation.specificity.sel(at), ablation.specificity_ci.sel(at)),
            "specific": {**_test(_with_interval(ablation.specific_difference.sel(at),
                                                ablation.specific_difference_ci.sel(at)),
                                 ablation.specific_p_value.sel(at), ablation.specific_min_p.sel(at)),
                         "others": [h for h in groups if h != group],
                         "other_records": int(np.isin(labels, [h for h in groups if h != group]).sum())},
            "own_changes": {str(h): round(float(v), 6) for h, v in zip(
                ablation.record_hash.values[labels == group], change.sel(at).values[labels == group])},
            "controls": {},
        }
        for control in controls:
            c_own = {"control": control, **own}
            c_at = {"control": control, **at}
            entry["controls"][control] = {
                "delta": _with_interval(ablation.delta_control.sel(c_own), ablation.delta_control_ci.sel(c_own)),
                "ratio": _with_interval(ablation.control_ratio.sel(c_at), ablation.control_ratio_ci.sel(c_at)),
                **_test(_with_interval(ablation.control_difference.sel(c_at), ablation.control_difference_ci.sel(c_at)),
                        ablation.control_p_value.sel(c_at), ablation.control_min_p.sel(c_at)),
                "mean_frequency": _value(ablation.control_mean_frequency.sel(c_at).mean("seed")),
            }
        entry["mean_frequency"] = _value(ablation.mean_frequency.sel(at))
        if entry["size"] == 0:  # nothing switched off: no test
            for test in [entry["specific"], *entry["controls"].values()]:
                test["p_value"] = None
        per_group[group] = entry
    for tests in [[per_group[g]["specific"] for g in groups]] + [[per_group[g]["controls"][c] for g in groups]
                                                                 for c in controls]:
        add_decisions(tests)
    for group in groups:
        if per_group[group]["size"] == 0:
            for test in [per_group[group]["specific"], *per_group[group]["controls"].values()]:
                test["reason"] = "its set is empty: nothing to switch off"
    delta = {str(a): {str(e): _value(ablation.delta.sel(ablated=a, evaluated=e)) for e in ablation.evaluated.values}
             for a in ablation.ablated.values}
    summary = {**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ablation.attrs.items()},
               "groups": groups, "controls_run": controls, "causal_control": CAUSAL_CONTROL,
               "apart": [str(e) for e in ablation.evaluated.values if str(e) not in groups],
               "per_group": per_group, "delta": delta}
    if "accuracy" in ablation:
        summary["accuracy"] = _accuracy_summary(ablation)
    if "fidelity_rank_correlation" in ablation:
        summary["fidelity"] = fidelity_summary(ablation)
    return summary


def _accuracy_summary(ablation: xr.Dataset) -> dict:
    """Accuracies over the records with a checkable answer, for the evaluated groups that have some."""
    labels = _labels(ablation)
    evaluated = [str(e) for e in ablation.evaluated.values if int(ablation.accuracy_records.sel(evaluated=e))]
    return {
        "max_new_tokens": ablation.attrs.get("max_new_tokens"),
        "checked": {e: int(ablation.accuracy_records.sel(evaluated=e)) for e in evaluated},
        "records": {e: int((labels == e).sum()) for e in evaluated},
        "skipped": list(ablation.attrs.get("accuracy_skipped", [])),
        "intact": {e: _value(ablation.accuracy_base.sel(evaluated=e)) for e in evaluated},
        "ablated": {str(a): {e: _value(ablation.accuracy.sel(ablated=a, evaluated=e)) for e in evaluated}
                    for a in ablation.ablated.values},
        "controls": {str(c): {str(a): {e: _value(ablation.accuracy_control.sel(control=c, ablated=a, evaluated=e))
                                       for e in evaluated} for a in ablation.ablated.values}
                     for c in ablation.control.values},
    }


def _fmt(figure: dict, digits: int = 3) -> str:
    if figure["value"] is None:
        return "n/a"
    bounds = "" if figure["low"] is None else f" [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]"
    return f"{figure['value']:.{digits}f}{bounds}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def decision_words(test: dict, yes: str, no: str) -> str:
    """The decision of a test in words: `yes`, `no`, or "undecided (the reason)"."""
    return {"yes": yes, "no": no}.get(test["decision"], f"undecided ({test['reason']})")


def _sentence(group: str, entry: dict, family: str) -> str:
    if entry["size"] == 0:
        return f"- **{group}**: its set is empty, nothing to switch off."
    specific = entry["specific"]
    parts = [f"- **{group}**: switching off its {entry['size']} {family.replace('_', ' ')} changes its own "
             f"{entry['records']} records' response NLL by {_fmt(entry['own_delta'])} nats per token, the other "
             f"groups' {specific['other_records']} records' by {_fmt(entry['other_delta'])}: own - others = "
             f"{_fmt(specific['difference'])}, p = {_p(specific['p_value'])} (adjusted "
             f"{_p(specific['p_adjusted'])}): "
             f"{decision_words(specific, 'specific to its own category', 'not specific to its own category')}."]
    for control, test in entry["controls"].items():
        words = CONTROL_WORDS.get(control, control)
        parts.append(f"Against {words} of the same size per layer ({_fmt(test['delta'])}): own - control = "
                     f"{_fmt(test['difference'])}, p = {_p(test['p_value'])} (adjusted {_p(test['p_adjusted'])}): "
                     f"{decision_words(test, f'hurts more than {words}', f'hurts no more than {words}')}.")
    return " ".join(parts)


def held_out_sentence(summary: dict) -> str:
    """Both counts of the held-out check: records identification read, and near duplicates."""
    read = "same record or same instruction and input"
    if summary.get("overlap"):
        text = f"**{summary['overlap']} evaluation records were also read by identification ({read})** (asked for)"
    else:
        text = f"No evaluation record was read by identification ({read})"
    if summary.get("identification_texts"):
        near = summary.get("near_duplicates", 0)
        text += (f"; {near or 'none'} {'is a near duplicate' if near == 1 else 'are near duplicates'} of an "
                 f"identification record (curation's rule; texts from {summary['identification_texts']}).")
    else:
        text += ("; the identification records' texts were not found, so records were compared by record "
                 "hash alone and near duplicates not counted.")
    return text


def ablation_markdown(summary: dict, heading: str = SECTION, plot: str | None = "ablation.png") -> str:
    family = summary.get("family", "components")
    overlap = " " + held_out_sentence(summary)
    apart = (f" Evaluated categories without components, reported apart and never among the others: "
             f"{', '.join(summary['apart'])}." if summary.get("apart") else "")
    cap = summary.get("max_response_tokens") or 0
    seeds = summary.get("seeds")
    measured_on = (", each measured on its own group's records (all the causal test compares)"
                   if summary.get("control_records") == "own" else "")
    lines = [
        heading, "",
        f"Each group's {family.replace('_', ' ')} (rule `{summary.get('rule')}`) switched off in turn; "
        f"measured: the mean response NLL of held-out records ({summary.get('eval_source')}"
        f"{f', first {cap} response tokens' if cap else ''}), teacher-forced after the prompt. "
        f"Delta = ablated - intact, in nats per token, with 95% bootstrap intervals over records; "
        f"controls of the same size per layer, {seeds} {'seed' if seeds == 1 else 'seeds'}{measured_on}. "
        f"Decided on differences: "
        f"own - control (one-sided sign-flip test of the per-record differences) and own - others "
        f"(one-sided two-sample permutation test, the group's records against the other groups'), "
        f"p Holm-adjusted across the groups, level {ALPHA}; a yes needs the adjusted p below it and the "
        f"interval above 0, a no the interval at or below 0 and a test that could have said yes. The "
        f"ratios (specificity, control ratio) are description only.{overlap}{apart}", "",
        *[_sentence(g, summary["per_group"][g], family) for g in summary["groups"]], "",
    ]
    header = ["group", "size", "records", "own delta", "others' delta", "own - others", "p adj.", "specific",
              "specificity"]
    for control in summary["controls_run"]:
        header += [f"{control} delta", f"own - {control}", "p adj.", "verdict", "ratio"]
    rows = []
    for group in summary["groups"]:
        entry = summary["per_group"][group]
        specific = entry["specific"]
        row = [group, entry["size"], entry["records"], _fmt(entry["own_delta"]), _fmt(entry["other_delta"]),
               _fmt(specific["difference"]), _p(specific["p_adjusted"]), specific["decision"],
               _fmt(entry["specificity"], 2)]
        for control in summary["controls_run"]:
            test = entry["controls"][control]
            row += [_fmt(test["delta"]), _fmt(test["difference"]), _p(test["p_adjusted"]), test["decision"],
                    _fmt(test["ratio"], 2)]
        rows.append(row)
    lines.append(table(header, rows))
    evaluated = list(next(iter(summary["delta"].values())))
    lines += ["", "Delta matrix (rows: components switched off; columns: records evaluated):", "",
              table(["switched off"] + evaluated, [[a] + ["n/a" if v is None else f"{v:.3f}" for v in row.values()]
                                                     for a, row in summary["delta"].items()])]
    if plot:
        lines += ["", f"![ablation]({plot})"]
    if "accuracy" in summary:
        lines += ["", accuracy_markdown(summary["accuracy"])]
    if "fidelity" in summary:
        lines += ["", fidelity_markdown(summary["fidelity"])]
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def accuracy_markdown(accuracy: dict) -> str:
    """The accuracy matrix (intact, then each group's set off) and each group's own records against its controls."""
    evaluated = list(accuracy["checked"])
    checked = ", ".join(f"{e} {accuracy['checked'][e]} of {accuracy['records'][e]}" for e in evaluated)
    skipped = (f" Skipped, no checkable answer: {', '.join(accuracy['skipped'])}." if accuracy["skipped"] else "")
    lines = [
        "### Accuracy (greedy decoding)", "",
        f"Greedy decoding of at most {accuracy['max_new_tokens']} new tokens after the prompt, intact and with "
        f"each set (and each control, mean over seeds) switched off, scored on the evaluation records with a "
        f"checkable answer (CLS: the label; MATH: the final number): {checked} records.{skipped}", "",
        table(["switched off"] + evaluated,
              [["nothing (intact)"] + [_share(accuracy["intact"][e]) for e in evaluated]]
              + [[a] + [_share(row[e]) for e in evaluated] for a, row in accuracy["ablated"].items()]),
    ]
    own = [a for a in accuracy["ablated"] if a in evaluated]
    if own:
        controls = list(accuracy["controls"])
        lines += ["", "Each group's own records:", "",
                  table(["group", "records", "intact", "own set off"] + [f"{c} off" for c in controls],
                        [[a, accuracy["checked"][a], _share(accuracy["intact"][a]), _share(accuracy["ablated"][a][a])]
                         + [_share(accuracy["controls"][c][a][a]) for c in controls] for a in own])]
    return "\n".join(lines)


def fidelity_summary(ablation: xr.Dataset) -> dict:
    """The fidelity figures as plain data: per group own and others' estimate and delta, the probes."""
    groups = [str(g) for g in ablation.ablated.values]

    def own_and_others(values: xr.DataArray, group: str) -> tuple[float | None, float | None]:
        # the other groups that have components: evaluated categories without any stay apart
        others = [e for e in values.evaluated.values if e != group and e in groups]
        return (_value(values.sel(ablated=group, evaluated=group)) if group in values.evaluated else None,
                _value(values.sel(ablated=group, evaluated=others).mean()) if others else None)

    per_group = {}
    for group in groups:
        own_estimate, other_estimate = own_and_others(ablation.set_estimate, group)
        own_delta, other_delta = own_and_others(ablation.delta, group)
        per_group[group] = {"size": int(ablation.ablated_size.sel(ablated=group)), "own_estimate": own_estimate,
                            "own_delta": own_delta, "other_estimate": other_estimate, "other_delta": other_delta}
    places = [name for name in ablation.coords if name.startswith("probe_")]
    return {
        "family": ablation.probe_estimate.attrs.get("family", ablation.attrs.get("family")),
        "per_group": per_group,
        "probe_records": int(np.isfinite(ablation.probe_nll_base.values).sum()) if "probe_nll_base" in ablation
        else ablation.sizes["instruction"],
        "rank_correlation": _with_interval(ablation.fidelity_rank_correlation, ablation.fidelity_rank_correlation_ci),
        "sign_agreement": _with_interval(ablation.fidelity_sign_agreement, ablation.fidelity_sign_agreement_ci),
        "probes": [{"place": {name.removeprefix("probe_"): int(ablation[name][k]) for name in places},
                    "estimate": _value(ablation.probe_estimate[k]), "delta": _value(ablation.probe_delta[k])}
                   for k in range(ablation.sizes["probe"])],
    }


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _side_of_zero(figure: dict) -> str:
    """'yes' when the whole interval is above 0, 'no' when below, else 'unclear'."""
    low, high = figure["low"], figure["high"]
    if low is None or high is None:
        return "unclear"
    return "yes" if low > 0 else "no" if high < 0 else "unclear"


def fidelity_markdown(fidelity: dict) -> str:
    """Sets' summed estimates beside their deltas; the probes' agreement with a verdict on its interval."""
    family = (fidelity["family"] or "components").replace("_", " ")
    rho = fidelity["rank_correlation"]
    verdict = {"yes": "the estimates rank these components' effects (the interval lies above 0)",
               "no": "the estimates rank these components' effects the wrong way round (the interval lies below 0)",
               "unclear": "undecided whether the estimates rank these components' effects (the interval spans 0 "
                          "or is missing)"}[_side_of_zero(rho)]
    rerouting = (" An expert's estimate does not see the re-routing its removal causes (first order only)."
                 if fidelity["family"] == "experts" else "")
    lines = [
        "### Fidelity of the attribution estimates", "",
        "The first-order estimates of switching components off (docs/method.md section 6a), computed on these "
        "evaluation records with the same scored tokens, against what switching them off measured (nats per "
        f"token); others: the mean over the other groups that have components.{rerouting}", "",
        table(["group", "size", "own estimate", "own delta", "others' estimate", "others' delta"],
              [[g, e["size"], _nats(e["own_estimate"]), _nats(e["own_delta"]), _nats(e["other_estimate"]),
                _nats(e["other_delta"])] for g, e in fidelity["per_group"].items()]), "",
        f"{len(fidelity['probes'])} single {family} switched off one at a time (drawn with the seed from the "
        f"strongest mean estimates, both signs), each estimated and measured on the same "
        f"{fidelity.get('probe_records', 'evaluation')} records: Spearman's rho = {_fmt(rho, 2)}, sign agreement = "
        f"{_fmt(fidelity['sign_agreement'], 2)} (95% bootstrap intervals over the probes): {verdict}.", "",
        table(["component", "estimate", "measured delta"],
              [[", ".join(f"{k} {v}" for k, v in p["place"].items()), _nats(p["estimate"]), _nats(p["delta"])]
               for p in fidelity["probes"]]),
    ]
    return "\n".join(lines)


def plot_ablation(ablation: xr.Dataset, path: Path) -> None:
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    heat, bars = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    delta = ablation.delta.transpose("ablated", "evaluated")
    image = heat.imshow(delta.values, cmap="magma", aspect="auto")
    heat.set_xticks(range(delta.sizes["evaluated"]), [str(g) for g in delta.evaluated.values], rotation=45)
    heat.set_yticks(range(delta.sizes["ablated"]), [str(g) for g in delta.ablated.values])
    for (i, j), value in np.ndenumerate(delta.values):
        heat.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color="cyan")
    heat.set_xlabel("evaluated records")
    heat.set_ylabel("components switched off")
    heat.set_title("Response NLL change (nats per token)")
    figure.colorbar(image, ax=heat)
    groups = [str(g) for g in ablation.ablated.values]
    own = ablation.delta.sel(evaluated=ablation.ablated).drop_vars("evaluated")
    own_ci = ablation.delta_ci.sel(evaluated=ablation.ablated).drop_vars("evaluated")
    series = [("own set", own, own_ci)] + [
        (str(c), ablation.delta_control.sel(control=c, evaluated=ablation.ablated).drop_vars("evaluated"),
         ablation.delta_control_ci.sel(control=c, evaluated=ablation.ablated).drop_vars("evaluated"))
        for c in ablation.control.values]
    width = 0.8 / len(series)
    for k, (name, values, interval) in enumerate(series):
        x = np.arange(len(groups)) + k * width
        errors = np.abs(np.stack([values - interval.sel(bound="low"), interval.sel(bound="high") - values]))
        bars.bar(x, values.values, width, yerr=errors, label=name, capsize=2)
    bars.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2, groups)
    bars.set_ylabel("own category's NLL change")
    bars.set_title("Own set against controls (95% intervals)")
    bars.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def report_ablation(ablation_path: Path, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    ablation = open_result(ablation_path).load()
    summary = summarize_ablation(ablation)
    files = {name: str(out_dir / name) for name in ("ablation.md", "ablation.json", "ablation.png")}
    files["ablation.zarr"] = str(ablation_path)
    summary["files"] = files
    plot_ablation(ablation, out_dir / "ablation.png")
    (out_dir / "ablation.md").write_text(ablation_markdown(summary, "# Ablation"))
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=2))
    return summary


def criticality_tests(base: dict, tuned: dict) -> dict[str, dict]:
    """Per group both ablations have: the paired difference tuned - base of the own records' NLL
    change over the records both measured (`sparcom.ablation.statistics.paired_difference`),
    Holm-adjusted across the groups, and the verdict: "more critical" or "less critical" only
    when the adjusted p < ALPHA and the interval excludes 0 on that side, else "undecided" with the
    reason (too few shared records, the interval spans 0, or the adjusted p is not below ALPHA)."""
    groups = [g for g in base["groups"] if g in tuned["per_group"]]
    tests = {}
    for index, group in enumerate(groups):
        tests[group] = paired_difference(base["per_group"][group].get("own_changes", {}),
                                         tuned["per_group"][group].get("own_changes", {}),
                                         base.get("resamples", 1000), base.get("permutations", 10000),
                                         [base.get("seed", 0), index])
    adjusted = holm([t["p_value"] for t in tests.values()])
    count = sum(p is not None for p in adjusted)
    for test, p in zip(tests.values(), adjusted):
        test["p_adjusted"] = p
        test["verdict"] = _criticality_verdict(test, p, count)
    return tests


def _criticality_verdict(test: dict, p_adjusted: float | None, tests: int) -> str:
    if p_adjusted is None:
        return "n/a (no shared records)"
    if not can_reach(test["min_p"], tests):
        return (f"undecided ({test['records']} shared records: p cannot go below {test['min_p']:.2g}, "
                f"{tests} x that is not below {ALPHA})")
    if p_adjusted < ALPHA and test["low"] > 0:
        return "more critical"
    if p_adjusted < ALPHA and test["high"] < 0:
        return "less critical"
    if test["low"] <= 0 <= test["high"]:
        return "undecided (interval spans 0)"
    return f"undecided (adjusted p = {p_adjusted:.2g}, not below {ALPHA})"


def criticality_change(base: dict, tuned: dict) -> str:
    """The section saying, per group, whether the tuned model's components matter more or less to
    their own category than the base model's did, decided on the paired difference."""
    lines = ["## Before and after fine-tuning: are the components more critical?", "",
             "Own-category NLL change when each group's components are switched off, base model "
             "(its components) against tuned model (its own components), same held-out records. "
             "Tuned - base: the mean over the records both measured of the difference of their NLL "
             "changes, a 95% paired bootstrap interval over those records and a two-sided sign-flip p, "
             f"Holm-adjusted across the groups; more or less critical only where the adjusted p is "
             f"below {ALPHA} and the interval excludes 0. Held out from identification, these records may "
             "still be among the fine-tune's training data (the default fine-tune trains on shipped "
             "HexaInst records): read the tuned categories' rows with that in mind.", ""]
    tests = criticality_tests(base, tuned)
    rows = [[group, _fmt(base["per_group"][group]["own_delta"]), _fmt(tuned["per_group"][group]["own_delta"]),
             _fmt({k: None if test[k] is None else round(test[k], 5) for k in ("value", "low", "high")}),
             _p(test["p_adjusted"]), test["verdict"]] for group, test in tests.items()]
    header = ["group", "base own delta", "tuned own delta", "tuned - base (paired)", "p adj.", "fine-tuning made them"]
    return "\n".join(lines) + "\n" + table(header, rows) + "\n"


def link_into_report(report: Path, summary: dict, baseline: Path | None = None) -> None:
    """Put the ablation's section into a run's report.md: the criticality change against
    `baseline` where one is given, else the ablation's own section with its plot."""
    if baseline is not None:
        section = criticality_change(json.loads(Path(baseline).read_text()), summary)
    else:
        plot = Path(summary["files"]["ablation.png"]).resolve().relative_to(Path(report).resolve().parent)
        section = ablation_markdown(summary, plot=str(plot))
    put_section(report, section)
