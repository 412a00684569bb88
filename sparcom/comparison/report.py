"""The before/after comparison as a person reads it: summary JSON, markdown, plots, data.

- `movement(comparison, family)`: per group, how much its set moved: turnover (1 - Jaccard),
  shift of the layer distribution (JS), mean |frequency change|.
- `labeling_test(values, focus)`: the fine-tuned groups' mean minus the others', against every
  labeling of as many groups as fine-tuned (p >= 1 / C(groups, fine-tuned)).
- `focus_verdict(moves, focus_groups)`: did the fine-tuned groups move more than the others?
  "yes" only where every measure's labeling p < ALPHA, else "undecided" with the reason.
- `summarize_comparison(comparison, base, tuned, focus_groups, top)`: the headline figures.
- `markdown_comparison(summary)`: the tables and the note on what changed most.
- `write_comparison_report(base, tuned, out_dir, focus_groups, top)`: compare, then write
  `comparison.zarr`, `comparison.json`, `comparison.md` and the plots.
- `report_comparison(base_path, tuned_path, out_dir, ...)`: the stage, on saved components.
- `link_into_report(report, summary)`: the headline and a link in a run's report.md (replaced on a rerun).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sparcom.comparison.compare import compare_components, families_in, top_movers
from sparcom.comparison.schema import COMPARISON, COMPARISON_REPORT, COMPARISON_SUMMARY
from sparcom.core.markdown import put_section, table
from sparcom.extraction.schema import MOE_LAYER
from sparcom.extraction.store import save_zarr
from sparcom.identification.rules import rule_parameters
from sparcom.identification.schema import GROUP, Family

# The one level of the reports' decisions (docs/method.md section 6b).
ALPHA = 0.05
MEASURES = {
    "turnover": "1 - Jaccard of the base and tuned sets",
    "layer_js": "JS divergence (bits) of the sets' layer distributions",
    "mean_abs_delta": "mean |frequency change| over all components",
}


def _number(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _by_group(values: xr.DataArray) -> dict[str, int | float | None]:
    convert = int if np.issubdtype(values.dtype, np.integer) else _number
    return {str(g): convert(v) for g, v in zip(values[GROUP].values, values.values)}


def label(family: Family) -> str:
    return family.name.replace("_", " ")


def movement(comparison: xr.Dataset, family: Family) -> dict[str, dict[str, float | None]]:
    name = family.selected
    return {
        "turnover": _by_group(1 - comparison[f"{name}_jaccard_total"]),
        "layer_js": _by_group(comparison[f"{name}_layer_js"]),
        "mean_abs_delta": _by_group(comparison[f"{family.frequency}_mean_abs_delta_total"]),
    }


def labeling_test(values: dict[str, float | None], focus: Sequence[str]) -> dict:
    """Did the `focus` groups move more? observed = mean over them - mean over the rest, against
    the same statistic for every labeling of as many groups as fine-tuned (all C(G, k)): p = the
    share of labelings at or above the observed one (itself included), so p >= 1 / C(G, k)."""
    groups = [g for g in values if values[g] is not None]
    chosen = [g for g in groups if g in set(focus)]

    def statistic(labelled: Sequence[str]) -> float:
        inside = [values[g] for g in groups if g in labelled]
        outside = [values[g] for g in groups if g not in labelled]
        return float(np.mean(inside) - np.mean(outside))

    labelings = [statistic(c) for c in combinations(groups, len(chosen))]
    observed = statistic(chosen)
    return {"difference": _number(observed),
            "p_value": float(np.mean(np.array(labelings) >= observed - 1e-12)),
            "labelings": len(labelings), "min_p": 1 / len(labelings)}


def focus_verdict(moves: dict[str, dict[str, float | None]], focus_groups: Sequence[str]) -> dict | None:
    """Per measure, the mean over the fine-tuned groups against the mean over the rest, with the
    labeling test; the answer is "yes" only where every measure's p < ALPHA, else "undecided"
    with the reason: a labeling test cannot say "no", and with few labelings it cannot say yes."""
    groups = list(next(iter(moves.values())))
    focus = [g for g in groups if g in set(focus_groups)]
    others = [g for g in groups if g not in set(focus_groups)]
    if not focus or not others:
        return None
    verdict = {"focus": focus, "others": others, "measures": {}}
    for measure, values in moves.items():
        mean = lambda members: float(np.nanmean([np.nan if values[g] is None else values[g]  # noqa: E731
                                                 for g in members]))
        ranking = sorted(groups, key=lambda g: -np.inf if values[g] is None else -values[g])
        verdict["measures"][measure] = {"focus_mean": _number(mean(focus)), "others_mean": _number(mean(others)),
                                        **labeling_test(values, focus), "ranking": ranking}
    tests = list(verdict["measures"].values())
    smallest = max(t["min_p"] for t in tests)
    if smallest >= ALPHA:
        verdict["answer"] = "undecided"
        verdict["reason"] = (f"with {len(focus)} of {len(groups)} groups fine-tuned there are only "
                             f"{max(t['labelings'] for t in tests)} labelings, so p cannot go below "
                             f"{smallest:.3f}, not below {ALPHA}")
    elif all(t["p_value"] < ALPHA for t in tests):
        verdict["answer"], verdict["reason"] = "yes", f"every measure's p < {ALPHA}"
    else:
        verdict["answer"] = "undecided"
        verdict["reason"] = f"not every measure's p is below {ALPHA}"
    return verdict


def _family_summary(comparison: xr.Dataset, base: xr.Dataset, tuned: xr.Dataset, family: Family,
                    top: int) -> dict:
    name, layer_dim = family.selected, family.layer_dim
    per_group = {
        measure: _by_group(comparison[f"{name}_{measure}_total"])
        for measure in ("base_size", "tuned_size", "kept", "gained", "lost", "jaccard")}
    per_group.update({f"layer_{d}": _by_group(comparison[f"{name}_layer_{d}"]) for d in ("tv", "js", "emd")})
    per_group["mean_abs_delta"] = _by_group(comparison[f"{family.frequency}_mean_abs_delta_total"])
    churn = (comparison[f"{name}_gained"] + comparison[f"{name}_lost"]).sum(GROUP)
    general = {m: int(comparison[f"{name}_general_{m}_total"]) for m in
               ("base_size", "tuned_size", "kept", "gained", "lost")}
    unique = {m: _by_group(comparison[f"{name}_unique_{m}_total"]) for m in
              ("base_size", "tuned_size", "kept", "gained", "lost")}
    return {
        "label": label(family),
        "layer_dim": layer_dim,
        "layers": comparison[layer_dim].values.tolist(),
        "per_group": per_group,
        "jaccard_per_layer": {str(g): [_number(v) for v in comparison[f"{name}_jaccard"].sel({GROUP: g}).values]
                              for g in comparison[GROUP].values},
        "churn_per_layer": churn.values.tolist(),
        "most_changed_layer": int(churn[layer_dim][churn.argmax(layer_dim)]),
        "general": general,
        "unique": unique,
        "movement": movement(comparison, family),
        "top_movers": top_movers(base[family.frequency], tuned[family.frequency], top),
    }


def summarize_comparison(comparison: xr.Dataset, base: xr.Dataset, tuned: xr.Dataset,
                         focus_groups: Sequence[str] = (), top: int = 10) -> dict:
    families = families_in(base)
    summary = {
        **{key: (value.tolist() if isinstance(value, np.ndarray) else value)
           for key, value in comparison.attrs.items()},
        "groups": [str(g) for g in comparison[GROUP].values],
        "focus_groups": list(focus_groups),
        "families": {f.selected: _family_summary(comparison, base, tuned, f, top) for f in families},
        "measures": MEASURES,
        "token_totals_match": bool((comparison.token_total_base == comparison.token_total_tuned).all()),
    }
    if "expert_selection_js" in comparison:
        js = comparison.expert_selection_js
        summary["expert_selection_js"] = {
            str(g): [_number(v) for v in js.sel({GROUP: g}).values] for g in comparison[GROUP].values}
    primary = families[0]
    summary["primary_family"] = primary.selected
    summary["focus_verdict"] = focus_verdict(summary["families"][primary.selected]["movement"], focus_groups)
    summary["note"] = headline(summary)
    return summary


def headline(summary: dict) -> str:
    """Plain sentences: what changed most, and whether the fine-tuned groups moved more."""
    primary = summary["families"][summary["primary_family"]]
    kind = primary["label"]
    turnover = primary["movement"]["turnover"]
    ranked = sorted((g for g in turnover if turnover[g] is not None), key=lambda g: -turnover[g])
    sentences = []
    if ranked:
        most = ranked[0]
        sentences.append(
            f"Most changed group: {most} ({kind}: Jaccard {primary['per_group']['jaccard'][most]:.3f}, "
            f"{primary['per_group']['gained'][most]} gained, {primary['per_group']['lost'][most]} lost); "
            f"least changed: {ranked[-1]} (Jaccard {primary['per_group']['jaccard'][ranked[-1]]:.3f}).")
    sentences.append(f"Most changed {primary['layer_dim'].replace('_', ' ')}: {primary['most_changed_layer']} "
                     f"({max(primary['churn_per_layer'])} {kind} gained or lost over all groups).")
    movers = [(g, row) for g, rows in primary["top_movers"].items() for row in rows[:1]]
    if movers:
        group, row = max(movers, key=lambda item: abs(item[1]["delta"]))
        where = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("base", "tuned", "delta"))
        sentences.append(f"Largest frequency change: {where} in {group}, "
                         f"{row['base']:.3f} -> {row['tuned']:.3f}.")
    if "expert_selection_js" in summary:
        js = summary["expert_selection_js"]
        layers = summary["families"]["ise"]["layers"]
        group, index, value = max(((g, i, v) for g, values in js.items() for i, v in enumerate(values)
                                   if v is not None), key=lambda item: item[2], default=(None, 0, None))
        if group is not None:
            sentences.append(f"Expert routing moved most in {group}, MoE layer {layers[index]} "
                             f"(JS {value:.4f} bits).")
    verdict = summary["focus_verdict"]
    if verdict:
        def number(value: float | None, digits: int) -> str:  # None: the sets were empty (lape, small model)
            return "undefined" if value is None else f"{value:.{digits}f}"

        parts = [f"{m.replace('_', ' ')} {number(v['focus_mean'], 4)} vs {number(v['others_mean'], 4)} "
                 f"(p = {number(v['p_value'], 3)})"
                 for m, v in verdict["measures"].items()]
        answer = "Yes" if verdict["answer"] == "yes" else f"Undecided ({verdict['reason']})"
        ranking = verdict["measures"]["turnover"]["ranking"]
        ranks = ", ".join(f"{g} {ranking.index(g) + 1}" for g in verdict["focus"])
        sentences.append(f"Did the fine-tuned categories ({', '.join(verdict['focus'])}) move more than "
                         f"the others? {answer}: fine-tuned vs others, {'; '.join(parts)}, p against every "
                         f"labeling of as many categories as fine-tuned; rank by turnover (1 = moved most, "
                         f"of {len(ranking)}): {ranks}.")
    if not summary["token_totals_match"]:
        sentences.append("Note: the two models counted different numbers of tokens (their tokenizers "
                         "or chat templates differ), so part of the change comes from the prompts.")
    return " ".join(sentences)


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _family_markdown(summary: dict, name: str) -> str:
    family = summary["families"][name]
    groups, per_group, kind = summary["groups"], family["per_group"], family["label"]
    sets = table(
        ["group", "base", "tuned", "kept", "gained", "lost", "Jaccard", "layer TV", "layer JS",
         "layer EMD", "mean abs delta f"],
        [[g, per_group["base_size"][g], per_group["tuned_size"][g], per_group["kept"][g],
          per_group["gained"][g], per_group["lost"][g], _cell(per_group["jaccard"][g]),
          _cell(per_group["layer_tv"][g]), _cell(per_group["layer_js"][g]),
          _cell(per_group["layer_emd"][g], 2), _cell(per_group["mean_abs_delta"][g], 5)] for g in groups])
    general = family["general"]
    unique = family["unique"]
    general_rows = [["general (all groups)", general["base_size"], general["tuned_size"], general["kept"],
                     general["gained"], general["lost"]]]
    general_rows += [[f"unique to {g}", unique["base_size"][g], unique["tuned_size"][g], unique["kept"][g],
                      unique["gained"][g], unique["lost"][g]] for g in groups]
    layer_rows = [[layer] + [_cell(family["jaccard_per_layer"][g][i], 2) for g in groups]
                  + [family["churn_per_layer"][i]] for i, layer in enumerate(family["layers"])]
    index_dims = [k for k in next((rows[0] for rows in family["top_movers"].values() if rows), {})
                  if k not in ("base", "tuned", "delta")]
    mover_rows = [[g] + [row[d] for d in index_dims] + [f"{row['base']:.3f}", f"{row['tuned']:.3f}",
                                                         f"{row['delta']:+.3f}"]
                  for g, rows in family["top_movers"].items() for row in rows[:5]]
    return "\n\n".join([
        f"## {kind.capitalize()} (`{name}`)",
        "Layer distribution shift: TV = total variation, JS = Jensen-Shannon divergence (bits), "
        "EMD = earth mover's distance in layers.\n\n" + sets,
        "### General and unique sets\n\n" + table(["set", "base", "tuned", "kept", "gained", "lost"],
                                                   general_rows),
        f"### Jaccard per {family['layer_dim'].replace('_', ' ')} (last column: gained + lost over all groups)\n\n"
        + table([family["layer_dim"]] + groups + ["churn"], layer_rows),
        "### Largest frequency changes (top 5 per group)\n\n"
        + table(["group"] + index_dims + ["base f", "tuned f", "delta"], mover_rows),
    ])


def markdown_comparison(summary: dict) -> str:
    sections = [
        "# SPARCOM: before and after fine-tuning",
        f"Base `{summary.get('base_model')}` (fingerprint `{str(summary.get('base_model_fingerprint'))[:12]}`) "
        f"vs tuned `{summary.get('tuned_model')}` (fingerprint `{str(summary.get('tuned_model_fingerprint'))[:12]}`); "
        f"dataset `{str(summary.get('dataset_hash'))[:12]}`, span `{summary.get('token_span')}`, "
        f"rule `{summary.get('rule')}` ({', '.join(f'{k} {v}' for k, v in rule_parameters(summary).items())}), "
        f"grouped by {summary.get('group_by')}.",
        "**What changed.** " + summary["note"],
    ]
    sections += [_family_markdown(summary, name) for name in summary["families"]]
    if "expert_selection_js" in summary:
        layers = summary["families"]["ise"]["layers"]
        rows = [[layer] + [_cell(summary["expert_selection_js"][g][i], 4) for g in summary["groups"]]
                for i, layer in enumerate(layers)]
        sections.append("## Expert selection frequencies: JS divergence per MoE layer (bits)\n\n"
                        + table([MOE_LAYER] + summary["groups"], rows))
    return "\n\n".join(sections) + "\n"


def plot_jaccard_layers(comparison: xr.Dataset, families: list[Family], path: Path) -> None:
    figure = Figure(figsize=(9, 2.2 + 1.6 * len(families)), layout="constrained")
    for i, family in enumerate(families):
        axes = figure.add_subplot(len(families), 1, i + 1)
        values = comparison[f"{family.selected}_jaccard"].transpose(GROUP, family.layer_dim)
        image = axes.imshow(values.values, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                            interpolation="nearest")
        axes.set_yticks(range(values.sizes[GROUP]), [str(g) for g in values[GROUP].values])
        layers = values[family.layer_dim].values
        ticks = range(0, len(layers), max(1, len(layers) // 15))
        axes.set_xticks(list(ticks), [str(layers[t]) for t in ticks])
        axes.set_xlabel(family.layer_dim.replace("_", " "))
        axes.set_title(f"Jaccard of base and tuned {label(family)} sets")
        figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)


def plot_set_changes(comparison: xr.Dataset, families: list[Family], path: Path) -> None:
    figure = Figure(figsize=(9, 2.2 + 1.6 * len(families)), layout="constrained")
    for i, family in enumerate(families):
        axes = figure.add_subplot(len(families), 1, i + 1)
        layers = comparison[family.layer_dim].values
        gained = comparison[f"{family.selected}_gained"].sum(GROUP).values
        lost = comparison[f"{family.selected}_lost"].sum(GROUP).values
        axes.bar(layers, gained, color="tab:green", label="gained")
        axes.bar(layers, -lost, color="tab:red", label="lost")
        axes.axhline(0, color="black", linewidth=0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel(family.layer_dim.replace("_", " "))
        axes.set_ylabel("summed over groups")
        axes.set_title(f"{label(family).capitalize()} gained and lost per layer")
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_frequency_shift(comparison: xr.Dataset, families: list[Family], path: Path) -> None:
    figure = Figure(figsize=(9, 2.2 + 1.6 * len(families)), layout="constrained")
    for i, family in enumerate(families):
        axes = figure.add_subplot(len(families), 1, i + 1)
        shift = comparison[f"{family.frequency}_mean_abs_delta"]
        for group in shift[GROUP].values:
            axes.plot(shift[family.layer_dim].values, shift.sel({GROUP: group}).values, label=str(group))
        axes.set_xlabel(family.layer_dim.replace("_", " "))
        axes.set_ylabel("mean |delta f|")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(f"Frequency change of {label(family)} per layer")
        axes.legend(ncols=6, fontsize=7)
    figure.savefig(path, dpi=120)


def plot_expert_selection(comparison: xr.Dataset, path: Path) -> None:
    js = comparison.expert_selection_js.transpose(GROUP, MOE_LAYER)
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(js.values, cmap="magma", aspect="auto", interpolation="nearest")
    axes.set_yticks(range(js.sizes[GROUP]), [str(g) for g in js[GROUP].values])
    layers = js.moe_layer.values
    ticks = range(0, len(layers), max(1, len(layers) // 15))
    axes.set_xticks(list(ticks), [str(layers[t]) for t in ticks])
    axes.set_xlabel("MoE layer")
    axes.set_title("JS divergence of expert selection frequencies (bits)")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)


def write_comparison_report(base: xr.Dataset, tuned: xr.Dataset, out_dir: Path,
                            focus_groups: Sequence[str] = (), top: int = 10) -> dict:
    """Compare two identification results and write data, summary, report and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare_components(base, tuned)
    families = families_in(base)
    summary = summarize_comparison(comparison, base, tuned, focus_groups, top)
    plots = {"comparison_jaccard.png": plot_jaccard_layers, "comparison_changes.png": plot_set_changes,
             "comparison_frequency.png": plot_frequency_shift}
    files = [COMPARISON_SUMMARY, COMPARISON_REPORT, COMPARISON, *plots]
    if "expert_selection_js" in comparison:
        files.append("expert_selection.png")
        plot_expert_selection(comparison, out_dir / "expert_selection.png")
    for name, plot in plots.items():
        plot(comparison, families, out_dir / name)
    # variable-length strings: Zarr v3 has no specification for fixed-width unicode
    save_zarr(comparison.assign_coords({GROUP: comparison[GROUP].astype(object)}), out_dir / COMPARISON)
    summary["files"] = {name: str(out_dir / name) for name in files}
    (out_dir / COMPARISON_SUMMARY).write_text(json.dumps(summary, indent=2))
    (out_dir / COMPARISON_REPORT).write_text(markdown_comparison(summary))
    return summary


def report_comparison(base_components: Path, tuned_components: Path, out_dir: Path,
                      focus_groups: Sequence[str] = (), top: int = 10) -> dict:
    base = xr.open_zarr(base_components).load()
    tuned = xr.open_zarr(tuned_components).load()
    return write_comparison_report(base, tuned, out_dir, focus_groups, top)


def link_into_report(report: Path, summary: dict) -> None:
    """Append the comparison's headline to a run's report.md, with a link to the full report."""
    relative = Path(summary["files"][COMPARISON_REPORT]).relative_to(Path(report).parent)
    put_section(report, f"## Before and after fine-tuning\n\n"
                        f"Compared with `{summary.get('tuned_model')}`. {summary['note']}\n\n"
                        f"Full comparison: [{relative}]({relative}).\n")
