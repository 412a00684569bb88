"""The ablation stage: do a group's components matter more to its own records than to other
groups' records, and more than control components of the same number, place and activity?
(docs/method.md section 6)

- `plan_ablation(components, store_path, settings)`: everything that can be checked without the
  model: the family, the evaluation records (held out from identification by content,
  `sparcom.ablation.held_out`; near duplicates counted), the
  sets and their seeded controls, which records have a checkable answer (with `accuracy`, at
  least one must). Bad input raises an `AblationInputError` naming what is wrong.
- `evaluation_records(settings, groups, group_by, identified)`: the records that judge the
  components: `settings.eval_dataset`, or the shipped HexaInst records of the same categories
  that identification did not read; overlap with `identified` (same record or same text) is
  refused unless `allow_overlap`, and then counted.
- `split_held_out(records, fraction, seed)`: records split by record hash into an identification
  part and a held-out evaluation part, per category, disjoint.
- `split_dataset(dataset_dir, fraction, seed, datasets_dir)`: the same for a saved dataset: both
  parts saved under their hashes (the pipeline identifies on one and evaluates on the other).
- `components_in(path)`: the components.zarr of an identification folder (or the path itself).
- `find_store(components_path)`: the count store beside an identification folder of a work dir.
- `run_ablation(components_path, store_path, settings, extraction, cache_dir, out_dir, passes_dir)`: the
  stage: checks, then one pass without ablation, one per group, one per group, control and
  seed; writes `out_dir/ablation.zarr` (docs/method.md section 6 names) and returns its path.
  With `settings.accuracy` the same passes again, greedy-decoding the records with a checkable
  answer (`sparcom.ablation.accuracy`), add the accuracy variables; where `measures_fidelity`,
  single components switched off too, on a few records of each group, for the fidelity of the
  attribution estimates (`sparcom.ablation.fidelity`). Its steps:
  `fingerprinted_model` (the model to load, refused unless the components were found in its
  weights), `stage_passes` (every pass, by label: any other set switched off is one more
  `AblationPass`), `measured_passes` (each pass's values: finished ones from `out_dir/passes`,
  the others on the Dask cluster `dask` chooses, `sparcom.ablation.distributed`, or in this
  process, `passes_in_process`), `gathered` (the passes' values as arrays),
  `control_frequencies`, `ablation_dataset` (the variables and figures).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from sparcom.ablation.answers import CHECKS, reference_answer
from sparcom.ablation.controls import CONTROLS, distinct_random_controls, overall_frequency
from sparcom.ablation.fidelity import fidelity_dataset, measures_fidelity, probe_records, probe_sets, record_estimates
from sparcom.ablation.held_out import IdentificationTexts, identification_texts
from sparcom.ablation.passes import AblationPass, FinishedPasses, PassInputs, measure_pass, pass_key, prepared
from sparcom.ablation.schema import ABLATED, ABLATION, CONTROL, EVALUATED, INSTRUCTION, PASSES, SEED
from sparcom.ablation.settings import AblationSettings
from sparcom.ablation.statistics import ablation_figures
from sparcom.core.cluster import extraction_cluster
from sparcom.core.outputs import building
from sparcom.core.settings import DaskSettings
from sparcom.curation.dataset import MANIFEST_NAME, load_records, save_dataset
from sparcom.curation.hexainst import authored_records
from sparcom.curation.records import CATEGORIES, InstructionRecord, dataset_hash, record_hash
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import is_complete, open_result, save_zarr, store_attrs
from sparcom.identification.schema import COMPONENTS, FAMILIES, GROUP, Family

ProgressCallback = Callable[[int, int], None]


class AblationInputError(ValueError):
    """Input the stage cannot run on; the message names the file, group or option."""


@dataclass(frozen=True)
class AblationPlan:
    family: Family
    groups: list[str]
    records: list[InstructionRecord]
    labels: np.ndarray                      # each record's evaluated group
    sets: dict[str, xr.DataArray]           # group -> boolean set over the family's dims
    controls: dict[tuple[str, int, str], xr.DataArray]  # (control, seed, group) -> set
    frequency: xr.DataArray                 # overall frequency of every component
    overlap: int                            # evaluation records that also selected the components
    eval_source: str
    attrs: dict
    checkable: np.ndarray                   # each record has an answer greedy decoding is scored on


def choose_family(components: xr.Dataset, name: str) -> Family:
    present = [f for f in FAMILIES if f.selected in components]
    if name == "auto":
        if not present:
            raise AblationInputError("components.zarr holds no component sets")
        return present[0]
    known = {f.name: f for f in FAMILIES}
    if name not in known or known[name] not in present:
        raise AblationInputError(
            f"unknown family {name!r} for these components; they hold: {', '.join(f.name for f in present)}")
    return known[name]


def components_in(path: Path) -> Path:
    """The components.zarr of a run folder, or `path` itself where it is not one (a components.zarr)."""
    path = Path(path)
    return path / COMPONENTS if (path / COMPONENTS).exists() else path


def find_store(components_path: Path) -> Path:
    """The store the components name (`store_path`), refused by name when it changed (another
    extraction key); else, in a run folder `<work>/runs/<store>-<key>/`, any finished store at
    `<work>/stores/*.zarr` with the components' fingerprint, dataset and span."""
    components_path = Path(components_path)
    attrs = store_attrs(components_path)
    named = attrs.get("store_path")
    if named and Path(named).exists():
        if store_attrs(named).get("extraction_key") != attrs.get("store_extraction_key"):
            raise AblationInputError(f"{named}: changed since the components {components_path} were found in it "
                                     "(another extraction key); pass --store with the store they were found in")
        return Path(named)
    run_dir = components_path.parent
    for candidate in sorted((run_dir.parent.parent / "stores").glob("*.zarr")) if run_dir.parent.name == "runs" else []:
        if is_complete(candidate) and all(
                store_attrs(candidate).get(k) == attrs.get(k) for k in ("model_fingerprint", "dataset_hash", "token_span")):
            return candidate
    gone = (f"its store {named} is gone (moved or deleted)" if named
            else "no count store of its model and dataset found beside it")
    raise AblationInputError(f"{components_path}: {gone}; pass --store STORE.zarr")


