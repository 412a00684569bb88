"""Prefect's temporary server, booting while the rest of the program loads.

- `temporary_server_early()`: with no server configured (PREFECT_API_URL unset), starts the
  temporary server that Prefect would otherwise start at the first flow run, from a thread, so
  that its process boots while this one imports the pipeline; returns a function that waits
  until it answers. With a server configured, nothing starts and the function returns at once.

    ready = temporary_server_early()
    from flows.pipeline import sparcom_pipeline   # heavy imports, the server boots meanwhile
    ready()
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefect.settings import PREFECT_API_URL


def temporary_server_early() -> Callable[[], None]:
    if PREFECT_API_URL.value():
        return lambda: None
    # Imported here, not in the thread: two threads importing one package can meet half-initialised modules.
    from prefect.server.api.server import SubprocessASGIServer

    # The same instance Prefect's client takes; its start() is a no-op once the server runs, and
    # after a failure here the client's own start() tries again and reports the error.
    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread.join
