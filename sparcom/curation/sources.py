"""Human-written public datasets as HexaInst sources, read with `datasets.load_dataset`.

- `SourceSpec`: one public set: where it lives (hub id, config, split, or a local builder with
  `data_files`), how its columns become a record (format templates), label names, license.
- `default_sources()`: the sets that fit each category, after the paper (FLAN-style
  classification, HumanEval, TriviaQA, Alpaca, MATH-500) plus CNN/DailyMail for summarization;
  HumanEval, TriviaQA and MATH-500 name a packaged set to read offline (`packaged_sources`).
- `source_pool(spec)`: the source's rows as a curation `Pool`; when the hub cannot be reached or
  the set cannot be loaded, an unavailable pool that says why.

Templates are Python format strings over a row's columns: "{question}", or "{answer[value]}"
for a nested field. Integer class labels become names, from `label_names` or from the
dataset's own `ClassLabel` feature. No dataset code is ever run (datasets >= 4 has no scripts).
"""

from __future__ import annotations

import re
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparcom.curation.records import Category, Origin, Pool, RawRow, validate_rows
from sparcom.curation.schema import PACKAGED_SET_NAMES

# Builders that read local files through `data_files`; any other `dataset` is a hub id or folder.
LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text")
HUB_TIMEOUT_S = 5.0