def split_held_out(records: Sequence[InstructionRecord], fraction: float, seed: int = 0
                   ) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """(identification, evaluation): per category the `fraction` of records whose seeded hash of
    the record hash is smallest (at least one, and one left for identification), disjoint by hash."""
    if not 0 < fraction < 1:
        raise AblationInputError(f"held-out fraction {fraction}: expected a number between 0 and 1")
    held: set[str] = set()
    for category in sorted({r.category for r in records}):
        hashes = sorted({record_hash(r) for r in records if r.category == category},
                        key=lambda h: hashlib.sha256(f"{seed}:{h}".encode()).hexdigest())
        count = min(max(1, round(fraction * len(hashes))), len(hashes) - 1)
        held.update(hashes[:count])
    return ([r for r in records if record_hash(r) not in held], [r for r in records if record_hash(r) in held])


def split_dataset(dataset_dir: Path, fraction: float, seed: int, datasets_dir: Path) -> tuple[Path, Path]:
    """(identification dataset, held-out evaluation dataset) folders."""
    parts = []
    for name, records in zip(("identification", "held-out"), split_held_out(load_records(dataset_dir), fraction, seed)):
        directory = Path(datasets_dir) / dataset_hash(records)[:16]
        if not (directory / MANIFEST_NAME).is_file():
            save_dataset(records, directory, settings={"source": f"{dataset_dir}: {name} part", "fraction": fraction,
                                                       "seed": seed})
        parts.append(directory)
    return parts[0], parts[1]


def _label(record: InstructionRecord, group_by: str) -> str:
    return record.category if group_by == "category" else record.origin


