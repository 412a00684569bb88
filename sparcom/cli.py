"""The `sparcom` command line: the pipeline (`run`) and single stages over the same library.

    sparcom run                                   # the embedded default, end to end
    sparcom extract --model default --dataset d.jsonl --out counts.zarr
    sparcom identify --store counts.zarr --epsilon 0.01 --out findings/
    sparcom curate [--input mine.jsonl] [--on-error quarantine]   # the HexaInst dataset
    sparcom generate --category MATH --count 20 --out new.jsonl
    sparcom finetune --model default --categories CODE,MATH   # cached checkpoint
    sparcom compare --base M1 --tuned M2 | --base-store S1 --tuned-store S2 | --pair NAME

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
DaskAddressOption = Annotated[Optional[str], typer.Option(
    "--dask-address", help="an existing Dask scheduler (tcp://host:port); default: a local cluster")]
DaskWorkersOption = Annotated[Optional[int], typer.Option(
    "--dask-workers", help="workers of the local Dask cluster; default: one per core")]


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
    dask_address: DaskAddressOption = None,
    compare: Annotated[Optional[bool], typer.Option(
        "--compare/--no-compare", help="end with the comparison against a (cached) fine-tune")] = None,
    refresh: Annotated[Optional[list[str]], typer.Option(
        help="recompute this stage even if cached: curate, extract, identify, analyse, finetune, "
             "compare (repeatable)")] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow: curate, extract, identify, analyse, compare."""
    settings = _settings(
        config, model__name=model, dataset__path=dataset, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, identification__rule=rule,
        identification__epsilon=epsilon, identification__tau=tau, identification__group_by=group_by,
        work_dir=work_dir, dask__address=dask_address, comparison__enabled=compare)
    from flows.server import temporary_server_early  # Prefect only where a flow runs

    server_ready = temporary_server_early()  # boots while the pipeline's modules load
    from flows.pipeline import sparcom_pipeline

    server_ready()
    summary = sparcom_pipeline(settings, refresh=refresh or [])
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
    shards: Annotated[Optional[str], typer.Option(
        help="only these shards, e.g. '0-3,8', so several processes or GPUs fill one store")] = None,
) -> None:
    """Count FFN activations of every instruction into a Zarr store (SPEC section 7)."""
    from sparcom.dataset import load_records
    from sparcom.extract import extract_to_store, parse_shards
    from sparcom.store import is_complete
    from sparcom.models import load_model, resolve_model

    settings = _settings(
        config, model__name=model, model__revision=revision,
        model__trust_remote_code=trust_remote_code or None, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, extraction__batch_tokens=batch_tokens)
    source = resolve_model(settings.model.name, settings.model.revision, settings.model.trust_remote_code)
    loaded = load_model(source, settings.cache_dir, settings.extraction.dtype,
                        settings.extraction.device, settings.model.trust_remote_code)
    store = extract_to_store(loaded, load_records(dataset), out, settings.extraction,
                             shards=parse_shards(shards) if shards else None)
    typer.echo(f"store: {store} ({'complete' if is_complete(store) else 'shards still missing'})")


@app.command()
def identify(
    store: Annotated[Path, typer.Option(help="a finished count store")],
    out: Annotated[Path, typer.Option(help="folder for components, analysis and report")],
    config: ConfigOption = None,
    rule: RuleOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    group_by: GroupOption = None,
    dask_address: DaskAddressOption = None,
    dask_workers: DaskWorkersOption = None,
) -> None:
    """Select instruction-specific neurons and experts and report their generality and
    uniqueness, computed with Dask (a local cluster, or an existing scheduler)."""
    from sparcom.cluster import dask_cluster
    from sparcom.identify import identify_store
    from sparcom.report import report_generality

    settings = _settings(config, identification__rule=rule, identification__epsilon=epsilon,
                         identification__tau=tau, identification__group_by=group_by,
                         dask__address=dask_address, dask__n_workers=dask_workers)
    with dask_cluster(settings.dask):
        components = identify_store(store, settings.identification, out)
        summary = report_generality(components, out)
    typer.echo(Path(summary["files"]["report.md"]).read_text())
    typer.echo(f"results: {out}")


@app.command("show-config")
def show_config(config: ConfigOption = None) -> None:
    """Print the settings in effect (defaults merged with --config) as JSON."""
    typer.echo(json.dumps(_settings(config).model_dump(mode="json"), indent=2))


