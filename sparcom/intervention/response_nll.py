"""How well a model predicts each record's reference response (docs/method.md section 6).

- `tokenize_responses(records, tokenizer, max_response_tokens)`: per record the prompt (the
  `prompt` span: chat template with the generation prompt) followed by
  `tokenizer(response, add_special_tokens=False)`, no EOS, the response tokens marked; optionally
  only the first `max_response_tokens` of the response. A response without tokens is refused.
- `response_nll(model, tokenized, tokenizer, settings, device)`: the mean negative log-likelihood
  (natural log) of each record's response tokens, teacher-forced, batched and padded exactly as
  extraction batches (`sparcom.extraction.batching.padded_batches`). The decoder runs on every position; the
  LM head only on the positions that predict a response token.
- `batch_response_nll(model, ids, attention, counted)`: the same for one padded batch, as a
  tensor; differentiable where gradients are on (the attribution stage differentiates it).

    nll = response_nll(model, tokenize_responses(records, tokenizer), tokenizer, ExtractionSettings(), device)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparcom.curation.prompts import TokenizedInstruction, tokenize_instruction
from sparcom.curation.records import InstructionRecord
from sparcom.extraction.batching import padded_batches
from sparcom.extraction.settings import ExtractionSettings

# Positions whose logits are computed at once: bounds the [rows, vocabulary] logits in memory.
LM_HEAD_ROWS = 1024


def tokenize_responses(
    records: Sequence[InstructionRecord], tokenizer: PreTrainedTokenizerBase, max_response_tokens: int | None = None
) -> list[TokenizedInstruction]:
    tokenized = []
    for record in records:
        item = tokenize_instruction(record, tokenizer, "response")
        response = sum(item.counted)
        if response == 0:
            raise ValueError(f"record {record.id}: its response has no tokens, so there is nothing to predict")
        if max_response_tokens is not None and response > max_response_tokens:
            end = len(item) - response + max_response_tokens
            item = TokenizedInstruction(item.input_ids[:end], item.counted[:end])
        tokenized.append(item)
    return tokenized


@torch.inference_mode()
def response_nll(
    model: nn.Module,
    tokenized: Sequence[TokenizedInstruction],
    tokenizer: PreTrainedTokenizerBase,
    settings: ExtractionSettings,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean response NLL per record, in the order of `tokenized` (float64)."""
    nll = np.full(len(tokenized), np.nan)
    for batch, ids, attention, counted in padded_batches(tokenized, tokenizer, settings, device):
        nll[batch] = batch_response_nll(model, ids, attention, counted).cpu().numpy()
        if on_batch:
            on_batch(len(batch))
    if np.isnan(nll).any():
        raise FloatingPointError("the model produced NaN log-likelihoods (known cause: float64 with eager "
                                 "attention and left padding); use right padding or another dtype")
    return nll


def batch_response_nll(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor,
                       counted: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each row's counted (response) tokens, float64 [batch]."""
    decoder = model.base_model
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    # Positions follow the real tokens, so left padding gives the same positions as no padding.
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    predicts = torch.zeros_like(counted)
    predicts[:, :-1] = counted[:, 1:]  # position t predicts token t + 1
    rows, columns = predicts.nonzero(as_tuple=True)
    targets = ids[rows, columns + 1]
    losses = []
    for start in range(0, len(rows), LM_HEAD_ROWS):
        chunk = slice(start, start + LM_HEAD_ROWS)
        logits = head(hidden[rows[chunk], columns[chunk]]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        losses.append(F.cross_entropy(logits, targets[chunk], reduction="none"))
    totals = torch.zeros(len(ids), dtype=torch.float64, device=ids.device).index_add(
        0, rows, torch.cat(losses).double())
    return totals / predicts.sum(dim=1).double()

