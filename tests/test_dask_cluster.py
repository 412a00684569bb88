"""Identification on real Dask clusters: a `dask scheduler` and a `dask worker` started as
processes on 127.0.0.1, and the local cluster; the components and the report computed there
are checked against plain NumPy on the store and set arithmetic on the selected sets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client, get_task_stream
from typer.testing import CliRunner

from cli.app import app
from sparcom.core.cluster import dask_cluster
from sparcom.core.settings import DaskSettings
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify_store
from sparcom.identification.report import report_generality

from builders import CATEGORIES, DASK, START_TIMEOUT, free_port, moe_store, stop, write_store
from references import assert_components_match, assert_summary_matches_sets, naive_generality


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    """tcp://127.0.0.1:PORT of a scheduler with one worker, both separate processes."""
    address = f"tcp://127.0.0.1:{free_port()}"
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = []
    try:
        processes.append(subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--no-dashboard", "--no-show"],
            stdout=subprocess.DEVNULL, stderr=(logs / "scheduler.log").open("w"), env=env))
        processes.append(subprocess.Popen(
            [DASK, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "2",
             "--memory-limit", "2GB", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=(logs / "worker.log").open("w"), env=env))
        with Client(address, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(1, timeout=START_TIMEOUT)
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return write_store(moe_store(31, CATEGORIES, experts=5), tmp_path_factory.mktemp("store") / "s.zarr")


def run_identification(store: Path, out: Path, settings: IdentificationSettings) -> tuple[xr.Dataset, dict]:
    components = identify_store(store, settings, out)
    return xr.open_zarr(components).load(), report_generality(components, out)


def assert_right_results(results: tuple[xr.Dataset, dict], store: Path, settings: IdentificationSettings) -> None:
    components, summary = results
    assert_components_match(components, xr.open_zarr(store).load(), settings)
    assert_summary_matches_sets(summary, components)


@pytest.mark.slow
@pytest.mark.parametrize("group_by", ["category", "instruction"])
def test_external_scheduler_and_worker(scheduler_address, moe_path, tmp_path, group_by):
    settings = IdentificationSettings(epsilon=0.1, group_by=group_by)
    with dask_cluster(DaskSettings(address=scheduler_address)) as client:
        with get_task_stream(client) as stream:
            on_cluster = run_identification(moe_path, tmp_path / "cluster", settings)
    assert len(stream.data) > 0  # the worker did the work
    assert client.status == "closed"
    assert_right_results(on_cluster, moe_path, settings)
    with Client(scheduler_address, timeout=10) as still_there:  # a borrowed scheduler stays up
        assert len(still_there.scheduler_info()["workers"]) == 1


@pytest.mark.slow
def test_report_plots_drawn_on_the_worker_are_the_plots_drawn_here(scheduler_address, moe_path, tmp_path):
    """The worker (another process, two threads) draws the report's plots; the images are the
    ones this process draws from the same components."""
    components = identify_store(moe_path, IdentificationSettings(epsilon=0.1), tmp_path / "run")
    here = report_generality(components, tmp_path / "here")["files"]
    with dask_cluster(DaskSettings(address=scheduler_address)) as client:
        with get_task_stream(client) as stream:
            there = report_generality(components, tmp_path / "there")["files"]
    plots = sorted(name for name in here if name.endswith(".png"))
    assert {"experts.png", "jaccard.png", "layers.png"} <= set(plots)
    assert sorted(task["key"].rsplit("-", 1)[0].removeprefix("sparcom-plot-") for task in stream.data
                  if task["key"].startswith("sparcom-plot-")) == plots
    for name in plots:
        assert Path(there[name]).read_bytes() == Path(here[name]).read_bytes(), name


@pytest.mark.slow
def test_local_cluster_is_sized_and_always_closed(moe_path, tmp_path):
    settings = IdentificationSettings(rule="layer_percentile", epsilon=0.2)
    with pytest.raises(RuntimeError, match="boom"):
        with dask_cluster(DaskSettings(n_workers=2, memory_limit="1GB")) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            on_cluster = run_identification(moe_path, tmp_path / "cluster", settings)
            cluster = client.cluster
            raise RuntimeError("boom")
    assert client.status == "closed" and cluster.status.name == "closed"
    assert_right_results(on_cluster, moe_path, settings)


def test_unreachable_scheduler_is_a_clear_error():
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Dask scheduler answers at {address}"):
        with dask_cluster(DaskSettings(address=address), connect_timeout="2s"):
            pass
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_cli_identify_on_the_external_scheduler(scheduler_address, moe_path, tmp_path):
    result = CliRunner().invoke(app, ["identify", "--store", str(moe_path), "--out", str(tmp_path / "out"),
                                      "--epsilon", "0.1", "--dask-address", scheduler_address])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["epsilon"] == 0.1 and "General experts" in result.output
    components = xr.open_zarr(tmp_path / "out" / "components.zarr").load()
    assert_right_results((components, summary), moe_path, IdentificationSettings(epsilon=0.1))


@pytest.mark.slow
def test_identify_flow_on_the_external_scheduler(prefect_harness, scheduler_address, moe_path, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.identify import identify_components

    [summary] = identify_components(moe_path, tmp_path / "out", IdentificationSettings(epsilon=0.1),
                                    DaskSettings(address=scheduler_address)).values()  # {rule: summary}
    assert summary["rule"] == "global_percentile" and Path(summary["files"]["experts.png"]).is_file()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                    any_=["sparcom-findings", "sparcom-experts-sets", "sparcom-experts-jaccard"])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                limit=10, sort=ArtifactSort.CREATED_DESC)

    found = {}
    for artifact in asyncio.run(artifacts()):  # newest first
        found.setdefault(artifact.key, artifact)
    assert set(found) == {"sparcom-findings", "sparcom-experts-sets", "sparcom-experts-jaccard"}
    components = xr.open_zarr(tmp_path / "out" / "components.zarr").load()
    groups = [str(g) for g in components.group.values]
    sets = {g: {tuple(ix) for ix in np.argwhere(components.ise.sel(group=g).values)} for g in groups}
    jaccard = naive_generality(sets)["jaccard"]
    rows = json.loads(found["sparcom-experts-sets"].data)
    assert {r["group"]: r["set size"] for r in rows} == {g: len(sets[g]) for g in groups}
    for row in json.loads(found["sparcom-experts-jaccard"].data):
        for other in groups:
            expected = jaccard[row["group"], other]
            assert row[other] == (None if expected is None else round(expected, 4)), (row["group"], other)
