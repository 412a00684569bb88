"""The `sparcom` command line: the pipeline (`run`) and single stages over the same library.

    sparcom run                                   # the embedded default, end to end
    sparcom extract --model default --dataset d.jsonl --out counts.zarr
    sparcom identify --store counts.zarr --epsilon 0.01 --out findings/

Every command takes `--config settings.yaml`; flags override the file, the file the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparcom.config import PipelineSettings, load_settings

app = typer.Typer(help=__doc__.split("\n")[0], no_args_is_help=True, pretty_exceptions_enable=False)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="YAML settings file")]
ModelOption = Annotated[Optional[str], typer.Option(help="'default', hub id, directory or .gguf")]
SpanOption = Annotated[Optional[str], typer.Option(help="prompt, content or response")]
DtypeOption = Annotated[Optional[str], typer.Option(help="auto, float32, float64, bfloat16, float16")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps")]
RuleOption = Annotated[Optional[str], typer.Option(help="global_percentile, layer_percentile or threshold")]
EpsilonOption = Annotated[Optional[float], typer.Option(help="fraction kept by the percentile rules")]
TauOption = Annotated[Optional[float], typer.Option(help="frequency threshold of the threshold rule")]
GroupOption = Annotated[Optional[str], typer.Option("--group-by", help="category, origin or instruction")]


def _settings(config: Path | None, **overrides) -> PipelineSettings:
    return load_settings(config, {key.replace("__", "."): value for key, value in overrides.items()})


@app.command()
def run(
    config: ConfigOption = None,
    model: ModelOption = None,
    dataset: Annotated[Optional[Path], typer.Option(help="JSONL or saved dataset; default: starter set")] = None,
    span: SpanOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    rule: RuleOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    group_by: GroupOption = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="datasets, stores and run reports")] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow: curate, extract, identify, analyse."""
    settings = _settings(
        config, model__name=model, dataset__path=dataset, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, identification__rule=rule,
        identification__epsilon=epsilon, identification__tau=tau, identification__group_by=group_by,
        work_dir=work_dir)
    from flows.pipeline import sparcom_pipeline  # Prefect only where a flow runs

    summary = sparcom_pipeline(settings)
    typer.echo(Path(summary["files"]["report.md"]).read_text())
    typer.echo(f"Results are in {Path(summary['files']['report.md']).parent}")


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="'default', hub id, directory or .gguf")],
    dataset: Annotated[Path, typer.Option(help="JSONL file or saved dataset directory")],
    out: Annotated[Path, typer.Option(help="the Zarr store to write (resumed if it exists)")],
    config: ConfigOption = None,
    span: SpanOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="padded tokens per forward pass")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="run the model repository's own code")] = False,
    revision: Annotated[Optional[str], typer.Option(help="hub revision")] = None,
) -> None:
    """Count FFN activations of every instruction into a Zarr store (SPEC section 7)."""
    from sparcom.dataset import load_records
    from sparcom.extract import extract_to_store
    from sparcom.models import load_model, resolve_model

    settings = _settings(
        config, model__name=model, model__revision=revision,
        model__trust_remote_code=trust_remote_code or None, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, extraction__batch_tokens=batch_tokens)
    source = resolve_model(settings.model.name, settings.model.revision, settings.model.trust_remote_code)
    loaded = load_model(source, settings.cache_dir, settings.extraction.dtype,
                        settings.extraction.device, settings.model.trust_remote_code)
    store = extract_to_store(loaded, load_records(dataset), out, settings.extraction)
    typer.echo(f"store: {store}")


@app.command()
def identify(
    store: Annotated[Path, typer.Option(help="a finished count store")],
    out: Annotated[Path, typer.Option(help="folder for components, analysis and report")],
    config: ConfigOption = None,
    rule: RuleOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    group_by: GroupOption = None,
) -> None:
    """Select instruction-specific neurons and report their generality and uniqueness."""
    from sparcom.identify import identify_store
    from sparcom.report import report_generality

    settings = _settings(config, identification__rule=rule, identification__epsilon=epsilon,
                         identification__tau=tau, identification__group_by=group_by)
    components = identify_store(store, settings.identification, out)
    summary = report_generality(components, out)
    typer.echo(Path(summary["files"]["report.md"]).read_text())
    typer.echo(f"results: {out}")


@app.command("show-config")
def show_config(config: ConfigOption = None) -> None:
    """Print the settings in effect (defaults merged with --config) as JSON."""
    typer.echo(json.dumps(_settings(config).model_dump(mode="json"), indent=2))
