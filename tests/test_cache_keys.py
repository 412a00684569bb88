"""Cache keys and code versions: a code version follows a stage's imports, ignores comments and
docstrings, changes with the code and refuses a missing module; named edits change exactly the
keys of the stages they can change; each stage has one key, the same for the caching (computed
before the stage runs) and for the result it names."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.curation.starter import prepare_dataset
from sparcom.extraction.stage import extract_dataset
from sparcom.stages import STAGES
from sparcom.core.code_version import modules_version
from sparcom.extraction.keys import planned_extraction_key
from sparcom.extraction.store import store_attrs


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `verpkg` on sys.path: `a` imports `b` inside a function, `b` imports nothing."""
    root = tmp_path / "verpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text(textwrap.dedent('''\
        """Module a."""
        import json


        def use():
            from verpkg.b import value  # only where it is needed
            return json.dumps(value())
        '''))
    (root / "b.py").write_text(textwrap.dedent('''\
        """Module b."""


        def value():
            """The value."""
            return 1  # one
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return root


def version(package: Path) -> str:
    return modules_version(["verpkg.a"], package="verpkg")


def test_comments_and_docstrings_keep_the_version(package):
    before = version(package)
    b = package / "b.py"
    b.write_text(b.read_text().replace('"""The value."""', '"""The value, documented at length."""')
                 .replace("# one", "# the number one, as a comment") + "\n# a closing remark\n")
    (package / "a.py").write_text((package / "a.py").read_text().replace('"""Module a."""', '"""A, renamed."""'))
    assert version(package) == before


def test_a_code_edit_in_an_imported_module_changes_the_version(package):
    before = version(package)
    b = package / "b.py"
    b.write_text(b.read_text().replace("return 1", "return 2"))
    assert version(package) != before


def test_a_missing_module_is_an_error_not_a_skip(package):
    (package / "a.py").write_text("from verpkg.gone import thing\n")
    with pytest.raises(ModuleNotFoundError, match=r"verpkg\.gone \(imported by verpkg\.a\) is not found"):
        version(package)
    with pytest.raises(ModuleNotFoundError, match="verpkg.nothere"):
        modules_version(["verpkg.nothere"], package="verpkg")


# (file, what the edit stands for, stages whose key it must change). Every other stage's key must
# stay: an edit reaches exactly the stages that import the edited module, at any depth.
EDITS = [
    ("sparcom/curation/packaged_sources.py", "the packaged human sets", {"curate"}),
    # the pipeline's curate stage saves records as they are; identification tokenizes the template
    ("sparcom/curation/prompts.py", "the prompt template", {"extract", "attribute", "identify", "finetune", "ablate"}),
    # the attribution store is written by extraction's shard writer and cluster code, which import counting;
    # the ablation's passes run on extraction's cluster code too (sparcom.ablation.distributed)
    ("sparcom/extraction/counting.py", "the counting hooks", {"extract", "attribute", "ablate"}),
    ("sparcom/extraction/architectures.py", "the architecture table", {"extract", "attribute", "ablate"}),
    ("sparcom/extraction/store.py", "the store writer and reader",
     {"extract", "attribute", "identify", "analyse", "compare", "ablate"}),
    # the fine-tune's loss is the scored response loss's batch function (its module batches too)
    ("sparcom/extraction/batching.py", "the batching", {"extract", "attribute", "ablate", "finetune"}),
    ("sparcom/extraction/distributed.py", "counting on the cluster", {"extract", "attribute", "ablate"}),
    # attribution runs its model as extraction does: loading, store naming, reuse, cluster or here
    ("sparcom/extraction/model_stage.py", "the steps the model stages share", {"extract", "attribute"}),
    ("sparcom/intervention/response_nll.py", "the scored response loss", {"attribute", "ablate", "finetune"}),
    # the ablation's fidelity check computes estimates on its records; the attribution rules' names
    # are the attribution store's, read by identification
    ("sparcom/attribution/estimate.py", "the attribution estimate", {"attribute", "ablate"}),
    ("sparcom/attribution/schema.py", "the attribution store's names", {"attribute", "identify", "analyse", "compare",
                                                                        "ablate", "findings"}),
    ("sparcom/identification/rules.py", "a selection rule", {"identify", "analyse", "compare"}),
    ("sparcom/identification/schema.py", "a new selection rule's name",
     {"identify", "analyse", "compare", "ablate", "findings"}),
    ("sparcom/identification/identify.py", "the one pass on Dask", {"identify"}),
    ("sparcom/identification/report.py", "the identification report's wording", {"analyse"}),
    ("sparcom/ablation/controls.py", "an ablation control", {"ablate"}),
    ("sparcom/ablation/schema.py", "a new ablation control's name", {"ablate", "findings"}),
    ("sparcom/ablation/report.py", "the ablation report's wording", {"ablate"}),
    ("sparcom/ablation/ablate.py", "the ablation", {"ablate"}),
    ("sparcom/comparison/compare.py", "the comparison", {"compare"}),
    ("sparcom/comparison/report.py", "the comparison report's wording", {"compare"}),
    ("sparcom/findings/rows.py", "the findings' verdicts", {"findings"}),
    ("sparcom/ablation/verdicts.py", "the rule that decides", {"ablate", "findings"}),
    ("sparcom/comparison/finetune.py", "the training loop", {"finetune"}),
    ("sparcom/config.py", "the pipeline's settings", set()),
    ("sparcom/stages.py", "the stage table", set()),
    ("cli/app.py", "the command line", set()),
    ("tasks/caching.py", "the Prefect caching", set()),
]
VERSIONS = """
import json, sys
from sparcom.core.code_version import modules_version
stages, edits = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def versions():
    return {name: modules_version(entries, libraries) for name, (entries, libraries) in stages.items()}
