"""The chat template's share of the counted tokens: how much of a set can come from the tokens
every prompt shares (the system prompt, role markers, the generation prompt).

- `template_tokens(path)`: the tokens the chat template adds to a prompt (the prompt span
  minus the content span, docs/method.md section 2), the fewest over a few sample messages, from the tokenizer
  saved with the model.
- `template_share(attrs, labels, token_total)`: template_share[group] = template tokens x the
  group's instructions / the group's counted tokens, with the tokens per prompt as an attribute;
  or None and the reason it is unknown. A component active on every template token and on no
  other has frequency template_share[group]: set members at or below it could owe their place to
  the template alone, members above it are active on the instructions' own text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from sparcom.core.settings import default_cache_dir
from sparcom.curation.records import InstructionRecord

SAMPLES = ("Summarize the text.", "What is 12 times 7?", "Write a Python function that adds two numbers.")


def _tokenizer_path(attrs: dict) -> Path:
    """The model's own path, or for a .gguf file the converted copy extraction left in the
    default cache (reading the tokenizer out of a GGUF file takes half a minute)."""
    path = Path(attrs["model_path"])
    converted = default_cache_dir() / "converted" / str(attrs.get("model_fingerprint"))[:16]
    return converted if path.suffix == ".gguf" and (converted / "tokenizer_config.json").is_file() else path


def template_tokens(model_path: Path) -> int:
    from transformers import AutoTokenizer

    from sparcom.curation.prompts import tokenize_instruction

    path = Path(model_path)
    tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
                 else AutoTokenizer.from_pretrained(path))
    counts = []
    for k, text in enumerate(SAMPLES):
        record = InstructionRecord(id=f"template-{k}", category="QA", origin="ai", source="sample",
                                   instruction=text, response="-", license="-")
        tokens = tokenize_instruction(record, tokenizer, "content")
        counts.append(len(tokens) - sum(tokens.counted))
    return min(counts)


def template_share(attrs: dict, labels: np.ndarray, token_total: xr.DataArray
                   ) -> tuple[xr.DataArray | None, dict]:
    """(template_share[group] or None, attributes: the tokens per prompt or the reason)."""
    span = attrs.get("token_span")
    if span != "prompt":
        reason = (f"token span {span!r}: no template tokens are counted" if span in ("content", "response")
                  else "the store does not record its token span")
        return None, {"template_share_left_out": reason}
    if not attrs.get("chat_template", False):
        return None, {"template_share_left_out": "the model has no chat template (or the store does not say)"}
    try:
        per_prompt = template_tokens(_tokenizer_path(attrs))
    except Exception as error:  # a moved model, a .gguf file, no tokenizer: say so, do not fail
        return None, {"template_share_left_out": f"tokenizer at {attrs.get('model_path')!r} "
                                                 f"not usable: {type(error).__name__}: {error}"}
    groups = token_total[token_total.dims[0]].values
    instructions = (labels[:, None] == np.asarray(groups, dtype=str)[None, :]).sum(0)
    share = xr.DataArray(per_prompt * instructions, dims=token_total.dims, coords=token_total.coords)
    share = share / token_total.where(token_total > 0)
    share.attrs = {"meaning": "fraction of the counted tokens that are chat-template tokens"}
    return share, {"template_tokens_per_prompt": per_prompt}
