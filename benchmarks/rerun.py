"""What a rerun costs: the pipeline on the default model, then three reruns.

    python benchmarks/rerun.py [--work-dir DIR] [--model default]

Prints the wall time of a first run (empty work folder and Prefect result storage), an
unchanged rerun (every stage should be a cache hit), a rerun with a new selection threshold
(identification onwards recomputes), and a rerun with 10 added instructions (only those are
counted), with the state of every task run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="sparcom-rerun-"))).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # Prefect reads its settings at import: isolate results and history before importing it.
    os.environ.setdefault("PREFECT_HOME", str(work_dir / "prefect"))

    from flows.pipeline import sparcom_pipeline
    from cli.runs import state_counts, task_run_states
    from sparcom.config import load_settings
    from sparcom.hexainst import authored_records, starter_set

    starter = starter_set()
    extra = [r for r in authored_records() if r not in starter][:10]
    grown = work_dir / "starter-plus-10.jsonl"
    grown.write_text("".join(r.model_dump_json() + "\n" for r in starter + extra))
    base = {"model.name": args.model, "work_dir": str(work_dir / "work")}
    runs = [
        ("first run", base),
        ("unchanged rerun", base),
        ("new threshold (epsilon 0.02)", {**base, "identification.epsilon": 0.02}),
        ("10 added instructions", {**base, "dataset.path": str(grown)}),
    ]
    rows = []
    for label, overrides in runs:
        start = time.perf_counter()
        state = sparcom_pipeline(load_settings(None, overrides), return_state=True)
        seconds = time.perf_counter() - start
        rows.append((label, seconds, state_counts(task_run_states(state.state_details.flow_run_id))))
    first = rows[0][1]
    print(f"work folder {work_dir}")
    print(f"{'run':<32}{'seconds':>9}{'of first':>10}  task states")
    for label, seconds, states in rows:
        summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        print(f"{label:<32}{seconds:>9.1f}{seconds / first:>10.1%}  {summary}")


if __name__ == "__main__":
    main()
