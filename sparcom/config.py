"""Typed settings for every stage, with defaults that a YAML file or command-line flags override.

- `PipelineSettings`: the whole pipeline (model, dataset, curation, extraction, identification, the
  fine-tune and the before/after comparison, the ablation, folders).
- `load_settings(yaml_path, overrides)`: defaults, then the YAML file, then dotted overrides
  such as {"identification.epsilon": 0.02}. A bad file is a SettingsError naming the file (and
  the line, for YAML syntax and duplicated keys) or the field.
- `validation_message(error)`: a pydantic ValidationError as one line naming each field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparcom.curation.records import Category
from sparcom.curation.sources import SourceSpec, default_sources

TokenSpan = Literal["prompt", "content", "response"]
DType = Literal["auto", "float32", "float64", "bfloat16", "float16"]
SelectionRule = Literal["global_percentile", "threshold", "layer_percentile", "lape", "contrastive"]


def default_cache_dir() -> Path:
    """Where converted models and fingerprints are kept between runs (XDG convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparcom"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(StrictModel):
    name: str = Field("default", description="'default', a hub id, a local directory or a .gguf file")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    device_map: str | dict[str, int | str] | None = Field(
        None, description="spread a model too large for one device (accelerate): 'auto', 'balanced', "
                          "'sequential' or {module: device}; none: the whole model on extraction.device")
    max_memory: dict[int | str, str] | None = Field(
        None, description="with device_map: memory per device, e.g. {0: 20GiB, 1: 20GiB, cpu: 64GiB}")


class DatasetSettings(StrictModel):
    path: Path | None = Field(None, description="JSONL file or saved dataset; none: the starter set")


class CurationSettings(StrictModel):
    authored: bool = Field(True, description="include the shipped AI-authored half")
    inputs: list[Path] = Field([], description="user datasets: JSONL, CSV, Parquet or saved folders")
    sources: list[SourceSpec] = Field(default_factory=default_sources, description="public sets")
    per_group: int | None = Field(100, gt=0, description="records kept per category x origin; none: all")
    seed: int = Field(0, description="seed of the balanced sampling")
    on_error: Literal["raise", "quarantine"] = Field("raise", description="bad user records")
    tokenizer: str = Field("default", description="tokenizer of the length limits: model name or path")
    max_prompt_tokens: int | None = Field(1024, gt=0, description="chat-templated prompt; none: no limit")
    max_response_tokens: int | None = Field(1024, gt=0, description="reference response; none: no limit")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="word-shingle Jaccard")
    shingle_words: int = Field(3, gt=0, description="words per shingle")
    out: Path | None = Field(None, description="output folder; none: work_dir/datasets/<hash>")


class ExtractionSettings(StrictModel):
    span: TokenSpan = "prompt"
    dtype: DType = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, gt=0)
    max_padding: float = Field(0.05, ge=0, lt=1, description="padded-token fraction allowed per batch")
    padding_side: Literal["right", "left"] = "right"
    shard_size: int = Field(32, gt=0, description="instructions per shard and per store chunk")
    layer_chunk: int = Field(8, gt=0, description="layers per store chunk")


class IdentificationSettings(StrictModel):
    rule: SelectionRule = "global_percentile"
    epsilon: float = Field(0.01, gt=0, le=1, description="fraction kept by the percentile rules")
    tau: float = Field(0.5, gt=0, le=1, description="frequency threshold of the 'threshold' rule")
    # lape's three rates, defaults as in the released identify.py of Tang et al. 2024 (docs/method.md section 4a)
    top_rate: float = Field(0.01, gt=0, lt=1, description="lape: fraction of components kept by entropy")
    filter_rate: float = Field(0.95, gt=0, lt=1, description="lape: quantile a candidate's frequency exceeds")
    bar_ratio: float = Field(0.95, gt=0, lt=1, description="lape: quantile a member's frequency exceeds")
    group_by: Literal["category", "origin", "instruction"] = "category"
    split_half_seeds: int = Field(5, ge=0, description="split-half reliability: seeds (0: off)")


class DaskSettings(StrictModel):
    address: str | None = Field(None, description="an existing Dask scheduler; none: a local cluster")
    n_workers: int | None = Field(None, gt=0, description="local cluster workers; none: one per core")
    threads_per_worker: int = Field(1, gt=0, description="threads of each local worker")
    memory_limit: str = Field("auto", description="per local worker, e.g. '2GB'; auto: RAM / workers")
    connect_timeout: str = Field("30s", description="how long to try reaching `address`")
    shard_resources: dict[str, float] | None = Field(
        None, description="Dask resources each extraction shard needs on a worker, e.g. {GPU: 1}; "
                          "none: {GPU: 1} when the extraction device is cuda, else none")


