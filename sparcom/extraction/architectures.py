"""Where each supported architecture computes the quantities docs/method.md sections 2 and 3 count.

- `ffn_sites(model)`: per decoder layer, what to hook:
  dense layers:  the activation module, whose output is A = f(gate_proj x) (gated MLPs, Phi-3's
                 fused gate_up) or f(fc_in x) (GPT-2, GPT-NeoX);
  MoE layers:    the fused experts module (transformers 5: `gate_up_proj[expert, 2I, hidden]`,
                 called with the router's top-k choice), and the activation module of the
                 shared (always-on) experts where the model has them.
  `names` gives each of these modules' dotted path, as `model.named_modules()` does.
- `SUPPORTED`: the model types, with the path of their decoder layers.
Anything else is refused with an error that names the architecture and lists the supported ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

SUPPORTED: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "olmoe": "model.layers",
    "deepseek_v2": "model.layers",
    "deepseek_v3": "model.layers",
}
ACTIVATION_NAMES = ("act_fn", "activation_fn", "act")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class MoELayer:
    index: int
    experts: nn.Module               # fused experts: gate_up_proj, act_fn, num_experts
    shared_activation: nn.Module | None


@dataclass(frozen=True)
class FFNSites:
    dense_layers: tuple[int, ...]
    dense_activations: tuple[nn.Module, ...]
    dense_neurons: int
    moe_layers: tuple[MoELayer, ...]
    experts: int
    expert_neurons: int
    shared_neurons: int
    last_mlp: nn.Module              # the forward pass can stop once this module has run
    # module -> dotted path, in model order, for every module above (the store records them)
    names: Mapping[nn.Module, str] = field(compare=False)

    @property
    def has_shared_experts(self) -> bool:
        return self.shared_neurons > 0

    def family_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each component family the model has (`sparcom.extraction.schema`), by its shape, layers first."""
        moe = len(self.moe_layers)
        shapes = {"neurons": (len(self.dense_layers), self.dense_neurons),
                  "experts": (moe, self.experts), "expert_neurons": (moe, self.experts, self.expert_neurons),
                  "shared_neurons": (moe, self.shared_neurons)}
        return {name: shape for name, shape in shapes.items() if 0 not in shape}


def _activation(module: nn.Module, where: str) -> nn.Module:
    for name in ACTIVATION_NAMES:
        if isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    raise UnsupportedArchitecture(f"{where}: no activation module ({', '.join(ACTIVATION_NAMES)})")


def _dense_width(mlp: nn.Module, config) -> int:
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj.out_features
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj.out_features // 2
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


def _shared_expert(mlp: nn.Module) -> nn.Module | None:
    for name in SHARED_EXPERT_NAMES:
        if isinstance(getattr(mlp, name, None), nn.Module):
            return getattr(mlp, name)
    return None


def ffn_sites(model: nn.Module) -> FFNSites:
    model_type = model.config.model_type
    if model_type not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    layers = model.get_submodule(SUPPORTED[model_type])
    dense_layers, dense_activations, dense_widths = [], [], set()
    moe_layers, expert_shapes, shared_widths = [], set(), set()
    for index, layer in enumerate(layers):
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is None:
            dense_layers.append(index)
            dense_activations.append(_activation(mlp, f"{model_type} layer {index}"))
            dense_widths.add(_dense_width(mlp, model.config))
            continue
        weights = getattr(experts, "gate_up_proj", None)
        if weights is None or weights.dim() != 3 or weights.shape[-1] != model.config.hidden_size:
            raise UnsupportedArchitecture(
                f"{model_type} layer {index}: experts without a fused gate_up_proj[expert, 2I, hidden]")
        expert_shapes.add((weights.shape[0], weights.shape[1] // 2))
        shared = _shared_expert(mlp)
        shared_widths.add(shared.gate_proj.out_features if shared is not None else 0)
        moe_layers.append(MoELayer(
            index, experts, _activation(shared, f"{model_type} layer {index} shared expert") if shared else None))
    if len(dense_widths) > 1 or len(expert_shapes) > 1 or len(shared_widths) > 1:
        raise UnsupportedArchitecture(f"{model_type}: layers of one kind differ in width")
    activations = dense_activations + [m.shared_activation for m in moe_layers if m.shared_activation]
    if len({id(a) for a in activations}) != len(activations):
        raise UnsupportedArchitecture(f"{model_type}: layers share one activation module")
    experts, expert_neurons = expert_shapes.pop() if expert_shapes else (0, 0)
    sites = {*activations, *(m.experts for m in moe_layers), layers[-1].mlp}
    return FFNSites(
        dense_layers=tuple(dense_layers), dense_activations=tuple(dense_activations),
        dense_neurons=dense_widths.pop() if dense_widths else 0, moe_layers=tuple(moe_layers),
        experts=experts, expert_neurons=expert_neurons,
        shared_neurons=shared_widths.pop() if shared_widths else 0, last_mlp=layers[-1].mlp,
        names={module: name for name, module in model.named_modules() if module in sites})
