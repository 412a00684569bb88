"""Reading back what a flow run did: the states of its task runs, subflows included.

- `task_run_states(flow_run_id)`: task run name -> its state names, over the run's whole tree.
- `state_counts(states)`: how many task runs ended in each state (Completed, Cached, ...).

Calls go through Prefect's client, which retries 429/502/503 with backoff (`PREFECT_CLIENT_MAX_RETRIES`).
"""

import asyncio
from collections import Counter
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
)


def task_run_states(flow_run_id: UUID) -> dict[str, list[str]]:
    """Task run name -> state names, over the flow run and every flow run nested in it
    (the subflows' own task runs, not the stand-in task run each subflow call leaves)."""

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            flow_runs, frontier = [flow_run_id], [flow_run_id]
            while frontier:
                children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
                frontier = [child.id for child in children]
                flow_runs += frontier
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)),
                task_run_filter=TaskRunFilter())
            states: dict[str, list[str]] = {}
            for run in task_runs:
                if run.state and run.state.state_details.child_flow_run_id:
                    continue  # the stand-in task run of a subflow, not work of its own
                states.setdefault(run.name, []).append(run.state.name if run.state else "?")
            return states

    return asyncio.run(read())


def state_counts(states: dict[str, list[str]]) -> Counter:
    return Counter(state for names in states.values() for state in names)
