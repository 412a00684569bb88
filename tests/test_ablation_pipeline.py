"""The ablation in the pipeline (base and fine-tuned model) and on the command line, tiny settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from sparcom.ablation.report import SECTION
from sparcom.findings.report import SECTION as FINDINGS
from cli.app import app
from sparcom.ablation.settings import AblationSettings
from sparcom.comparison.settings import FinetuneSettings
from sparcom.config import PipelineSettings
from sparcom.curation.settings import DatasetSettings
from sparcom.extraction.settings import ModelSettings
from sparcom.identification.settings import IdentificationSettings

from builders import write_jsonl

TINY = AblationSettings(eval_per_group=1, seeds=1, resamples=20, permutations=20, max_response_tokens=4)


@pytest.mark.slow  # a Prefect server, the pipeline, a fine-tune
def test_pipeline_ablates_base_and_tuned_components(tmp_path, prefect_harness, tiny_llama_dir, cache_dir,
                                                     sample_records):
    from flows.pipeline import sparcom_pipeline
    from cli.runs import task_run_states

    settings = PipelineSettings(
        model=ModelSettings(name=str(tiny_llama_dir)),
        dataset=DatasetSettings(path=write_jsonl(sample_records, tmp_path / "d.jsonl")),
        finetune=FinetuneSettings(steps=2, batch_size=2), ablation=TINY,
        identification=IdentificationSettings(), work_dir=tmp_path / "work", cache_dir=cache_dir)
    state = sparcom_pipeline(settings, return_state=True)
    summary = state.result()
    run_dir = Path(summary["files"]["report.md"]).parent
    report = (run_dir / "report.md").read_text()
    assert SECTION in report and report.count(SECTION) == 1
    assert "![ablation](ablation.png)" in report and (run_dir / "ablation.png").is_file()
    assert "## Before and after fine-tuning: are the components more critical?" in report
    for group in summary["groups"]:
        assert f"- **{group}**" in report
    base = xr.open_zarr(run_dir / "ablation.zarr")
    tuned = xr.open_zarr(run_dir / "tuned" / "ablation.zarr")
    assert base.attrs["model_fingerprint"] != tuned.attrs["model_fingerprint"]
    assert list(base.record_hash.values) == list(tuned.record_hash.values)  # the same held-out records
    assert summary["ablation"]["per_group"]["CODE"]["size"] == int(base.ablated_size.sel(ablated="CODE"))
    states = task_run_states(state.state_details.flow_run_id)
    assert [s for name, s in states.items() if name.startswith("measure the ablation")]
    # every ablation of the run keeps its passes in the work dir's one folder, none beside its results
    assert list((tmp_path / "work" / "passes").glob("*.json"))
    assert not (run_dir / "passes").exists() and not (run_dir / "tuned" / "passes").exists()
    # The findings open the report, and the run's own artifact (no task's) carries them.
    assert report.split("\n## ")[1].startswith(FINDINGS.removeprefix("## ")) and report.count(FINDINGS) == 1
    assert summary["findings"]["verdicts"][summary["rule"]].startswith(f"`{summary['rule']}` (neurons): reproducible")
    assert json.loads((run_dir / "summary.json").read_text())["findings"] == summary["findings"]
    [artifact] = run_artifacts(state.state_details.flow_run_id, "sparcom-verdicts")
    assert artifact.task_run_id is None and artifact.data.startswith(FINDINGS)

    def task_states(refresh: list[str]) -> dict[str, list[str]]:
        """Each task's states in a rerun, its name without Prefect's run suffix."""
        run = sparcom_pipeline(settings, refresh=refresh, return_state=True)
        states: dict[str, list[str]] = {}
        for name, names_states in task_run_states(run.state_details.flow_run_id).items():
            states.setdefault(name.rsplit("-", 1)[0], []).extend(names_states)
        return states

    rerun = task_states(["ablate"])
    assert rerun["measure the ablation"] == ["Completed", "Completed"]
    assert rerun["extract activation counts"] == ["Cached", "Cached"]
    assert (run_dir / "report.md").read_text().count(SECTION) == 1

    # The analysis writes report.md anew; the later stages' sections come back without their work.
    again_states = task_states(["analyse"])
    assert again_states["analyse generality and uniqueness"] == ["Completed", "Completed"]
    assert again_states["measure the ablation"] == ["Cached", "Cached"]
    assert again_states["compare base and tuned components"] == ["Cached"]
    assert again_states["add the ablation to the run report"] == ["Completed", "Completed"]
    assert again_states["add the comparison to the run report"] == ["Completed"]
    rewritten = (run_dir / "report.md").read_text()
    assert rewritten.count(SECTION) == 1 and "![ablation](ablation.png)" in rewritten
    assert rewritten.count("## Before and after fine-tuning: are the components more critical?") == 1
    assert rewritten.count("## Before and after fine-tuning\n") == 1
    assert again_states["write the findings first in each report"] == ["Completed"]
    assert rewritten.split("\n## ")[1].startswith(FINDINGS.removeprefix("## ")) and rewritten.count(FINDINGS) == 1


def run_artifacts(flow_run_id, key: str) -> list:
    """The artifacts of that key that a flow run (not its subflows) made."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_cli_ablate(tmp_path, identified, cache_dir, monkeypatch):
    work, store, components, held_out = identified
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    runner = CliRunner()
    args = ["ablate", "--components", str(components.parent), "--eval-dataset", str(held_out),
            "--out", str(tmp_path / "out"), "--seeds", "1", "--controls", "random", "--max-response-tokens", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Delta matrix" in result.output and (tmp_path / "out" / "ablation.zarr" / "zarr.json").is_file()
    bad = runner.invoke(app, args[:-6] + ["--family", "experts"])
    assert bad.exit_code == 2 and "error: unknown family 'experts'" in bad.output
