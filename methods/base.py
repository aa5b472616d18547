"""The one interface every method implements.

A method is fitted on the 16-shot train/dev split and then predicts label ids for the eval split. Black-box
methods receive only `ctx.service` (the model-service boundary, which meters every query); gradient methods
receive `ctx.backbone` and own the model. Each declares its cost-table flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from harness.backbones import Backbone
from harness.checkpoint import Checkpoint
from harness.data import Example
from harness.progress import RunProgress
from harness.prompts import PromptFormat
from harness.service import ServiceClient
from harness.tasks import TaskCard


@dataclass
class RunContext:
    card: TaskCard
    prompt: PromptFormat
    seed: int
    service: ServiceClient | None = None  # black-box methods: in process or over HTTP, the same queries
    backbone: Backbone | None = None  # gradient methods only
    checkpoint: Checkpoint | None = None  # where a long method saves its state to resume after a crash
    dtype: str = "float32"  # compute dtype; gradient methods run their forward under autocast when it is not float32
    progress: RunProgress = field(default_factory=RunProgress)  # a method with a loop reports its progress here


@dataclass
class MethodConfig:
    """Hyper-parameters; each method subclasses this. Profiles override fields by name."""


class Method:
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    group: ClassVar[str]  # "gradient-free" | "gradient-based"
    as_a_service: ClassVar[bool]  # reaches the backbone only through the service
    deployment_efficient: ClassVar[bool]  # one shared backbone serves every task
    uses_train: ClassVar[bool] = True  # False: no training data, so the result does not depend on the split seed

    def __init__(self, config: MethodConfig, ctx: RunContext):
        self.config = config
        self.ctx = ctx

    def fit(self, train: list[Example], dev: list[Example]) -> None:
        """Learn from the 16-shot split (nothing to do for zero-shot methods)."""

    def predict(self, examples: list[Example]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the run holds and undo any change to the shared backbone (the runner calls this after
        predict, also when the run fails; gradient methods restore the model here)."""

    def tunable_parameters(self) -> int:
        return 0

    def user_tensor_bytes(self) -> int:
        """Bytes of torch tensors the method keeps on the user side (tracemalloc does not see them)."""
        return 0

    def trace(self) -> dict | None:
        """Convergence trace stored with the result, for methods that have one."""
        return None
