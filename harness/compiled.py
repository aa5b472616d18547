"""Optional torch.compile of a backbone's transformer layers, for the service's queries (off by default).

Regional compilation: each layer's forward is compiled, not the whole model. The layers share one code object,
so one compilation serves the stack, and hooks on the layers (deep prompts, layer reuse's capture) stay
outside the compiled region, where they neither break graphs nor force recompiles. Queries vary in batch and
length (buckets, population size, dev and test batches), so shapes are compiled dynamic. A causal LM's prefix
cache reaches every layer in a different state, so there each layer compiles apart (slow to warm up). Whether it
pays off depends on the device and architecture: `harness bench --compile MODE` measures it beside the eager path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from harness.errors import HarnessError
from harness.scoring import transformer_layers

# No CUDA-graph modes: a query's forward is large (a whole generation), so kernel launches, which CUDA graphs
# remove, are a small part of it and already overlap the GPU's work; and the shapes vary from query to query.
MODES = ("default", "max-autotune-no-cudagraphs")


class CompiledLayers:
    """Compiled forwards of a model's transformer layers, swapped in only while `active` (the backbone stays
    eager for anything else that uses it, such as a gradient method training it)."""

    def __init__(self, model, mode: str):
        if mode not in MODES:
            raise HarnessError(f"unknown torch.compile mode '{mode}'; choose one of: {', '.join(MODES)}")
        self.layers = transformer_layers(model)
        self.forwards = [torch.compile(layer.forward, mode=mode, dynamic=True) for layer in self.layers]
        # a decoder layer keeps its index as an int attribute: left static, every layer of the stack would be a
        # recompilation, and the default limit (8) would send deep stacks back to eager
        config = {"allow_unspec_int_on_nn_module": True, "recompile_limit": max(8, 2 * len(self.layers))}
        self.config = {k: v for k, v in config.items() if hasattr(torch._dynamo.config, k)}  # older torch lacks some

    @contextmanager
    def active(self):
        for layer, forward in zip(self.layers, self.forwards):
            layer.forward = forward
        try:
            with torch._dynamo.config.patch(**self.config):
                yield
        finally:
            for layer in self.layers:
                del layer.forward