def evaluation_records(settings: AblationSettings, groups: Sequence[str], group_by: str,
                       identified: IdentificationTexts) -> tuple[list[InstructionRecord], int, str]:
    """(records, overlap, where they came from)."""
    if settings.eval_dataset is not None:
        candidates = load_records(settings.eval_dataset)
        source = str(settings.eval_dataset)
        overlapping = [r for r in candidates if identified.holds(r)]
        if overlapping and not settings.allow_overlap:
            raise AblationInputError(
                f"{source}: {len(overlapping)} of its records also selected the components (the same record, "
                f"or the same instruction and input; first: {overlapping[0].id}); evaluate on held-out "
                "records, or pass --allow-overlap to "
                "evaluate on them anyway (the result then says so)")
    else:
        wanted = [g for g in groups if g in CATEGORIES] if group_by == "category" else list(CATEGORIES)
        candidates = [r for r in authored_records(tuple(wanted)) if not identified.holds(r)]
        source = "shipped HexaInst records not used by identification"
    taken, per_group = [], Counter()
    for record in candidates:
        label = _label(record, group_by)
        if settings.eval_per_group is None or per_group[label] < settings.eval_per_group:
            taken.append(record)
            per_group[label] += 1
    for record in taken:
        if not record.response.strip():
            raise AblationInputError(f"{source}: record {record.id} has no response to score")
    empty = [g for g in groups if per_group[g] == 0]
    if empty:
        raise AblationInputError(f"{source}: no evaluation record of group {empty[0]} "
                                 f"(groups with records: {', '.join(sorted(per_group)) or 'none'})")
    return taken, sum(identified.holds(r) for r in taken), source


def plan_ablation(components: xr.Dataset, store_path: Path, settings: AblationSettings) -> AblationPlan:
    attrs = components.attrs
    store = store_attrs(store_path)
    for key in ("model_fingerprint", "dataset_hash"):
        if store.get(key) != attrs.get(key):
            raise AblationInputError(f"{store_path}: its {key} {str(store.get(key))[:12]} is not the components' "
                                     f"{str(attrs.get(key))[:12]}: the store is of another model or dataset")
    group_by = attrs.get("group_by")
    if group_by not in ("category", "origin"):
        raise AblationInputError(f"components grouped by {group_by!r}: ablation needs groups of records "
                                 "(category or origin) that held-out records can belong to")
    family = choose_family(components, settings.family)
    groups = [str(g) for g in components[GROUP].values]
    identified = identification_texts(store_path)
    records, overlap, source = evaluation_records(settings, groups, group_by, identified)
    checkable = np.array([reference_answer(r) is not None for r in records], dtype=bool)
    if settings.accuracy and not checkable.any():
        raise AblationInputError(
            f"accuracy: none of the {len(records)} evaluation records ({source}) has a checkable answer; "
            f"categories with one: {', '.join(f'{c} ({what})' for c, what in CHECKS.items())}; evaluated: "
            f"{', '.join(sorted({r.category for r in records}))}. Evaluate such records, or leave --accuracy off")
    selected = components[family.selected].transpose(GROUP, family.layer_dim, ...).load()
    frequency = overall_frequency(components, family).transpose(*selected.dims[1:]).load()
    sets = {g: selected.sel({GROUP: g}, drop=True).reset_coords(drop=True) for g in groups}
    controls = {}
    for g_index, (group, chosen) in enumerate(sets.items()):
        if not chosen.any():
            continue
        distinct = distinct_random_controls(chosen, family.layer_dim)
        if distinct < settings.seeds:
            raise AblationInputError(
                f"--seeds {settings.seeds}: group {group}'s {int(chosen.sum())} {family.name} allow "
                f"{'no control of the same size per layer' if distinct == 0 else f'only {distinct} different random controls'}"
                f"{'' if distinct == 0 else f'; use at most {distinct} seeds'}")
        for c_index, control in enumerate(settings.controls):
            for seed in range(settings.seeds):
                rng = np.random.default_rng([settings.seed, g_index, c_index, seed])
                controls[control, seed, group] = CONTROLS[control](chosen, frequency, family.layer_dim, rng)
    return AblationPlan(
        family=family, groups=groups, records=records,
        labels=np.array([_label(r, group_by) for r in records]), sets=sets, controls=controls,
        frequency=frequency, overlap=overlap, eval_source=source, checkable=checkable,
        attrs={**{k: attrs[k] for k in ("model", "model_fingerprint", "dataset_hash", "token_span", "rule",
                                         "epsilon", "group_by") if k in attrs},
               "family": family.name, "eval_source": source, "eval_dataset_hash": dataset_hash(records),
               "overlap": overlap, "near_duplicates": identified.near_duplicates(records),
               "identification_texts": identified.found_in or "", "allow_overlap": settings.allow_overlap, "seeds": settings.seeds,
               "control_records": settings.control_records,
               "seed": settings.seed, "controls": list(settings.controls),
               "max_response_tokens": settings.max_response_tokens or 0, "resamples": settings.resamples,
               "permutations": settings.permutations, **(_accuracy_attrs(records, checkable, settings)
                                                          if settings.accuracy else {})})


