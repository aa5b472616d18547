"""Mid-run checkpoints: a long run (BBT's thousands of calls, a gradient baseline's thousand steps) saves its
state at each dev check, so a run that dies, or a session that ends, resumes where it was instead of starting
again.

A checkpoint lives beside the results store, named by the run's id, and is removed once the run's record is
written. It holds the method's state (for BBT/BBTv2 a journal of every generation's losses, from which their
strategies, each with its own random generator, are rebuilt: small enough to carry a long run to another machine;
for a trainer its tensors), the service's query counts and the run time spent so far, so the resumed run ends with
the same result and the whole cost. It also keeps where each stretch of the run computed (device, CPU threads):
a search that moves to another device or thread count goes another way from there, and its record says so.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from pathlib import Path

from harness.meters import current_place

log = logging.getLogger("harness")
# 2: strategies own their random streams and traces record pycma's stops; a version-1 checkpoint would resume
# onto numpy's global stream, so it is not used. 3: BBT/BBTv2 keep a journal of losses, not pickled strategies.
FORMAT = 3


class Checkpoint:
    def __init__(self, path: Path, meter=None, where: str | None = None):
        self.path = Path(path)
        self.meter = meter  # the service's QueryMeter, restored with the state (None for gradient methods)
        self.started = time.time()
        self.earlier_s = 0.0  # run time spent by earlier, interrupted attempts
        self.resumed_at: list[int] = []
        self.where = where or current_place()
        self.ran_on: list[list] = [[0, self.where]]  # [from (calls or steps), place] per stretch of the run

    def save(self, state: dict) -> None:
        payload = {
            "format": FORMAT,
            "state": state,
            "meter": dict(self.meter.phases) if self.meter else None,
            "elapsed_s": self.earlier_s + time.time() - self.started,
            "resumed_at": self.resumed_at,
            "ran_on": self.ran_on,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)  # atomic: a kill mid-save leaves the previous checkpoint whole

    def load(self) -> dict | None:
        """The saved state, with the meter and clock put back; None when there is none (or it is of an older format)."""
        if not self.path.exists():
            return None
        with open(self.path, "rb") as handle:  # streamed: model tuning's state is gigabytes
            payload = pickle.load(handle)
        if payload.get("format") != FORMAT:
            log.warning("    %s is from an older harness (format %s, not %s): the run starts afresh",
                        self.path, payload.get("format", 1), FORMAT)
            return None
        if self.meter is not None and payload["meter"] is not None:
            self.meter.phases.update(payload["meter"])
        self.earlier_s = payload["elapsed_s"]
        self.started = time.time()
        state = payload["state"]  # where it resumes: API calls for a search, optimiser steps for a trainer
        at = state["calls"] if "calls" in state else state.get("step", 0)
        self.resumed_at = payload["resumed_at"] + [at]
        earlier = payload.get("ran_on") or [[0, None]]  # None: saved before checkpoints kept where they ran
        if earlier[-1][1] != self.where:
            before = f"on {earlier[-1][1]}" if earlier[-1][1] else "where its checkpoint does not say"
            log.warning("    %s: the run so far computed %s; from %d on it computes on %s, and may not end where an "
                        "uninterrupted run would (its record says which part ran where)", self.path.name, before, at,
                        self.where)
            earlier = earlier + [[at, self.where]]
        self.ran_on = earlier
        return state
