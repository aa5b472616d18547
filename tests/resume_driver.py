"""One attempt of a small BBT/BBTv2 run with a checkpoint, for the resumption tests (tests/test_bbt.py).

`python -m tests.resume_driver METHOD FOLDER KILL_AT` runs it in a process of its own that SIGKILLs itself right
after the checkpoint saved at KILL_AT calls: a real death, so nothing of that attempt survives but the file.
`python -m tests.resume_driver METHOD FOLDER` then resumes from that file, runs the same setting uninterrupted
beside it, and pickles both outcomes to FOLDER/out.pkl. Both processes should get the same thread settings
(float32 sums on a CPU, and so the search, depend on them).

The setting crosses pycma's lazy covariance eigendecompositions (every 6th generation of a strategy here), and its
300 dimensions switch pycma to TPA step-size adaptation, which draws random numbers of its own.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np

from harness.checkpoint import Checkpoint
from harness.prompts import PromptFormat
from harness.service import ModelService
from harness.tasks import get_card
from methods import get_method
from methods.base import RunContext
from tests.conftest import tiny_backbone

SETTINGS = {  # method: (config, layers of the tiny model)
    # 14 generations, two eigendecompositions (before the 7th and the 13th)
    "bbt": ({"budget": 140, "eval_every": 20}, 2),
    # 3 layers x 7 rounds, one eigendecomposition per layer (before its 7th generation); a checkpoint every two
    # generations, so two in three fall in the middle of a round
    "bbtv2": ({"budget": 210, "eval_every": 20}, 3),
}


def split(n: int = 8) -> tuple[list, list, list]:
    """Train, dev and eval sets of n short sentences (the tiny model's words; not loaded, so a process starts fast)."""
    rng = np.random.RandomState(0)
    words = "the a movie film was is it great bad good terrible about this that".split()
    rows = [{"sentence": " ".join(rng.choice(words, rng.randint(3, 12))), "label": i % 2} for i in range(3 * n)]
    return rows[:n], rows[n : 2 * n], rows[2 * n :]


class _DiesAfterSaving(Checkpoint):
    def __init__(self, path, meter, kill_at):
        super().__init__(path, meter)
        self.kill_at = kill_at

    def save(self, state):
        super().save(state)
        if state["calls"] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def attempt(method_name: str, folder: Path, kill_at: int | None = None) -> dict:
    """Fit (resuming from FOLDER's checkpoint if there is one) and predict; what a resumed run must reproduce."""
    overrides, layers = SETTINGS[method_name]
    card = get_card("sst2")
    train, dev, test = split()
    service = ModelService(tiny_backbone("gemma3", layers))
    path = Path(folder) / "run.pkl"
    checkpoint = Checkpoint(path, service.meter) if kill_at is None else _DiesAfterSaving(path, service.meter, kill_at)
    cls = get_method(method_name)
    config = cls.config_class(popsize=10, intrinsic_dim=300, n_tokens=2, **overrides)
    method = cls(config, RunContext(card, PromptFormat(card, "clm", ""), 42, service=service, checkpoint=checkpoint))
    with service.phase("train"):
        method.fit(train, dev)
    counts = {phase: {k: v for k, v in c.items() if k != "seconds"} for phase, c in service.meter.summary().items()}
    return {"trace": method.trace(), "best_z": method.best_z, "predictions": method.predict(test),
            "resumed_at": checkpoint.resumed_at, "queries": counts}


if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    if len(sys.argv) > 3:
        attempt(name, folder, int(sys.argv[3]))
        sys.exit("the run ended without being killed")
    resumed = attempt(name, folder)
    (folder / "whole").mkdir()
    outcome = {"resumed": resumed, "whole": attempt(name, folder / "whole")}
    (folder / "out.pkl").write_bytes(pickle.dumps(outcome))