def _accuracy_attrs(records: Sequence[InstructionRecord], checkable: np.ndarray, settings: AblationSettings) -> dict:
    categories = sorted({r.category for r in records})
    checked = sorted({r.category for r, c in zip(records, checkable) if c})
    return {"max_new_tokens": settings.max_new_tokens, "accuracy_categories": checked,
            "accuracy_skipped": [c for c in categories if c not in checked]}


def _mean_frequency(frequency: xr.DataArray, chosen: xr.DataArray) -> float:
    return float(frequency.where(chosen).mean()) if chosen.any() else float("nan")


def run_ablation(
    components_path: Path,
    store_path: Path,
    settings: AblationSettings,
    extraction: ExtractionSettings,
    cache_dir: Path,
    out_dir: Path,
    model_name: str | None = None,
    on_progress: ProgressCallback | None = None,
    model: ModelSettings | None = None,
    dask: DaskSettings | None = None,
    passes_dir: Path | None = None,
) -> Path:
    """Write `out_dir/ablation.zarr`. The model is the store's own unless `model_name` is given,
    and must have the components' weights fingerprint; `model` gives how it loads (device map,
    revision). With `dask` the passes run on the cluster `extraction_cluster` chooses, if any.
    Finished passes are kept in `passes_dir` (default `out_dir/passes`): a folder shared by
    several ablations (a run's rules) measures the passes they have in common once, e.g. the
    intact pass of one model on one set of records."""
    from sparcom.ablation.accuracy import accuracy_dataset

    plan = plan_ablation(open_result(components_path), store_path, settings)
    to_load = fingerprinted_model(plan, store_path, cache_dir, model_name, model)
    passes = stage_passes(plan, settings)
    if fidelity := measures_fidelity(plan.attrs.get("rule"), settings):
        estimates = record_estimates(to_load, plan.records, plan.family, settings.max_response_tokens, extraction,
                                     cache_dir)
        measured_on = probe_records(plan.labels, settings.fidelity_per_group)
        probes = probe_sets(estimates if measured_on is None else estimates.isel({INSTRUCTION: measured_on}),
                            settings)
        passes["probe", "base"] = AblationPass.of("nll", plan.family.name, None, measured_on)
        passes.update({("probe", k): AblationPass.of("nll", plan.family.name, p, measured_on)
                       for k, p in enumerate(probes)})
    values = dict(zip(passes, measured_passes(list(passes.values()), pass_inputs(plan, settings, extraction),
                                              to_load, extraction, cache_dir, Path(passes_dir or Path(out_dir) / PASSES), dask,
                                              on_progress)))
    base, nll_ablated, nll_control = gathered(values, "nll", plan, settings)
    controls = list(settings.controls)
    control_frequency = control_frequencies(plan, controls, settings.seeds)
    dataset = ablation_dataset(plan, base, nll_ablated, nll_control, control_frequency, controls, settings)
    if settings.accuracy:
        texts = gathered(values, "answers", plan, settings)
        dataset = dataset.merge(accuracy_dataset(plan.records, plan.labels, dataset[EVALUATED].values, *texts))
    if fidelity:
        dataset = dataset.merge(fidelity_dataset(plan.family, plan.sets, plan.labels, dataset[EVALUATED].values,
                                                 estimates, probes, values["probe", "base"],
                                                 [values["probe", k] for k in range(len(probes))], settings))
    path = Path(out_dir) / ABLATION
    with building(path, ABLATION) as partial:  # never over a folder the tool did not write
        save_zarr(dataset, partial)
    return path


def fingerprinted_model(plan: AblationPlan, store_path: Path, cache_dir: Path, model_name: str | None = None,
                        model: ModelSettings | None = None) -> ModelSettings:
    """The model to load: the store's own unless `model_name` is given; one whose weights are not
    the ones the components were found in is refused before it loads."""
    from sparcom.core.models import model_fingerprint, resolve_model

    attrs = store_attrs(store_path)
    name = model_name or (attrs["model_path"] if Path(attrs.get("model_path", "")).exists() else attrs["model"])
    to_load = (model or ModelSettings()).model_copy(update={"name": name})
    source = resolve_model(name, to_load.revision, to_load.trust_remote_code)
    if model_fingerprint(source, cache_dir) != plan.attrs["model_fingerprint"]:
        raise AblationInputError(f"model {name}: its weights are not the ones the components were found in "
                                 f"(fingerprint {plan.attrs['model_fingerprint'][:12]}); pass that model")
    return to_load


