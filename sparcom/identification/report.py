"""The findings a person reads: summary JSON, tables, a markdown report and plots.

- `summarize(components, analysis)`: the headline figures as plain data, per component family
  (`summary["families"]`); the dense family's figures also at the top level.
- `markdown_report(summary)`: per family the general count, set sizes and unique counts, counts
  per layer, the distribution over experts, the Jaccard matrix and the split-half reliability
  against its label-permutation null ("is this set reproducible from other instructions of its
  group?"), with the template's share of the counted tokens.
- `reproducible(gap, null_q95, permutations, null_left_out)`: the split-half verdict, or why the
  data cannot decide.
- `artifact_tables(summary)`: the same tables as rows, for a UI (Prefect table artifacts),
  the split-half table included.
- `findings_markdown(summary)`: the written report.md with a list linking every file (for a UI).
- `write_report(components, analysis, out_dir)`: all of it on disk: `generality.zarr`, Parquet
  tables under `tables/`, `summary.json`, `report.md` and the plots.
- `start_plots(small, families)`: the plots of the analysis's small figures, drawn (on the
  workers of the current Dask cluster where there is one, `sparcom.core.drawing`) while the caller
  goes on: `jaccard.png`, `layers.png`, `split_half.png` where the groups were split and, for
  MoE stores, `experts.png`.
- `report_generality(components_path, out_dir)`: the stage: analysis of saved components,
  reported; the big arrays are computed and written chunk by chunk on the current Dask scheduler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from sparcom.core.drawing import Drawing, start_drawing
from sparcom.core.markdown import table
from sparcom.extraction.store import open_result, save_zarr
from sparcom.identification.generality import EXPERT, OTHER, analyze, analyzed_families, family_part, prefix
from sparcom.identification.rules import rule_parameters
from sparcom.identification.schema import GROUP, Family

TITLES = {
    "neurons": ("neurons", "Neurons of dense FFN layers"),
    "experts": ("experts", "Routed experts"),
    "expert_neurons": ("expert neurons", "Neurons of routed experts"),
    "shared_neurons": ("shared-expert neurons", "Neurons of shared experts"),
}
# Tables and plots with a column or a line per group stay readable up to this many groups.
MAX_GROUPS_SHOWN = 12
# The level of the split-half null's verdict (docs/method.md section 4b: above its 95th percentile).
LEVEL = 0.05
# Per-group arrays too big to load for a report; they stay in generality.zarr.
LARGE = ("general", "unique", "membership")


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def _per_group(values: xr.DataArray, groups: list[str]) -> dict:
    return dict(zip(groups, values.transpose(GROUP, ...).values.tolist()))


def _exact(value: float) -> float | None:
    """Unrounded, so that a verdict can be recomputed from the summary's numbers."""
    return None if np.isnan(value) else float(value)


def reproducible(gap: float | None, null_q95: float | None, permutations: int, null_left_out: str | None
                 ) -> tuple[bool | None, str | None]:
    """(verdict, None), or (None, why the data cannot decide): reproducible when the gap is above
    the null's 95th percentile (docs/method.md section 4b)."""
    if null_left_out:
        return None, null_left_out
    if gap is None:
        return None, "no gap: the halves' sets are empty"
    if null_q95 is None:
        return None, "no null: the permuted halves' sets are all empty"
    if 1 / (1 + permutations) >= LEVEL:
        return None, f"{permutations} permutations: p cannot go below 1/{permutations + 1}"
    return gap > null_q95, None


def _split_half_row(part: xr.Dataset, group: str, null_left_out: str | None) -> dict:
    gap = _exact(part.specificity_gap.sel({GROUP: group}))
    row = {"within": _rounded(part.split_within.sel({GROUP: group})),
           "cross": _rounded(part.split_cross.sel({GROUP: group}).mean(OTHER)), "gap": gap,
           "null_q95": None, "p": None, "permutations": 0}
    if "split_null_q95" in part:
        row.update(null_q95=_exact(part.split_null_q95.sel({GROUP: group})),
                   p=_exact(part.split_p.sel({GROUP: group})),
                   permutations=int(part.split_null_count.sel({GROUP: group})))
    elif not null_left_out:
        null_left_out = "no null in these components"
    row["reproducible"], row["undecided"] = reproducible(gap, row["null_q95"], row["permutations"], null_left_out)
    return row


