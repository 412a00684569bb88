"""The orchestration layer's face: the `sparcom` command line and its Prefect API clients.

- `cli.app`: the `sparcom` commands (`app`, a typer application).
- `cli.trigger`: runs a deployment through the Prefect API and reports how it ended.
- `cli.runs`: reads back what a flow run did (its task runs' states).
"""
