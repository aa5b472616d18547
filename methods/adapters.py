"""Houlsby-style bottleneck adapters, attached to a frozen model with forward hooks (nothing in the model changes).

Houlsby et al. (2019) put a bottleneck adapter (down-projection, non-linearity, up-projection, skip connection)
after the output projection of each attention sub-layer and of each feed-forward sub-layer, before the residual
add (and, in post-norm models, before the layer norm). Here the adapter acts on the output of those
projections; in encoder-decoder models the decoder's cross-attention gets one too. The sites per architecture:

| model_type | adapter after |
|---|---|
| bert, roberta | `attention.output.dense`, `layer.N.output.dense` |
| gpt2 | `attn.c_proj`, `mlp.c_proj` |
| gemma3_text, gemma2, gemma, llama (SmolLM2), qwen2, mistral | `self_attn.o_proj`, `mlp.down_proj` |
| t5, mt5 | `SelfAttention.o`, `EncDecAttention.o`, `DenseReluDense.wo` |
| bart, mbart | `self_attn.out_proj`, `encoder_attn.out_proj`, `fc2` |

Each adapter: h + W_up · GELU(W_down · h + b_down) + b_up, with d·m + m + m·d + d parameters for width d and
bottleneck m; weights start from N(0, 1e-2) and biases from zero, so the model starts near its own function
(Houlsby's near-identity initialisation). The base model stays frozen; Houlsby also trained the layer norms, which
we leave frozen so that only adapter weights change (the BBT papers' adapter count, 2.4M on RoBERTa-large,
corresponds to bottleneck 24 and no layer norms: 48 × (2·1024·24 + 24 + 1024) = 2,409,600).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError

_DECODER_ONLY = (r"self_attn\.o_proj", r"mlp\.down_proj")
SITES: dict[str, tuple[str, ...]] = {
    "bert": (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),
    "roberta": (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_proj"),
    **{t: _DECODER_ONLY for t in ("gemma3_text", "gemma3", "gemma2", "gemma", "llama", "qwen2", "mistral")},
    "t5": (r"SelfAttention\.o", r"EncDecAttention\.o", r"DenseReluDense\.wo"),
    "mt5": (r"SelfAttention\.o", r"EncDecAttention\.o", r"DenseReluDense\.wo"),
    "bart": (r"self_attn\.out_proj", r"encoder_attn\.out_proj", r"fc2"),
    "mbart": (r"self_attn\.out_proj", r"encoder_attn\.out_proj", r"fc2"),
}


def output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # GPT-2's Conv1D
        return module.nf
    raise HarnessError(f"cannot attach an adapter after a {type(module).__name__}")


def adapter_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose outputs get an adapter, in model order."""
    model_type = model.config.model_type
    if model_type not in SITES:
        raise HarnessError(
            f"the adapter method does not know where to put adapters in a '{model_type}' model; "
            f"it knows: {', '.join(sorted(SITES))} (add the sites to methods/adapters.py SITES)"
        )
    pattern = re.compile(r"(^|\.)(" + "|".join(SITES[model_type]) + r")$")
    found = [(name, module) for name, module in model.named_modules() if pattern.search(name)]
    if not found:
        raise HarnessError(f"no adapter sites matched in {type(model).__name__}; check SITES['{model_type}']")
    return found


class BottleneckAdapter(nn.Module):
    def __init__(self, width: int, bottleneck: int, init_std: float = 1e-2):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(F.gelu(self.down(hidden)))


class Adapters(nn.Module):
    """Adapters for every site of `model`, applied through forward hooks; `remove()` detaches them."""

    def __init__(self, model: nn.Module, bottleneck: int, init_std: float = 1e-2):
        super().__init__()
        sites = adapter_sites(model)
        self.sites = [name for name, _ in sites]
        self.layers = nn.ModuleDict()
        self._handles = []
        for name, module in sites:
            weight = next(module.parameters())
            adapter = BottleneckAdapter(output_width(module), bottleneck, init_std).to(weight.device, weight.dtype)
            self.layers[name.replace(".", "__")] = adapter
            self._handles.append(module.register_forward_hook(_hook(adapter)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _hook(adapter: BottleneckAdapter):
    def apply(module, inputs, output):
        return adapter(output)

    return apply