def _family_summary(family: Family, components: xr.Dataset, part: xr.Dataset, groups: list[str],
                    null_left_out: str | None = None) -> dict:
    dims = [d for d in components[family.selected].dims if d != GROUP]
    summary = {
        "title": TITLES[family.name][1],
        "dims": {d: int(components.sizes[d]) for d in dims},
        "layer_dim": family.layer_dim,
        "layer_index": components[family.layer_dim].values.tolist(),
        "set_size": _per_group(part.set_size, groups),
        "unique_count": _per_group(part.unique_count, groups),
        "general_count": int(part.general_count),
        "set_size_per_layer": _per_group(part.set_size_per_layer, groups),
        "unique_per_layer": _per_group(part.unique_per_layer, groups),
        "general_per_layer": part.general_per_layer.values.tolist(),
        "jaccard": None,
    }
    if "jaccard" in part:
        values = part.jaccard.transpose(GROUP, OTHER).values
        summary["jaccard"] = {a: {b: _rounded(values[i, j]) for j, b in enumerate(groups)}
                              for i, a in enumerate(groups)}
    if "set_size_per_expert" in part:
        summary["set_size_per_expert"] = _per_group(part.set_size_per_expert, groups)
    if "specificity_gap" in part:
        summary["split_half"] = {g: _split_half_row(part, g, null_left_out) for g in groups}
    if "template_level" in part:
        summary["template_level"] = _per_group(part.template_level, groups)
    return summary


def summarize(components: xr.Dataset, analysis: xr.Dataset) -> dict:
    groups = [str(g) for g in components[GROUP].values]
    null_left_out = analysis.attrs.get("split_null_left_out")
    families = {f.name: _family_summary(f, components, family_part(analysis, f), groups, null_left_out)
                for f in analyzed_families(analysis)}
    summary = {**analysis.attrs, "groups": groups, "families": families}
    if "template_share" in components:
        summary["template_share"] = {g: _rounded(v) for g, v in
                                     _per_group(components.template_share.load(), groups).items()}
    if "neurons" in families:  # the dense headline, where the pipeline's readers expect it
        dense = families["neurons"]
        summary.update({
            "layers": dense["dims"]["layer"], "neurons_per_layer": dense["dims"]["neuron"],
            **{k: dense[k] for k in ("set_size", "unique_count", "general_count",
                                      "general_per_layer", "jaccard")}})
    return summary


def _family_markdown(name: str, family: dict, groups: list[str]) -> str:
    plural, title = TITLES[name]
    layer_dim = family["layer_dim"]
    shape = " x ".join(f"{size:,} {dim}" for dim, size in family["dims"].items())
    sections = [
        f"## {title}",
        f"{shape}. **General {plural}** (in every group's set): **{family['general_count']}**.",
        table(["group", "set size", "unique"],
               [[g, family["set_size"][g], family["unique_count"][g]] for g in groups]),
    ]
    if len(groups) <= MAX_GROUPS_SHOWN:
        sections.append(f"Set size per {layer_dim} (unique in brackets), and the general {plural}:\n\n" + table(
            [layer_dim] + groups + ["general"],
            [[layer] + [f"{family['set_size_per_layer'][g][i]} ({family['unique_per_layer'][g][i]})"
                        for g in groups] + [family["general_per_layer"][i]]
             for i, layer in enumerate(family["layer_index"])]))
        if "set_size_per_expert" in family:
            experts = range(family["dims"][EXPERT])
            sections.append(f"Distribution over experts (set members per expert, all {layer_dim}s):\n\n" + table(
                ["expert"] + groups, [[e] + [family["set_size_per_expert"][g][e] for g in groups]
                                      for e in experts]))
        if family["jaccard"] is not None:
            sections.append("Jaccard overlap between groups:\n\n" + table([""] + groups, [
                [a] + ["-" if family["jaccard"][a][b] is None else f"{family['jaccard'][a][b]:.3f}"
                       for b in groups] for a in groups]))
    else:
        sections.append(f"{len(groups)} groups: the per-layer, per-expert and Jaccard tables are "
                        "in `tables/` and `generality.zarr`.")
    if "split_half" in family:
        sections.append(_split_half_markdown(plural, family, groups))
    return "\n\n".join(sections)


