"""One error style for every command: one line on stderr, exit 2 for bad input, 1 for failures.

- `ErrorStyleGroup`: the command group of the Typer app. It runs the command and turns any
  error into `error: <message>`: exit 2 when the input was bad (a file, record, field, option or
  store the user gave), exit 1 when the work itself failed. With the app's global `--debug`
  option (or SPARCOM_DEBUG=1) the error propagates with its traceback instead.
- `describe(error)`: the error as one line (pydantic and YAML errors folded).
- `exit_code(error)`: 2 for the project's bad-input errors, 1 for the rest.

The bad-input classes are looked up among the modules already imported, so mapping an error
never imports a model library.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperGroup

BAD_INPUT = (  # (module, class): raised for what the user gave, not for a failure while working
    ("sparcom.extraction.store", "StoreError"),
    ("sparcom.curation.records", "RecordError"),
    ("sparcom.curation.sources", "SourceError"),
    ("sparcom.core.models", "ModelLoadError"),
    ("sparcom.comparison.compare", "ComparisonError"),
    ("sparcom.comparison.finetune", "FinetuneError"),
    ("sparcom.core.outputs", "OutputError"),
    ("sparcom.extraction.distributed", "ClusterError"),
    ("yaml", "YAMLError"),
    ("builtins", "ValueError"),  # settings, options, pydantic's ValidationError (a ValueError)
    ("builtins", "ConnectionError"),  # no Dask scheduler at the address given
    ("builtins", "FileNotFoundError"),
    ("builtins", "NotADirectoryError"),
    ("builtins", "IsADirectoryError"),
)


def exit_code(error: BaseException) -> int:
    for module, name in BAD_INPUT:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and isinstance(error, kind):
            return 2
    return 1


def describe(error: BaseException) -> str:
    pydantic = sys.modules.get("pydantic")
    if pydantic and isinstance(error, pydantic.ValidationError):
        from sparcom.core.settings import validation_message

        text = f"{error.title}: {validation_message(error)}"
    elif isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and error.filename:
        text = f"{error.filename}: {error.strerror or error}"
    else:
        text = str(error) or type(error).__name__
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if exit_code(error) == 2 else f"{type(error).__name__}: {line} (--debug shows the traceback)"


class ErrorStyleGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, typer.Exit, typer.Abort):
            raise  # a command's own exit, and click's usage errors (exit 2 already)
        except Exception as error:  # noqa: BLE001 - every error of a command, mapped once
            if ctx.params.get("debug") or os.environ.get("SPARCOM_DEBUG") == "1":
                raise
            click.echo(f"error: {describe(error)}", err=True)
            ctx.exit(exit_code(error))
