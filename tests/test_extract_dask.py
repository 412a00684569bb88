"""Extraction on Dask: a real scheduler and worker processes fill one store that equals the naive
per-record reference; a killed worker's shard is redone; a model split by a device map counts the
same; bad input (no scheduler, no GPU worker, a missing device) fails clearly, writing nothing."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from transformers import AutoConfig
from typer.testing import CliRunner

from cli.app import app
from sparcom.core.cluster import GPU_RESOURCE, gpu_cluster_spec
from sparcom.core.settings import DaskSettings
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.distributed import (
    FILLERS, TASKS_PER_WORKER, ClusterError, extract_on_cluster, shard_tasks, task_shards, worker_model,
)
from sparcom.extraction.extract import SORT_WINDOW_SHARDS, extract_to_store
from sparcom.core.models import ModelLoadError, load_model, resolve_model
from sparcom.extraction.store import PROGRESS, finished_shards, is_complete, open_store, shard_count, store_attrs

from builders import START_TIMEOUT, free_port, make_record, start_cluster, stop
from references import llama_hooked_modules, naive_store

# float64 counts do not depend on batching, so every split of the work gives the naive counts.
SETTINGS = ExtractionSettings(dtype="float64", device="cpu", shard_size=4)


@pytest.fixture(scope="module")
def records():
    return [make_record(i, category, f"Question {i}: explain topic {i % 13} " * (1 + i % 4))
            for i, category in enumerate(["CLS", "CODE", "QA", "GEN", "MATH", "SUM"] * 8)]


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, records):
    return naive_store(tiny_llama_dir, torch.float64, records, "prompt")


def assert_naive_counts(store: Path, expected) -> None:
    counts, tokens = expected
    dataset = open_store(store)
    np.testing.assert_array_equal(dataset.token_count.values, tokens)
    np.testing.assert_array_equal(dataset.act_count.values, counts)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, cache_dir):
    address, _, processes = start_cluster(tmp_path_factory.mktemp("dask-logs"), cache_dir)
    try:
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.mark.slow
def test_two_worker_processes_fill_one_store_with_the_naive_counts(
    two_workers, tiny_llama_dir, cache_dir, records, expected, tmp_path
):
    store = tmp_path / "s.zarr"
    with Client(two_workers, timeout=START_TIMEOUT) as client:
        done = []
        extract_on_cluster(client, ModelSettings(name=str(tiny_llama_dir)), records, store, SETTINGS, {},
                           cache_dir, on_progress=lambda n, total: done.append((n, total)))
        workers = set(client.scheduler_info()["workers"])
    assert is_complete(store)
    assert_naive_counts(store, expected)
    fillers = zarr.open_group(store, mode="r").attrs[FILLERS]
    assert sorted(map(int, fillers)) == list(range(shard_count(len(records), SETTINGS.shard_size)))
    assert {f["worker"] for f in fillers.values()} == workers  # both workers took shards
    assert {f["model_loads"] for f in fillers.values()} == {1}  # each loaded the model once
    assert {tuple(f["devices"]) for f in fillers.values()} == {("cpu",)}
    # Progress comes per task (12 shards on 2 workers: tasks of 3, 3, 2, 1, 1, 1, 1 shards).
    assert done[-1] == (len(records), len(records)) and len(done) == 7
    assert [n for n, _ in done] == sorted(n for n, _ in done)

    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in records))
    config = tmp_path / "settings.yaml"
    config.write_text("extraction: {dtype: float64, device: cpu, shard_size: 4}\n")
    result = CliRunner().invoke(app, [
        "extract", "--model", str(tiny_llama_dir), "--dataset", str(dataset), "--out", str(tmp_path / "cli.zarr"),
        "--config", str(config), "--dask-address", two_workers], env={"XDG_CACHE_HOME": str(cache_dir.parent)})
    assert result.exit_code == 0, result.output
    assert "complete" in result.output
    assert_naive_counts(tmp_path / "cli.zarr", expected)


@pytest.mark.slow
def test_a_worker_killed_mid_run_has_its_shard_redone(tmp_path_factory, tiny_llama_dir, cache_dir, expected,
                                                     records, tmp_path):
    address, workers, processes = start_cluster(tmp_path_factory.mktemp("dask-logs"), cache_dir)
    victim, survivor = workers
    store = tmp_path / "s.zarr"
    settings = SETTINGS.model_copy(update={"shard_size": 1})  # many short shards: the kill lands mid-run
    errors = []
    try:
        with Client(address, timeout=START_TIMEOUT) as client:
            def run() -> None:
                try:
                    extract_on_cluster(client, ModelSettings(name=str(tiny_llama_dir)), records, store, settings,
                                       {}, cache_dir)
                except BaseException as error:  # noqa: BLE001 - reported by the test thread
                    errors.append(error)

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 300
            interrupted: list[int] = []
            while time.monotonic() < deadline and not interrupted:
                if (store / "zarr.json").is_file() and len(finished_shards(store)) >= 4:
                    interrupted = [shard for k in client.processing([victim])[victim]
                                   if k.startswith("sparcom-shards-") for shard in task_shards(k)]
                if not interrupted:
                    time.sleep(0.01)
            workers[victim].kill()
            thread.join(timeout=600)
    finally:
        for process in reversed(processes):
            stop(process)
    assert not errors, errors
    assert interrupted
    assert is_complete(store)
    assert_naive_counts(store, expected)
    fillers = zarr.open_group(store, mode="r").attrs[FILLERS]
    assert any(fillers[str(shard)]["worker"] == survivor for shard in interrupted)


def test_a_half_written_shard_is_rewritten_and_a_finished_one_kept(tiny_llama_dir, cache_dir, records, expected,
                                                                    tmp_path):
    """What a retried shard meets: garbage without a done flag (its worker died while writing),
    or a done flag (its worker died after writing)."""
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu")
    store = extract_to_store(loaded, records, tmp_path / "s.zarr", SETTINGS, shards=[0], finalize=False)
    group = zarr.open_group(store, mode="r+")
    group["act_count"][4:8] = 7  # shard 1 half-written, flag unset
    assert list(group[PROGRESS][:2]) == [1, 0]
    first = (store / "act_count" / "c" / "0" / "0" / "0").stat().st_mtime_ns
    extract_to_store(loaded, records, store, SETTINGS, shards=[0, 1])
    assert (store / "act_count" / "c" / "0" / "0" / "0").stat().st_mtime_ns == first
    extract_to_store(loaded, records, store, SETTINGS)
    assert_naive_counts(store, expected)


@pytest.fixture(scope="module")
def threads_client():
    """An in-process cluster of one worker thread: the cluster logic without process start-up."""
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        yield client


def test_in_process_cluster_counts_and_keeps_one_model(threads_client, tiny_llama_dir, cache_dir, records,
                                                        expected, tmp_path):
    model = ModelSettings(name=str(tiny_llama_dir))
    store = extract_on_cluster(threads_client, model, records, tmp_path / "s.zarr", SETTINGS, {}, cache_dir,
                               shards=[0, 2])
    assert not is_complete(store) and finished_shards(store) == {0, 2}
    extract_on_cluster(threads_client, model, records, store, SETTINGS, {}, cache_dir)
    assert_naive_counts(store, expected)
    assert store_attrs(store)["hooked_modules"] == llama_hooked_modules(AutoConfig.from_pretrained(tiny_llama_dir))
    from sparcom.extraction.distributed import _model_lock

    with _model_lock:
        first = worker_model(model, SETTINGS, cache_dir)
        assert worker_model(model, SETTINGS, cache_dir) is first
        other = worker_model(model, SETTINGS.model_copy(update={"dtype": "float32"}), cache_dir)
        assert other is not first and other.dtype == torch.float32


def test_tasks_run_costliest_first_and_shrink_to_single_shards(threads_client, tiny_llama_dir, cache_dir, records,
                                                           tmp_path):
    from distributed import get_task_stream

    lengths = [len(f"{r.instruction}\n\n{r.input}" if r.input else r.instruction) for r in records]
    per_shard = [sum(lengths[i:i + SETTINGS.shard_size]) for i in range(0, len(records), SETTINGS.shard_size)]
    with get_task_stream(threads_client) as stream:
        extract_on_cluster(threads_client, ModelSettings(name=str(tiny_llama_dir)), records, tmp_path / "s.zarr",
                           SETTINGS, {}, cache_dir)
    started = sorted((task["startstops"][0]["start"], task["key"]) for task in stream.data
                     if task["key"].startswith("sparcom-shards-"))
    ran = [task_shards(key) for _, key in started]
    assert [len(task) for task in ran] == [6, 3, 2, 1]  # one worker, 12 shards: half of those left
    assert sorted(s for task in ran for s in task) == list(range(len(per_shard)))
    costs = [sum(per_shard[s] for s in task) for task in ran]
    assert costs == sorted(costs, reverse=True)
    assert per_shard[ran[-1][0]] == min(per_shard)  # the cheapest shard alone, last


def test_shard_tasks_known_answers():
    # Costliest shards first, each task half of those left (one worker): 3 of 6, 2 of 3, 1 of 1.
    assert shard_tasks({0: 10, 1: 9, 2: 8, 3: 1, 4: 1, 5: 1}, workers=1) == [[0, 1, 2], [3, 4], [5]]
    assert shard_tasks({7: 5}, workers=4) == [[7]]
    assert shard_tasks({}, workers=2) == []
    # At most SORT_WINDOW_SHARDS per task: 20 alike shards (ties in shard order) on one worker.
    assert shard_tasks(dict.fromkeys(range(20), 3), workers=1) == [
        list(range(8)), list(range(8, 14)), [14, 15, 16], [17, 18], [19]]


def test_shard_tasks_cover_every_shard_once_costliest_first_ending_in_single_shards():
    rng = np.random.default_rng(0)
    for n_shards, workers in [(3, 2), (10, 2), (38, 8), (200, 3), (1000, 16)]:
        costs = dict(zip(rng.permutation(n_shards * 2)[:n_shards].tolist(),
                         rng.integers(100, 5000, n_shards).tolist()))
        tasks = shard_tasks(costs, workers)
        assert sorted(s for task in tasks for s in task) == sorted(costs)
        assert all(task == sorted(task) and 0 < len(task) <= SORT_WINDOW_SHARDS for task in tasks)
        sizes = [len(task) for task in tasks]
        assert sizes == sorted(sizes, reverse=True)
        totals = [sum(costs[s] for s in task) for task in tasks]
        assert totals == sorted(totals, reverse=True)
        # The last shards, one per task, are the cheapest ones: whichever worker is free takes them.
        # (Tasks are single once at most TASKS_PER_WORKER x workers shards are left; the step
        # before leaves at least one fewer.)
        last = min(n_shards, TASKS_PER_WORKER * workers - 1)
        assert sizes[-last:] == [1] * last
        assert sorted(costs[task[0]] for task in tasks[-last:]) == sorted(costs.values())[:last]


def test_task_keys_name_their_shards():
    assert task_shards("sparcom-shards-0123456789ab-3_7_12") == [3, 7, 12]
    with pytest.raises(ValueError, match="not an extraction task"):
        task_shards("sparcom-load-tcp://127.0.0.1:1")


def test_no_worker_with_the_gpu_resource_is_a_clear_error(threads_client, tiny_llama_dir, cache_dir, records,
                                                           tmp_path):
    with pytest.raises(ClusterError, match="no worker .* offers the resources GPU=1"):
        extract_on_cluster(threads_client, ModelSettings(name=str(tiny_llama_dir)), records, tmp_path / "s.zarr",
                           SETTINGS, {GPU_RESOURCE: 1}, cache_dir)
    assert not (tmp_path / "s.zarr").exists()


def test_a_device_map_naming_a_missing_device_is_refused_before_loading(
    threads_client, tiny_llama_dir, cache_dir, records, tmp_path
):
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ModelLoadError, match=f"model.device_map: device '{missing}' does not exist"):
        load_model(resolve_model(str(tiny_llama_dir)), cache_dir, device_map={"": missing})
    with pytest.raises(ModelLoadError, match="does not exist"):
        extract_on_cluster(threads_client, ModelSettings(name=str(tiny_llama_dir), device_map={"": missing}),
                           records, tmp_path / "s.zarr", SETTINGS, {}, cache_dir)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in records))
    result = CliRunner().invoke(app, ["extract", "--model", str(tiny_llama_dir), "--dataset", str(dataset),
                                      "--out", str(tmp_path / "s.zarr"), "--device-map", json.dumps({"": missing})])
    assert result.exit_code == 2 and f"device '{missing}' does not exist" in result.output
    with pytest.raises(ModelLoadError, match="'gpu7' is not a device"):
        load_model(resolve_model(str(tiny_llama_dir)), cache_dir, device_map={"model.layers.0": "gpu7"})
    assert not (tmp_path / "s.zarr").exists()


def test_a_model_split_by_a_device_map_counts_like_one_device(tiny_llama_dir, cache_dir, records, expected,
                                                              tmp_path):
    """CPU has one device, so the split is CPU and disk: accelerate dispatches the model with its
    hooks, and the disk layer's weights are brought in for its forward pass, as on a real split."""
    parts = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
             "model.rotary_emb", "lm_head"]
    device_map = {part: "disk" if part == "model.layers.1" else "cpu" for part in parts}
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu",
                        device_map=device_map)
    assert loaded.model.hf_device_map == device_map and loaded.device == torch.device("cpu")
    assert hasattr(loaded.model.model.layers[1], "_hf_hook")  # dispatched by accelerate
    assert loaded.model.model.layers[1].mlp.gate_proj.weight.device.type == "meta"  # on disk
    store = extract_to_store(loaded, records, tmp_path / "s.zarr", SETTINGS)
    assert_naive_counts(store, expected)
    assert open_store(store).attrs["devices"] == ["cpu", "disk"]