@app.command()
def curate(
    config: ConfigOption = None,
    input: Annotated[Optional[list[Path]], typer.Option(
        "--input", help="user dataset (JSONL, CSV, Parquet, saved folder); repeatable")] = None,
    hub: Annotated[Optional[bool], typer.Option("--hub/--no-hub", help="use the public human-written sets")] = None,
    authored: Annotated[Optional[bool], typer.Option(
        "--authored/--no-authored", help="include the shipped AI-authored half")] = None,
    per_group: Annotated[Optional[int], typer.Option(help="records kept per category x origin")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the balanced sampling")] = None,
    on_error: Annotated[Optional[str], typer.Option(help="raise or quarantine (bad records set aside)")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="tokenizer of the length limits")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help="longest chat-templated prompt")] = None,
    max_response_tokens: Annotated[Optional[int], typer.Option(help="longest reference response")] = None,
    near_duplicate_threshold: Annotated[Optional[float], typer.Option(help="word-shingle Jaccard")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder; default: work_dir/datasets/<hash>")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="datasets, stores and run reports")] = None,
) -> None:
    """Curate HexaInst as a Prefect flow: AI-authored half, public sets, your files; balanced."""
    from sparcom.records import RecordError
    from sparcom.sources import SourceError

    settings = _settings(
        config, curation__inputs=input or None, curation__sources=[] if hub is False else None,
        curation__authored=authored, curation__per_group=per_group, curation__seed=seed,
        curation__on_error=on_error, curation__tokenizer=tokenizer,
        curation__max_prompt_tokens=max_prompt_tokens, curation__max_response_tokens=max_response_tokens,
        curation__near_duplicate_threshold=near_duplicate_threshold, curation__out=out, work_dir=work_dir)
    from flows.curate import curate_hexainst  # Prefect only where a flow runs

    try:
        summary = curate_hexainst(settings)
    except (RecordError, SourceError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary["report"])
    typer.echo(f"dataset: {summary['directory']} (hash {summary['dataset_hash']})")


@app.command()
def generate(
    category: Annotated[str, typer.Option(help="CLS, CODE, QA, GEN, MATH or SUM")],
    out: Annotated[Path, typer.Option(help="JSONL of the accepted records; rejects go to OUT.rejected.jsonl")],
    count: Annotated[int, typer.Option(help="records wanted")] = 10,
    config: ConfigOption = None,
    model: ModelOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="longest reply")] = 512,
    temperature: Annotated[float, typer.Option(help="sampling temperature; 0 is greedy")] = 0.8,
    license: Annotated[str, typer.Option(help="license recorded in the new records")] = "other",
    trust_remote_code: Annotated[bool, typer.Option(help="run the model repository's own code")] = False,
) -> None:
    """Write new AI-generated records with a chat model from constrained meta-prompts."""
    from sparcom.generate import generate_records, transformers_chat
    from sparcom.hexainst import authored_records
    from sparcom.models import load_model, resolve_model

    settings = _settings(config, model__name=model, model__trust_remote_code=trust_remote_code or None,
                         extraction__dtype=dtype, extraction__device=device)
    source = resolve_model(settings.model.name, settings.model.revision, settings.model.trust_remote_code)
    loaded = load_model(source, settings.cache_dir, settings.extraction.dtype,
                        settings.extraction.device, settings.model.trust_remote_code)
    chat = transformers_chat(loaded, max_new_tokens, temperature, seed)
    result = generate_records(chat, category, count, seed, existing=authored_records(),
                              source=f"generated:{settings.model.name}", license=license)
    out.write_text("".join(r.model_dump_json() + "\n" for r in result.records), encoding="utf-8")
    rejected = out.with_suffix(".rejected.jsonl")
    rejected.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rejected),
                        encoding="utf-8")
    typer.echo(f"{len(result.records)} of {count} records written to {out}; "
               f"{len(result.rejected)} replies rejected ({rejected})")


def _codes(value: str | None) -> list[str] | None:
    """'CODE,MATH' -> ['CODE', 'MATH']; 'all' -> [] (every category); none -> the settings' own."""
    if value is None:
        return None
    return [] if value.strip().lower() == "all" else [c.strip() for c in value.split(",") if c.strip()]


