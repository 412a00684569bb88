"""Plain HTTP calls to a Prefect server that survive a busy one, for the tests that talk to the
API as another CI system would (Prefect's own client already does this).

- `RETRIED_STATUS`: 429, 502 and 503, the answers Prefect's client retries
  (`PREFECT_CLIENT_RETRY_EXTRA_CODES` adds to them there); a busy SQLite server answers 503.
- `RetryingTransport(retries)`: an httpx transport that retries those answers and dropped
  connections with exponential backoff and jitter (1, 2, 4, ... s, capped at 30 s, +-20%; a
  `Retry-After` header is honoured), as Prefect's client does.
- `api_client(base_url)`: an `httpx.Client` on that transport.
"""

from __future__ import annotations

import random
import time

import httpx

RETRIED_STATUS = frozenset({429, 502, 503})
RETRIED_ERRORS = (httpx.ConnectError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout,
                  httpx.RemoteProtocolError, httpx.ReadError)
MAX_WAIT_SECONDS = 30.0
JITTER = 0.2  # Prefect's PREFECT_CLIENT_RETRY_JITTER_FACTOR default


class RetryingTransport(httpx.HTTPTransport):
    def __init__(self, retries: int = 8, sleep=time.sleep, **options):
        super().__init__(**options)
        self.retries, self.sleep = retries, sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = super().handle_request(request)
            except RETRIED_ERRORS:
                if last:
                    raise
                self.sleep(backoff_seconds(attempt))
                continue
            if response.status_code not in RETRIED_STATUS or last:
                return response
            response.read()
            response.close()
            self.sleep(backoff_seconds(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")


def backoff_seconds(attempt: int, retry_after: str | None = None) -> float:
    if retry_after and retry_after.replace(".", "", 1).isdigit():
        return min(float(retry_after), MAX_WAIT_SECONDS)
    return min(2.0 ** attempt, MAX_WAIT_SECONDS) * random.uniform(1 - JITTER, 1 + JITTER)


def api_client(base_url: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=timeout, transport=RetryingTransport())
