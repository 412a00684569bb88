"""Flow run names a person can read in the Prefect UI: which model, on which data.

- `describe(settings)`: "<model> on <dataset>" for pipeline settings, e.g.
  "SmolLM2-135M-Instruct on starter set" or "Mistral-7B-Instruct-v0.3 on mine.jsonl".
- `run_name()`: the same for the flow run in progress, for `@flow(flow_run_name=run_name)`;
  flows without pipeline settings get the flow's own name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from sparcom.config import PipelineSettings
from sparcom.core.models import DEFAULT_MODEL_FILE

STARTER_SET_LABEL = "starter set"


def describe(settings: PipelineSettings) -> str:
    return f"{model_label(settings.model.name)} on {dataset_label(settings.dataset.path)}"


def model_label(name: str) -> str:
    """The last part of a hub id, a directory or a .gguf file: what people call the model."""
    if name == "default":
        return DEFAULT_MODEL_FILE.split(".")[0]
    return Path(name.rstrip("/")).name or name


def dataset_label(path: Path | None) -> str:
    return STARTER_SET_LABEL if path is None else Path(path).name


def run_name() -> str:
    settings = _as_settings(flow_run.parameters.get("settings"))
    return describe(settings) if settings is not None else flow_run.flow_name


def _as_settings(value: Any) -> PipelineSettings | None:
    """Inside a run the parameter is already validated; read back from the API it is a dict."""
    if isinstance(value, dict):
        return PipelineSettings.model_validate(value)
    return value if isinstance(value, PipelineSettings) else None