def _split_half_markdown(plural: str, family: dict, groups: list[str]) -> str:
    """Is this set reproducible from other instructions of its group? The gap against its null."""
    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def verdict(row: dict) -> str:
        if row["reproducible"] is None:
            return f"undecided: {row['undecided']}"
        return "yes" if row["reproducible"] else "**no** (gap within the null)"

    rows = [[g, cell(r["within"]), cell(r["cross"]), cell(r["gap"]), cell(r["null_q95"]), cell(r["p"], 4), verdict(r)]
            for g, r in family["split_half"].items()]
    permutations = max((r["permutations"] for r in family["split_half"].values()), default=0)
    return (f"Is this set reproducible from other instructions of its group? Split-half reliability: each "
            f"group's instructions in two halves (by seed, stratified by origin), {plural} selected on each "
            "half with the same rule; within = J(g_A, g_B), cross = mean J(g_A, h_B) over the other groups, "
            "gap = within - cross, averaged over seeds. The null: the same gap with the group labels "
            f"shuffled across instructions (group sizes kept, {permutations} permutations); a set is "
            "reproducible only when its gap is above the null's 95th percentile (null q95), "
            "p = (1 + #{null gap >= gap}) / (1 + permutations). A gap above 0 is not enough.\n\n"
            + table(["group", "within", "cross", "gap", "null q95", "p", "reproducible"], rows))


def _template_markdown(summary: dict) -> str | None:
    """How much of each set the template tokens (shared by every prompt) could account for."""
    if "template_share" not in summary:
        reason = summary.get("template_share_left_out")
        return f"Template share: not known ({reason})." if reason else None
    groups = summary["groups"]
    names = [n for n, f in summary["families"].items() if "template_level" in f]
    rows = [[g, f"{summary['template_share'][g]:.3f}"]
            + [f"{summary['families'][n]['template_level'][g]} of {summary['families'][n]['set_size'][g]}"
               for n in names] for g in groups]
    return ("## The chat template's share of the counts\n\n"
            f"Template share: the chat template adds {summary['template_tokens_per_prompt']} tokens to "
            "every prompt, this share of each group's counted tokens. A component active on every "
            "template token and on nothing else has exactly that frequency, so set members at or "
            "below it could owe their place to the template alone; members above it are active on "
            "the instructions' own text.\n\n"
            + table(["group", "template share"] + [f"{TITLES[n][0]} at or below it" for n in names], rows))


def markdown_report(summary: dict) -> str:
    groups = summary["groups"]
    rule = summary["rule"]
    parameter = ", ".join(f"{k} = {v}" for k, v in rule_parameters(summary).items())
    header = [
        "# SPARCOM: instruction-specific components",
        f"Model `{summary.get('model')}` (fingerprint `{str(summary.get('model_fingerprint'))[:12]}`), "
        f"dataset `{str(summary.get('dataset_hash'))[:12]}`, span `{summary.get('token_span')}`.",
        f"Selection: `{rule}`, {parameter}, grouped by {summary['group_by']} ({len(groups)} groups).",
    ]
    left_out = [f"Left out: {v}." for k, v in summary.items() if k.endswith("jaccard_left_out")]
    if "split_half_left_out" in summary:
        left_out.append(f"Split-half reliability left out: {summary['split_half_left_out']}.")
    elif "split_null_left_out" in summary:
        left_out.append(f"Split-half null left out: {summary['split_null_left_out']}.")
    template = [t for t in [_template_markdown(summary)] if t]
    families = [_family_markdown(name, family, groups) for name, family in summary["families"].items()]
    return "\n\n".join(header + left_out + template + families) + "\n"


def artifact_tables(summary: dict) -> dict[str, dict]:
    """key -> {"table": rows, "description": text} for each family's sets and Jaccard matrix."""
    tables = {}
    for name, family in summary["families"].items():
        key = "sparcom-" + name.replace("_", "-")
        tables[f"{key}-sets"] = {
            "description": f"{TITLES[name][1]}: set size and unique count per group "
                           f"(general: {family['general_count']})",
            "table": [{"group": g, "set size": family["set_size"][g], "unique": family["unique_count"][g]}
                      for g in summary["groups"]]}
        if "split_half" in family:
            tables[f"{key}-split-half"] = {
                "description": f"{TITLES[name][1]}: is the set reproducible from other instructions of "
                               "its group? Split-half Jaccard within and across groups, the gap against "
                               "its label-permutation null",
                "table": [{"group": g, **row} for g, row in family["split_half"].items()]}
        if family["jaccard"] is not None and len(summary["groups"]) <= MAX_GROUPS_SHOWN:
            tables[f"{key}-jaccard"] = {
                "description": f"{TITLES[name][1]}: Jaccard overlap between groups",
                "table": [{"group": a, **row} for a, row in family["jaccard"].items()]}
    return tables


def findings_markdown(summary: dict) -> str:
    """report.md as written, then a `## Files` list linking each file by its absolute URI."""
    files = "\n".join(f"- [{name}]({Path(path).resolve().as_uri()})" for name, path in summary["files"].items())
    return Path(summary["files"]["report.md"]).read_text() + f"\n## Files\n\n{files}\n"


