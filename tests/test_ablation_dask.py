"""The ablation's passes on Dask and across interruptions: 2 local worker processes give the
one-process ablation.zarr (dense and MoE); a worker of two threads runs one pass at a time on its
model; a worker killed mid-stage costs only its task; a killed run resumes from its finished
passes; the per-pass key changes with what decides a pass's numbers and with nothing else;
experts offloaded by a device map are refused by name; torch never runs more threads than cores."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client
from typer.testing import CliRunner

import sparcom.ablation.ablate as ablate_module
import sparcom.intervention.response_nll as response_nll_module
from cli.app import app
from sparcom.ablation.ablate import run_ablation
from sparcom.ablation.distributed import TASK_PREFIX
from sparcom.ablation.passes import AblationPass, PassInputs, pass_key
from sparcom.ablation.schema import PASSES
from sparcom.ablation.settings import AblationSettings
from sparcom.core.settings import DaskSettings
from sparcom.core.threads import WAIT_POLICY, fit_torch_threads, wait_passively
from sparcom.extraction.settings import ExtractionSettings
from sparcom.intervention.hooks import Ablation, AblationError

from builders import HELD_OUT, SAMPLE_TEXTS, START_TIMEOUT, make_record, start_cluster, stop, tiny, write_jsonl

FAST = dict(seeds=2, resamples=50, permutations=200, max_response_tokens=None)
EXTRACTION = ExtractionSettings(max_batch_size=4, device="cpu", dtype="float32")
# Every variable that comes from a seeded draw or from the sets alone: equal exactly.
DRAWN = ("ablated_size", "mean_frequency", "control_mean_frequency")


def assert_same_ablation(got: xr.Dataset, expected: xr.Dataset) -> None:
    assert set(got.data_vars) == set(expected.data_vars)
    for name in expected.data_vars:
        if expected[name].dtype.kind in "fc" and name not in DRAWN:
            # A ratio of two deltas carries their 1e-4 differences divided by its denominator: a
            # worker's one thread sums MoE expert outputs in another order than the process's two.
            relative = 1e-3 if "ratio" in name or "specificity" in name else 0
            np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-4, rtol=relative,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)
    for name in expected.coords:
        np.testing.assert_array_equal(got[name].values, expected[name].values)


@pytest.fixture(scope="module")
def one_process(identified, cache_dir, tmp_path_factory):
    work, store, components, held_out = identified
    out = tmp_path_factory.mktemp("one-process")
    settings = AblationSettings(eval_dataset=held_out, **FAST)
    return xr.open_zarr(run_ablation(components, store, settings, EXTRACTION, cache_dir, out)).load(), settings


@pytest.fixture(scope="module")
def identified_moe(tmp_path_factory, tiny_models, cache_dir):
    """A tiny Qwen2-MoE's store and components (shared and routed experts), and held-out records."""
    from sparcom.core.models import load_model, resolve_model
    from sparcom.extraction.extract import extract_to_store
    from sparcom.identification.identify import identify_store
    from sparcom.identification.settings import IdentificationSettings

    work = tmp_path_factory.mktemp("moe-work")
    loaded = load_model(resolve_model(str(tiny_models("qwen2_moe"))), cache_dir, dtype="float32", device="cpu")
    records = [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]
    store = extract_to_store(loaded, records, work / "stores" / "moe.zarr", ExtractionSettings())
    components = identify_store(store, IdentificationSettings(epsilon=0.2), work / "runs" / "moe-run")
    held_out = write_jsonl([make_record(100 + i, *texts) for i, texts in enumerate(HELD_OUT)], work / "held.jsonl")
    return store, components, held_out