class SourceError(ValueError):
    """A source whose configuration does not fit its data (a template naming no column, say)."""


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="short label, used in record ids and the report")
    category: Category
    origin: Origin = "human"
    dataset: str = Field(description="hub id, local folder, or a builder such as 'json' with data_files")
    config: str | None = None
    split: str
    data_files: str | list[str] | None = None
    revision: str | None = None
    instruction: str = Field(description="format template over the row's columns, e.g. '{question}'")
    input: str = ""
    response: str
    id_field: str | None = Field(None, description="column with a stable id; default: the row number")
    label_names: dict[str, list[str]] = Field({}, description="integer label column -> names")
    license: str
    packaged: str | None = Field(None, description="packaged set read instead when this one is unavailable "
                                                   "(sparcom.curation.schema.PACKAGED_SET_NAMES)")

    @field_validator("packaged")
    @classmethod
    def _known_packaged_set(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if name not in PACKAGED_SET_NAMES:
            raise ValueError(f"no packaged set {name!r}; there are {', '.join(PACKAGED_SET_NAMES)}")
        return name

    @field_validator("instruction", "input", "response")
    @classmethod
    def _plain_fields(cls, template: str) -> str:
        for field in template_fields(template):
            if "." in field or "(" in field:
                raise ValueError(f"template field {{{field}}}: use column or column[key] only")
        return template

    @field_validator("name")
    @classmethod
    def _id_safe(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError("use letters, digits, '_', '.' or '-' only (it goes into record ids)")
        return name

    def describe(self) -> str:
        where = f"{self.dataset} {self.data_files}" if self.data_files else self.dataset
        config = f", config {self.config}" if self.config else ""
        return f"{where}{config}, split {self.split}"

    def record_source(self) -> str:
        """Where a record came from; a pinned revision follows an '@' (the manifest's version)."""
        if self.dataset in LOCAL_BUILDERS:
            return self.name
        where = f"{self.dataset}/{self.config}:{self.split}" if self.config else f"{self.dataset}:{self.split}"
        return f"{where}@{self.revision}" if self.revision else where

    def is_local(self) -> bool:
        return self.dataset in LOCAL_BUILDERS or Path(self.dataset).exists()


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _column(field: str) -> str:
    return re.split(r"[\[.]", field, maxsplit=1)[0]


FLAN_AG_NEWS = ("{text}\n\nWhat is this text about?\nOPTIONS:\n- World\n- Sports\n- Business\n"
                "- Science/Tech")
FLAN_SST2 = ("Review:\n{sentence}\nIs this movie review sentence negative or positive?\n"
             "OPTIONS:\n- negative\n- positive")


def default_sources() -> list[SourceSpec]:
    """Licenses as their hub dataset cards state them; the CLS sets' cards say 'unknown'."""
    return [
        SourceSpec(name="ag_news", category="CLS", dataset="fancyzhx/ag_news", split="test",
                   instruction=FLAN_AG_NEWS, response="{label}", license="unknown",
                   label_names={"label": ["World", "Sports", "Business", "Science/Tech"]}),
        SourceSpec(name="sst2", category="CLS", dataset="stanfordnlp/sst2", split="validation",
                   id_field="idx", instruction=FLAN_SST2, response="{label}", license="unknown",
                   label_names={"label": ["negative", "positive"]}),
        SourceSpec(name="humaneval", category="CODE", dataset="openai/openai_humaneval", split="test",
                   id_field="task_id", instruction="Complete the following Python function.",
                   input="{prompt}", response="{prompt}{canonical_solution}", license="MIT",
                   packaged="humaneval"),
        SourceSpec(name="trivia_qa", category="QA", dataset="mandarjoshi/trivia_qa", config="rc.nocontext",
                   split="validation", id_field="question_id", instruction="{question}",
                   response="{answer[value]}", license="apache-2.0", packaged="fanoutqa"),
        SourceSpec(name="alpaca", category="GEN", dataset="tatsu-lab/alpaca", split="train",
                   instruction="{instruction}", input="{input}", response="{output}",
                   license="CC-BY-NC-4.0"),
        SourceSpec(name="math500", category="MATH", dataset="HuggingFaceH4/MATH-500", split="test",
                   id_field="unique_id", instruction="{problem}", response="{solution}", license="MIT",
                   packaged="champ"),
        SourceSpec(name="cnn_dailymail", category="SUM", dataset="abisee/cnn_dailymail", config="3.0.0",
                   split="test", id_field="id", instruction="Write highlights for this article.",
                   input="{article}", response="{highlights}", license="apache-2.0"),
    ]


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None. In the hub's offline mode
    (HF_HUB_OFFLINE=1) `datasets` answers from its cache, so no probe is made."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        return f"the Hugging Face hub ({host}:{port}) cannot be reached: {error}"
    return None


def load_table(spec: SourceSpec):
    import datasets

    return datasets.load_dataset(spec.dataset, spec.config, split=spec.split,
                                 data_files=spec.data_files, revision=spec.revision)


def source_pool(spec: SourceSpec) -> Pool:
    pool = Pool(name=spec.name, description=spec.describe(), strict=False, group=(spec.category, spec.origin))
    reason = None if spec.is_local() else hub_unreachable()
    if reason is None:
        try:
            table = load_table(spec)
        except Exception as error:  # missing set, bad files, network: all mean unavailable
            reason = f"{type(error).__name__}: {error}"
    if reason is not None:
        pool.unavailable = f"{spec.name} ({spec.describe()}) is unavailable: {reason}"
        return pool
    pool.records, pool.rejected = validate_rows(source_rows(spec, table), "quarantine")
    return pool


def source_rows(spec: SourceSpec, table, source: str | None = None) -> list[RawRow]:
    """`source` (default `spec.record_source()`) goes into every record."""
    columns = set(table.column_names)
    wanted = {_column(f) for t in (spec.instruction, spec.input, spec.response) for f in template_fields(t)}
    missing = sorted(wanted - columns | ({spec.id_field} - columns if spec.id_field else set()))
    if missing:
        raise SourceError(f"source {spec.name!r} ({spec.describe()}): no column(s) {', '.join(missing)}; "
                          f"its columns are {', '.join(sorted(columns))}")
    labels = {**_class_labels(table), **spec.label_names}
    source = source or spec.record_source()
    return [_row(spec, index, data, labels, source) for index, data in enumerate(table)]


def _class_labels(table) -> dict[str, list[str]]:
    import datasets

    return {name: feature.names for name, feature in table.features.items()
            if isinstance(feature, datasets.ClassLabel)}


def _row(spec: SourceSpec, index: int, data: dict, labels: dict[str, list[str]], source: str) -> RawRow:
    native = str(data[spec.id_field]) if spec.id_field else f"{index:06d}"
    record_id = f"{spec.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', native)}"
    where = f"{spec.name} row {index}"
    values = dict(data)
    try:
        for column, names in labels.items():
            if column in values and isinstance(values[column], int):
                if not 0 <= values[column] < len(names):
                    return RawRow(where, data, f"label {column}={values[column]} is not one of "
                                               f"0..{len(names) - 1} (an unlabelled row?)")
                values[column] = names[values[column]]
        filled = {part: getattr(spec, part).format_map(values)
                  for part in ("instruction", "input", "response")}
    except (KeyError, IndexError, TypeError, ValueError) as error:
        return RawRow(where, data, f"cannot fill the templates: {type(error).__name__}: {error}")
    return RawRow(where, {"id": record_id, "category": spec.category, "origin": spec.origin,
                          "source": source,
                          "license": spec.license, **filled})
