"""Shared fixtures: the default model's tokenizer, tiny random models built on it, sample records,
the one Prefect test server (`prefect_harness`), and Dask pinned to two local workers at most.

Tests that load the real model, start a server, a browser or a cluster, or kill processes are
marked `slow`; `bash scripts/test.sh -m "not slow"` is the fast loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparcom.curation.records import InstructionRecord

# torch and transformers are imported where used: with `-n 2`, the process that only hands out
# tests to the workers then starts them seconds sooner.


# Every Prefect server the tests start is a small SQLite one on a loaded machine: database calls
# wait longer before the server gives up with a 503, and Prefect's client retries 429/502/503
# more often (with backoff) than its default 5 times. tests/test_deployment_e2e.py passes these
# to its server, worker and CLI processes; here they reach the test server and clients.
SMALL_SERVER_SETTINGS = {
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",             # statement timeout; default 10 s
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",  # default 5 s
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_TIMEOUT": "60",  # waiting for a pooled connection
    "PREFECT_CLIENT_MAX_RETRIES": "8",                   # 1 + 2 + ... + 30 s: minutes of a busy server
}
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


def make_record(i: int, category: str, instruction: str, input: str = "", response: str = "An answer.") -> InstructionRecord:
    return InstructionRecord(
        id=f"t-{i:03d}", category=category, origin="ai" if i % 2 else "human", source="tests",
        instruction=instruction, input=input, response=response, license="CC0-1.0")


SAMPLE_TEXTS = [
    ("CLS", "Is this review positive or negative?", "The soup was cold and the waiter rude.", "Negative."),
    ("CODE", "Write a Python function that reverses a string.", "", "def rev(s):\n    return s[::-1]"),
    ("QA", "What is the capital of Peru?", "", "Lima."),
    ("GEN", "Write a haiku about autumn rain falling on old stone steps.", "", "Grey rain on old steps,\nmoss drinks..."),
    ("MATH", "What is 17 times 23?", "", "17 x 23 = 391.\nAnswer: 391"),
    ("SUM", "Summarize in one sentence.", "The council met on Tuesday. It voted to repair the bridge, "
     "to plant forty trees along the river and to open the library on Sundays from next spring.",
     "The council approved a bridge repair, new trees and Sunday library hours."),
    ("QA", "Why is the sky blue?", "", "Air scatters blue light more than red light."),
    ("MATH", "Solve 2x + 6 = 14.", "", "2x = 8, so x = 4.\nAnswer: 4"),
    ("CLS", "Label the topic: sports, politics or science.", "The striker scored twice in the final.", "sports"),
    ("GEN", "Give me three names for a bakery.", "", "Rise & Shine; The Crumb Club; Flour Power"),
    ("CODE", "Explain what this does.", "print(sum(range(10)))", "It prints 45, the sum of 0 to 9."),
    ("SUM", "Give a headline.", "Scientists found that bees can count up to four.", "Bees can count to four"),
]


def reference_tokens(record: InstructionRecord, tokenizer, span: str) -> tuple[list[int], int]:
    """The unpadded token ids a naive reference feeds the model, and the first counted position."""
    prompt = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": record.user_turn()}], add_generation_prompt=True)["input_ids"])
    if span == "response":
        return prompt + tokenizer(record.response, add_special_tokens=False)["input_ids"], len(prompt)
    return prompt, 0


def forward_with_hooks(model, ids: list[int], hooks: list) -> None:
    """One unpadded forward pass of the full model; the hooks are removed even on error."""
    import torch

    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()


def hooked(module: str, kind: str, *counts: str) -> dict:
    """One entry of a store's `hooked_modules` attribute."""
    return {"module": module, "kind": kind, "counts": list(counts)}


def in_model_order(entries: list[dict]) -> list[dict]:
    """`model.layers.<i>....` entries ordered as `named_modules()` lists them: by layer, then a
    module before its submodules (the hooked ones sort by name the way the models define them)."""
    return sorted(entries, key=lambda entry: (int(entry["module"].split(".")[2]), entry["module"]))


def llama_hooked_modules(config) -> list[dict]:
    """A LLaMA's hook points: each layer's activation module, and the last layer's MLP, whose
    hook only stops the forward pass."""
    last = config.num_hidden_layers - 1
    return in_model_order(
        [hooked(f"model.layers.{i}.mlp.act_fn", "forward_hook", "act_count") for i in range(last + 1)]
        + [hooked(f"model.layers.{last}.mlp", "forward_hook")])


@pytest.fixture
def sample_records() -> list[InstructionRecord]:
    return [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]
