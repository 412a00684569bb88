"""The findings a person reads: summary JSON, a markdown report and plots.

- `summarize(components, analysis)`: the headline figures as plain data.
- `markdown_report(summary)`: set sizes, general and unique counts, the Jaccard matrix.
- `write_report(components, analysis, out_dir)`: all of it on disk, data included (Zarr).
- `report_generality(components_path, out_dir)`: the stage: analysis of saved components, reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from sparcom.analysis import generality
from sparcom.identify import GROUP
from sparcom.store import save_zarr


def summarize(components: xr.Dataset, analysis: xr.Dataset) -> dict:
    groups = [str(g) for g in components[GROUP].values]
    jaccard = analysis.jaccard.values
    return {
        **{k: v for k, v in components.attrs.items()},
        "groups": groups,
        "layers": int(components.sizes["layer"]),
        "neurons_per_layer": int(components.sizes["neuron"]),
        "set_size": dict(zip(groups, analysis.set_size.values.tolist())),
        "unique_count": dict(zip(groups, analysis.unique_count.values.tolist())),
        "general_count": int(analysis.general_count),
        "general_per_layer": analysis.general_per_layer.values.tolist(),
        "jaccard": {a: {b: _rounded(jaccard[i, j]) for j, b in enumerate(groups)}
                    for i, a in enumerate(groups)},
    }


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(summary: dict) -> str:
    groups = summary["groups"]
    rule = summary["rule"]
    parameter = f"tau = {summary['tau']}" if rule == "threshold" else f"epsilon = {summary['epsilon']}"
    sizes = _table(["group", "set size", "unique"],
                   [[g, summary["set_size"][g], summary["unique_count"][g]] for g in groups])
    jaccard = _table([""] + groups, [
        [a] + ["-" if summary["jaccard"][a][b] is None else f"{summary['jaccard'][a][b]:.3f}" for b in groups]
        for a in groups])
    return "\n\n".join([
        "# SPARCOM: instruction-specific neurons",
        f"Model `{summary.get('model')}` (fingerprint `{str(summary.get('model_fingerprint'))[:12]}`), "
        f"dataset `{str(summary.get('dataset_hash'))[:12]}`, span `{summary.get('token_span')}`, "
        f"{summary['layers']} layers x {summary['neurons_per_layer']} neurons.",
        f"Selection: `{rule}`, {parameter}, grouped by {summary['group_by']}.",
        f"**General neurons** (in every group's set): **{summary['general_count']}**.",
        "## Set sizes and unique neurons\n\n" + sizes,
        "## Jaccard overlap between groups\n\n" + jaccard,
    ]) + "\n"


def plot_jaccard(analysis: xr.Dataset, path: Path) -> None:
    groups = [str(g) for g in analysis[GROUP].values]
    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(analysis.jaccard.values, vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(groups)), groups, rotation=45)
    axes.set_yticks(range(len(groups)), groups)
    for (i, j), value in np.ndenumerate(analysis.jaccard.values):
        if not np.isnan(value):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white")
    axes.set_title("Jaccard overlap of ISN sets")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)


def plot_layers(analysis: xr.Dataset, path: Path) -> None:
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.add_subplot()
    layers = analysis.layer.values
    for group in analysis[GROUP].values:
        axes.plot(layers, analysis.set_size_per_layer.sel({GROUP: group}).values, label=str(group))
    axes.bar(layers, analysis.general_per_layer.values, color="lightgray", label="general")
    axes.set_xlabel("layer")
    axes.set_ylabel("neurons in the set")
    axes.set_title("Instruction-specific neurons per layer")
    axes.legend(ncols=4, fontsize=8)
    figure.savefig(path, dpi=120)


def write_report(components: xr.Dataset, analysis: xr.Dataset, out_dir: Path) -> dict:
    """Write data, summary, report and plots; return the summary with the files' paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_zarr(analysis, out_dir / "generality.zarr")
    summary = summarize(components, analysis)
    files = {name: str(out_dir / name) for name in
             ("summary.json", "report.md", "jaccard.png", "layers.png", "generality.zarr")}
    summary["files"] = files
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(markdown_report(summary))
    plot_jaccard(analysis, out_dir / "jaccard.png")
    plot_layers(analysis, out_dir / "layers.png")
    return summary


def report_generality(components_path: Path, out_dir: Path) -> dict:
    components = xr.open_zarr(components_path).load()
    return write_report(components, generality(components.isn), out_dir)
