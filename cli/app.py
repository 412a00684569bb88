"""The `sparcom` command line: the pipeline (`run`) and single stages over the same library.

    sparcom run                                   # the embedded default, end to end
    sparcom run --rules global_percentile,contrastive   # rules side by side, a run folder each
    sparcom extract --model default --dataset d.jsonl --out counts.zarr
    sparcom attribute --model default --dataset d.jsonl --out attr.zarr   # effect estimates
    sparcom identify --store counts.zarr --epsilon 0.01 --out findings/
    sparcom ablate --components findings/ --out ablation/   # do the components matter?
    sparcom curate [--input mine.jsonl] [--on-error quarantine]   # the HexaInst dataset
    sparcom generate --category MATH --count 20 --out new.jsonl
    sparcom finetune --model default --categories CODE,MATH   # cached checkpoint
    sparcom compare --base M1 --tuned M2 | --base-store S1 --tuned-store S2 | --pair NAME

Every command takes `--config settings.yaml`; flags override the file, the file the defaults.

One rule for where a command goes: `extract`, `attribute`, `identify`, `generate` and `show-config` call the
library (`sparcom`) directly and need no Prefect server; `run`, `curate`, `finetune` and `compare`
run the flows (`flows`, imported in the command so the others start without Prefect);
`trigger` asks a Prefect server through `cli.trigger`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer

from cli.errors import ErrorStyleGroup
from sparcom.ablation.schema import CONTROLS, FAMILY_CHOICES
from sparcom.config import DEFAULT_RULES, PipelineSettings, load_settings
from sparcom.curation.records import CATEGORIES
from sparcom.extraction.settings import DType, TokenSpan
from sparcom.identification.schema import GROUP_BY, RULES

# Prefect's server telemetry off unless asked for: offline its heartbeat prints an ERROR line and
# a traceback on every run (set before any Prefect import reads its settings).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help=__doc__.split("\n")[0], no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=ErrorStyleGroup)


@app.callback()
def main(debug: Annotated[bool, typer.Option(
        "--debug", help="show the traceback of an error (default: one line, see cli/errors.py)")] = False,
) -> None:
    """Errors are one line on stderr: exit 2 for bad input, 1 for failures during work."""
    from sparcom.core.threads import wait_passively

    wait_passively()  # before any command imports torch (sparcom/core/threads.py says why)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="YAML settings file")]
ModelOption = Annotated[Optional[str], typer.Option(help="'default', hub id, directory or .gguf")]
SpanOption = Annotated[Optional[str], typer.Option(help=", ".join(get_args(TokenSpan)))]
DtypeOption = Annotated[Optional[str], typer.Option(help=", ".join(get_args(DType)))]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps")]
RuleOption = Annotated[Optional[str], typer.Option(help=", ".join(RULES))]
RulesOption = Annotated[Optional[str], typer.Option(
    help="several rules side by side, comma-separated (one pass, a run folder each): " + ",".join(RULES))]
EpsilonOption = Annotated[Optional[float], typer.Option(
    help="fraction kept by the percentile rules and contrastive, in (0, 1]")]
TauOption = Annotated[Optional[float], typer.Option(help="frequency threshold of the threshold rule")]
TopRateOption = Annotated[Optional[float], typer.Option(help="lape: fraction kept by entropy, in (0, 1)")]
FilterRateOption = Annotated[Optional[float], typer.Option(help="lape: candidate quantile, in (0, 1)")]
BarRatioOption = Annotated[Optional[float], typer.Option(help="lape: membership quantile, in (0, 1)")]
SplitSeedsOption = Annotated[Optional[int], typer.Option(help="split-half reliability seeds (0: off)")]
PermutationsOption = Annotated[Optional[int], typer.Option(
    help="label permutations of the split-half null (default 200; 0: off)")]
GroupOption = Annotated[Optional[str], typer.Option("--group-by", help=", ".join(GROUP_BY))]
DaskAddressOption = Annotated[Optional[str], typer.Option(
    "--dask-address", help="an existing Dask scheduler (tcp://host:port); default: a local cluster")]
DaskWorkersOption = Annotated[Optional[int], typer.Option(
    "--dask-workers", help="workers of the local Dask cluster; default: one per core")]
# `extract` and `attribute`: a model over a dataset into a store
RequiredModelOption = Annotated[str, typer.Option(help="'default', hub id, directory or .gguf")]
StoreOutOption = Annotated[Path, typer.Option(help="the Zarr store to write (resumed if it exists)")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(help="run the model repository's own code")]
RevisionOption = Annotated[Optional[str], typer.Option(help="hub revision")]
ModelDaskWorkersOption = Annotated[Optional[int], typer.Option(
    "--dask-workers", help="local Dask workers (one per GPU at most); default: one per GPU where "
                           "there are several, else this process alone")]


def _settings(config: Path | None, default_rules: list[str] | None = DEFAULT_RULES, **overrides) -> PipelineSettings:
    return load_settings(config, {key.replace("__", "."): value for key, value in overrides.items()}, default_rules)


def _rules(rule: str | None, rules: str | None) -> list[str] | None:
    """--rules 'global_percentile,lape' -> the list, each name checked; none -> the settings' own."""
    if rules is None:
        return None
    if rule is not None:
        raise ValueError("give --rule (one rule) or --rules (several), not both")
    names = [name.strip() for name in rules.split(",") if name.strip()]
    unknown = [name for name in names if name not in RULES]
    if unknown or not names:
        raise ValueError(f"--rules: unknown rule {', '.join(map(repr, unknown)) or 'none given'}; "
                         f"choose from {', '.join(RULES)}")
    return names


