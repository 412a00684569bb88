"""Batches of tokenized prompts under a token budget, padded (docs/method.md section 7): the
batching of every stage that runs the model over records (extraction, the ablation).

- `plan_batches(lengths, batch_tokens, max_batch_size, max_padding)`: length-sorted batches.
- `pad_batch(items, pad_id, side, device)`: input ids, attention mask and counted mask of one batch.
- `padded_batches(tokenized, tokenizer, settings, device)`: every planned batch, padded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sparcom.curation.prompts import TokenizedInstruction
from sparcom.extraction.settings import ExtractionSettings


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch_size: int, max_padding: float = 0.05
) -> list[list[int]]:
    """Indices grouped longest first. A batch closes when its padded size (rows x longest) would
    pass the token budget, or its padded-token fraction would pass `max_padding`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for index in order:
        if batches:
            current = batches[-1]
            longest = lengths[current[0]]
            rows = len(current) + 1
            fits = rows <= min(max_batch_size, batch_tokens // longest)
            padding = 1 - (real + lengths[index]) / (rows * longest)
            if fits and padding <= max_padding:
                current.append(index)
                real += lengths[index]
                continue
        batches.append([index])
        real = lengths[index]
    return batches


def pad_batch(
    items: Sequence[TokenizedInstruction], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(item) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    counted = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        span = slice(0, len(item)) if side == "right" else slice(width - len(item), width)
        ids[row, span] = torch.tensor(item.input_ids)
        attention[row, span] = 1
        counted[row, span] = torch.tensor(item.counted)
    return ids.to(device), attention.to(device), counted.to(device)


def padded_batches(
    tokenized: Sequence[TokenizedInstruction], tokenizer: PreTrainedTokenizerBase, settings: ExtractionSettings,
    device: torch.device,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(positions in `tokenized`, input ids, attention mask, counted mask) per planned batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in plan_batches([len(t) for t in tokenized], settings.batch_tokens,
                              settings.max_batch_size, settings.max_padding):
        yield (batch, *pad_batch([tokenized[b] for b in batch], pad_id, settings.padding_side, device))