Label = tuple  # ("base", measure) | ("ablated", measure, group) | ("control", measure, control, seed, group)
#                | ("probe", k): the fidelity check's single components (`sparcom.ablation.fidelity`)


def stage_passes(plan: AblationPlan, settings: AblationSettings) -> dict[Label, AblationPass]:
    """Every pass of the stage: intact, each group's set off, each control of each seed off (its
    NLL on the group's own records with `control_records: own`), for the NLL and (with
    `settings.accuracy`) again for the answers, of every record. A group with an empty set has
    no control: its pass is the intact one (`AblationPass.of` makes it so)."""
    family = plan.family.name
    passes = {}
    for measure in ("nll", "answers") if settings.accuracy else ("nll",):
        passes["base", measure] = AblationPass.of(measure, family, None)
        for group in plan.groups:
            passes["ablated", measure, group] = AblationPass.of(measure, family, plan.sets[group].values)
        for control, seed, group in product(settings.controls, range(settings.seeds), plan.groups):
            chosen = plan.controls.get((control, seed, group), plan.sets[group])
            own = (np.flatnonzero(plan.labels == group)
                   if measure == "nll" and settings.control_records == "own" and chosen.any() else None)
            passes["control", measure, control, seed, group] = AblationPass.of(measure, family, chosen.values, own)
    return passes


def pass_inputs(plan: AblationPlan, settings: AblationSettings, extraction: ExtractionSettings) -> PassInputs:
    checked = np.flatnonzero(plan.checkable).tolist() if settings.accuracy else []
    return PassInputs(plan.records, checked, settings.max_response_tokens, settings.max_new_tokens, extraction)


Measured = tuple[np.ndarray, np.ndarray, np.ndarray]  # intact, each group off, each control off


def gathered(values: dict[Label, np.ndarray], measure: str, plan: AblationPlan, settings: AblationSettings
             ) -> Measured:
    """(intact [record], each group off [group, record], each control off [control, seed, group, record])."""
    base = values["base", measure]
    ablated = np.stack([values["ablated", measure, g] for g in plan.groups])
    controlled = np.stack([values["control", measure, c, s, g] for c, s, g in
                           product(settings.controls, range(settings.seeds), plan.groups)])
    return base, ablated, controlled.reshape(len(settings.controls), settings.seeds, *ablated.shape)


def measured_passes(passes: list[AblationPass], inputs: PassInputs, model: ModelSettings,
                    extraction: ExtractionSettings, cache_dir: Path, folder: Path, dask: DaskSettings | None = None,
                    on_progress: ProgressCallback | None = None) -> list[np.ndarray]:
    """Each pass's values, in order: the finished ones read from `folder` (named by `pass_key`),
    the others measured, on the cluster `dask` chooses or in this process, and kept in `folder`
    as each ends; passes with one key run once. `on_progress(passes done, passes)`."""
    from sparcom.ablation.distributed import cluster_model, passes_on_cluster
    from sparcom.core.models import model_fingerprint, resolve_device, resolve_dtype, resolve_model
    from sparcom.extraction.distributed import shard_resources

    finished = FinishedPasses(folder)
    fingerprint = model_fingerprint(resolve_model(model.name, model.revision, model.trust_remote_code), cache_dir)
    here = str(resolve_dtype(extraction.dtype, resolve_device(extraction.device)))
    keys = [pass_key(p, inputs, fingerprint, here) for p in passes]
    if all(finished.get(key) is not None for key in keys):  # a rerun: no model, no cluster
        return [finished.get(key) for key in keys]
    with ExitStack() as stack:
        client = None if dask is None else stack.enter_context(
            extraction_cluster(dask, extraction.device, spread=model.device_map is not None))
        if client is not None:
            resources = shard_resources(dask, extraction)
            fingerprint, dtype, workers = cluster_model(client, model, extraction, cache_dir, resources)
            keys = [pass_key(p, inputs, fingerprint, dtype) for p in passes]
        values = {key: finished.get(key) for key in keys}
        pending = {key: p for key, p in zip(keys, passes) if values[key] is None}
        progress = tqdm(total=len(values), initial=len(values) - len(pending), unit="pass",
                        desc="ablating" if client is None else f"ablating on {workers} workers")

        def keep(key: str, measured: np.ndarray) -> None:
            finished.put(key, measured)
            values[key] = measured
            progress.update(1)
            if on_progress:
                on_progress(progress.n, len(values))

        if client is not None:
            passes_on_cluster(client, model, extraction, cache_dir, inputs, pending, resources, keep)
        else:
            passes_in_process(model, extraction, cache_dir, inputs, pending, keep)
        progress.close()
    return [values[key] for key in keys]