def _check_devices(*devices: str | None) -> None:
    """The devices this process will run models on exist here: known before any work."""
    from sparcom.core.models import check_device

    for device in devices:
        if device:
            check_device(device)


@app.command()
def run(
    config: ConfigOption = None,
    model: ModelOption = None,
    dataset: Annotated[Optional[Path], typer.Option(help="JSONL or saved dataset; default: starter set")] = None,
    span: SpanOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    rule: RuleOption = None,
    rules: RulesOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    top_rate: TopRateOption = None,
    filter_rate: FilterRateOption = None,
    bar_ratio: BarRatioOption = None,
    split_half_seeds: SplitSeedsOption = None,
    split_half_permutations: PermutationsOption = None,
    group_by: GroupOption = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="datasets, stores and run reports")] = None,
    dask_address: DaskAddressOption = None,
    compare: Annotated[Optional[bool], typer.Option(
        "--compare/--no-compare", help="end with the comparison against a (cached) fine-tune")] = None,
    refresh: Annotated[Optional[list[str]], typer.Option(
        help="recompute this stage even if cached: curate, extract, attribute, identify, analyse, "
             "finetune, compare, ablate (repeatable)")] = None,
    ablate: Annotated[Optional[bool], typer.Option(
        "--ablate/--no-ablate", help="switch each group's components off on held-out records")] = None,
    ablation_accuracy: Annotated[Optional[bool], typer.Option(
        "--ablation-accuracy/--no-ablation-accuracy",
        help="the ablation also scores greedy-decoded answers (CLS label, MATH final number); slow on CPU")] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow: curate, extract, identify, analyse, compare."""
    settings = _settings(
        config, model__name=model, dataset__path=dataset, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, identification__rule=rule,
        identification__rules=_rules(rule, rules),
        identification__split_half_permutations=split_half_permutations, identification__epsilon=epsilon, identification__tau=tau, identification__group_by=group_by,
        identification__top_rate=top_rate, identification__filter_rate=filter_rate,
        identification__bar_ratio=bar_ratio, identification__split_half_seeds=split_half_seeds,
        work_dir=work_dir, dask__address=dask_address, comparison__enabled=compare,
        ablation__enabled=ablate, ablation__accuracy=ablation_accuracy)
    _check_devices(settings.extraction.device, settings.finetune.device if settings.comparison.enabled else None)
    from cli.server import temporary_server_early  # Prefect only where a flow runs

    server_ready = temporary_server_early()  # boots while the pipeline's modules load
    from flows.pipeline import sparcom_pipeline

    server_ready()
    summary = sparcom_pipeline(settings, refresh=refresh or [])
    typer.echo(Path(summary["files"]["report.md"]).read_text())
    for rule, each in summary["rules"].items():
        typer.echo(f"Results of {rule} are in {Path(each['files']['report.md']).parent}")


@app.command()
def extract(
    model: RequiredModelOption,
    dataset: Annotated[Path, typer.Option(help="JSONL file or saved dataset directory")],
    out: StoreOutOption,
    config: ConfigOption = None,
    span: SpanOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="padded tokens per forward pass")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    revision: RevisionOption = None,
    shards: Annotated[Optional[str], typer.Option(
        help="only these shards, e.g. '0-3,8', so several processes or GPUs fill one store")] = None,
    device_map: Annotated[Optional[str], typer.Option(
        help="spread a model larger than one GPU: auto, balanced, sequential or a JSON {module: device}")] = None,
    dask_address: DaskAddressOption = None,
    dask_workers: ModelDaskWorkersOption = None,
) -> None:
    """Count FFN activations of every instruction into a Zarr store (docs/method.md section 7), in
    this process or as one Dask task per shard (an existing scheduler, or one local worker per GPU)."""
    from sparcom.core.models import check_device_map
    from sparcom.curation.dataset import load_records
    from sparcom.extraction.distributed import extract_on_cluster
    from sparcom.extraction.extract import check_extraction, extract_to_store, parse_shards
    from sparcom.extraction.model_stage import run_on_model
    from sparcom.extraction.store import check_store_target, is_complete

    settings = _settings(
        config, model__name=model, model__revision=revision,
        model__trust_remote_code=trust_remote_code or None, extraction__span=span,
        extraction__dtype=dtype, extraction__device=device, extraction__batch_tokens=batch_tokens,
        model__device_map=json.loads(device_map) if device_map and device_map.startswith("{") else device_map,
        dask__address=dask_address, dask__n_workers=dask_workers)
    if not settings.dask.address:  # a remote cluster's workers check their own devices
        _check_devices(settings.extraction.device)
    records = load_records(dataset)  # every input is checked before the model loads
    wanted = parse_shards(shards) if shards else None
    check_extraction(records, settings.extraction, wanted, dataset)
    check_store_target(out)
    if not settings.dask.address:  # a remote cluster's workers check their own devices
        check_device_map(settings.model.device_map, settings.model.max_memory)
    store = run_on_model(
        settings.model, settings.extraction, settings.cache_dir, settings.dask,
        lambda client, resources: extract_on_cluster(client, settings.model, records, out, settings.extraction,
                                                     resources, settings.cache_dir, shards=wanted),
        lambda loaded: extract_to_store(loaded, records, out, settings.extraction, shards=wanted, dataset_path=dataset))
    typer.echo(f"store: {store} ({'complete' if is_complete(store) else 'shards still missing'})")


@app.command()
def attribute(
    model: RequiredModelOption,
    dataset: Annotated[Path, typer.Option(help="JSONL file or saved dataset directory (records with responses)")],
    out: StoreOutOption,
    config: ConfigOption = None,
    max_response_tokens: Annotated[Optional[int], typer.Option(
        help="response tokens scored per record, the first ones (default 16, as the ablation)")] = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="padded tokens per forward and backward pass")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    revision: RevisionOption = None,
    dask_address: DaskAddressOption = None,
    dask_workers: ModelDaskWorkersOption = None,
) -> None:
    """Estimate, per record, what switching each component off would do to the loss of its
    reference response (docs/method.md section 6a): one forward and one backward pass per batch,
    into a Zarr store laid out as a count store, in this process or as Dask tasks of shards."""
    from sparcom.attribution.store import attribute_on_cluster, attribute_to_store, check_attribution
    from sparcom.attribution.keys import KEY
    from sparcom.attribution.schema import STORE_KIND
    from sparcom.core.models import check_device_map
    from sparcom.curation.dataset import load_records
    from sparcom.extraction.model_stage import run_on_model
    from sparcom.extraction.store import check_store_target, is_complete

    settings = _settings(
        config, model__name=model, model__revision=revision, model__trust_remote_code=trust_remote_code or None,
        attribution__max_response_tokens=max_response_tokens, attribution__dtype=dtype,
        extraction__device=device, extraction__batch_tokens=batch_tokens,
        dask__address=dask_address, dask__n_workers=dask_workers)
    records = load_records(dataset)  # every input is checked before the model loads
    check_attribution(records, dataset)
    check_store_target(out, KEY, STORE_KIND)
    if not settings.dask.address:  # a remote cluster's workers check their own devices
        check_device_map(settings.model.device_map, settings.model.max_memory)
    store = run_on_model(
        settings.model, settings.attribution.loading(settings.extraction), settings.cache_dir, settings.dask,
        lambda client, resources: attribute_on_cluster(client, settings.model, records, out, settings.attribution,
                                                       settings.extraction, resources, settings.cache_dir),
        lambda loaded: attribute_to_store(loaded, records, out, settings.attribution, settings.extraction))
    typer.echo(f"store: {store} ({'complete' if is_complete(store) else 'shards still missing'})")


@app.command()
def identify(
    store: Annotated[Path, typer.Option(help="a finished count store")],
    out: Annotated[Path, typer.Option(help="folder for components, analysis and report")],
    config: ConfigOption = None,
    rule: RuleOption = None,
    rules: RulesOption = None,
    epsilon: EpsilonOption = None,
    tau: TauOption = None,
    top_rate: TopRateOption = None,
    filter_rate: FilterRateOption = None,
    bar_ratio: BarRatioOption = None,
    split_half_seeds: SplitSeedsOption = None,
    split_half_permutations: PermutationsOption = None,
    group_by: GroupOption = None,
    attribution: Annotated[Optional[Path], typer.Option(
        help="the attribution store of the count store's records (sparcom attribute), for the rules "
             "attribution and attribution_contrastive")] = None,
    dask_address: DaskAddressOption = None,
    dask_workers: DaskWorkersOption = None,
) -> None:
    """Select instruction-specific neurons and experts and report their generality and
    uniqueness, computed with Dask (a local cluster, or an existing scheduler). With several
    rules, one pass selects with each, and each rule's run goes to OUT/<rule>."""
    from sparcom.core.cluster import dask_cluster
    from sparcom.core.outputs import check_output, claimed
    from sparcom.extraction.store import open_store
    from sparcom.identification.identify import identify_store_rules, open_attribution, rule_dirs
    from sparcom.identification.report import report_generality
    from sparcom.identification.schema import RUN_KIND

    # One rule unless --rules or the file names several: `sparcom run` compares DEFAULT_RULES.
    settings = _settings(config, None, identification__rule=rule, identification__rules=_rules(rule, rules),
                         identification__split_half_permutations=split_half_permutations,
                         identification__epsilon=epsilon,
                         identification__tau=tau, identification__group_by=group_by,
                         identification__top_rate=top_rate, identification__filter_rate=filter_rate,
                         identification__bar_ratio=bar_ratio,
                         identification__split_half_seeds=split_half_seeds,
                         identification__attribution=attribution,
                         dask__address=dask_address, dask__n_workers=dask_workers)
    # the store verified, an attribution rule's store checked against it, before the cluster starts
    open_attribution(settings.identification, open_store(store), store)
    out_dirs = rule_dirs(out, settings.identification)
    for folder in {out, *out_dirs.values()}:
        check_output(folder, RUN_KIND)
    with dask_cluster(settings.dask), claimed(out, RUN_KIND):  # one run at a time into `out`
        components = identify_store_rules(store, settings.identification, out_dirs)
        summaries = {rule: report_generality(components[rule], out_dirs[rule]) for rule in out_dirs}
    for rule, summary in summaries.items():
        typer.echo(Path(summary["files"]["report.md"]).read_text())
        typer.echo(f"results of {rule}: {out_dirs[rule]}")


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="a finished count store, or a run output (components.zarr, ...)")]) -> None:
    """Check a finished count store or run output against its manifest: every chunk of its grid
    present and unchanged, its result-deciding attributes unchanged."""
    from sparcom.extraction.store import verify_store

    verify_store(store)
    typer.echo(f"{store}: verified, every chunk present and unchanged")