def test_pass_keys_name_what_decides_the_numbers(identified):
    records = [make_record(i, *texts) for i, texts in enumerate(HELD_OUT)]
    inputs = PassInputs(records, [], 16, 128, EXTRACTION)
    mask = np.zeros((3, 48), dtype=bool)
    mask[1, 5] = True
    key = pass_key(AblationPass.of("nll", "neurons", mask), inputs, "f" * 64, "torch.float32")
    assert key == pass_key(AblationPass.of("nll", "neurons", mask.copy()), inputs, "f" * 64, "torch.float32")
    intact = pass_key(AblationPass.of("nll", "neurons", None), inputs, "f" * 64, "torch.float32")
    assert intact == pass_key(AblationPass.of("nll", "neurons", np.zeros_like(mask)), inputs, "f" * 64, "torch.float32")
    other_set = mask.copy()
    other_set[1, 6] = True
    changed = [
        pass_key(AblationPass.of("nll", "neurons", other_set), inputs, "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask), inputs, "e" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask), PassInputs(records[1:], [], 16, 128, EXTRACTION),
                 "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask), PassInputs(records, [], 8, 128, EXTRACTION),
                 "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask), inputs, "f" * 64, "torch.bfloat16"),
        pass_key(AblationPass.of("answers", "neurons", mask), inputs, "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask.reshape(6, 24)), inputs, "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask, [0, 2]), inputs, "f" * 64, "torch.float32"),
        pass_key(AblationPass.of("nll", "neurons", mask, [0, 3]), inputs, "f" * 64, "torch.float32"),
        intact,
    ]
    assert len({key, *changed}) == len(changed) + 1
    # the records a pass measures, in any order
    assert pass_key(AblationPass.of("nll", "neurons", mask, [2, 0]), inputs, "f" * 64, "torch.float32") == changed[-3]
    with pytest.raises(ValueError, match="only NLL passes measure a part of the records"):
        AblationPass.of("answers", "neurons", mask, [0])
    # K of an NLL pass is the scored response tokens; the decoded tokens do not change it
    assert key == pass_key(AblationPass.of("nll", "neurons", mask), PassInputs(records, [], 16, 64, EXTRACTION),
                           "f" * 64, "torch.float32")


def test_a_killed_run_resumes_from_its_finished_passes(identified, cache_dir, one_process, tmp_path, monkeypatch):
    work, store, components, held_out = identified
    expected, settings = one_process
    real = ablate_module.measure_pass
    calls = []

    def killed_after_five(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the run is killed during its sixth pass
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ablate_module, "measure_pass", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path)
    assert len(list((tmp_path / PASSES).glob("*.json"))) == 5
    assert not list((tmp_path / PASSES).glob(".*"))  # nothing half-written
    distinct = len({p.set_digest() for p in ablate_module.stage_passes(
        ablate_module.plan_ablation(xr.open_zarr(components), store, settings), settings).values()})
    calls.clear()
    monkeypatch.setattr(ablate_module, "measure_pass", lambda *args: calls.append(1) or real(*args))
    resumed = xr.open_zarr(run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path)).load()
    assert len(calls) == distinct - 5
    assert_same_ablation(resumed, expected)
    calls.clear()
    run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path)
    assert calls == []  # everything finished: no model loads, no pass runs


def test_a_worker_of_two_threads_runs_one_pass_at_a_time(identified, cache_dir, one_process, tmp_path, monkeypatch):
    """Two task threads share one model: a pass that saw another's switch-off would change its NLLs."""
    work, store, components, held_out = identified
    expected, settings = one_process
    real, spans = response_nll_module.response_nll, []

    def slow_pass(*args, **kwargs):
        start = time.monotonic()
        time.sleep(0.05)  # a wide window for another thread's pass to switch its set off
        result = real(*args, **kwargs)
        spans.append((start, time.monotonic()))
        return result

    monkeypatch.setattr(response_nll_module, "response_nll", slow_pass)
    threads = torch.get_num_threads()
    try:
        with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
            done = []
            result = run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path,
                                  on_progress=lambda n, total: done.append((n, total)),
                                  dask=DaskSettings(address=client.scheduler.address))
    finally:
        torch.set_num_threads(threads)
    spans.sort()
    assert len(spans) > 10
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert_same_ablation(xr.open_zarr(result).load(), expected)
    assert [n for n, _ in done] == list(range(1, len(done) + 1)) and done[-1][0] == done[-1][1] == len(spans)


