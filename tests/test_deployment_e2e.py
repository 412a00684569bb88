"""End to end, the way people run SPARCOM: a real Prefect server on 127.0.0.1 (SQLite in a temporary
PREFECT_HOME), the process work pool, every deployment of deployments/prefect.yaml, a process
worker, and the pipeline deployment triggered through the API on 12 records and a tiny random
LLaMA: it completes, its artifacts are readable through the API, a rerun is all cache hits,
`sparcom trigger` fails when the run fails, and headless Chromium shows the run and the findings.
Everything started here is stopped at the end, on failure too."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from builders import SAMPLE_TEXTS, SMALL_SERVER_SETTINGS, make_record
from prefect_api import api_client

pytestmark = pytest.mark.slow  # a server, a worker, flow runs in processes, a browser

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
except ImportError:  # only the browser check needs it, and it says so when it skips
    webdriver = By = None

ROOT = Path(__file__).resolve().parents[1]
POOL = "sparcom-process"
PIPELINE = "sparcom-pipeline/pipeline"
DEPLOYMENTS = {PIPELINE, "curate-hexainst/curate", "sparcom-identify/identify",
               "sparcom-finetune/finetune", "sparcom-compare/compare"}
# Generous: CI has 2 cores and other jobs may keep both busy; nothing here is a timing assertion.
SERVER_START_SECONDS = 300
RUN_SECONDS = 900
UI_SECONDS = 120
CLI_SECONDS = 300


@dataclass
class Services:
    """Processes started by this module, each in its own session, stopped with all descendants."""

    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("w") as log:
            process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str, last: int = 4000) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-last:]

    def stop_all(self) -> None:
        for process in reversed(list(self.processes.values())):
            try:
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in tree:  # flow runs and Dask workers may sit in process groups of their own
                try:
                    member.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(tree, timeout=10)
            for member in alive:
                member.kill()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait(timeout=10)
        self.processes.clear()


@dataclass
class Server:
    api: str
    ui: str
    env: dict[str, str]
    services: Services

    def client(self) -> httpx.Client:
        """Plain API calls, as another CI system makes them: retried on 429/502/503 with backoff."""
        return api_client(self.api)

    def cli(self, *args: str, timeout: float = CLI_SECONDS) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def isolated_env(home: Path, api: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1", XDG_CACHE_HOME=str(home / "xdg-cache"),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **SMALL_SERVER_SETTINGS)
    return env


def wait_until(condition, seconds: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {seconds} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    services = Services(home)
    started = time.monotonic()
    try:
        env = isolated_env(home, api)
        process = services.start("server", [sys.executable, "-m", "prefect", "server", "start",
                                            "--host", "127.0.0.1", "--port", str(port)], env)

        def healthy() -> bool:
            assert process.poll() is None, f"prefect server exited:\n{services.log('server')}"
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, SERVER_START_SECONDS, f"prefect server health at {api}")
        print(f"\nprefect server up in {time.monotonic() - started:.1f} s at {api} (logs in {home})")
        yield Server(api=api, ui=f"http://127.0.0.1:{port}", env=env, services=services)
    finally:
        services.stop_all()


@pytest.fixture(scope="module")
def deployed(server):
    """The work pool, every deployment of deployments/prefect.yaml, and a worker on the pool."""
    created = server.cli(sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    deploy = server.cli(sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                        "--prefect-file", "deployments/prefect.yaml", timeout=2 * CLI_SECONDS)
    assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
    server.services.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                          server.env)
    with server.client() as api:
        names = {f"{flow_name(api, d['flow_id'])}/{d['name']}"
                 for d in api.post("/deployments/filter", json={}).json()}
    return names


def flow_name(api: httpx.Client, flow_id: str) -> str:
    return api.get(f"/flows/{flow_id}").json()["name"]


def test_every_deployment_is_on_the_pool_with_an_inactive_schedule(server, deployed):
    assert DEPLOYMENTS <= deployed
    with server.client() as api:
        for deployment in api.post("/deployments/filter", json={}).json():
            assert deployment["work_pool_name"] == POOL
            assert deployment["schedules"] and not any(s["active"] for s in deployment["schedules"])
            assert deployment["pull_steps"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            assert "sparcom" in deployment["tags"] and deployment["description"]
            assert deployment["parameter_openapi_schema"]["properties"], deployment["name"]


@dataclass
class PipelineRuns:
    first: dict
    second: dict
    trigger_output: str
    model_dir: Path
    dataset: Path


def finished_run(api: httpx.Client, run_id: str) -> dict:
    def final():
        run = api.get(f"/flow_runs/{run_id}").json()
        return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_until(final, RUN_SECONDS, f"flow run {run_id} to end", every=1)


@pytest.fixture(scope="module")
def pipeline_runs(server, deployed, tmp_path_factory, tiny_llama_dir) -> PipelineRuns:
    """The pipeline deployment run twice with the same parameters: by `sparcom trigger`, then
    by a plain API call, as another CI system would."""
    work = tmp_path_factory.mktemp("pipeline-e2e")
    dataset = work / "d.jsonl"
    records = [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]  # conftest's sample_records
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in records))
    overrides = {"model.name": tiny_llama_dir, "dataset.path": dataset, "work_dir": work / "work",
                 "cache_dir": work / "cache", "finetune.steps": 2, "dask.n_workers": 1}
    started = time.monotonic()
    triggered = server.cli(sys.executable, "-m", "cli.app", "trigger", PIPELINE, "--wait", "--poll", "1",
                           "--timeout", str(RUN_SECONDS),
                           *[f"--set=settings.{key}={value}" for key, value in overrides.items()],
                           timeout=RUN_SECONDS + 60)
    output = triggered.stdout + triggered.stderr
    assert triggered.returncode == 0, output + "\nworker log:\n" + server.services.log("worker")
    first_id = re.search(r"flow run '[^']+' \(([0-9a-f-]{36})\)", output).group(1)
    print(f"first pipeline run: {time.monotonic() - started:.1f} s")
    with server.client() as api:
        first = api.get(f"/flow_runs/{first_id}").json()
        started = time.monotonic()
        deployment = api.get(f"/deployments/name/{PIPELINE}").json()
        response = api.post(f"/deployments/{deployment['id']}/create_flow_run",
                            json={"parameters": first["parameters"]})
        assert response.status_code == 201, response.text
        second = finished_run(api, response.json()["id"])
        print(f"rerun: {time.monotonic() - started:.1f} s")
    return PipelineRuns(first, second, output, tiny_llama_dir, dataset)


def run_tree(api: httpx.Client, run_id: str) -> tuple[list[str], list[dict]]:
    """A flow run and its subflow runs, and their task runs less the ones that stand for subflows."""
    flow_runs, frontier, task_runs = [run_id], [run_id], []
    while frontier:
        task_runs += api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": frontier}}}).json()
        frontier = [r["id"] for r in api.post(
            "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": frontier}}}).json()]
        flow_runs += frontier
    subflow_stand_ins = {r["parent_task_run_id"] for r in api.post(
        "/flow_runs/filter", json={"flow_runs": {"id": {"any_": flow_runs}}}).json()}
    return flow_runs, [t for t in task_runs if t["id"] not in subflow_stand_ins]


def tree_artifacts(api: httpx.Client, run_id: str) -> list[dict]:
    flow_runs, _ = run_tree(api, run_id)
    # Explicit empty filters: prefect 3.8.8's server refuses `null` ones under FastAPI >= 0.151.
    return api.post("/artifacts/filter", json={
        "artifacts": {}, "flow_runs": {"id": {"any_": flow_runs}}, "task_runs": {}}).json()


def model_findings(artifacts: list[dict], model_dir: Path) -> dict:
    """The model's findings; its fine-tune's are published as `sparcom-tuned-findings`."""
    [findings] = [a for a in artifacts if a["key"] == "sparcom-findings" and f"`{model_dir}`" in a["data"]]
    return findings


def test_pipeline_deployment_completes_with_findings(server, pipeline_runs):
    first = pipeline_runs.first
    assert first["state_name"] == "Completed", first["state"]
    assert f"/runs/flow-run/{first['id']}" in pipeline_runs.trigger_output  # the UI address for CI logs
    with server.client() as api:
        _, task_runs = run_tree(api, first["id"])
        artifacts = tree_artifacts(api, first["id"])
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs} >= {
        "curate dataset", "extract activation counts", "identify instruction-specific components",
        "analyse generality and uniqueness", "measure the ablation", "fine-tune model",
        "compare base and tuned components"}
    assert all(t["state_name"] == "Completed" for t in task_runs)
    findings = model_findings(artifacts, pipeline_runs.model_dir)
    assert findings["type"] == "markdown" and "General neurons" in findings["data"]
    keys = [a["key"] for a in artifacts]
    assert keys.count("sparcom-findings") == keys.count("sparcom-tuned-findings") == 1
    [comparison] = [a for a in artifacts if a["key"] == "sparcom-comparison"]
    assert "SPARCOM: before and after fine-tuning" in comparison["data"]
    assert keys.count("sparcom-ablation") == keys.count("sparcom-tuned-ablation") == 1
    # The deployment compares two rules, the second reading effect estimates: 2 extractions, 2
    # attribution stores, the fine-tune, and per rule 2 ablations (the model's components, the fine-tune's)
    assert [a["data"] for a in artifacts if a["type"] == "progress"] == [100.0] * 9
    assert keys.count("sparcom-attribution-contrastive-comparison") == 1
    assert any(a["type"] == "table" for a in artifacts)


def test_run_name_shows_model_and_dataset(pipeline_runs):
    name = pipeline_runs.first["name"]
    assert pipeline_runs.model_dir.name in name and pipeline_runs.dataset.name in name, (
        f"run name {name!r} should show the model and the dataset (flows/naming.py: run_name)")


def test_rerun_is_all_cache_hits(server, pipeline_runs):
    second = pipeline_runs.second
    assert second["state_name"] == "Completed", second["state"]
    with server.client() as api:
        _, task_runs = run_tree(api, second["id"])
    assert len(task_runs) >= 6
    not_cached = sorted(f"{t['name']}: {t['state_name']}" for t in task_runs if t["state_name"] != "Cached")
    assert not not_cached, f"an unchanged rerun recomputed: {not_cached}"


def test_trigger_fails_when_the_run_fails(server, deployed, tmp_path):
    triggered = server.cli(sys.executable, "-m", "cli.app", "trigger", "sparcom-identify/identify",
                           "--params", json.dumps({"store": str(tmp_path / "missing.zarr"),
                                                   "out_dir": str(tmp_path / "out")}),
                           "--set", "dask.n_workers=1", "--wait", "--poll", "1", "--timeout", str(RUN_SECONDS),
                           timeout=RUN_SECONDS + 60)
    assert triggered.returncode == 1, triggered.stdout + triggered.stderr
    assert "ended Failed" in triggered.stdout


def test_trigger_refuses_an_unknown_deployment_and_bad_parameters(server, deployed):
    unknown = server.cli(sys.executable, "-m", "cli.app", "trigger", "sparcom-pipeline/nonexistent")
    assert unknown.returncode == 2
    assert "no deployment 'sparcom-pipeline/nonexistent'" in unknown.stderr
    out_of_range = server.cli(sys.executable, "-m", "cli.app", "trigger", PIPELINE,
                              "--set", "settings.identification.epsilon=7")
    assert out_of_range.returncode == 2, out_of_range.stdout + out_of_range.stderr
    assert "refused the parameters" in out_of_range.stderr and "7" in out_of_range.stderr


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--window-size=1400,1000"]


@pytest.fixture
def browser(tmp_path):
    if webdriver is None:
        pytest.skip("selenium is not installed (it comes with `pip install -e .[test]`)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium needs the Debian packages chromium and chromium-driver "
                    "(.ci/run installs them where apt-get works)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def page_showing(browser, url: str, *texts: str) -> str:
    browser.get(url)

    def shown():
        body = browser.find_element(By.TAG_NAME, "body").text
        return body if all(text in body for text in texts) else None

    return wait_until(shown, UI_SECONDS, f"{url} showing {texts}")


def test_ui_shows_the_run_and_its_findings(server, pipeline_runs, browser, tmp_path_factory, capsys):
    first = pipeline_runs.first
    with server.client() as api:
        findings = model_findings(tree_artifacts(api, first["id"]), pipeline_runs.model_dir)
        producer = api.get(f"/flow_runs/{findings['flow_run_id']}").json()
    shots = tmp_path_factory.mktemp("ui-screenshots")
    page_showing(browser, f"{server.ui}/runs/flow-run/{first['id']}", first["name"], "sparcom-pipeline",
                 "Completed")
    browser.find_element(By.ID, "subflow-runs").click()  # the tab listing the run that made the findings
    wait_until(lambda: producer["name"] in browser.find_element(By.TAG_NAME, "body").text, UI_SECONDS,
               f"subflow run {producer['name']} listed on the pipeline run's page")
    browser.save_screenshot(str(shots / "pipeline-run.png"))
    page_showing(browser, f"{server.ui}/artifacts/artifact/{findings['id']}", "sparcom-findings",
                 "General neurons", producer["name"])
    browser.save_screenshot(str(shots / "findings.png"))
    with capsys.disabled():
        print(f"\nPrefect UI screenshots: {shots / 'pipeline-run.png'} and {shots / 'findings.png'}")
    failed_requests = [entry["message"] for entry in browser.get_log("browser")
                       if re.search(r"status of (422|5\d\d)", entry["message"])]
    assert not failed_requests, f"the UI's own API requests failed: {failed_requests}"
