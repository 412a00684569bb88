"""Prefect's temporary server, booting while the rest of the program loads, and ending with it.

- `temporary_server_early()`: with no server configured (PREFECT_API_URL unset), starts the
  temporary server that Prefect would otherwise start at the first flow run, from a thread, so
  that its process boots while this one imports the pipeline; returns a function that waits
  until it answers (call it after importing the flows: it also filters Prefect's logging, set
  up by then). With a server configured, nothing starts and the function returns at once.
  Either way SIGTERM ends this process as Ctrl-C does (`sparcom.core.children.stop_on_signals`):
  the Dask cluster is closed and the server stopped; and the server also ends when this process
  is killed outright (`end_with_this_process`), never left running re-parented to init. Flows'
  logs of bad input (reported as one line at the end) lose their tracebacks.

    ready = temporary_server_early()
    from flows.pipeline import sparcom_pipeline   # heavy imports, the server boots meanwhile
    ready()

Prefect's server telemetry is off unless PREFECT_SERVER_ANALYTICS_ENABLED says otherwise
(`cli.app` sets the default): offline, its heartbeat logs an ERROR line and a traceback on
every run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefect.settings import PREFECT_API_URL

from cli.errors import hide_bad_input_tracebacks
from sparcom.core.children import end_with_this_process, stop_on_signals


def temporary_server_early() -> Callable[[], None]:
    stop_on_signals()
    if PREFECT_API_URL.value():
        return hide_bad_input_tracebacks
    # Imported here, not in the thread: two threads importing one package can meet half-initialised modules.
    from prefect.server.api.server import SubprocessASGIServer

    # The same instance Prefect's client takes; its start() is a no-op once the server runs, and
    # after a failure here the client's own start() tries again and reports the error.
    server = SubprocessASGIServer()
    start_process = server._run_uvicorn_command  # its one place that starts the server's process

    def started_and_guarded():
        process = start_process()
        end_with_this_process(process.pid)
        return process

    server._run_uvicorn_command = started_and_guarded
    thread = threading.Thread(target=server.start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def ready() -> None:
        thread.join()
        hide_bad_input_tracebacks()  # Prefect's logging is set up once the flows are imported

    return ready
