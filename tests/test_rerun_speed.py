"""What a cached rerun does not pay for: stage code versions are read from the source files
without importing the stages (tests/test_provenance.py checks what they hash), the report modules load only when their task runs, and with a
Prefect server configured no temporary one is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path



def test_keys_and_cached_tasks_load_no_plotting_or_stage_code():
    code = ("import sys; from sparcom.stages import STAGES; import tasks.generality, tasks.comparison; "
            "[STAGES[s].version() for s in ('analyse', 'compare', 'finetune')]; "
            "print(sorted(m for m in ('matplotlib', 'sparcom.identification.report', 'sparcom.comparison.report', 'sparcom.comparison.finetune') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parents[1], check=True)
    assert result.stdout.strip() == "[]"


def test_no_temporary_server_when_one_is_configured(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cli.server import temporary_server_early

    starts = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: starts.append(self))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        temporary_server_early()()
    assert starts == []
    with temporary_settings({PREFECT_API_URL: None}):
        temporary_server_early()()
    assert len(starts) == 1  # without one, the temporary server Prefect's client would start
