"""What switching each component off would do to a record's loss, to first order, for every
component at once: one forward and one backward pass per batch (docs/method.md section 6a).

The estimate is defined once for every family: give the component's contribution a scale alpha
(1: intact, 0: switched off exactly as `sparcom.intervention.hooks.Ablation` switches it off);
the estimate is -dL/dalpha at alpha = 1, L the mean NLL of the record's first K response
tokens, teacher-forced exactly as `sparcom.intervention.response_nll` scores it. Positive: the
loss would rise without the component.

- `attribute_records(loaded, records, max_response_tokens, settings)`: the estimates of every
  record, an xarray Dataset with the count store's dims (`sparcom.attribution.schema` names),
  float32, and `response_tokens[instruction]`. Batched and padded as extraction batches.
  `attribution_dataset(records, values, tokens, sites, max_response_tokens)` builds that Dataset.
- `check_responses(records)`: a record without a response is refused by name (nothing to score).
- `AttributionHooks(model, sites)`: a context manager holding the hooks; `estimate(ids,
  attention, counted)` gives one padded batch's estimates per store variable, [batch, ...].
  Parameters are frozen inside it (restored on exit): gradients reach activations only.

How each family is computed, h being the input of down_proj (f(gate) * up; f(fc_in x) for
non-gated MLPs) and g_t = dL/dy_t the gradient at a MoE layer's routed-experts output y_t:
- dense and shared-expert neurons: -sum_t h_t,i dL/dh_t,i, summed over every real position. The
  hook reads the activation module's output a = f(gate) (where the ablation zeroes it) and
  takes -sum_t a_t,i dL/da_t,i, the same number: h_i = a_i up_i.
- routed-expert neuron (e, i): the fused experts module has no per-expert point to hook, so h is
  recomputed on the tokens routed to e, and dL/dh_t = w_te W_down[e]^T g_t, w_te the routing
  weight: -sum_t w_te h_t,e,i (W_down[e]^T g_t)_i.
- expert e: sum_t (y'_t - y_t) . g_t over the tokens routed to e, y'_t the output with e removed
  from routing as the ablation removes it (the router's choice redone from its logits with e at
  -inf, `sparcom.intervention.hooks.ROUTING`): each expert's term E_e(x_t) . g_t is
  h_t,e . (W_down[e]^T g_t), known for the chosen experts from the neuron estimates; only the
  experts the new choice adds are computed again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from sparcom.attribution.schema import (
    ATTRIBUTION_FAMILIES,
    MAX_RESPONSE_TOKENS,
    NLL_DEFINITION,
    NLL_WORDS,
    RESPONSE_TOKENS,
)
from sparcom.core.models import LoadedModel
from sparcom.curation.records import InstructionRecord, record_hash
from sparcom.extraction.architectures import FFNSites, MoELayer, ffn_sites
from sparcom.extraction.batching import padded_batches
from sparcom.extraction.schema import INSTRUCTION, LAYER, MOE_LAYER
from sparcom.extraction.settings import ExtractionSettings
from sparcom.intervention.hooks import ROUTING, ReversibleHooks, moe_router
from sparcom.intervention.response_nll import batch_response_nll, tokenize_responses

VARIABLES = {family.name: family.attribution for family in ATTRIBUTION_FAMILIES}


class AttributionError(ValueError):
    pass


def check_responses(records: Sequence[InstructionRecord]) -> None:
    for record in records:
        if not record.response.strip():
            raise AttributionError(f"record {record.id}: has no response, so there is no loss to attribute; "
                                   "give it its reference response or leave it out")


def attribute_records(
    loaded: LoadedModel,
    records: Sequence[InstructionRecord],
    max_response_tokens: int | None,
    settings: ExtractionSettings,
    on_batch: Callable[[int], None] | None = None,
) -> xr.Dataset:
    """Per record and component, -dL/dalpha at alpha = 1 (float32), in the order of `records`."""
    check_responses(records)
    tokenized = tokenize_responses(records, loaded.tokenizer, max_response_tokens)
    sites = ffn_sites(loaded.model)
    shapes = sites.family_shapes()
    values = {VARIABLES[name]: np.zeros((len(records), *shape), dtype=np.float32) for name, shape in shapes.items()}
    with AttributionHooks(loaded.model, sites) as hooks:
        for batch, ids, attention, counted in padded_batches(tokenized, loaded.tokenizer, settings, loaded.device):
            for name, rows in hooks.estimate(ids, attention, counted).items():
                values[name][batch] = rows
            if on_batch:
                on_batch(len(batch))
    tokens = np.array([sum(item.counted) for item in tokenized], dtype=np.uint32)
    return attribution_dataset(records, values, tokens, sites, max_response_tokens)


def attribution_dataset(records: Sequence[InstructionRecord], values: dict[str, np.ndarray], tokens: np.ndarray,
                        sites: FFNSites, max_response_tokens: int | None) -> xr.Dataset:
    dims = {family.attribution: family.dims for family in ATTRIBUTION_FAMILIES}
    strings = lambda items: np.array(items, dtype=object)  # noqa: E731 - variable-length strings
    layers = {LAYER: list(sites.dense_layers)} if sites.dense_layers else {}
    if sites.moe_layers:
        layers[MOE_LAYER] = [layer.index for layer in sites.moe_layers]
    return xr.Dataset(
        {RESPONSE_TOKENS: ((INSTRUCTION,), tokens),
         **{name: ((INSTRUCTION, *dims[name]), array) for name, array in values.items()}},
        coords={"instruction_id": (INSTRUCTION, strings([r.id for r in records])),
                "category": (INSTRUCTION, strings([r.category for r in records])),
                "origin": (INSTRUCTION, strings([r.origin for r in records])),
                "record_hash": (INSTRUCTION, strings([record_hash(r) for r in records])),
                **{dim: (dim, np.asarray(indices, dtype=np.int32)) for dim, indices in layers.items()}},
        attrs={MAX_RESPONSE_TOKENS: max_response_tokens or 0, NLL_DEFINITION: NLL_WORDS})


class AttributionHooks(ReversibleHooks):
    def __init__(self, model: nn.Module, sites: FFNSites | None = None):
        self.model = model
        self.sites = sites if sites is not None else ffn_sites(model)
        for layer in self.sites.moe_layers:
            _check_experts(layer)
        super().__init__()
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._parts: dict[str, list[torch.Tensor | None]] = {}  # variable -> per layer slot [batch, ...]
        self._masks: dict[torch.device, torch.Tensor] = {}      # real (not padding) positions [batch, seq]
        self._routed: dict[int, dict[str, torch.Tensor]] = {}   # MoE slot -> what its forward pass saw

    def _undo(self) -> None:
        for parameter, wanted in self._frozen:
            parameter.requires_grad_(wanted)
        self._frozen.clear()

    def _install(self) -> None:
        for parameter in self.model.parameters():
            self._frozen.append((parameter, parameter.requires_grad))
            parameter.requires_grad_(False)
        # The graph starts at the embeddings: every activation after them gets its gradient.
        self._handles.append(self.model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.requires_grad_()))
        sites = self.sites
        for slot, module in enumerate(sites.dense_activations):
            self._handles.append(module.register_forward_hook(self._activation_hook(VARIABLES["neurons"], slot)))
        for slot, layer in enumerate(sites.moe_layers):
            if layer.shared_activation is not None:
                self._handles.append(layer.shared_activation.register_forward_hook(
                    self._activation_hook(VARIABLES["shared_neurons"], slot)))
            self._handles.append(moe_router(self.model, layer.index).register_forward_hook(self._router_hook(slot)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_pre_hook(slot), with_kwargs=True))
            self._handles.append(layer.experts.register_forward_hook(self._experts_hook(slot, layer)))

    def estimate(self, ids: torch.Tensor, attention: torch.Tensor, counted: torch.Tensor) -> dict[str, np.ndarray]:
        """One padded batch: each store variable's estimates [batch, layer, ...] (float32)."""
        layers = {"neurons": len(self.sites.dense_layers), "shared_neurons": len(self.sites.moe_layers),
                  "expert_neurons": len(self.sites.moe_layers), "experts": len(self.sites.moe_layers)}
        self._parts = {VARIABLES[name]: [None] * layers[name] for name in self.sites.family_shapes()}
        self._masks = {attention.device: attention.bool()}
        self._routed = {}
        try:
            with torch.inference_mode(False), torch.enable_grad():  # also when called under no_grad
                nll = batch_response_nll(self.model, ids, attention, counted)
                if torch.isnan(nll).any():
                    raise FloatingPointError(
                        "the model produced NaN log-likelihoods (known cause: float64 with eager attention "
                        "and left padding); use right padding or another dtype")
                nll.sum().backward()  # rows are independent: each row's gradient is its own L's
            unreached = [name for name, parts in self._parts.items() if any(p is None for p in parts)]
            if unreached:
                raise RuntimeError(f"no gradient reached {', '.join(unreached)}: the loss does not depend on "
                                   "those components as hooked")
            return {name: torch.stack([p.cpu() for p in parts], dim=1).float().numpy()
                    for name, parts in self._parts.items()}
        finally:
            self._parts, self._masks, self._routed = {}, {}, {}

    def _mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:  # a layer on another device (device_map)
            self._masks[device] = next(iter(self._masks.values())).to(device)
        return self._masks[device]

    def _activation_hook(self, name: str, slot: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return  # a forward pass outside `estimate`
            value = output.detach()  # not `output`: the hook would hold its own tensor

            def backward(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    mask = self._mask(grad.device)
                    term = (value * grad).reshape(*mask.shape, -1).to(_accumulation(value.dtype))
                    self._parts[name][slot] = -torch.where(mask[..., None], term, 0).sum(dim=1)

            output.register_hook(backward)

        return hook

    def _router_hook(self, slot: int):
        def hook(module: nn.Module, inputs, output) -> None:
            self._routed.setdefault(slot, {})["logits"] = output[0].detach()

        return hook

    def _experts_pre_hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            given = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
            routed = self._routed.setdefault(slot, {})
            routed.update({"hidden": given["hidden_states"].detach(), "index": given["top_k_index"],
                           "weights": given["top_k_weights"].detach()})

        return hook

    def _experts_hook(self, slot: int, layer: MoELayer):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            routed = self._routed.pop(slot)

            def backward(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    self._routed_estimates(slot, layer, routed, grad.reshape(-1, grad.shape[-1]))

            output.register_hook(backward)

        return hook

    def _routed_estimates(self, slot: int, layer: MoELayer, routed: dict[str, torch.Tensor],
                          grad: torch.Tensor) -> None:
        """Expert-neuron and expert estimates of one MoE layer, from g = dL/dy [token, hidden]."""
        hidden, index, weights, logits = routed["hidden"], routed["index"], routed["weights"], routed["logits"]
        index = index.reshape(grad.shape[0], -1)
        weights = weights.reshape(index.shape)
        mask = self._mask(grad.device)
        batch, real = mask.shape[0], mask.reshape(-1)
        rows = torch.arange(batch, device=grad.device).repeat_interleave(mask.shape[1])
        dtype = _accumulation(hidden.dtype)
        n_experts = self.sites.experts
        # terms[t, e] = E_e(x_t) . g_t, expert e's output on token t against the gradient; NaN: not computed
        terms = torch.full((grad.shape[0], n_experts), float("nan"), dtype=dtype, device=grad.device)
        neurons = torch.zeros((batch, n_experts, self.sites.expert_neurons), dtype=dtype, device=grad.device)
        for e in index.unique().tolist():
            if e >= n_experts:
                continue
            token, choice = (index == e).nonzero(as_tuple=True)
            product = _expert_product(layer.experts, e, hidden[token], grad[token], self.sites.expert_neurons, dtype)
            terms[token, e] = product.sum(dim=-1)
            share = weights[token, choice, None].to(dtype) * product
            neurons[:, e].index_add_(0, rows[token], -torch.where(real[token, None], share, 0))
        self._parts[VARIABLES["expert_neurons"]][slot] = neurons

        router = moe_router(self.model, layer.index)
        routing = ROUTING[self.model.config.model_type]
        intact = (weights.to(dtype) * terms.gather(1, index)).sum(dim=1)
        experts = torch.zeros((batch, n_experts), dtype=dtype, device=grad.device)
        for choice in range(index.shape[1]):
            removed = index[:, choice:choice + 1]
            new_weights, new_index = routing(router, logits.scatter(1, removed, float("-inf")))
            new_weights = new_weights.to(weights.dtype).to(dtype)
            new_index = new_index.to(index.dtype)
            unknown = torch.isnan(terms.gather(1, new_index))
            token, position = unknown.nonzero(as_tuple=True)
            added = new_index[token, position]
            for e in added.unique().tolist():
                chosen = token[added == e]
                terms[chosen, e] = _expert_product(layer.experts, e, hidden[chosen], grad[chosen],
                                                   self.sites.expert_neurons, dtype).sum(dim=-1)
            rerouted = (new_weights * terms.gather(1, new_index)).sum(dim=1)
            experts.index_put_((rows, removed[:, 0]), torch.where(real, rerouted - intact, 0), accumulate=True)
        self._parts[VARIABLES["experts"]][slot] = experts


def _expert_product(experts: nn.Module, e: int, hidden: torch.Tensor, grad: torch.Tensor, width: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """h_t,e * (W_down[e]^T g_t) per token and neuron of expert e: summed over neurons, E_e(x_t) . g_t."""
    gate_up = F.linear(hidden, experts.gate_up_proj[e])
    h = experts.act_fn(gate_up[:, :width]) * gate_up[:, width:]
    back = grad.to(dtype) @ experts.down_proj[e].to(dtype)
    return h.to(dtype) * back


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens in float32 at least (bfloat16 products would lose the small terms)."""
    return torch.promote_types(dtype, torch.float32)


def _check_experts(layer: MoELayer) -> None:
    """The layouts `_expert_product` computes: [gate; up] rows, act(gate) * up, no biases."""
    experts = layer.experts
    layout = (getattr(experts, "is_concatenated", True), getattr(experts, "is_transposed", False),
              getattr(experts, "has_gate", True), getattr(experts, "has_bias", False))
    if layout != (True, False, True, False) or getattr(experts, "down_proj", None) is None:
        raise AttributionError(
            f"layer {layer.index}: {type(experts).__name__} is not laid out as [gate; up] rows with act(gate) * up "
            "and no biases, the only layout whose expert estimates this stage computes")
