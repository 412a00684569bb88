"""Run a deployment through the Prefect API, from CI or a terminal, and say how it ended.

- `parse_assignments(["settings.model.name=M", ...])`: dotted `key=value` pairs as nested
  parameters; a value is read as JSON where it is JSON (`0.02`, `false`, `[1, 2]`), else as text.
- `merge_parameters(defaults, overrides)`: the deployment's parameters with the overrides laid
  over them key by key (Prefect itself would replace a whole `settings` mapping).
- `trigger(deployment, overrides, wait, timeout)`: creates the flow run, reports its id and UI
  address, and with `wait` polls it until it ends or `timeout` seconds pass (`TriggeredRun`).

The server is the one Prefect's settings name (`PREFECT_API_URL`, `PREFECT_API_KEY`): with none
set, or none answering there, a ConnectionError or LookupError names the address. Every call
goes through Prefect's client, which retries 429, 502 and 503 answers and dropped connections
with exponential backoff (`PREFECT_CLIENT_MAX_RETRIES`, default 5; `PREFECT_CLIENT_RETRY_EXTRA_CODES`
adds codes): a busy server delays a submission, it does not fail it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.utilities.urls import url_for


@dataclass(frozen=True)
class TriggeredRun:
    id: UUID
    name: str
    url: str | None
    state_name: str
    state_type: StateType
    finished: bool

    @property
    def succeeded(self) -> bool:
        return self.state_type == StateType.COMPLETED


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"{assignment!r}: expected KEY=VALUE, e.g. settings.identification.epsilon=0.02")
        *parents, leaf = key.strip().split(".")
        node = parameters
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{assignment!r}: {part} was already given a value, not a mapping")
        node[leaf] = _json_or_text(text)
    return parameters


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def merge_parameters(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_parameters(merged[key], value)
        else:
            merged[key] = value
    return merged


def trigger(
    deployment: str,
    overrides: dict[str, Any],
    wait: bool = False,
    timeout: float | None = None,
    poll_seconds: float = 5.0,
    report: Callable[[str], None] = print,
) -> TriggeredRun:
    """`deployment` is "FLOW_NAME/DEPLOYMENT_NAME"; a timeout leaves the run going (`finished` False)."""
    return asyncio.run(_trigger(deployment, overrides, wait, timeout, poll_seconds, report))


async def _trigger(deployment_name, overrides, wait, timeout, poll_seconds, report) -> TriggeredRun:
    url = PREFECT_API_URL.value()
    if not url:  # Prefect would start a throw-away server, which holds no deployment
        raise LookupError("PREFECT_API_URL is not set: trigger asks the server that holds the deployment; "
                          "set it, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        return await _trigger_on(url, deployment_name, overrides, wait, timeout, poll_seconds, report)
    except httpx.TransportError as error:
        raise ConnectionError(f"no Prefect server answers at {url} ({type(error).__name__}: {error}); start it "
                              "(`prefect server start`) or set PREFECT_API_URL to a server that runs") from None


async def _trigger_on(url, deployment_name, overrides, wait, timeout, poll_seconds, report) -> TriggeredRun:
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            raise LookupError(f"no deployment {deployment_name!r} at {client.api_url} "
                              "(`prefect deployment ls` lists them)") from None
        try:
            flow_run = await client.create_flow_run_from_deployment(
                deployment.id, parameters=merge_parameters(deployment.parameters, overrides))
        except PrefectHTTPStatusError as error:  # the server checks parameters against the flow's schema
            if error.response.status_code not in (409, 422):
                raise
            raise ValueError(f"{deployment_name} refused the parameters: "
                             f"{error.response.json().get('detail', error.response.text)}") from None
        url = url_for(flow_run)
        report(f"flow run {flow_run.name!r} ({flow_run.id}) of {deployment_name}" + (f": {url}" if url else ""))
        deadline = None if timeout is None else time.monotonic() + timeout
        state_name = flow_run.state.name
        while wait and not flow_run.state.is_final() and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(poll_seconds)
            flow_run = await client.read_flow_run(flow_run.id)
            if flow_run.state.name != state_name:
                state_name = flow_run.state.name
                report(f"state: {state_name}")
        return TriggeredRun(id=flow_run.id, name=flow_run.name, url=url, state_name=flow_run.state.name,
                            state_type=flow_run.state.type, finished=flow_run.state.is_final())