class FinetuneSettings(StrictModel):
    """Defaults finish on 2 CPU cores in a few minutes on the default model; `epochs` and a
    larger `max_tokens` give real training lengths on a GPU."""

    categories: list[Category] = Field(
        ["CODE", "MATH"], description="categories trained on (HexaInst or the user dataset); []: all")
    dataset: Path | None = Field(None, description="JSONL or saved dataset; none: shipped HexaInst")
    method: Literal["full", "lora"] = "full"
    steps: int = Field(60, gt=0, description="optimizer steps, unless `epochs` is set")
    epochs: float | None = Field(None, gt=0, description="passes over the data (overrides steps)")
    batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_tokens: int = Field(128, gt=1, description="prompt + response tokens per example, cut at the end")
    learning_rate: float | None = Field(None, gt=0, description="none: 1e-4 for full, 5e-4 for LoRA")
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lora_rank: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    gradient_checkpointing: bool = False
    seed: int = 0
    dtype: DType = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")


class ComparisonSettings(StrictModel):
    enabled: bool = Field(True, description="the pipeline compares the model with a tuned one")
    tuned: ModelSettings | None = Field(None, description="the tuned model; none: fine-tune the model")
    top_movers: int = Field(10, gt=0, description="components listed per group as moving most")


class AblationSettings(StrictModel):
    """The causal check (docs/method.md section 6). The defaults are sized for the default run on 2
    CPU cores: 3 held-out records per category, the first 16 response tokens, 3 seeds per control,
    i.e. 1 + 6 x (1 + 2 x 3) = 43 passes over 18 records, for the model and again for its fine-tune.
    On a GPU raise `eval_per_group` and drop `max_response_tokens`."""

    enabled: bool = Field(True, description="the pipeline ablates each group's components after identifying them")
    family: Literal["auto", "neurons", "experts", "expert_neurons", "shared_neurons"] = Field(
        "auto", description="components switched off; auto: neurons where the model has dense layers, else experts")
    controls: list[Literal["random", "frequency_matched"]] = Field(
        ["random", "frequency_matched"], description="control sets of the same size per layer")
    seeds: int = Field(3, gt=0, description="draws of each control")
    seed: int = Field(0, description="seed of the controls, the bootstrap and the permutations")
    eval_dataset: Path | None = Field(
        None, description="records that judge the components; none: shipped HexaInst records of the "
                          "same categories that identification did not use")
    held_out_fraction: float | None = Field(
        None, gt=0, lt=1, description="the pipeline identifies on the rest of the dataset and evaluates on this "
                                      "fraction of each category (by record hash); none: see eval_dataset")
    eval_per_group: int | None = Field(3, gt=0, description="evaluation records per group; none: all")
    max_response_tokens: int | None = Field(
        16, gt=0, description="response tokens scored per record (the first ones); none: all")
    allow_overlap: bool = Field(False, description="evaluate on records that also selected the components")
    accuracy: bool = Field(
        False, description="also greedy-decode the records with a checkable answer (CLS label, MATH final "
                           "number) intact and under every ablation, and score their accuracy; off by default: slow on CPU")
    max_new_tokens: int = Field(128, gt=0, description="accuracy: tokens greedy-decoded per record at most")
    resamples: int = Field(1000, gt=0, description="bootstrap resamples over records")
    permutations: int = Field(10000, gt=0, description="sign flips of the permutation test")


class PipelineSettings(StrictModel):
    model: ModelSettings = ModelSettings()
    dataset: DatasetSettings = DatasetSettings()
    curation: CurationSettings = CurationSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    identification: IdentificationSettings = IdentificationSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    comparison: ComparisonSettings = ComparisonSettings()
    ablation: AblationSettings = AblationSettings()
    dask: DaskSettings = DaskSettings()
    work_dir: Path = Field(Path("sparcom-work"), description="datasets, stores and run reports")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models")


class SettingsError(ValueError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - safe
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise SettingsError(f"{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: {error}") from None


def load_settings(yaml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineSettings:
    data: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = _read_yaml(yaml_path)
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{yaml_path}: expected a mapping of settings at the top level")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as error:
        where = f"{yaml_path} or the options" if yaml_path else "options"
        raise SettingsError(f"settings ({where}): {validation_message(error)}") from None


def validation_message(error: ValidationError) -> str:
    """Pydantic's errors as one line: 'extraction.shard_size: Input should be ... (got 0)'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r})"
                     for e in error.errors())
