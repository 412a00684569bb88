"""Builders of test inputs, shared by several test files: records, constructed count stores, tiny
model configurations, JSONL files and `dask` processes. They compute no expected result: the
independent computations tests compare against are in tests/references.py, and fixtures are in
tests/conftest.py. Test files import from here (`from builders import ...`), never from each other.

Two modules rather than one: builders make what a test feeds the code under test, references say
what it must return. Together they hold over 600 lines; apart, a reader checking that a reference
is independent of the code reads only references, and builders stay light enough for conftest to
import at start-up.

Records and files
    SAMPLE_TEXTS      twelve (category, instruction, input, response) tuples, two per category
    HELD_OUT          SAMPLE_TEXTS with numbered texts: records kept out of a store
    make_record       one InstructionRecord with a numbered id (t-000) and test defaults
    write_jsonl       records written one JSON object a line

Count stores (the store contract's layout)
    CATEGORIES        eleven category labels, CLS..CODE, for constructed stores
    make_store        a dense store from given act_count and token_count arrays
    moe_store         a random DeepSeek-style (or, without dense layers, Mixtral-style) store
    write_store       a store written to Zarr as extraction leaves it: chunked, complete, sealed
    attribution_store an attribution store (ATTR.zarr layout) of a count store's records

Tiny models
    SMALL, MOE        the shared sizes of the tiny configurations
    CONFIGS           one tiny transformers configuration per supported family
    tiny              a randomly initialised model of a family, large weights, in memory

Processes and servers
    DASK, START_TIMEOUT   the `dask` command beside this Python, and how long to wait for it
    free_port             a free TCP port on 127.0.0.1
    start_workers, start_cluster   `dask worker` processes of one thread; a `dask scheduler` with them
    stop                  a process terminated, then killed if it does not end
    SMALL_SERVER_SETTINGS Prefect settings for small SQLite servers on a loaded machine

torch, transformers and xarray are imported where used: conftest imports this module, and with
`-n 2` the process that only hands out tests then starts sooner.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparcom.curation.records import InstructionRecord

if TYPE_CHECKING:
    import xarray as xr
    from torch import nn


# --- records and files -------------------------------------------------------------------------

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


HELD_OUT = [(c, f"{i} {text}", extra, f"{answer} {i}") for i, (c, text, extra, answer) in enumerate(SAMPLE_TEXTS)]


def write_jsonl(records, path):
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    return path


# --- count stores --------------------------------------------------------------------------------

CATEGORIES = ["CLS", "MATH", "QA", "CLS", "MATH", "QA", "CLS", "SUM", "CODE", "QA", "CLS"]


def make_store(act_count: np.ndarray, token_count: np.ndarray, categories: list[str]) -> xr.Dataset:
    import xarray as xr

    n = len(categories)
    return xr.Dataset(
        {"act_count": (("instruction", "layer", "neuron"), act_count.astype(np.uint32)),
         "token_count": (("instruction",), token_count.astype(np.uint32))},
        coords={"instruction_id": ("instruction", [f"i{k}" for k in range(n)]),
                "category": ("instruction", categories),
                "origin": ("instruction", ["ai", "human"] * (n // 2) + ["ai"] * (n % 2)),
                "layer": np.arange(act_count.shape[1])})


def moe_store(seed: int, categories: list[str], dense_layers: int = 2, moe_layers: int = 3,
              experts: int = 4, expert_neurons: int = 5, shared_neurons: int = 6) -> xr.Dataset:
    """A DeepSeek-style store: dense layers first (dim `layer`), then MoE layers (`moe_layer`
    holds their true indices); without dense layers, a Mixtral-style one."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    n = len(categories)
    tokens = rng.integers(4, 30, n)
    routed = rng.integers(0, 7, (n, moe_layers, experts)).clip(max=tokens[:, None, None])
    variables = {
        "token_count": (("instruction",), tokens),
        "expert_count": (("instruction", "moe_layer", "expert"), routed),
        "expert_act_count": (("instruction", "moe_layer", "expert", "expert_neuron"),
                             rng.integers(0, 7, (n, moe_layers, experts, expert_neurons)).clip(max=routed[..., None])),
        "shared_act_count": (("instruction", "moe_layer", "shared_neuron"),
                             rng.integers(0, 7, (n, moe_layers, shared_neurons)).clip(max=tokens[:, None, None])),
    }
    coords = {"moe_layer": np.arange(dense_layers, dense_layers + moe_layers, dtype=np.int32)}
    if dense_layers:
        variables["act_count"] = (("instruction", "layer", "neuron"),
                                  rng.integers(0, 7, (n, dense_layers, 8)).clip(max=tokens[:, None, None]))
        coords["layer"] = np.arange(dense_layers, dtype=np.int32)
    store = xr.Dataset({k: (dims, np.asarray(v, dtype=np.uint32)) for k, (dims, v) in variables.items()},
                       coords={"instruction_id": ("instruction", [f"i{k}" for k in range(n)]),
                               "category": ("instruction", categories),
                               "origin": ("instruction", ["ai", "human"] * (n // 2) + ["ai"] * (n % 2)),
                               **coords})
    return store


def write_store(store: xr.Dataset, path: Path, instruction_chunk: int = 3) -> Path:
    """The store as extraction leaves it: Zarr v3, chunked along instruction and layer, complete."""
    import warnings

    from sparcom.extraction.store import seal_store

    chunk = {"instruction": instruction_chunk, "layer": 1, "moe_layer": 2}
    encoding = {name: {"chunks": tuple(min(chunk.get(d, store.sizes[d]), store.sizes[d]) for d in var.dims)}
                for name, var in store.data_vars.items()}
    coords = {c: ("instruction", np.array(store[c].values, dtype=object))
              for c in ("instruction_id", "category", "origin")}
    attrs = {"model": "tiny-test", "model_fingerprint": "f" * 64, "dataset_hash": "d" * 64,
             "token_span": "prompt", "sparcom_status": "complete"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        store.assign_coords(coords).assign_attrs(attrs).to_zarr(
            path, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
    seal_store(path)
    return path


ATTRIBUTION_OF = {"act_count": "act_attribution", "expert_count": "expert_attribution",
                  "expert_act_count": "expert_act_attribution", "shared_act_count": "shared_act_attribution"}


def attribution_store(store: xr.Dataset, seed: int, eighths: int = 16) -> xr.Dataset:
    """Float32 estimates for each count family of `store`, its dims and coordinates: random
    multiples of 1/8 in [-eighths/8, eighths/8], so every float64 sum of them is exact, in any
    order, and ties are common."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    estimates = {attribution: (store[count].dims, (rng.integers(-eighths, eighths + 1, store[count].shape) / 8)
                               .astype(np.float32))
                 for count, attribution in ATTRIBUTION_OF.items() if count in store}
    return xr.Dataset({**estimates, "response_tokens": (("instruction",), np.full(store.sizes["instruction"], 16,
                                                                                 dtype=np.uint32))},
                      coords=store.coords).assign_attrs(max_response_tokens=16)


# --- tiny models -----------------------------------------------------------------------------------

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
MOE = dict(num_experts_per_tok=2)


CONFIGS = {
    "mistral": ("MistralConfig", dict(SMALL, intermediate_size=48)),
    "qwen2": ("Qwen2Config", dict(SMALL, intermediate_size=48)),
    "qwen3": ("Qwen3Config", dict(SMALL, intermediate_size=48, head_dim=8)),
    "gemma": ("GemmaConfig", dict(SMALL, intermediate_size=48, head_dim=8, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(SMALL, intermediate_size=48, head_dim=8)),
    "phi3": ("Phi3Config", dict(SMALL, intermediate_size=48)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=2048)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=2048)),
    "mixtral": ("MixtralConfig", dict(SMALL, **MOE, intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20, intermediate_size=40,
                                         mlp_only_layers=[0], decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                         intermediate_size=40, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(SMALL, **MOE, num_experts=4, intermediate_size=24)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        **{**SMALL, **MOE, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=40, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        **{**SMALL, **MOE, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=2, moe_intermediate_size=16,
        intermediate_size=40, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
}


def tiny(family: str, tokenizer, dtype=None) -> nn.Module:
    """A randomly initialised model of the family in CONFIGS (float32 unless dtype says otherwise)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    config_class, options = CONFIGS[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2, **options)  # large weights: clear effects
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if family == "deepseek_v3":  # a non-zero correction bias, so removal must not leave it choosable
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(0.5, -0.5, 4))
    return model


# --- processes and servers -------------------------------------------------------------------------

DASK = str(Path(sys.executable).with_name("dask"))
START_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)

def start_workers(address: str, logs: Path, ports: list[int], env: dict) -> list[subprocess.Popen]:
    """One `dask worker` process per port, one thread each, no nanny (a killed one stays dead)."""
    return [subprocess.Popen(
        [DASK, "worker", address, "--host", "127.0.0.1", "--worker-port", str(port), "--nthreads", "1",
         "--no-nanny", "--memory-limit", "2GB", "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=(logs / f"worker-{port}.log").open("w"), env=env) for port in ports]


def start_cluster(logs: Path, cache_dir: Path, n_workers: int = 2):
    """A `dask scheduler` and worker processes on 127.0.0.1: (address, {worker address: process}, all)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XDG_CACHE_HOME": str(cache_dir.parent)}
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard",
         "--no-show"], stdout=subprocess.DEVNULL, stderr=(logs / "scheduler.log").open("w"), env=env)
    ports = [free_port() for _ in range(n_workers)]
    workers = start_workers(address, logs, ports, env)
    from distributed import Client  # builders stay light for conftest: Dask loads where a cluster starts

    with Client(address, timeout=START_TIMEOUT) as client:
        client.wait_for_workers(n_workers, timeout=START_TIMEOUT)
    return address, {f"tcp://127.0.0.1:{p}": w for p, w in zip(ports, workers)}, [scheduler, *workers]


# Every Prefect server the tests start is a small SQLite one on a loaded machine: database calls
# wait longer before the server gives up with a 503, and Prefect's client retries 429/502/503
# more often (with backoff) than its default 5 times. tests/test_deployment_e2e.py passes these
# to its server, worker and CLI processes; conftest puts them in the environment of the tests'
# own server and clients.
SMALL_SERVER_SETTINGS = {
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",             # statement timeout; default 10 s
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",  # default 5 s
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_TIMEOUT": "60",  # waiting for a pooled connection
    "PREFECT_CLIENT_MAX_RETRIES": "8",                   # 1 + 2 + ... + 30 s: minutes of a busy server
}