def write_tables(analysis: xr.Dataset, families: list[Family], out_dir: Path) -> dict[str, str]:
    """Long-format Parquet tables of every per-group figure; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for family in families:
        part = family_part(analysis, family)
        frames = {
            "sets": xr.Dataset({"set_size": part.set_size, "unique_count": part.unique_count}),
            "layers": xr.Dataset({"set_size": part.set_size_per_layer, "unique": part.unique_per_layer,
                                  "general": part.general_per_layer, "share": part.layer_distribution}),
        }
        if "jaccard" in part:
            frames["jaccard"] = xr.Dataset({"jaccard": part.jaccard})
        if "set_size_per_expert" in part:
            frames["experts"] = xr.Dataset({"set_size": part.set_size_per_expert,
                                            "share": part.expert_distribution})
        if "specificity_gap" in part:
            frames["split_half"] = xr.Dataset({"within": part.split_within, "specificity_gap": part.specificity_gap,
                                               **{name: part[name] for name in ("split_null_q95", "split_p")
                                                  if name in part}})
        for kind, frame in frames.items():
            path = out_dir / f"{family.name}_{kind}.parquet"
            frame.to_dataframe().reset_index().to_parquet(path, index=False)
            written[path.name] = str(path)
    return written


# Fixed margins in inches (ticks, axis labels, group names at 45 degrees, titles): a layout
# engine measures every text of a figure to place them, which took most of the report's time.
MARGINS = {"left": 0.9, "right": 0.25, "bottom": 1.0, "top": 0.45, "across": 1.0, "down": 1.25}


# A title at a fixed height: left to matplotlib, each title is placed above every decoration
# of its axes, which are measured for it (and these plots have none above the axes).
TITLE_HEIGHT = 1.0


def _save(figure: Figure, target: Path | BinaryIO) -> None:
    # zlib's fastest level: the default spent a tenth of a plot's time, for files a fifth smaller.
    figure.savefig(target, dpi=120, format="png", pil_kwargs={"compress_level": 1})


def _grid(count: int, width: float, height: float) -> tuple[Figure, list]:
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    total_width, total_height = width * columns, height * rows
    figure = Figure(figsize=(total_width, total_height))
    m = MARGINS
    axes_width = (total_width - m["left"] - m["right"] - (columns - 1) * m["across"]) / columns
    axes_height = (total_height - m["bottom"] - m["top"] - (rows - 1) * m["down"]) / rows
    figure.subplots_adjust(left=m["left"] / total_width, right=1 - m["right"] / total_width,
                           bottom=m["bottom"] / total_height, top=1 - m["top"] / total_height,
                           wspace=m["across"] / axes_width, hspace=m["down"] / axes_height)
    return figure, [figure.add_subplot(rows, columns, k + 1) for k in range(count)]


def plot_jaccard(parts: dict[str, xr.Dataset], target: Path | BinaryIO) -> None:
    shown = {name: part for name, part in parts.items() if "jaccard" in part}
    figure, axes_list = _grid(max(1, len(shown)), 5.5, 4.5)
    for axes, (name, part) in zip(axes_list, shown.items()):
        groups = [str(g) for g in part[GROUP].values]
        values = part.jaccard.transpose(GROUP, OTHER).values
        image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis")
        if len(groups) <= MAX_GROUPS_SHOWN:
            axes.set_xticks(range(len(groups)), groups, rotation=45)
            axes.set_yticks(range(len(groups)), groups)
            for (i, j), value in np.ndenumerate(values):
                if not np.isnan(value):
                    axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white")
        axes.set_title(f"Jaccard overlap: {TITLES[name][0]}", y=TITLE_HEIGHT)
        figure.colorbar(image, ax=axes)
    if not shown:
        axes_list[0].text(0.5, 0.5, "Jaccard matrix left out (too many groups)", ha="center")
        axes_list[0].set_axis_off()
    _save(figure, target)


def plot_layers(parts: dict[str, xr.Dataset], target: Path | BinaryIO) -> None:
    figure, axes_list = _grid(len(parts), 8, 4)
    for axes, (name, part) in zip(axes_list, parts.items()):
        layer_dim = next(d for d in part.set_size_per_layer.dims if d != GROUP)
        layers = part[layer_dim].values
        if part.sizes[GROUP] <= MAX_GROUPS_SHOWN:
            for group in part[GROUP].values:
                axes.plot(layers, part.set_size_per_layer.sel({GROUP: group}).values, label=str(group))
        else:
            axes.plot(layers, part.set_size_per_layer.mean(GROUP).values, label="mean over groups")
            axes.plot(layers, part.unique_per_layer.sum(GROUP).values, label="unique (all groups)")
        axes.bar(layers, part.general_per_layer.values, color="lightgray", label="general")
        axes.set_xlabel(layer_dim)
        axes.set_ylabel(f"{TITLES[name][0]} in the set")
        axes.set_title(f"Instruction-specific {TITLES[name][0]} per layer", y=TITLE_HEIGHT)
        axes.legend(ncols=4, fontsize=8)
    _save(figure, target)


def plot_experts(parts: dict[str, xr.Dataset], target: Path | BinaryIO) -> None:
    """Per MoE family: set members in each (layer, expert), summed over groups."""
    figure, axes_list = _grid(len(parts), 6, 4.5)
    for axes, (name, part) in zip(axes_list, parts.items()):
        counts = part.set_size_per_layer_expert.sum(GROUP)
        layer_dim = next(d for d in counts.dims if d != EXPERT)
        image = axes.imshow(counts.transpose(layer_dim, EXPERT).values, aspect="auto", cmap="magma",
                            interpolation="nearest")
        axes.set_xlabel(EXPERT)
        axes.set_ylabel(f"{layer_dim} (row)")
        axes.set_title(f"{TITLES[name][1]}: selections over all groups", y=TITLE_HEIGHT)
        figure.colorbar(image, ax=axes)
    _save(figure, target)


def plot_split_half(parts: dict[str, xr.Dataset], target: Path | BinaryIO) -> None:
    """Per family and group: within-group against mean cross-group split-half Jaccard."""
    figure, axes_list = _grid(len(parts), 6, 4)
    for axes, (name, part) in zip(axes_list, parts.items()):
        groups = [str(g) for g in part[GROUP].values]
        where = np.arange(len(groups))
        axes.bar(where - 0.2, part.split_within.values, 0.4, label="within: J(g_A, g_B)")
        axes.bar(where + 0.2, part.split_cross.mean(OTHER).values, 0.4, label="cross: mean J(g_A, h_B)")
        if len(groups) <= MAX_GROUPS_SHOWN:
            axes.set_xticks(where, groups, rotation=45)
        axes.set_ylim(0, 1)
        axes.set_ylabel("Jaccard of the halves' sets")
        axes.set_title(f"Is the set specific to its group? {TITLES[name][0]}", y=TITLE_HEIGHT)
        axes.legend(fontsize=8)
    _save(figure, target)


def write_report(components: xr.Dataset, analysis: xr.Dataset, out_dir: Path) -> dict:
    """Write data, tables, summary, report and plots; return the summary with the files' paths.
    `components` and `analysis` may be lazy: the large arrays are written chunk by chunk."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = analyzed_families(analysis)
    large = [prefix(f) + name for f in families for name in LARGE]
    if not analysis[large].chunks:
        # Sets analysed in memory: the figures are known before the data is written, and the
        # plots are drawn (on the cluster's workers, where there is one) while it is.
        analysis = analysis.load()
        small = analysis.drop_vars(large)
        drawing = start_plots(small, families)
        save_zarr(analysis, out_dir / "generality.zarr")
    else:
        # The small figures are read back, not computed again from the lazy sets.
        save_zarr(analysis, out_dir / "generality.zarr")
        small = open_result(out_dir / "generality.zarr").drop_vars(large).load()
        drawing = start_plots(small, families)
    summary = summarize(components, small)
    files = {name: str(out_dir / name) for name in ("summary.json", "report.md", "generality.zarr")}
    files.update(write_tables(small, families, out_dir / "tables"))
    files.update(drawing.write(out_dir))
    summary["files"] = files
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(markdown_report(summary))
    return summary


def start_plots(small: xr.Dataset, families: list[Family]) -> Drawing:
    """`jaccard.png`, `layers.png`, `split_half.png` where the groups were split and, for MoE
    families, `experts.png`, from the analysis's small figures."""
    parts = {f.name: family_part(small, f) for f in families}
    plots = {"jaccard.png": (plot_jaccard, parts), "layers.png": (plot_layers, parts)}
    split = {name: part for name, part in parts.items() if "specificity_gap" in part}
    if split:
        plots["split_half.png"] = (plot_split_half, split)
    moe = {name: part for name, part in parts.items() if "set_size_per_layer_expert" in part}
    if moe:
        plots["experts.png"] = (plot_experts, moe)
    return start_drawing(plots)


def report_generality(components_path: Path, out_dir: Path) -> dict:
    components = open_result(components_path)
    return write_report(components, analyze(components), out_dir)
