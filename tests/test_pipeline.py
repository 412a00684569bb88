"""The pipeline flow and the CLI on a tiny model: every stage runs and the results are on disk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from cli.app import app
from sparcom.config import DEFAULT_RULES, PipelineSettings
from sparcom.identification.settings import IdentificationSettings
from sparcom.curation.settings import DatasetSettings
from sparcom.extraction.settings import ModelSettings
from sparcom.extraction.store import is_complete, open_store

from builders import write_jsonl


@pytest.mark.slow
def test_pipeline_flow_runs_every_stage(tmp_path, prefect_harness, tiny_llama_dir, cache_dir, sample_records):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.pipeline import sparcom_pipeline

    dataset = write_jsonl(sample_records, tmp_path / "d.jsonl")
    settings = PipelineSettings(model=ModelSettings(name=str(tiny_llama_dir)), dataset=DatasetSettings(path=dataset),
                                work_dir=tmp_path / "work", cache_dir=cache_dir)
    summary = sparcom_pipeline(settings)

    # No rule named: the default rules side by side, each in the folder it has when run alone.
    assert list(summary["rules"]) == DEFAULT_RULES and summary["rule"] == DEFAULT_RULES[0]
    for rule, each in summary["rules"].items():
        run_dir = Path(each["files"]["report.md"]).parent
        assert each["rule"] == rule and (run_dir / "components.zarr").is_dir()
        assert xr.open_zarr(run_dir / "components.zarr").attrs["rule"] == rule
        assert (run_dir / "comparison" / "comparison.md").is_file()
        # two records per category here: too few for halves, and the report says so
        assert "Split-half reliability left out" in (run_dir / "report.md").read_text()
    assert len({Path(each["files"]["report.md"]).parent for each in summary["rules"].values()}) == 2
    assert summary["groups"] == ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
    assert summary["layers"] == 3 and summary["neurons_per_layer"] == 48
    for file in ("report.md", "summary.json", "jaccard.png", "layers.png"):
        assert Path(summary["files"][file]).is_file()
    stores = list((tmp_path / "work" / "stores").glob("*.zarr"))
    assert len(stores) == 2 and all(is_complete(s) for s in stores)  # the model and its fine-tune
    assert all(open_store(s).sizes["instruction"] == len(sample_records) for s in stores)
    comparison = summary["comparison"]
    assert comparison["focus_groups"] == ["CODE", "MATH"] and comparison["focus_verdict"] is not None
    assert Path(comparison["files"]["comparison.md"]).is_file()
    assert "Before and after fine-tuning" in Path(summary["files"]["report.md"]).read_text()
    # the neurons reported general are those selected in every category, in the components on disk
    isn = xr.open_zarr(Path(summary["files"]["report.md"]).parent / "components.zarr").isn.load()
    general = int(isn.all("group").sum())
    assert json.loads(Path(summary["files"]["summary.json"]).read_text())["general_count"] == general
    assert summary["general_count"] == general

    async def findings():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sparcom-findings"])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                limit=5, sort=ArtifactSort.CREATED_DESC)

    artifacts = asyncio.run(findings())
    assert artifacts and "General neurons" in artifacts[0].data


@pytest.mark.slow
def test_cli_extract_then_identify(tmp_path, tiny_llama_dir, cache_dir, sample_records, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    dataset = write_jsonl(sample_records, tmp_path / "d.jsonl")
    runner = CliRunner()
    extracted = runner.invoke(app, ["extract", "--model", str(tiny_llama_dir), "--dataset", str(dataset),
                                    "--out", str(tmp_path / "s.zarr"), "--dtype", "float64"])
    assert extracted.exit_code == 0, extracted.output
    assert open_store(tmp_path / "s.zarr").attrs["dtype"] == "float64"
    identified = runner.invoke(app, ["identify", "--store", str(tmp_path / "s.zarr"), "--epsilon", "0.05",
                                     "--out", str(tmp_path / "out")])
    assert identified.exit_code == 0, identified.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["epsilon"] == 0.05 and summary["rule"] == "global_percentile"
    assert "Jaccard" in identified.output


@pytest.mark.parametrize("command", ["run", "extract", "identify", "compare", "finetune"])
def test_cli_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output


@pytest.mark.slow
def test_reruns_recompute_only_what_changed(tmp_path, prefect_harness, tiny_llama_dir, cache_dir, sample_records):
    from cli.runs import task_run_states
    from flows.pipeline import sparcom_pipeline

    dataset = write_jsonl(sample_records, tmp_path / "d.jsonl")
    settings = PipelineSettings(model=ModelSettings(name=str(tiny_llama_dir)), dataset=DatasetSettings(path=dataset),
                                identification=IdentificationSettings(), work_dir=tmp_path / "work", cache_dir=cache_dir)
    settings.comparison.enabled = False

    def states(run_settings, refresh=()):
        state = sparcom_pipeline(run_settings, refresh=list(refresh), return_state=True)
        assert state.is_completed()
        return {name.rsplit("-", 1)[0]: s for name, s in task_run_states(state.state_details.flow_run_id).items()}

    first = states(settings)
    assert all(s == ["Completed"] for s in first.values()), first
    assert states(settings) == {name: ["Cached"] for name in first}

    stricter = settings.model_copy(deep=True)
    stricter.identification.epsilon = 0.05
    changed = states(stricter)
    assert changed["curate dataset"] == changed["extract activation counts"] == ["Cached"]
    assert changed["identify instruction-specific components"] == ["Completed"]
    assert changed["analyse generality and uniqueness"] == ["Completed"]

    refreshed = states(settings, refresh=["extract"])
    assert refreshed["extract activation counts"] == ["Completed"]
    assert refreshed["curate dataset"] == ["Cached"]