def test_experts_offloaded_by_a_device_map_are_refused_by_name(tokenizer_dir):
    from transformers import AutoTokenizer

    model = tiny("qwen2_moe", AutoTokenizer.from_pretrained(tokenizer_dir))
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.to("meta"), requires_grad=False)
    mask = np.zeros((2, 4, 16), dtype=bool)  # layers 1 and 2 are MoE layers
    mask[0, 1, 3] = True
    with pytest.raises(AblationError, match=r"layer 1 .*offloaded by the device map \(meta\)"):
        with Ablation(model, {"expert_neurons": mask}):
            pass
    mask[:] = False
    mask[1, 1, 3] = True  # a layer whose experts are in memory: switched off as before
    with Ablation(model, {"expert_neurons": mask}):
        assert float(model.model.layers[2].mlp.experts.gate_up_proj[1, 3].abs().sum()) == 0


def test_torch_threads_never_exceed_the_usable_cores(monkeypatch):
    import sparcom.core.threads

    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(sparcom.core.threads, "usable_cores", lambda: 1)
        assert fit_torch_threads(4) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(sparcom.core.threads, "usable_cores", lambda: 3)
        assert fit_torch_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    wait_passively()
    assert os.environ[WAIT_POLICY] == "PASSIVE"
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")  # the user's choice stays
    wait_passively()
    assert os.environ[WAIT_POLICY] == "ACTIVE"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_two_local_workers_give_the_one_process_result(kind, identified, identified_moe, one_process, cache_dir,
                                                      tmp_path):
    if kind == "dense":
        _, store, components, _ = identified
        expected, settings = one_process
    else:
        store, components, held_out = identified_moe
        settings = AblationSettings(eval_dataset=held_out, family="expert_neurons", **FAST)
        expected = xr.open_zarr(run_ablation(components, store, settings, EXTRACTION, cache_dir,
                                             tmp_path / "one")).load()
        assert (expected.ablated_size > 0).any()
    cluster = DaskSettings(n_workers=2, memory_limit="2GB")
    got = xr.open_zarr(run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path / "two",
                                    dask=cluster)).load()
    assert_same_ablation(got, expected)


@pytest.mark.slow
def test_a_worker_killed_mid_stage_costs_only_its_pass(identified, cache_dir, one_process, tmp_path_factory,
                                                      tmp_path):
    work, store, components, held_out = identified
    expected, settings = one_process
    address, workers, processes = start_cluster(tmp_path_factory.mktemp("dask-logs"), cache_dir)
    victim, survivor = workers
    errors, interrupted = [], []
    try:
        with Client(address, timeout=START_TIMEOUT) as client:
            def run() -> None:
                try:
                    run_ablation(components, store, settings, EXTRACTION, cache_dir, tmp_path / "killed",
                                 dask=DaskSettings(address=address))
                except BaseException as error:  # noqa: BLE001 - reported by the test thread
                    errors.append(error)

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not interrupted and thread.is_alive():
                if list((tmp_path / "killed" / PASSES).glob("*.json")):  # at least one pass finished
                    interrupted = [k for k in client.processing([victim])[victim] if k.startswith(TASK_PREFIX)]
                if not interrupted:
                    time.sleep(0.005)
            workers[victim].kill()
            thread.join(timeout=600)
            assert not errors, errors
            assert interrupted, "the victim ran no pass while others had finished"
            assert_same_ablation(xr.open_zarr(tmp_path / "killed" / "ablation.zarr").load(), expected)

            result = CliRunner().invoke(app, [  # the command line on the cluster's surviving worker
                "ablate", "--components", str(components.parent), "--eval-dataset", str(held_out),
                "--out", str(tmp_path / "cli"), "--seeds", "2", "--dask-address", address],
                env={"XDG_CACHE_HOME": str(cache_dir.parent)})
            assert result.exit_code == 0, result.output
            assert list(client.scheduler_info()["workers"]) == [survivor]
    finally:
        for process in reversed(processes):
            stop(process)
    assert len(list((tmp_path / "cli" / PASSES).glob("*.json"))) == len(list((tmp_path / "killed" / PASSES).glob("*.json")))