def test_unreachable_scheduler_is_a_clear_error_and_writes_nothing(tiny_llama_dir, records, tmp_path):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in records))
    address = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "settings.yaml"
    config.write_text("dask: {connect_timeout: 2s}\n")
    result = CliRunner().invoke(app, ["extract", "--model", str(tiny_llama_dir), "--dataset", str(dataset),
                                      "--out", str(tmp_path / "s.zarr"), "--dask-address", address,
                                      "--config", str(config)])
    assert result.exit_code == 2 and f"no Dask scheduler answers at {address}" in result.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_the_local_gpu_cluster_pins_one_device_per_worker():
    """The spec of the local GPU cluster, started here on CPU: each worker sees only its device."""
    from distributed import SpecCluster

    scheduler, workers = gpu_cluster_spec(["0", "1"], DaskSettings(memory_limit="1GB"))
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=START_TIMEOUT)
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        info = client.scheduler_info()["workers"]
    assert sorted(seen.values()) == ["0", "1"]
    assert all(w["resources"] == {GPU_RESOURCE: 1} for w in info.values())


@pytest.mark.slow
def test_local_extraction_workers_keep_the_adaptive_allocator_and_identification_workers_trim():
    from sparcom.core.cluster import dask_cluster, extraction_cluster

    def trim_threshold():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_")

    settings = DaskSettings(n_workers=1, memory_limit="1GB")
    seen = []
    for cluster in (extraction_cluster, dask_cluster, extraction_cluster):  # the second nanny set it here
        with cluster(settings) as client:
            seen.append(set(client.run(trim_threshold).values()))
    assert seen == [{None}, {"65536"}, {None}]  # 65536: Dask's default, which identification keeps