before = versions()
changed = []
for path in edits:
    with open(path) as file:
        original = file.read()
    with open(path, "w") as file:
        file.write(original + "\\nEDITED_FOR_THE_KEY_TEST = 1\\n")
    after = versions()
    with open(path, "w") as file:
        file.write(original)
    changed.append(sorted(name for name in stages if after[name] != before[name]))
print(json.dumps(changed))
"""


@pytest.fixture(scope="module")
def changed_stages(tmp_path_factory) -> dict[str, set[str]]:
    """Each edit of EDITS made in a copy of the code, and the stages whose code version it changed:
    the copy is versioned in its own process, where `sparcom` is the copy."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path_factory.mktemp("code")
    for package in ("sparcom", "cli", "tasks"):
        shutil.copytree(root / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    stages = {name: (code.entries, code.libraries) for name, code in STAGES.items()}
    result = subprocess.run([sys.executable, "-c", VERSIONS, json.dumps(stages), json.dumps([e[0] for e in EDITS])],
                            cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True,
                            check=True, timeout=600)
    return {path: set(names) for (path, _, _), names in zip(EDITS, json.loads(result.stdout))}


def test_the_copy_is_what_gets_versioned(changed_stages):
    assert changed_stages["sparcom/extraction/counting.py"], "an edit of the copy changed no key"


@pytest.mark.parametrize(("path", "edit", "stages"), EDITS, ids=[e[1] for e in EDITS])
def test_an_edit_changes_exactly_the_keys_of_the_stages_it_can_change(changed_stages, path, edit, stages):
    assert changed_stages[path] == stages, f"{edit} ({path})"


def test_a_release_alone_changes_no_key(monkeypatch):
    """The package's version is recorded in results but hashed into no key."""
    before = {name: code.version() for name, code in STAGES.items()}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "sparcom" else real(name))
    assert {name: code.version() for name, code in STAGES.items()} == before


def test_model_stages_follow_torch_and_transformers(monkeypatch):
    before = {name: code.version() for name, code in STAGES.items()}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "transformers" else real(name))
    after = {name: code.version() for name, code in STAGES.items()}
    assert {name for name in STAGES if after[name] != before[name]} == {"extract", "attribute", "finetune", "ablate"}


def test_extraction_has_one_key(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.model_dump_json() + "\n" for r in sample_records[:4]))
    dataset_dir = prepare_dataset(data, tmp_path / "datasets")
    model, settings = ModelSettings(name=str(tiny_llama_dir)), ExtractionSettings(dtype="float32", device="cpu")
    planned = planned_extraction_key(model, dataset_dir, settings, cache_dir)
    store = extract_dataset(model, dataset_dir, settings, tmp_path / "stores", cache_dir)
    assert store_attrs(store)["extraction_key"] == planned and store.stem.endswith(planned[:16])


def test_attribution_has_one_key(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    from sparcom.attribution.keys import KEY, planned_attribution_key
    from sparcom.attribution.settings import AttributionSettings
    from sparcom.attribution.stage import attribute_dataset

    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.model_dump_json() + "\n" for r in sample_records[:3]))
    dataset_dir = prepare_dataset(data, tmp_path / "datasets")
    model, extraction = ModelSettings(name=str(tiny_llama_dir)), ExtractionSettings(device="cpu")
    settings = AttributionSettings(max_response_tokens=2, dtype="float32")
    planned = planned_attribution_key(model, dataset_dir, settings, extraction, cache_dir)
    store = attribute_dataset(model, dataset_dir, settings, extraction, tmp_path / "attributions", cache_dir)
    assert store_attrs(store)[KEY] == planned and store.stem.endswith(planned[:16])
    assert attribute_dataset(model, dataset_dir, settings, extraction, tmp_path / "attributions", cache_dir) == store
