"""Continuous prompts sent through the service: the protocol both sides agree on.

A prompt is `n_tokens` vectors per slot. Slot 0 enters with the input embeddings (BBT); with `deep`, slot j >= 1
is added to the hidden states entering transformer layer j at the prompt positions (BBTv2). The client either
sends the prompt vectors themselves (`send="prompt"`) or only each slot's low-dimensional z (`send="z"`), in
which case the server rebuilds the slot's random projection A_j from the seed and std the client declared once
(`ProjectionSpec`): both sides draw A_j the same way, so sending z is exactly as good as sending A_j z.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from harness.errors import HarnessError


@dataclass(frozen=True)
class ProjectionSpec:
    dim: int  # intrinsic dimension d
    seed: int
    stds: tuple[float, ...]  # one per slot: alpha * sigma_hat_j / (sqrt(d) * sigma)
    dist: str = "normal"  # normal | uniform (same std)


@dataclass(frozen=True)
class PromptSpec:
    n_tokens: int = 50
    slots: int = 1  # 1: input layer only (BBT); n_layers: every layer (BBTv2)
    mode: str = "add"  # slot 0: "add" into placeholder-token embeddings, or "cat" (the vectors alone)
    send: str = "z"  # "z" or "prompt"
    projection: ProjectionSpec | None = None
    placeholder_start: int = 1000  # slot 0 of "add" mode: token ids start .. start + n_tokens - 1

    def __post_init__(self):
        if self.mode not in ("add", "cat"):
            raise HarnessError(f"prompt mode must be 'add' or 'cat', not '{self.mode}'")
        if self.send not in ("z", "prompt"):
            raise HarnessError(f"prompt send must be 'z' or 'prompt', not '{self.send}'")
        if self.send == "z" and (self.projection is None or len(self.projection.stds) != self.slots):
            raise HarnessError("send='z' needs a projection spec with one std per slot")

    def wire_bytes(self) -> int:
        """The one-time upload that declares the spec."""
        import json

        return len(json.dumps(asdict(self)).encode())


def placeholder_ids(spec: PromptSpec, vocab_size: int) -> list[int]:
    """Slot 0's placeholder tokens in "add" mode: ids start .. start + n - 1, moved down into small vocabularies."""
    start = max(0, min(spec.placeholder_start, vocab_size - spec.n_tokens))
    return list(range(start, start + spec.n_tokens))


def projection_std(sigma_hat: float, dim: int, sigma: float, alpha: float = 1.0) -> float:
    """BBT's std for A ~ N(0, std^2): alpha * sigma_hat / (sqrt(d) * sigma), so that A z, with z ~ N(0, sigma^2),
    has entries of std alpha * sigma_hat, the scale of the vectors it is added to."""
    return alpha * sigma_hat / (np.sqrt(dim) * sigma)


def clipped_std(values: torch.Tensor, rounds: int = 5, width: float = 3.0) -> float:
    """BBTv2's hidden-state statistic: clip to mean +- 3 std, five times, then take the std."""
    values = values.detach().float().flatten()
    for _ in range(rounds):
        mean, std = values.mean(), values.std()
        values = values.clamp(mean - width * std, mean + width * std)
    return float(values.std())


def projection_matrix(spec: ProjectionSpec, slot: int, width: int) -> torch.Tensor:
    """A_slot: [d, width], drawn from its own seeded generator (so either side can rebuild it)."""
    generator = torch.Generator().manual_seed(spec.seed * 1000 + slot)
    std = spec.stds[slot]
    if spec.dist == "normal":
        return torch.randn(spec.dim, width, generator=generator) * std
    if spec.dist == "uniform":
        bound = std * np.sqrt(3.0)
        return (torch.rand(spec.dim, width, generator=generator) * 2 - 1) * bound
    raise HarnessError(f"projection dist must be 'normal' or 'uniform', not '{spec.dist}'")


def draw_projections(spec: PromptSpec, hidden: int, matrices: dict, device="cpu") -> dict:
    """Fill the cache `matrices` with A_j for every slot missing from it, on `device` (drawn on the CPU, so every
    device gets the same A)."""
    for slot in range(spec.slots):
        if slot not in matrices:
            matrices[slot] = projection_matrix(spec.projection, slot, spec.n_tokens * hidden).to(device)
    return matrices


def project(spec: PromptSpec, z: np.ndarray, hidden: int, matrices: dict, device="cpu") -> torch.Tensor:
    """z [P, slots, d] -> prompt [P, slots, n_tokens, hidden] (float32, on `device`); `matrices` caches A_j per
    slot there (see draw_projections)."""
    z = torch.as_tensor(np.asarray(z, dtype=np.float32)).to(device)
    draw_projections(spec, hidden, matrices, device)
    out = [(z[:, slot] @ matrices[slot]).view(-1, spec.n_tokens, hidden) for slot in range(spec.slots)]
    return torch.stack(out, dim=1)
