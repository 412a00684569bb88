"""Switching components off during the forward pass (docs/method.md section 6), for every family a store holds.

- `Ablation(model, off)`: a context manager that switches off the components marked
  True in `off` (family name -> boolean numpy array over the family's component dims, as in
  `components.zarr`) and undoes every change on exit, even on error.

    with Ablation(model, {"neurons": mask}):
        model(input_ids)   # neuron (layer, i) with mask[layer, i] contributes nothing

- `neurons`, `shared_neurons`: a forward hook on the activation module (the one counting reads)
  sets f(gate)_i to 0, the same as a zero in column i of down_proj's input (or f(fc_in x)_i = 0).
- `expert_neurons` (e, i): transformers 5 fuses a layer's experts into one module and dispatches
  to eager, batched_mm or grouped_mm code, which all compute f(x W_gate[e]) * (x W_up[e]); there
  is no per-expert hook point. Row i of expert e's gate projection (and its bias) is zeroed in
  place for the duration, so f(gate)_i = f(0) = 0 exactly, only inside expert e and only on the
  tokens routed to it, whichever implementation runs; the saved rows are written back on exit.
  Activations with f(0) != 0 are refused, and so are experts whose weights a device map
  offloaded (they sit on the `meta` device and are read from elsewhere layer by layer, so a
  zeroed row would change nothing): refused by name, before anything runs.
- `experts` (e of a layer): a forward hook on the router takes the router's own logits, sets the
  removed experts' logits to -inf and redoes the router's choice from them (top-k, then the
  model's own weight normalisation), so every token goes to its next-best experts. The choice
  from logits follows each supported router (`ROUTING`); `moe_router(model, index)` finds the
  router of MoE layer `index`.
- `ReversibleHooks`: the context manager both `Ablation` and the attribution's hooks
  (`sparcom.attribution.estimate.AttributionHooks`) are: hooks and changes undone on exit, even
  when installing them fails half-way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Self

import numpy as np
import torch
from torch import nn

from sparcom.extraction.architectures import SUPPORTED, FFNSites, ffn_sites
from sparcom.extraction.schema import FAMILY_NAMES


def _softmax_top_k(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral (always renormalised), Qwen2-MoE, Qwen3-MoE and OLMoE (`norm_topk_prob`)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _deepseek_v2(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.float().softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        scores = scores.masked_fill(~_group_mask(router, scores.view(
            -1, router.num_group, router.num_experts // router.num_group).max(dim=-1).values), 0.0)
    weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, indices


def _deepseek_v3(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.float().sigmoid()
    # The correction bias only steers the choice; a removed expert must not be choosable at all.
    choice = (scores + router.e_score_correction_bias).masked_fill(torch.isneginf(logits), float("-inf"))
    grouped = choice.view(-1, router.num_group, router.num_experts // router.num_group)
    choice = choice.masked_fill(~_group_mask(router, grouped.topk(2, dim=-1)[0].sum(dim=-1)), float("-inf"))
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, indices


def _group_mask(router: nn.Module, group_scores: torch.Tensor) -> torch.Tensor:
    chosen = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1).bool()
    return mask.unsqueeze(-1).expand(-1, router.num_group, router.num_experts // router.num_group).reshape(
        -1, router.num_experts)


# The router's choice from its logits, per model type: what its forward does after F.linear.
ROUTING: dict[str, Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "mixtral": _softmax_top_k, "qwen2_moe": _softmax_top_k, "qwen3_moe": _softmax_top_k,
    "olmoe": _softmax_top_k, "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3,
}


class AblationError(ValueError):
    pass


class ReversibleHooks(ABC):
    """Hooks on a model for the duration of `with`: `_install` registers them (their handles in
    `_handles`) and `_undo` reverts whatever else it changed; on exit, and when installing fails
    half-way, every handle is removed and `_undo` runs."""

    def __init__(self):
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Self:
        try:
            self._install()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._undo()

    @abstractmethod
    def _install(self) -> None: ...

    @abstractmethod
    def _undo(self) -> None: ...


class Ablation(ReversibleHooks):
    """Switch components off inside `with`; see the module docstring for where each family is cut."""

    def __init__(self, model: nn.Module, off: Mapping[str, np.ndarray], sites: FFNSites | None = None):
        unknown = sorted(set(off) - set(FAMILY_NAMES))
        if unknown:
            raise AblationError(f"unknown component family {unknown[0]!r}; expected one of {', '.join(FAMILY_NAMES)}")
        self.model = model
        self.sites = sites if sites is not None else ffn_sites(model)
        self.off = {name: np.asarray(mask, dtype=bool) for name, mask in off.items()}
        self._check_shapes()
        super().__init__()
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, rows, values)

    def _check_shapes(self) -> None:
        shapes = self.sites.family_shapes()
        for name, mask in self.off.items():
            if mask.shape != shapes.get(name):
                raise AblationError(f"{name}: the mask has shape {mask.shape}, the model's {name} are "
                                    f"{shapes[name] if name in shapes else 'none'}")

    def _undo(self) -> None:
        with torch.no_grad():
            for parameter, rows, values in reversed(self._saved):
                parameter[rows] = values
        self._saved.clear()

    def _install(self) -> None:
        sites = self.sites
        if "neurons" in self.off:
            for module, mask in zip(sites.dense_activations, self.off["neurons"]):
                self._zero_outputs(module, mask)
        if "shared_neurons" in self.off:
            for layer, mask in zip(sites.moe_layers, self.off["shared_neurons"]):
                self._zero_outputs(layer.shared_activation, mask)
        if "expert_neurons" in self.off:
            for layer, mask in zip(sites.moe_layers, self.off["expert_neurons"]):
                self._zero_expert_gates(layer.experts, mask, layer.index)
        if "experts" in self.off:
            for layer, mask in zip(sites.moe_layers, self.off["experts"]):
                self._remove_experts(layer, mask)

    def _zero_outputs(self, module: nn.Module, mask: np.ndarray) -> None:
        if not mask.any():
            return
        off = None

        def zero(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            nonlocal off
            if off is None or off.device != output.device:
                off = torch.as_tensor(mask, device=output.device)
            return output.masked_fill(off, 0)

        self._handles.append(module.register_forward_hook(zero))

    def _zero_expert_gates(self, experts: nn.Module, mask: np.ndarray, index: int) -> None:
        if not mask.any():
            return
        weights = experts.gate_up_proj
        if weights.is_meta:
            raise AblationError(
                f"layer {index} {type(experts).__name__}: its weights are offloaded by the device map (meta), so "
                "its neurons cannot be switched off in place; give the experts room on a device (max_memory), "
                "or switch off experts or shared neurons instead")
        probe = torch.zeros(1, dtype=weights.dtype, device=weights.device)
        if experts.act_fn(probe).item() != 0:
            raise AblationError(f"{type(experts).__name__}: its activation is not 0 at 0, so a zeroed gate "
                                "row would not switch a neuron off")
        expert, neuron = np.nonzero(mask)
        # Concatenated layout [gate; up] (gate row i is row i), or interleaved [g0, u0, g1, u1, ...].
        gate_row = neuron if getattr(experts, "is_concatenated", True) else 2 * neuron
        rows = (torch.as_tensor(expert, device=weights.device), torch.as_tensor(gate_row, device=weights.device))
        targets = [weights]
        bias = getattr(experts, "gate_up_proj_bias", None)
        if isinstance(bias, torch.Tensor):
            targets.append(bias)
        with torch.no_grad():
            for parameter in targets:
                self._saved.append((parameter, rows, parameter[rows].clone()))
                parameter[rows] = 0

    def _remove_experts(self, layer, mask: np.ndarray) -> None:
        if not mask.any():
            return
        router = moe_router(self.model, layer.index)
        kept = int((~mask).sum())
        if kept < router.top_k:
            raise AblationError(f"layer {layer.index}: removing {int(mask.sum())} experts leaves {kept}, "
                                f"fewer than the {router.top_k} each token is routed to")
        routing = ROUTING[self.model.config.model_type]
        removed = None

        def reroute(module: nn.Module, inputs, output):
            nonlocal removed
            logits, weights, indices = output
            if removed is None or removed.device != logits.device:
                removed = torch.as_tensor(mask, device=logits.device)
            new_weights, new_indices = routing(module, logits.masked_fill(removed, float("-inf")))
            return logits, new_weights.to(weights.dtype), new_indices.to(indices.dtype)

        self._handles.append(router.register_forward_hook(reroute))


def moe_router(model: nn.Module, index: int) -> nn.Module:
    """The router of MoE layer `index`: the MoE block's `gate` in every supported MoE model."""
    model_type = model.config.model_type
    if model_type not in ROUTING:
        raise AblationError(f"{model_type}: no known router, so experts cannot be removed from routing")
    router = getattr(model.get_submodule(SUPPORTED[model_type])[index].mlp, "gate", None)
    if not isinstance(router, nn.Module) or not hasattr(router, "top_k"):
        raise AblationError(f"{model_type} layer {index}: no router (`gate` with top_k) beside the experts")
    return router
