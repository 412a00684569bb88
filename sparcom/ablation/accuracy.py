"""Answer accuracy by greedy decoding, intact and with components switched off (docs/method.md
section 6, accuracy): the second measure of the ablation, for records with a checkable answer
(`sparcom.ablation.answers`).

- `tokenize_prompts(records, tokenizer)`: each record's `prompt` span (chat template with the
  generation prompt), the tokens greedy decoding continues.
- `greedy_generate(model, prompts, tokenizer, settings, device, max_new_tokens)`: the text each
  prompt continues with, choosing the most likely token at every step (no sampling, no
  penalties), at most `max_new_tokens` tokens, up to the model's first EOS. Batched with left
  padding by extraction's padding-capped batching (`plan_batches`, each row's length counted with
  its new tokens), positions following the real tokens: the same as one prompt at a time.
- `answers_correct(records, generations)`: 1.0 or 0.0 per record, NaN where it has no checkable answer.
- `accuracy_dataset(records, labels, evaluated, groups, controls, generations)`: the accuracy
  variables of `ablation.zarr` from the generations intact, per ablated group and per control
  and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparcom.ablation.answers import is_correct, reference_answer
from sparcom.ablation.schema import ABLATED, CONTROL, EVALUATED, INSTRUCTION, SEED
from sparcom.curation.prompts import TokenizedInstruction, tokenize_instruction
from sparcom.curation.records import InstructionRecord
from sparcom.extraction.batching import pad_batch, plan_batches
from sparcom.extraction.settings import ExtractionSettings


def tokenize_prompts(records: Sequence[InstructionRecord], tokenizer: PreTrainedTokenizerBase
                     ) -> list[TokenizedInstruction]:
    return [tokenize_instruction(record, tokenizer, "prompt") for record in records]


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    return set(configured if isinstance(configured, list) else [] if configured is None else [configured])


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[TokenizedInstruction],
    tokenizer: PreTrainedTokenizerBase,
    settings: ExtractionSettings,
    device: torch.device,
    max_new_tokens: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The decoded new tokens per prompt (special tokens left out), in the order of `prompts`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: greedy decoding needs at least 1 new token")
    decoder = model.base_model
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [""] * len(prompts)
    for batch in plan_batches([len(p) + max_new_tokens for p in prompts], settings.batch_tokens,
                              settings.max_batch_size, settings.max_padding):
        ids, attention, _ = pad_batch([prompts[b] for b in batch], pad_id, "left", device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        chosen, cache = [], None
        finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            output = decoder(input_ids=ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            cache = output.past_key_values
            logits = head(output.last_hidden_state[:, -1]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            token = logits.argmax(dim=-1).to(device)  # the head may sit on another device (device_map)
            chosen.append(token)
            finished |= torch.isin(token, eos)
            if finished.all():
                break
            ids = token[:, None]
            attention = torch.cat([attention, attention.new_ones(len(batch), 1)], dim=1)
            positions = positions[:, -1:] + 1
        stops = set(eos.tolist())
        for index, tokens in zip(batch, torch.stack(chosen, dim=1).tolist()):
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            texts[index] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if on_batch:
            on_batch(len(batch))
    return texts


def answers_correct(records: Sequence[InstructionRecord], generations: Sequence[str]) -> np.ndarray:
    return np.array([float(is_correct(record, text)) if reference_answer(record) is not None else np.nan
                     for record, text in zip(records, generations, strict=True)])


def _membership(labels: np.ndarray, evaluated: Sequence[str]) -> xr.DataArray:
    return xr.DataArray(np.asarray(labels)[:, None] == np.asarray(evaluated)[None, :],
                        dims=(INSTRUCTION, EVALUATED), coords={EVALUATED: list(evaluated)})


def _group_means(correct: xr.DataArray, member: xr.DataArray) -> xr.DataArray:
    """Mean over each evaluated group's records with a checkable answer (NaN: none)."""
    counted = member & correct.notnull()
    return xr.dot(correct.fillna(0.0), counted, dim=INSTRUCTION) / counted.sum(INSTRUCTION).where(
        lambda n: n > 0)


def accuracy_dataset(
    records: Sequence[InstructionRecord],
    labels: np.ndarray,
    evaluated: Sequence[str],
    generation_base: np.ndarray,
    generation: np.ndarray,
    generation_control: np.ndarray,
) -> xr.Dataset:
    """From the texts (object arrays) intact [instruction], per ablated group [ablated,
    instruction] and per control [control, seed, ablated, instruction]; records without a
    checkable answer are not decoded ('' and NaN)."""
    answers = [reference_answer(r) for r in records]

    def correct(texts: np.ndarray) -> np.ndarray:
        flat = texts.reshape(-1, len(records))
        return np.array([answers_correct(records, row) for row in flat]).reshape(texts.shape)

    member = _membership(labels, evaluated)
    checkable = xr.DataArray(np.array([a is not None for a in answers]), dims=(INSTRUCTION,))
    correct_base = xr.DataArray(correct(generation_base), dims=(INSTRUCTION,))
    correct_ablated = xr.DataArray(correct(generation), dims=(ABLATED, INSTRUCTION))
    correct_control = xr.DataArray(correct(generation_control), dims=(CONTROL, SEED, ABLATED, INSTRUCTION))
    # Every seed scores the same records, so the mean over seeds of the accuracies is this.
    seed_mean = correct_control.sum(SEED).where(checkable) / max(correct_control.sizes[SEED], 1)
    return xr.Dataset({
        "answer_checkable": checkable,
        "reference_answer": (INSTRUCTION, np.array([a or "" for a in answers], dtype=object)),
        "generation_base": (INSTRUCTION, generation_base),
        "generation": ((ABLATED, INSTRUCTION), generation),
        "correct_base": correct_base,
        "correct": correct_ablated,
        "correct_control": correct_control,
        "accuracy_records": (member & checkable).sum(INSTRUCTION),
        "accuracy_base": _group_means(correct_base, member),
        "accuracy": _group_means(correct_ablated, member),
        "accuracy_control": _group_means(seed_mean, member),
    })
