"""Where each supported architecture computes its FFN activation A = f(gate_proj x) (SPEC section 2).

- `dense_ffn_sites(model)`: the activation module of every layer, in layer order, and the
  neuron count. Hooking the activation module's output gives f(gate) exactly as the model
  computes it, for gated (f(gate) * up) and non-gated (f(fc_in x)) MLPs alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class DenseLayout:
    layers_path: str        # the ModuleList of decoder layers
    activation_path: str    # the activation module inside one layer


DENSE_LAYOUTS: dict[str, DenseLayout] = {
    "llama": DenseLayout("model.layers", "mlp.act_fn"),
    "mistral": DenseLayout("model.layers", "mlp.act_fn"),
    "qwen2": DenseLayout("model.layers", "mlp.act_fn"),
    "qwen3": DenseLayout("model.layers", "mlp.act_fn"),
    "gemma": DenseLayout("model.layers", "mlp.act_fn"),
    "gemma2": DenseLayout("model.layers", "mlp.act_fn"),
    "phi3": DenseLayout("model.layers", "mlp.activation_fn"),
    "gpt2": DenseLayout("transformer.h", "mlp.act"),
    "gpt_neox": DenseLayout("gpt_neox.layers", "mlp.act"),
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class DenseSites:
    activations: tuple[nn.Module, ...]
    neurons: int


def ffn_width(config: PretrainedConfig) -> int:
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


def dense_ffn_sites(model: nn.Module) -> DenseSites:
    model_type = model.config.model_type
    if model_type not in DENSE_LAYOUTS:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(DENSE_LAYOUTS))}")
    layout = DENSE_LAYOUTS[model_type]
    layers = model.get_submodule(layout.layers_path)
    activations = tuple(layer.get_submodule(layout.activation_path) for layer in layers)
    if len({id(module) for module in activations}) != len(activations):
        raise UnsupportedArchitecture(
            f"'{model_type}': layers share one activation module, so a hook cannot tell them apart")
    return DenseSites(activations, ffn_width(model.config))
