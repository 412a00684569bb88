"""The parts of triggering and naming runs that need no server: `--set` parsing, parameter
merging, run names, the deployment file, and the `sparcom trigger` command's refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from cli.trigger import merge_parameters, parse_assignments
from flows.naming import describe, model_label
from sparcom.config import PipelineSettings
from sparcom.curation.settings import DatasetSettings
from sparcom.extraction.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[1]


def test_assignments_nest_dotted_keys_and_read_json_values():
    parsed = parse_assignments([
        "settings.model.name=mistralai/Mistral-7B-Instruct-v0.3", "settings.identification.epsilon=0.02",
        "settings.comparison.enabled=false", "focus_groups=[\"CODE\", \"MATH\"]", "out_dir=runs/a=b",
        "settings.model.revision=null", "label=007x"])
    assert parsed == {
        "settings": {"model": {"name": "mistralai/Mistral-7B-Instruct-v0.3", "revision": None},
                     "identification": {"epsilon": 0.02}, "comparison": {"enabled": False}},
        "focus_groups": ["CODE", "MATH"], "out_dir": "runs/a=b", "label": "007x"}


@pytest.mark.parametrize("bad", ["settings.model.name", "=3", "a=1 a.b=2"])
def test_assignments_refuse_what_is_not_key_value(bad):
    with pytest.raises(ValueError, match="KEY=VALUE|already given a value"):
        parse_assignments(bad.split(" "))


def test_overrides_merge_key_by_key_into_the_deployment_parameters():
    defaults = {"settings": {"model": {"name": "default"}, "identification": {"epsilon": 0.01, "rule": "threshold"},
                             "work_dir": "sparcom-work"}, "focus_groups": ["CODE"]}
    merged = merge_parameters(defaults, {"settings": {"identification": {"epsilon": 0.05}, "work_dir": "/data"},
                                         "focus_groups": []})
    assert merged == {"settings": {"model": {"name": "default"}, "identification": {"epsilon": 0.05, "rule": "threshold"},
                                   "work_dir": "/data"}, "focus_groups": []}
    assert defaults["settings"]["identification"]["epsilon"] == 0.01  # the defaults are left as they were


def test_run_names_show_model_and_dataset():
    assert describe(PipelineSettings()) == "SmolLM2-135M-Instruct on starter set"
    tuned = PipelineSettings(model=ModelSettings(name="mistralai/Mistral-7B-Instruct-v0.3"),
                             dataset=DatasetSettings(path=Path("/data/hexainst.jsonl")))
    assert describe(tuned) == "Mistral-7B-Instruct-v0.3 on hexainst.jsonl"
    assert model_label("/models/llama-ft/") == "llama-ft"


def test_deployment_file_names_existing_flows_with_paused_schedules():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        module, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (ROOT / module).read_text(), deployment["entrypoint"]
        assert [s["active"] for s in deployment["schedules"]] == [False]
        assert deployment["work_pool"]["name"] == "sparcom-process"
    flow_files = {p.name for p in (ROOT / "flows").glob("*.py") if re.search(r"^@flow\b", p.read_text(), re.M)}
    assert {Path(d["entrypoint"].split(":")[0]).name for d in spec["deployments"]} == flow_files


def test_trigger_refuses_bad_parameters_before_calling_the_server(tmp_path):
    runner = CliRunner()
    not_json = runner.invoke(app, ["trigger", "sparcom-pipeline/pipeline", "--params", "{epsilon: 1}"])
    assert not_json.exit_code == 2 and "error:" in not_json.output
    not_pair = runner.invoke(app, ["trigger", "sparcom-pipeline/pipeline", "--set", "settings.work_dir"])
    assert not_pair.exit_code == 2 and "KEY=VALUE" in not_pair.output
    settings = tmp_path / "s.yaml"
    settings.write_text("identification: {epsilon: 7}\n")
    bad_settings = runner.invoke(app, ["trigger", "sparcom-pipeline/pipeline", "--config", str(settings)])
    assert bad_settings.exit_code == 2 and "epsilon" in bad_settings.output


def test_what_the_stages_ask_of_the_pipeline_settings_together(tmp_path):
    from sparcom.curation.records import CATEGORIES
    from sparcom.extraction.settings import ModelSettings

    settings = PipelineSettings()
    assert settings.fine_tuned_groups() == ["CODE", "MATH"]
    assert PipelineSettings(finetune={"categories": []}).fine_tuned_groups() == list(CATEGORIES)
    assert PipelineSettings(comparison={"tuned": ModelSettings(name="t")}).fine_tuned_groups() == []
    assert PipelineSettings(identification={"group_by": "origin"}).fine_tuned_groups() == []
    held_out = settings.evaluated_on(tmp_path / "held-out")
    assert held_out.ablation.eval_dataset == tmp_path / "held-out" and settings.ablation.eval_dataset is None
    assert held_out.model_dump(exclude={"ablation"}) == settings.model_dump(exclude={"ablation"})


def test_trigger_without_a_server_says_how_to_name_one():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["trigger", "sparcom-pipeline/pipeline"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: PREFECT_API_URL is not set: trigger asks the server that holds the "
                                     "deployment; set it, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")


def test_trigger_to_a_dead_server_names_its_address():
    import socket

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
        result = CliRunner().invoke(app, ["trigger", "sparcom-pipeline/pipeline"])
    assert result.exit_code == 2, result.output
    assert f"error: no Prefect server answers at {url} (ConnectError" in result.output
    assert "prefect server start" in result.output and len(result.output.strip().splitlines()) == 1