def passes_in_process(model: ModelSettings, extraction: ExtractionSettings, cache_dir: Path, inputs: PassInputs,
                      pending: dict[str, AblationPass], keep: Callable[[str, np.ndarray], None]) -> None:
    """The passes one after another on the model loaded here; a set that cannot be switched off
    (offloaded experts) is refused before the first pass."""
    from sparcom.core.models import load_model, resolve_model
    from sparcom.core.threads import fit_torch_threads
    from sparcom.intervention.hooks import Ablation

    loaded = load_model(resolve_model(model.name, model.revision, model.trust_remote_code), cache_dir,
                        extraction.dtype, extraction.device, model.trust_remote_code, model.device_map,
                        model.max_memory)
    fit_torch_threads()
    for ablation_pass in pending.values():
        if ablation_pass.off is not None:
            with Ablation(loaded.model, {ablation_pass.family: ablation_pass.off}):
                break  # installed and undone: the family can be switched off in this model
    ready = prepared(inputs, loaded.tokenizer)
    for key, ablation_pass in pending.items():
        keep(key, measure_pass(loaded, ablation_pass, ready, inputs))


def control_frequencies(plan: AblationPlan, controls: list[str], seeds: int) -> np.ndarray:
    """The mean overall frequency of each control set, [control, seed, group]."""
    control_frequency = np.full((len(controls), seeds, len(plan.groups)), np.nan)
    for (c, control), s, (g, group) in product(enumerate(controls), range(seeds), enumerate(plan.groups)):
        # a group with an empty set has no control: its set (nothing) again
        control_frequency[c, s, g] = _mean_frequency(plan.frequency, plan.controls.get((control, s, group),
                                                                                      plan.sets[group]))
    return control_frequency


def ablation_dataset(plan: AblationPlan, base: np.ndarray, nll: np.ndarray, nll_control: np.ndarray,
                     control_frequency: np.ndarray, controls: list[str], settings: AblationSettings) -> xr.Dataset:
    coords = {
        "instruction_id": (INSTRUCTION, np.array([r.id for r in plan.records], dtype=object)),
        "category": (INSTRUCTION, np.array([r.category for r in plan.records], dtype=object)),
        "origin": (INSTRUCTION, np.array([r.origin for r in plan.records], dtype=object)),
        "record_hash": (INSTRUCTION, np.array([record_hash(r) for r in plan.records], dtype=object)),
        ABLATED: plan.groups, CONTROL: controls, SEED: np.arange(nll_control.shape[1]),
    }
    nll_base = xr.DataArray(base, dims=(INSTRUCTION,))
    nll_ablated = xr.DataArray(nll, dims=(ABLATED, INSTRUCTION))
    nll_controlled = xr.DataArray(nll_control, dims=(CONTROL, SEED, ABLATED, INSTRUCTION))
    dataset = xr.Dataset(
        {"nll_base": nll_base, "nll": nll_ablated, "nll_control": nll_controlled,
         "ablated_size": (ABLATED, np.array([int(plan.sets[g].sum()) for g in plan.groups], dtype=np.int64)),
         "mean_frequency": (ABLATED, np.array([_mean_frequency(plan.frequency, plan.sets[g]) for g in plan.groups])),
         "control_mean_frequency": ((CONTROL, SEED, ABLATED), control_frequency)},
        coords=coords)
    figures = ablation_figures(dataset.nll_base, dataset.nll, dataset.nll_control, plan.labels,
                               settings.resamples, settings.permutations, settings.seed)
    merged = xr.merge([dataset, figures.assign_coords({ABLATED: plan.groups})]).assign_attrs(plan.attrs)
    # Variable-length strings: fixed-width ones have no Zarr v3 specification and warn when written.
    return merged.assign_coords({name: merged[name].astype(object) for name in merged.coords
                                 if merged[name].dtype.kind == "U"})
