"""`sparcom run` ends cleanly: a successful run prints no ERROR line and no traceback, and a run
ended by SIGTERM, SIGINT or SIGKILL leaves none of its processes behind (its temporary Prefect
server, its Dask cluster)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PATIENCE = 600  # seconds: generous, a busy two-core machine starts servers and clusters slowly


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry.name)] = (int(stat[1]), stat[19], command)
    return table


def descendants(root: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line of every process below `root`."""
    table = process_table()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, command) in table.items():
            if ppid == parent and (pid, start) not in found:
                found[pid, start] = command
                frontier.append(pid)
    return found


def still_running(processes: dict[tuple[int, str], str]) -> list[str]:
    table = process_table()
    return [command for (pid, start), command in processes.items()
            if pid in table and table[pid][1] == start and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def run_command(tmp_path, tiny_llama_dir, sample_records):
    """The default command line path, as cheap as it gets: a tiny model, twelve records, no
    fine-tune, no ablation, no split-half seeds; its own Prefect home and caches."""
    dataset = write_jsonl(sample_records, tmp_path / "d.jsonl")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
    command = [sys.executable, "-m", "cli.app", "run", "--model", str(tiny_llama_dir), "--dataset", str(dataset),
               "--work-dir", str(tmp_path / "work"), "--no-compare", "--no-ablate", "--split-half-seeds", "0"]
    return command, env


@pytest.mark.slow  # a whole run: Prefect's temporary server, a Dask cluster
def test_a_successful_run_prints_no_error_and_no_traceback(run_command):
    command, env = run_command
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Results are in" in log
    assert "Traceback" not in log, log
    assert not [line for line in log.splitlines() if re.search(r"\bERROR\b", line)], log


@pytest.mark.slow  # a whole run: Prefect's temporary server, a Dask cluster
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_an_ended_run_leaves_no_process_behind(run_command, how):
    command, env = run_command
    run = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[tuple[int, str], str] = {}
    deadline = time.monotonic() + PATIENCE
    try:
        while run.poll() is None and time.monotonic() < deadline:
            seen.update(descendants(run.pid))
            commands = " | ".join(still_running(seen))
            if "uvicorn" in commands and "spawn_main" in commands:  # the server and the cluster's workers
                break
            time.sleep(0.1)
        assert run.poll() is None, f"the run ended before its server and cluster were seen: {list(seen.values())}"
        seen.update(descendants(run.pid))
        run.send_signal(how)
        run.wait(timeout=PATIENCE)
        deadline = time.monotonic() + 120
        while still_running(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert still_running(seen) == []
    finally:
        run.kill()
        for pid, _ in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
