"""Shared fixtures: the default model's tokenizer, tiny random models built on it (`tiny_llama_dir`,
`tiny_models` for every supported family), sample records, a tiny LLaMA's store and components
(`identified`), the one Prefect test server (`prefect_harness`), `no_model_loading` (a command
must refuse bad input or output before any model loads), and Dask pinned to two local workers
at most; and the session's setup (Prefect server settings, torch threads).

Fixtures and session setup only: the helpers tests share are in tests/builders.py (inputs) and
tests/references.py (independent computations), imported by module name (`from builders import
...`; pytest puts tests/ on sys.path, as it has no __init__.py). No test file imports from
conftest or from another test file (tests/test_suite_hygiene.py checks).

Tests that load the real model, start a server, a browser or a cluster, or kill processes are
marked `slow`; `bash scripts/test.sh -m "not slow"` is the fast loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builders import CONFIGS, HELD_OUT, SAMPLE_TEXTS, SMALL_SERVER_SETTINGS, make_record, write_jsonl
from sparcom.curation.records import InstructionRecord

# torch and transformers are imported where used: with `-n 2`, the process that only hands out
# tests to the workers then starts them seconds sooner.


# Small SQLite servers on a loaded machine: see builders.SMALL_SERVER_SETTINGS.
for _name, _value in SMALL_SERVER_SETTINGS.items():
    os.environ.setdefault(_name, _value)

# A local Dask cluster has one worker process per core: 64 on a 64-core runner. Tests need two.
TEST_DASK_WORKERS = 2

# pytest-xdist workers (`-n 2`) share the cores: torch's default of one thread per core in each
# would oversubscribe them, and tiny models then spend their time waiting for threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def few_dask_workers():
    import sparcom.core.cluster

    with pytest.MonkeyPatch.context() as patch:
        cores = sparcom.core.cluster.usable_cores()
        patch.setattr(sparcom.core.cluster, "usable_cores", lambda: min(TEST_DASK_WORKERS, cores))
        yield


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: the command was to refuse before it."""
    import sparcom.core.models
    import sparcom.extraction.model_stage

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load before the command's inputs and output are checked")

    for module in (sparcom.core.models, sparcom.extraction.model_stage):  # `extract` and `attribute` load there
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite in a temporary folder) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sparcom-cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's tokenizer (chat template included), read from its GGUF file."""
    from sparcom.core.models import load_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer("default").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised 3-layer LLaMA with the default tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def sample_records() -> list[InstructionRecord]:
    return [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """build(family) -> the folder of a randomly initialised tiny model of the family in
    builders.CONFIGS, with the default tokenizer, saved like a hub model (built once per module)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    built = {}

    def build(family: str):
        if family not in built:
            config_class, options = CONFIGS[family]
            config = getattr(transformers, config_class)(
                vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **options)
            torch.manual_seed(1)
            model = AutoModelForCausalLM.from_config(config)
            directory = tmp_path_factory.mktemp(family)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            built[family] = directory
        return built[family]

    return build


@pytest.fixture(scope="module")
def identified(tmp_path_factory, tiny_llama_dir, cache_dir):
    """work/stores/<store>.zarr and work/runs/<run>/components.zarr, laid out as the pipeline does."""
    from sparcom.extraction.settings import ExtractionSettings
    from sparcom.identification.settings import IdentificationSettings
    from sparcom.extraction.extract import extract_to_store
    from sparcom.core.models import load_model, resolve_model
    from sparcom.identification.identify import identify_store

    work = tmp_path_factory.mktemp("work")
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float32", device="cpu")
    sample_records = [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]
    store = extract_to_store(loaded, sample_records, work / "stores" / "tiny.zarr", ExtractionSettings())
    components = identify_store(store, IdentificationSettings(epsilon=0.05), work / "runs" / "tiny-run")
    held_out = write_jsonl([make_record(100 + i, *texts) for i, texts in enumerate(HELD_OUT)], work / "held.jsonl")
    return work, store, components, held_out
