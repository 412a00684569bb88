"""The pipeline's settings: every stage's typed settings in one, with defaults that a YAML file or
command-line flags override. Each stage's own settings live in its package (`settings` module),
so that a stage's code version covers its settings and not the others'.

- `PipelineSettings`: the whole pipeline (model, dataset, curation, extraction, identification, the
  attribution, the fine-tune and the before/after comparison, the ablation, folders);
  `evaluated_on(held_out)`, `needs_attribution()`, `identified_with(attribution)`,
  `passes_dir()` and `fine_tuned_groups()` answer what the pipeline's stages ask of them together. Settings that
  name no selection rule (neither `identification.rule` nor `identification.rules`) select with
  `DEFAULT_RULES` side by side.
- `load_settings(yaml_path, overrides, default_rules)`: defaults, then the YAML file, then dotted
  overrides such as {"identification.epsilon": 0.02}. A bad file is a SettingsError naming the file (and
  the line, for YAML syntax and duplicated keys) or the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, model_validator

from sparcom.ablation.schema import PASSES
from sparcom.ablation.settings import AblationSettings
from sparcom.attribution.schema import ATTRIBUTION_RULES
from sparcom.attribution.settings import AttributionSettings
from sparcom.comparison.settings import ComparisonSettings, FinetuneSettings
from sparcom.core.settings import DaskSettings, StrictModel, default_cache_dir, validation_message
from sparcom.curation.records import CATEGORIES
from sparcom.curation.settings import CurationSettings, DatasetSettings
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.identification.settings import IdentificationSettings


# The default run compares the paper's rule (by firing frequency) with one that selects by
# estimated effect (docs/method.md sections 4d and 6a): the two questions a reader asks side by side.
DEFAULT_RULES = ["global_percentile", "attribution_contrastive"]


class PipelineSettings(StrictModel):
    model: ModelSettings = ModelSettings()
    dataset: DatasetSettings = DatasetSettings()
    curation: CurationSettings = CurationSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    identification: IdentificationSettings = IdentificationSettings()
    attribution: AttributionSettings = AttributionSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    comparison: ComparisonSettings = ComparisonSettings()
    ablation: AblationSettings = AblationSettings()
    dask: DaskSettings = DaskSettings()
    work_dir: Path = Field(Path("sparcom-work"), description="datasets, stores and run reports")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models")

    @model_validator(mode="before")
    @classmethod
    def _default_rules(cls, data, info: ValidationInfo):
        """No rule named in the identification settings: the default run's rules (or, validated
        with the context {"default_rules": None}, `rule`'s default alone)."""
        default = (info.context or {}).get("default_rules", DEFAULT_RULES)
        if not isinstance(data, dict) or default is None:
            return data
        identification = data.get("identification", {})
        if isinstance(identification, dict) and not {"rule", "rules"} & set(identification):
            return {**data, "identification": {**identification, "rules": default}}
        return data

    def evaluated_on(self, held_out: Path) -> PipelineSettings:
        """These settings with the ablation evaluated on the `held_out` dataset (a copy)."""
        return self.model_copy(deep=True, update={"ablation": self.ablation.model_copy(
            update={"eval_dataset": held_out})})

    def needs_attribution(self) -> bool:
        """Whether a chosen selection rule reads an attribution store, so the pipeline makes one."""
        return any(rule in ATTRIBUTION_RULES for rule in self.identification.selected_rules())

    def identified_with(self, attribution: Path) -> PipelineSettings:
        """These settings with identification reading the attribution store `attribution` (a copy)."""
        return self.model_copy(deep=True, update={"identification": self.identification.model_copy(
            update={"attribution": attribution})})

    def passes_dir(self) -> Path:
        """Where the pipeline's ablations keep their finished passes: one folder for every rule and
        model of the work dir, so that a pass they share (the intact one) runs once."""
        return Path(self.work_dir) / PASSES

    def fine_tuned_groups(self) -> list[str]:
        """The groups the tuned model was trained on, where the pipeline fine-tunes it by category."""
        if self.comparison.tuned is not None or self.identification.group_by != "category":
            return []
        return list(self.finetune.categories) or list(CATEGORIES)


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


def load_settings(yaml_path: Path | None = None, overrides: dict[str, Any] | None = None,
                  default_rules: list[str] | None = DEFAULT_RULES) -> PipelineSettings:
    """`default_rules`: the rules where neither the file nor the overrides name one (none: the
    one rule of `identification.rule`'s default)."""
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
        return PipelineSettings.model_validate(data, context={"default_rules": default_rules})
    except ValidationError as error:
        where = f"{yaml_path} or the options" if yaml_path else "options"
        raise SettingsError(f"settings ({where}): {validation_message(error)}") from None
