"""The retrying HTTP transport of the API tests, against a stand-in server that is busy at first."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from prefect_api import RetryingTransport, backoff_seconds


@pytest.fixture
def busy_server():
    """127.0.0.1 on a free port: the first `busy` requests are answered with the given status."""
    state = {"busy": 0, "status": 503, "seen": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["seen"].append(body)
            if len(state["seen"]) <= state["busy"]:
                self.send_response(state["status"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(201)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [429, 502, 503])
def test_busy_answers_are_retried_with_the_same_body(busy_server, status):
    url, state = busy_server
    state.update(busy=3, status=status)
    waits = []
    with httpx.Client(transport=RetryingTransport(retries=5, sleep=waits.append)) as client:
        response = client.post(f"{url}/deployments/x/create_flow_run", json={"parameters": {"a": 1}})
    assert response.status_code == 201 and response.json() == {"parameters": {"a": 1}}
    assert len(state["seen"]) == 4 and len(set(state["seen"])) == 1
    assert len(waits) == 3 and waits[0] < waits[1] < waits[2]  # 1, 2, 4 s give or take 20%


def test_other_answers_and_exhausted_retries_come_back(busy_server):
    url, state = busy_server
    state.update(busy=10, status=422)
    with httpx.Client(transport=RetryingTransport(retries=5, sleep=lambda s: None)) as client:
        assert client.post(url, json={}).status_code == 422 and len(state["seen"]) == 1
    state.update(busy=10, status=503, seen=[])
    with httpx.Client(transport=RetryingTransport(retries=2, sleep=lambda s: None)) as client:
        assert client.post(url, json={}).status_code == 503 and len(state["seen"]) == 3


def test_backoff_doubles_up_to_a_cap_and_honours_retry_after():
    assert 0.8 <= backoff_seconds(0) <= 1.2 and 3.2 <= backoff_seconds(2) <= 4.8
    assert backoff_seconds(10) <= 30 * 1.2
    assert backoff_seconds(0, "7") == 7.0 and backoff_seconds(0, "600") == 30.0