@app.command("ablate")
def ablate_command(
    components: Annotated[Path, typer.Option(help="an identification folder (or its components.zarr)")],
    out: Annotated[Path, typer.Option(help="folder for ablation.zarr and its report")],
    eval_dataset: Annotated[Optional[Path], typer.Option(
        help="held-out records (JSONL or saved dataset); default: shipped HexaInst records not identified on")] = None,
    store: Annotated[Optional[Path], typer.Option(help="the count store; default: found beside the run folder")] = None,
    model: Annotated[Optional[str], typer.Option(help="the model; default: the store's own")] = None,
    config: ConfigOption = None,
    family: Annotated[Optional[str], typer.Option(help=", ".join(FAMILY_CHOICES))] = None,
    seeds: Annotated[Optional[int], typer.Option(help="draws of each control (default 1)")] = None,
    controls: Annotated[Optional[str], typer.Option(help="comma-separated: " + ",".join(CONTROLS))] = None,
    control_records: Annotated[Optional[str], typer.Option(
        help="own: each control on its group's own records (all the causal test compares; default); "
             "all: on every record")] = None,
    eval_per_group: Annotated[Optional[int], typer.Option(help="evaluation records per group (default 8)")] = None,
    max_response_tokens: Annotated[Optional[int], typer.Option(help="response tokens scored per record")] = None,
    allow_overlap: Annotated[bool, typer.Option(help="evaluate on records that also selected the components")] = False,
    accuracy: Annotated[Optional[bool], typer.Option(
        "--accuracy/--no-accuracy", help="also greedy-decode records with a checkable answer (CLS label, MATH "
                                         "final number) and score accuracy, intact and ablated; default off")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="with --accuracy: tokens greedy-decoded per record at most (default 128)")] = None,
    fidelity: Annotated[Optional[bool], typer.Option(
        "--fidelity/--no-fidelity", help="also check the attribution estimates against single switch-offs; "
                                         "default: when the components' rule is an attribution rule")] = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    device_map: Annotated[Optional[str], typer.Option(
        help="spread a model larger than one GPU: auto, balanced, sequential or a JSON {module: device}")] = None,
    dask_address: DaskAddressOption = None,
    dask_workers: Annotated[Optional[int], typer.Option(
        "--dask-workers", help="local Dask workers the passes spread over (one per GPU at most on GPUs); "
                               "default: one per GPU where there are several, else this process alone")] = None,
) -> None:
    """Switch each group's components off on held-out records and report whether they hurt their
    own group more than others and more than random and frequency-matched controls. The passes
    run on a Dask cluster when one is given (or several GPUs are visible), else here; finished
    passes are kept in OUT/passes and a rerun reuses them."""
    from sparcom.ablation.ablate import components_in, find_store, run_ablation
    from sparcom.ablation.report import ablation_markdown, report_ablation
    from sparcom.ablation.schema import ABLATION
    from sparcom.core.outputs import check_output, claimed
    from sparcom.identification.schema import RUN_KIND

    settings = _settings(
        config, ablation__eval_dataset=eval_dataset, ablation__family=family, ablation__seeds=seeds,
        ablation__controls=controls.split(",") if controls else None, ablation__control_records=control_records,
        ablation__eval_per_group=eval_per_group,
        ablation__max_response_tokens=max_response_tokens, ablation__allow_overlap=allow_overlap or None,
        ablation__accuracy=accuracy, ablation__max_new_tokens=max_new_tokens, ablation__fidelity=fidelity,
        extraction__dtype=dtype, extraction__device=device, dask__address=dask_address, dask__n_workers=dask_workers,
        model__device_map=json.loads(device_map) if device_map and device_map.startswith("{") else device_map)
    if not settings.dask.address:  # a remote cluster's workers check their own devices
        _check_devices(settings.extraction.device)
    check_output(out, RUN_KIND)  # before any work: never a user's folder, nor their ablation.zarr
    check_output(out / ABLATION, ABLATION)
    path = components_in(components)
    with claimed(out, RUN_KIND):  # one ablation at a time into `out`: none overwrites another's files
        result = run_ablation(path, store or find_store(path), settings.ablation, settings.extraction,
                              settings.cache_dir, out, model_name=model, model=settings.model, dask=settings.dask)
        summary = report_ablation(result, out)
    typer.echo(ablation_markdown(summary, plot=None))
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
    settings = _settings(
        config, curation__inputs=input or None, curation__sources=[] if hub is False else None,
        curation__authored=authored, curation__per_group=per_group, curation__seed=seed,
        curation__on_error=on_error, curation__tokenizer=tokenizer,
        curation__max_prompt_tokens=max_prompt_tokens, curation__max_response_tokens=max_response_tokens,
        curation__near_duplicate_threshold=near_duplicate_threshold, curation__out=out, work_dir=work_dir)
    from sparcom.core.outputs import check_output
    from sparcom.curation.dataset import DATASET_KIND

    if settings.curation.out:
        check_output(settings.curation.out, DATASET_KIND)  # before any work, never a user's folder
    from cli.server import temporary_server_early  # Prefect only where a flow runs

    server_ready = temporary_server_early()  # ends with this command, however it ends
    from flows.curate import curate_hexainst

    server_ready()

    summary = curate_hexainst(settings)
    typer.echo(summary["report"])
    typer.echo(f"dataset: {summary['directory']} (hash {summary['dataset_hash']})")