@app.command()
def finetune(
    config: ConfigOption = None,
    model: ModelOption = None,
    categories: Annotated[Optional[str], typer.Option(help="comma-separated codes, or 'all' (default CODE,MATH)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="train on this JSONL/saved dataset, not HexaInst")] = None,
    hold_out: Annotated[Optional[Path], typer.Option(help="a dataset whose records are not trained on")] = None,
    method: Annotated[Optional[str], typer.Option(help="full or lora")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default 60)")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="passes over the data (overrides --steps)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per step")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="prompt + response tokens per example")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="peak rate; default 1e-4 full, 5e-4 LoRA")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of initialisation and data order")] = None,
    full_training: Annotated[bool, typer.Option(
        help="real training lengths for a GPU: 3 epochs, 2048 tokens (unless given)")] = False,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    trust_remote_code: Annotated[bool, typer.Option(help="run the model repository's own code")] = False,
    work_dir: Annotated[Optional[Path], typer.Option(help="checkpoints go to WORK_DIR/checkpoints")] = None,
) -> None:
    """Fine-tune a model on HexaInst records or your dataset; prints the (cached) checkpoint."""
    from sparcom.finetune import FinetuneError, read_provenance
    from sparcom.records import RecordError

    settings = _settings(
        config, model__name=model, model__trust_remote_code=trust_remote_code or None,
        finetune__categories=_codes(categories), finetune__dataset=dataset, finetune__method=method,
        finetune__steps=steps, finetune__epochs=epochs if epochs or not full_training else 3.0,
        finetune__batch_size=batch_size, finetune__learning_rate=learning_rate, finetune__seed=seed,
        finetune__max_tokens=max_tokens if max_tokens or not full_training else 2048,
        finetune__dtype=dtype, finetune__device=device, work_dir=work_dir)
    from flows.finetune import finetune as finetune_flow  # Prefect only where a flow runs

    try:
        checkpoint = finetune_flow(settings, hold_out)
    except (RecordError, FinetuneError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    provenance = read_provenance(checkpoint)
    typer.echo(f"loss {provenance['loss_first']:.3f} -> {provenance['loss_last']:.3f} over "
               f"{provenance['steps']} steps ({provenance['wall_seconds']} s when trained)")
    typer.echo(f"checkpoint: {checkpoint}")


@app.command()
def compare(
    config: ConfigOption = None,
    base: Annotated[Optional[str], typer.Option(help="base model: 'default', hub id, directory or .gguf")] = None,
    tuned: Annotated[Optional[str], typer.Option(help="tuned model of the same architecture")] = None,
    base_store: Annotated[Optional[Path], typer.Option(help="a finished count store of the base model")] = None,
    tuned_store: Annotated[Optional[Path], typer.Option(help="a finished count store of the tuned model")] = None,
    pair: Annotated[Optional[str], typer.Option(help="a public pair of sparcom/data/model_pairs.yaml")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="JSONL or saved dataset; default: starter set")] = None,
    focus: Annotated[Optional[str], typer.Option(help="comma-separated groups the tuned model was trained on")] = None,
    span: SpanOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    rule: RuleOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    group_by: GroupOption = None,
    top: Annotated[Optional[int], typer.Option(help="components listed per group as moving most")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="run the model repositories' own code")] = False,
    work_dir: Annotated[Optional[Path], typer.Option(help="datasets, stores and run reports")] = None,
    dask_address: DaskAddressOption = None,
) -> None:
    """Compare two checkpoints (models or finished stores): kept, gained and lost components."""
    from sparcom.compare import ComparisonError, model_pair
    from sparcom.config import ModelSettings
    from sparcom.models import ModelLoadError
    from sparcom.store import StoreError

    def fail(message: str) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if pair:
        try:
            chosen = model_pair(pair)
        except ValueError as error:
            fail(str(error))
        base, tuned = base or chosen.base, tuned or chosen.tuned
    for side, model, store in (("base", base, base_store), ("tuned", tuned, tuned_store)):
        if (model is None) == (store is None):
            fail(f"give the {side} side as --{side} MODEL or --{side}-store STORE (exactly one), or --pair NAME")
    settings = _settings(
        config, dataset__path=dataset, extraction__span=span, extraction__dtype=dtype,
        extraction__device=device, identification__rule=rule, identification__epsilon=epsilon,
        identification__tau=tau, identification__group_by=group_by, comparison__top_movers=top,
        work_dir=work_dir, dask__address=dask_address)
    as_model = lambda name: name and ModelSettings(name=name, trust_remote_code=trust_remote_code)  # noqa: E731
    from flows.compare import compare_models  # Prefect only where a flow runs

    try:
        summary = compare_models(settings, as_model(base), as_model(tuned), base_store, tuned_store,
                                 _codes(focus) or [])
    except (ComparisonError, StoreError, ModelLoadError) as error:
        fail(str(error))
    typer.echo(Path(summary["files"]["comparison.md"]).read_text())
    typer.echo(f"Results are in {Path(summary['files']['comparison.md']).parent}")


@app.command()
def trigger(
    deployment: Annotated[str, typer.Argument(help="FLOW/DEPLOYMENT, e.g. sparcom-pipeline/pipeline")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="YAML settings file: sent as the run's `settings` parameter")] = None,
    params: Annotated[Optional[str], typer.Option(help="parameters as a JSON object")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="dotted KEY=VALUE, the value read as JSON where it is JSON; repeatable")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the flow run ends")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="seconds to wait at most (exit 124 after)")] = None,
    poll: Annotated[float, typer.Option(help="seconds between looks at the run's state")] = 5.0,
) -> None:
    """Run a deployment through the Prefect API (PREFECT_API_URL, PREFECT_API_KEY); with --wait,
    exit 1 when the run ends Failed, Crashed or Cancelled."""
    import yaml

    from flows.trigger import merge_parameters, parse_assignments, trigger as trigger_run  # Prefect only here

    try:
        _settings(config)  # a bad file is refused here, not on the worker
        overrides = {"settings": yaml.safe_load(config.read_text(encoding="utf-8")) or {}} if config else {}
        given = json.loads(params) if params else {}
        if not isinstance(given, dict):
            raise ValueError("--params: expected a JSON object")
        overrides = merge_parameters(merge_parameters(overrides, given), parse_assignments(set_ or []))
        run = trigger_run(deployment, overrides, wait, timeout, poll, report=typer.echo)
    except (ValueError, LookupError) as error:  # JSON and pydantic errors are ValueErrors too
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if not wait:
        return
    if not run.finished:
        typer.echo(f"flow run {run.name!r} ({run.id}) is still {run.state_name} after {timeout} s", err=True)
        raise typer.Exit(124)
    typer.echo(f"flow run {run.name!r} ({run.id}) ended {run.state_name}")
    if not run.succeeded:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
