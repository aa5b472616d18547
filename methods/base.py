"""The one interface every method implements.

A method is fitted on the 16-shot train/dev split and then predicts label ids for the eval split. Black-box
methods receive only `ctx.service` (the model-service boundary, which meters every query); gradient methods
receive `ctx.backbone` and own the model. Each declares its cost-table flags.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import numpy as np

from harness.backbones import Backbone
from harness.checkpoint import Checkpoint
from harness.data import Example
from harness.errors import HarnessError
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


def setting(default, help: str, unset: str | None = None):
    """A config field with its one-line help (shown by `harness list --method NAME`); `unset` names what the
    default means where it switches the setting off, so the report's departures need not print a bare 0."""
    return field(default=default, metadata={"help": help, "unset": unset})


@dataclass
class MethodConfig:
    """Hyper-parameters; each method subclasses this with `setting(default, help)` fields.

    A method's values for a profile live here, with the method, not in a central table: `profiles` maps a profile
    name to {field: value} (quick's smaller budgets), `task_profiles` a profile name to {task: {field: value}}
    (the paper's 20,000 calls on dbpedia). A user's settings (`--set`, `--config`) win over both."""

    profiles: ClassVar[dict] = {}
    task_profiles: ClassVar[dict] = {}

    @classmethod
    def for_profile(cls, profile: str, task: str | None = None) -> dict:
        """This method's own values for a profile (and task): a profile's per-task values win over its
        method-wide ones (quick's budget on dbpedia over quick's budget); another profile's never apply."""
        per_task = cls.task_profiles.get(profile, {}).get(task, {}) if task else {}
        return {**cls.profiles.get(profile, {}), **per_task}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        """(name, default, help) for every setting."""
        out = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            helps = (getattr(c, "__dataclass_fields__", {}).get(f.name) for c in cls.__mro__)
            help = next((h.metadata["help"] for h in helps if h is not None and "help" in h.metadata), "")
            out.append((f.name, default, help))
        return out

    def idle(self) -> set[str]:
        """Settings this configuration leaves without effect (BBTv2's call budget once `rounds` is set): the
        report's departures skip them, so a reader is not told of a difference that changed nothing."""
        return set()


class Method:
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    group: ClassVar[str]  # "gradient-free" | "gradient-based"
    as_a_service: ClassVar[bool]  # reaches the backbone only through the service
    deployment_efficient: ClassVar[bool]  # one shared backbone serves every task
    uses_train: ClassVar[bool] = True  # False: no training data, so the result does not depend on the split seed
    rank: ClassVar[int] = 1000  # row order in reports (the papers' order for the built-in methods; plug-ins after)

    @classmethod
    def check_config(cls, config: MethodConfig) -> None:
        """Raise HarnessError for a value the method cannot run with. Called before any backbone loads (and again
        when the method is built); a method with constraints beyond the fields' types extends it."""

    @classmethod
    def require_positive(cls, config: MethodConfig, *names: str) -> None:
        """The check_config rule most fields share: counts (steps, sizes, periods) of at least 1."""
        for name in names:
            if getattr(config, name) < 1:
                raise HarnessError(f"{cls.name}: {name} must be at least 1, got {getattr(config, name)}")

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