@app.command()
def generate(
    category: Annotated[str, typer.Option(help=", ".join(CATEGORIES))],
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
    from sparcom.core.models import load_model, resolve_model
    from sparcom.curation.generate import generate_records, transformers_chat
    from sparcom.core.outputs import check_output_file
    from sparcom.curation.hexainst import authored_records

    check_output_file(out)  # before the model loads: never over a user's file
    check_output_file(out.with_suffix(".rejected.jsonl"))
    settings = _settings(config, model__name=model, model__trust_remote_code=trust_remote_code or None,
                         extraction__dtype=dtype, extraction__device=device)
    _check_devices(settings.extraction.device)
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
    from sparcom.comparison.finetune import read_provenance

    settings = _settings(
        config, model__name=model, model__trust_remote_code=trust_remote_code or None,
        finetune__categories=_codes(categories), finetune__dataset=dataset, finetune__method=method,
        finetune__steps=steps, finetune__epochs=epochs if epochs or not full_training else 3.0,
        finetune__batch_size=batch_size, finetune__learning_rate=learning_rate, finetune__seed=seed,
        finetune__max_tokens=max_tokens if max_tokens or not full_training else 2048,
        finetune__dtype=dtype, finetune__device=device, work_dir=work_dir)
    _check_devices(settings.finetune.device)
    from cli.server import temporary_server_early  # Prefect only where a flow runs

    server_ready = temporary_server_early()  # ends with this command, however it ends
    from flows.finetune import sparcom_finetune

    server_ready()

    checkpoint = sparcom_finetune(settings, hold_out)
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
    from sparcom.comparison.compare import model_pair
    from sparcom.comparison.schema import COMPARISON_REPORT
    from sparcom.extraction.settings import ModelSettings

    if pair:
        chosen = model_pair(pair)
        base, tuned = base or chosen.base, tuned or chosen.tuned
    for side, model, store in (("base", base, base_store), ("tuned", tuned, tuned_store)):
        if (model is None) == (store is None):
            raise ValueError(f"give the {side} side as --{side} MODEL or --{side}-store STORE (exactly one), "
                             "or --pair NAME")
    settings = _settings(
        config, dataset__path=dataset, extraction__span=span, extraction__dtype=dtype,
        extraction__device=device, identification__rule=rule, identification__epsilon=epsilon,
        identification__tau=tau, identification__group_by=group_by, comparison__top_movers=top,
        work_dir=work_dir, dask__address=dask_address)
    _check_devices(settings.extraction.device)
    as_model = lambda name: name and ModelSettings(name=name, trust_remote_code=trust_remote_code)  # noqa: E731
    from cli.server import temporary_server_early  # Prefect only where a flow runs

    server_ready = temporary_server_early()  # ends with this command, however it ends
    from flows.compare import compare_models

    server_ready()

    summary = compare_models(settings, as_model(base), as_model(tuned), base_store, tuned_store,
                             _codes(focus) or [])
    typer.echo(Path(summary["files"][COMPARISON_REPORT]).read_text())
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

    from cli.trigger import merge_parameters, parse_assignments  # Prefect only here
    from cli.trigger import trigger as trigger_run

    try:
        _settings(config)  # a bad file is refused here, not on the worker
        overrides = {"settings": yaml.safe_load(config.read_text(encoding="utf-8")) or {}} if config else {}
        given = json.loads(params) if params else {}
        if not isinstance(given, dict):
            raise ValueError("--params: expected a JSON object")
        overrides = merge_parameters(merge_parameters(overrides, given), parse_assignments(set_ or []))
        run = trigger_run(deployment, overrides, wait, timeout, poll, report=typer.echo)
    except (ValueError, LookupError, ConnectionError) as error:  # JSON and pydantic errors are ValueErrors too
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
