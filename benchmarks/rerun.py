"""What a rerun costs: `sparcom run` on the default model, then three reruns, each its own process.

    python benchmarks/rerun.py [--work-dir DIR] [--model default] [--no-compare]

Prints the wall time of a first run (empty work folder and Prefect result storage), an
unchanged rerun (every stage should be a cache hit), a rerun with a new selection threshold
(identification onwards recomputes), and a rerun with 10 added instructions (only those are
counted), with the state of every task run. Each run is a new `sparcom run` process, as a user
starts it, so the times include process start, imports and Prefect's temporary server (when no
PREFECT_API_URL is set); the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--model", default="default")
    parser.add_argument("--no-compare", action="store_true", help="without the fine-tune comparison")
    args = parser.parse_args()
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="sparcom-rerun-"))).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # Isolated results and history; a loaded machine may take long to bring the temporary server up.
    env = {**os.environ, "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(work_dir / "prefect")),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    os.environ.update(env)

    from sparcom.curation.hexainst import authored_records
    from sparcom.curation.starter import starter_set

    starter = starter_set()
    extra = [r for r in authored_records() if r not in starter][:10]
    grown = work_dir / "starter-plus-10.jsonl"
    grown.write_text("".join(r.model_dump_json() + "\n" for r in starter + extra))
    base = ["--model", args.model, "--work-dir", str(work_dir / "work")] + (["--no-compare"] if args.no_compare else [])
    runs = [
        ("first run", base),
        ("unchanged rerun", base),
        ("new threshold (epsilon 0.02)", base + ["--epsilon", "0.02"]),
        ("10 added instructions", base + ["--dataset", str(grown)]),
    ]
    rows = []
    for label, options in runs:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli.app", "run", *options], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        rows.append((label, time.perf_counter() - start, os.getloadavg()[0]))
    states = pipeline_task_states()
    first = rows[0][1]
    print(f"work folder {work_dir}")
    print(f"{'run':<32}{'seconds':>9}{'of first':>10}{'load':>6}  task states")
    for (label, seconds, load), counts in zip(rows, states + [{}] * (len(rows) - len(states))):
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"{label:<32}{seconds:>9.1f}{seconds / first:>10.1%}{load:>6.1f}  {summary}")


def pipeline_task_states() -> list[dict[str, int]]:
    """State counts of every pipeline run in this Prefect history, oldest first."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from cli.runs import state_counts, task_run_states

    async def pipeline_runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sparcom-pipeline"])),
                                               sort=FlowRunSort.START_TIME_ASC)

    return [dict(state_counts(task_run_states(run.id))) for run in asyncio.run(pipeline_runs())]


if __name__ == "__main__":
    main()
