"""Counting routed experts from the values their own computation produces (docs/method.md sections 2 and 3).

transformers 5 fuses a layer's experts into one module whose forward dispatches, through the
`ExpertsInterface`, to the implementation the model's config names (eager, batched_mm,
grouped_mm, ...). Each of these applies the experts' activation module to the gate projection
of the routed (token, expert) rows: once per expert in eager, once for all rows in the others.

- `backend_covers(experts)`: whether the counting backend can count this fused experts module:
  one of the implementations whose row order it knows, the standard gate (`act_fn(gate) * up`),
  and no expert parallelism.
- `CountingBackend(layers, on_routes, on_gates)`: a context manager that registers an experts
  backend under a name of its own and points the configs of the covered experts modules at it.
  The backend delegates to the model's chosen implementation, so the outputs are the model's
  own, and reads the activation module's output: `on_routes(slot, top_k_index)` gets each call's
  routing and `on_gates(slot, token, expert, active)` each block of activated gates, f(gate) > 0
  (rows of `active`, grouped by expert, belong to the flat tokens `token`, routed to `expert`:
  one id, or one per row).
  No gate is projected twice. On exit the configs and the interface are as they were, also on error.

    with CountingBackend({experts: slot}, count_routes, count_gates):
        model(input_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate

# Implementations whose activation calls `_gate_blocks` can line up with (token, expert) rows.
KNOWN_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

RoutesCallback = Callable[[int, torch.Tensor], None]
GatesCallback = Callable[[int, torch.Tensor, "torch.Tensor | int", torch.Tensor], None]


def _implementation(experts: nn.Module) -> str:
    return getattr(experts.config, "_experts_implementation", None) or "eager"


def backend_covers(experts: nn.Module) -> bool:
    eager = getattr(type(experts).forward, "__wrapped__", None)  # set by use_experts_implementation
    return (eager is not None and hasattr(experts, "config") and _implementation(experts) in KNOWN_IMPLEMENTATIONS
            and getattr(experts, "has_gate", False) and not getattr(experts, "_is_expert_parallel", True)
            and getattr(type(experts), "_apply_gate", None) is _default_apply_gate
            and isinstance(getattr(experts, "act_fn", None), nn.Module))


def _gate_blocks(implementation: str, top_k_index: torch.Tensor, n_experts: int) -> Iterator[tuple]:
    """Per activation call, in the order the implementation makes them: the rows' order that
    groups them by expert (None: already grouped), then each grouped row's flat token and expert."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    if implementation == "batched_mm":  # every (token, choice) row, token-major
        order = torch.argsort(flat, stable=True)
        yield order, order // top_k, flat[order]
    elif implementation == "grouped_mm":  # rows grouped by expert, by the implementation's own sort
        expert, order = torch.sort(flat)
        yield None, order // top_k, expert
    else:  # eager: one call per routed-to expert, its tokens as torch.where lists them
        mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        for e in mask.sum(dim=(-1, -2)).gt(0).nonzero()[:, 0].tolist():
            if e < n_experts:
                yield None, torch.where(mask[e])[1], e


class CountingBackend:
    def __init__(self, layers: Mapping[nn.Module, int], on_routes: RoutesCallback, on_gates: GatesCallback):
        self.layers = dict(layers)
        self.on_routes = on_routes
        self.on_gates = on_gates
        self.name = f"sparcom-counting-{id(self):x}"
        self._chosen: dict[int, tuple[object, str | None]] = {}  # id(config) -> (config, its implementation)

    def __enter__(self) -> CountingBackend:
        ALL_EXPERTS_FUNCTIONS[self.name] = self._forward
        try:
            for experts in self.layers:
                config = experts.config
                if id(config) not in self._chosen:
                    self._chosen[id(config)] = (config, config._experts_implementation_internal)
                    config._experts_implementation_internal = self.name
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for config, implementation in self._chosen.values():
            config._experts_implementation_internal = implementation
        self._chosen.clear()
        ALL_EXPERTS_FUNCTIONS.pop(self.name, None)

    def _forward(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        implementation = self._chosen[id(experts.config)][1] or "eager"
        chosen = ALL_EXPERTS_FUNCTIONS.get_interface(implementation, type(experts).forward.__wrapped__)
        slot = self.layers.get(experts)
        if slot is None:  # a module sharing the config that this backend does not count
            return chosen(experts, hidden_states, top_k_index, top_k_weights)
        self.on_routes(slot, top_k_index)
        blocks = _gate_blocks(implementation, top_k_index, experts.num_experts)

        def count_block(module: nn.Module, inputs, activation: torch.Tensor) -> None:
            order, token, expert = next(blocks, (None, None, None))
            if token is None or token.shape[0] != activation.shape[0]:
                raise RuntimeError(f"experts implementation '{implementation}' applied its activation to rows "
                                   "the counting backend cannot attribute to (token, expert) pairs")
            active = activation > 0
            self.on_gates(slot, token, expert, active if order is None else active[order])

        handle = experts.act_fn.register_forward_hook(count_block)
        try:
            output = chosen(experts, hidden_states, top_k_index, top_k_weights)
        finally:
            handle.remove()
        if next(blocks, None) is not None:
            raise RuntimeError(f"experts implementation '{implementation}' skipped routed experts")
        return output
