"""Counting FFN activations inside the forward pass, keeping only integers (SPEC section 2).

- `FFNCounter(sites)`: a context manager whose hooks add, per batch row, the number of counted
  tokens on which each neuron's activation is > 0. Hooks always remove themselves.

    with FFNCounter(dense_ffn_sites(model)) as counter:
        counts = counter.count(model, input_ids, attention_mask, counted_mask)  # [batch, layer, neuron]

The forward pass stops in the hook of the last layer: nothing after it (the rest of that MLP,
the final norm, the LM head) runs, because extraction needs no logits.
"""

from __future__ import annotations

import torch
from torch import nn

from sparcom.architectures import DenseSites


class _LastLayerCounted(Exception):
    """Raised from the last hook to skip the rest of the forward pass."""


class FFNCounter:
    def __init__(self, sites: DenseSites):
        self.sites = sites
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._counts: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def __enter__(self) -> FFNCounter:
        last = len(self.sites.activations) - 1
        for layer, module in enumerate(self.sites.activations):
            self._handles.append(module.register_forward_hook(self._hook(layer, stop=layer == last)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int, stop: bool):
        def count_positive(module: nn.Module, inputs, output: torch.Tensor):
            active = (output > 0) & self._mask
            self._counts[:, layer] = active.sum(dim=1, dtype=torch.int32)
            if stop:
                raise _LastLayerCounted

        return count_positive

    @torch.inference_mode()
    def count(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        counted_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Counts [batch, layer, neuron] (int32) over the tokens where counted_mask is true."""
        batch = input_ids.shape[0]
        self._counts = torch.zeros(
            (batch, len(self.sites.activations), self.sites.neurons), dtype=torch.int32,
            device=input_ids.device)
        self._mask = (counted_mask & attention_mask.bool()).unsqueeze(-1)
        # Positions follow the real tokens, so left padding gives the same positions as no padding.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
        except _LastLayerCounted:
            pass
        else:
            raise RuntimeError("the forward pass never reached the last counted layer")
        counts, self._counts, self._mask = self._counts, None, None
        return counts
