"""Counting activations inside the forward pass, keeping only integers (docs/method.md sections 2 and 3).

- `FFNCounter(sites)`: a context manager whose hooks count, per batch row, the counted tokens on
  which each component is active. Hooks always remove themselves.

    with FFNCounter(ffn_sites(model)) as counter:
        counts = counter.count(model, input_ids, attention_mask, counted_mask)
        counts["act_count"]  # [batch, layer, neuron] int32; MoE models add the expert counts

- Dense and shared-expert neurons: the hook reads the activation module's output, f(gate), as
  the model computed it.
- Routed experts: transformers 5 fuses a layer's experts into one module and dispatches its
  forward to one of several implementations (eager, grouped_mm, batched_mm), so there is no
  per-expert module to hook. A counting experts backend (`sparcom.extraction.expert_counting`) runs the
  model's chosen implementation and counts the activated gates it computes, for the tokens routed
  to each expert. Where the backend does not cover an implementation, a pre-hook on the fused
  module takes the router's top-k choice from its arguments and computes f(x W_gate[e]) again,
  the same arithmetic as the eager implementation: that repeats the gate projection of routed
  tokens (a third of the experts' matmul work).
- `expert_counting_path(sites)`: which of the two counts the routed experts of a model
  ("backend", "pre_hook", both joined by "+", or "none" without routed experts).
- `FFNCounter(sites).hook_points`: every module the counter hooks, in model order, as
  `HookPoint(module, kind, counts)`: its dotted path (as `model.named_modules()` names it), how
  it is hooked, and the store variables it feeds. Kinds:
    "forward_hook"      reads the module's output (activation modules; and the last layer's
                        MLP, which feeds no variable: its hook ends the forward pass);
    "forward_pre_hook"  reads the module's arguments (fused experts: the router's top-k choice);
    "experts_backend"   the fused experts module runs through the counting experts backend.
  The store keeps them as its `hooked_modules` attribute.

The forward pass stops after the last layer's MLP: the final norm and the LM head never run.
A model spread over devices (`device_map`) counts each layer where it computes: its hooks see
the masks and count buffers on that device, and the buffers are added up on the input's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sparcom.extraction.architectures import FFNSites
from sparcom.extraction.expert_counting import CountingBackend, backend_covers


def expert_counting_path(sites: FFNSites) -> str:
    paths = {"backend" if backend_covers(layer.experts) else "pre_hook" for layer in sites.moe_layers}
    return "+".join(sorted(paths)) or "none"


FORWARD_HOOK = "forward_hook"
FORWARD_PRE_HOOK = "forward_pre_hook"
EXPERTS_BACKEND = "experts_backend"


@dataclass(frozen=True)
class HookPoint:
    module: str               # dotted path, as model.named_modules() gives it
    kind: str
    counts: tuple[str, ...]   # the store variables it feeds

    def as_attribute(self) -> dict:
        return {"module": self.module, "kind": self.kind, "counts": list(self.counts)}


@dataclass(frozen=True)
class _Hook:
    point: HookPoint
    module: nn.Module
    slot: int | None          # the layer's place along the store's layer dimension
    hook: Callable | None     # None: the counting experts backend counts this module


class _LastLayerCounted(Exception):
    """Raised after the last MLP to skip the rest of the forward pass."""


class FFNCounter:
    def __init__(self, sites: FFNSites):
        self.sites = sites
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None        # [batch, seq] counted and not padding
        self._mask_bytes: torch.Tensor | None = None  # the same as uint8 [batch, seq, 1]
        self._rows: torch.Tensor | None = None        # [batch * seq] batch row of each flat token
        self._backend: CountingBackend | None = None
        self._elsewhere: dict[torch.device, tuple] = {}  # device -> (mask, mask_bytes, rows, buffers)

    @property
    def hook_points(self) -> list[HookPoint]:
        return [hook.point for hook in self._plan()]

    def _plan(self) -> list[_Hook]:
        """Every hook of this counter, in model order: the store's record and what `__enter__`
        installs come from this one list, so they cannot disagree."""
        sites, hooks = self.sites, []

        def add(module: nn.Module, kind: str, counts: tuple[str, ...], slot: int | None,
                hook: Callable | None) -> None:
            hooks.append(_Hook(HookPoint(sites.names[module], kind, counts), module, slot, hook))

        for slot, module in enumerate(sites.dense_activations):
            add(module, FORWARD_HOOK, ("act_count",), slot, partial(self._count_positive, "act_count", slot))
        for slot, layer in enumerate(sites.moe_layers):
            routed = ("expert_count", "expert_act_count")
            if backend_covers(layer.experts):
                add(layer.experts, EXPERTS_BACKEND, routed, slot, None)
            else:
                add(layer.experts, FORWARD_PRE_HOOK, routed, slot, partial(self._count_routed, slot))
            if layer.shared_activation is not None:
                add(layer.shared_activation, FORWARD_HOOK, ("shared_act_count",), slot,
                    partial(self._count_positive, "shared_act_count", slot))
        add(sites.last_mlp, FORWARD_HOOK, (), None, self._stop)
        order = {module: position for position, module in enumerate(sites.names)}
        return sorted(hooks, key=lambda hook: order[hook.module])

    def __enter__(self) -> FFNCounter:
        plan = self._plan()
        counted_by_backend = {hook.module: hook.slot for hook in plan if hook.point.kind == EXPERTS_BACKEND}
        if counted_by_backend:
            self._backend = CountingBackend(counted_by_backend, self._count_routes, self._count_gates).__enter__()
        for hook in plan:
            if hook.point.kind == FORWARD_HOOK:
                self._handles.append(hook.module.register_forward_hook(self._placed(hook.hook)))
            elif hook.point.kind == FORWARD_PRE_HOOK:
                self._handles.append(hook.module.register_forward_pre_hook(self._placed(hook.hook), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._backend is not None:
            self._backend.__exit__(*exc_info)
            self._backend = None

    def _placed(self, hook):
        """The hook, run with the masks and buffers of the device its layer computes on."""

        def on_layer_device(module: nn.Module, args, *rest):
            device = _first_tensor(args, *rest).device
            if device == self._mask.device:
                return hook(module, args, *rest)
            if device not in self._elsewhere:
                self._elsewhere[device] = (
                    self._mask.to(device), self._mask_bytes.to(device), self._rows.to(device),
                    {name: torch.zeros_like(values, device=device) for name, values in self._buffers.items()})
            home = self._mask, self._mask_bytes, self._rows, self._buffers
            self._mask, self._mask_bytes, self._rows, self._buffers = self._elsewhere[device]
            try:
                return hook(module, args, *rest)
            finally:
                self._mask, self._mask_bytes, self._rows, self._buffers = home

        return on_layer_device

    def _stop(self, module: nn.Module, inputs, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        # NaN propagates to the last layer, so one check here covers every counted activation.
        if torch.isnan(hidden.reshape(*self._mask.shape, -1)[self._mask]).any():
            raise FloatingPointError(
                "the model produced NaN at counted tokens, so counts would be wrong. Known cause: "
                "float64 with eager attention and left padding (the attention mask overflows); "
                "use right padding or another dtype")
        raise _LastLayerCounted

    def _count_positive(self, name: str, slot: int, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # uint8 multiply-and-sum: exact integers, and measured 3x faster than bool `&` then sum.
        active = (output.reshape(*self._mask.shape, -1) > 0).view(torch.uint8)
        active.mul_(self._mask_bytes)
        self._buffers[name][:, slot] = active.sum(dim=1, dtype=torch.int32)

    def _count_routed(self, slot: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        token, expert = self._count_routes(slot, top_k_index.reshape(hidden.shape[0], -1))
        self._count_expert_neurons(module, slot, hidden, token, expert)

    def _count_routes(self, slot: int, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts each counted token's routed experts; returns the (flat token, expert) pairs."""
        routed = (top_k_index < self.sites.experts) & self._mask.reshape(-1, 1)
        token, choice = routed.nonzero(as_tuple=True)
        expert = top_k_index[token, choice]
        rows = self._rows[token]
        self._buffers["expert_count"][:, slot].index_put_(
            (rows, expert), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
        return token, expert

    def _count_gates(self, slot: int, token: torch.Tensor, expert: torch.Tensor | int, active: torch.Tensor) -> None:
        """Adds activated gates (`active[row, neuron]`, rows grouped by expert) of the flat tokens
        `token` to their batch rows, keeping only counted tokens."""
        if isinstance(expert, int):
            experts, sizes = [expert], [len(token)]
        else:
            experts, sizes = (values.tolist() for values in torch.unique_consecutive(expert, return_counts=True))
        # A 0/1 matrix picks each batch row's counted tokens: one matmul per expert sums their rows.
        pick = torch.zeros((self._mask.shape[0], len(token)), dtype=torch.int8, device=token.device)
        pick[self._rows[token], torch.arange(len(token), device=token.device)] = self._mask_bytes.reshape(-1)[token].view(torch.int8)
        counts = self._buffers["expert_act_count"][:, slot]
        start = 0
        for e, size in zip(experts, sizes):
            counts[:, e] += _count_matmul(pick[:, start:start + size], active[start:start + size])
            start += size

    def _count_expert_neurons(self, experts: nn.Module, slot: int, hidden: torch.Tensor,
                              token: torch.Tensor, expert: torch.Tensor) -> None:
        width = self.sites.expert_neurons
        bias = getattr(experts, "gate_up_proj_bias", None)
        counts = self._buffers["expert_act_count"][:, slot]
        for e in expert.unique().tolist():
            tokens = token[expert == e]
            gate = F.linear(hidden[tokens], experts.gate_up_proj[e, :width],
                            None if bias is None else bias[e, :width])
            counts[:, e].index_add_(0, self._rows[tokens], (experts.act_fn(gate) > 0).to(torch.int32))

    def _allocate(self, batch: int, device: torch.device) -> None:
        sites = self.sites
        shapes = {}
        if sites.dense_layers:
            shapes["act_count"] = (batch, len(sites.dense_layers), sites.dense_neurons)
        if sites.moe_layers:
            shapes["expert_count"] = (batch, len(sites.moe_layers), sites.experts)
            shapes["expert_act_count"] = (batch, len(sites.moe_layers), sites.experts, sites.expert_neurons)
        if sites.has_shared_experts:
            shapes["shared_act_count"] = (batch, len(sites.moe_layers), sites.shared_neurons)
        self._buffers = {name: torch.zeros(shape, dtype=torch.int32, device=device)
                         for name, shape in shapes.items()}

    @torch.inference_mode()
    def count(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        counted_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Counts over the tokens where counted_mask is true, by variable name (docs/method.md section 7)."""
        batch, seq = input_ids.shape
        self._allocate(batch, input_ids.device)
        self._elsewhere = {}
        self._mask = counted_mask & attention_mask.bool()
        self._mask_bytes = self._mask.unsqueeze(-1).to(torch.uint8)
        self._rows = torch.arange(batch, device=input_ids.device).repeat_interleave(seq)
        # Positions follow the real tokens, so left padding gives the same positions as no padding.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
        except _LastLayerCounted:
            pass
        else:
            raise RuntimeError("the forward pass never reached the last layer's MLP")
        counts, self._buffers = self._buffers, {}
        for *_, buffers in self._elsewhere.values():  # each layer's slot is written on one device only
            for name, values in buffers.items():
                counts[name] += values.to(input_ids.device)
        self._mask = self._mask_bytes = self._rows = None
        self._elsewhere = {}
        return counts


def _count_matmul(pick: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """pick[row, token] @ active[token, neuron] in exact integers: int8 on CPU, where it is the
    fastest and the bool rows need no conversion; float32 elsewhere (exact below 2^24 tokens)."""
    if active.device.type == "cpu":
        return torch._int_mm(pick.contiguous(), active.view(torch.int8))
    return torch.mm(pick.float(), active.float()).round().to(torch.int32)


def _first_tensor(*values) -> torch.Tensor:
    """The first tensor among hook arguments (positional tuples, keyword dicts, outputs)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
        for item in items:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError("a counting hook got no tensor")
