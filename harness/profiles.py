"""Profiles: named sets of protocol settings. `paper` follows the papers; `quick` fits a 2-core CPU.

A profile holds what every method shares (seeds, shots, the eval cap). Each method's own values for a profile
(quick's budgets, the paper's dbpedia budget) live in its config class (`MethodConfig.profiles`), and the user's
settings (`--set`, `--config`) ride in `method_overrides`, winning over both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.errors import unknown_name


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seeds: tuple[int, ...]
    k_shot: int = 16
    eval_cap: int | None = None  # stratified cap on eval rows (None: the whole eval split)
    method_overrides: dict = field(default_factory=dict)  # the user's settings: method -> {config field: value}
    task_k_shot: dict = field(default_factory=dict)  # task -> shots per class, where a task departs from k_shot

    def shots(self, task: str) -> int:
        return self.task_k_shot.get(task, self.k_shot)


PROFILES = {
    p.name: p
    for p in [
        Profile(
            name="paper",
            description="the papers' protocol: 16 shots per class, 3 splits (seeds 13, 42, 100), full eval sets",
            seeds=(13, 42, 100),
        ),
        Profile(
            name="quick",
            description="fits a 2-core CPU: 16 shots (4 on dbpedia), 1 split (seed 42), eval capped at 400 rows per "
            "task (stratified, fixed sample shared by all methods)",
            seeds=(42,),
            eval_cap=400,
            # a black-box call scores the whole train set: dbpedia's 14 x 16 examples made a call ~75 s on a
            # 2-core CPU without native bf16, 5x agnews's; 4 shots per class bring it near agnews (every method
            # on dbpedia gets the same 4-shot split)
            task_k_shot={"dbpedia": 4},
        ),
    ]
}


def default_profile() -> str:
    return "paper" if torch.cuda.is_available() else "quick"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise unknown_name("profile", name, PROFILES)
    return PROFILES[name]


def describe(profile: Profile) -> str:
    """The profile's description with each method's own departures for it (from the methods' configs)."""
    from methods import registry

    parts = []
    for name, cls in registry().items():
        values = cls.config_class.for_profile(profile.name)
        per_task = cls.config_class.task_profiles.get(profile.name, {})
        text = ", ".join(f"{k} {v}" for k, v in values.items())
        text += "".join(f"{', ' if text else ''}{k} {v} on {task}" for task, tv in per_task.items() for k, v in tv.items())
        if text:
            parts.append(f"{name}: {text}")
    return profile.description + (f"; {'; '.join(parts)}" if parts else "")
