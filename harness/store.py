"""The results store: one JSON line per finished run, appended (and flushed to disk) as the run ends.

A run is named by its RunSpec's id; a rerun skips ids already recorded as finished, so an interrupted grid
resumes where it stopped and loses at most the run in flight. Failed runs are recorded too and retried.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path


def stable_hash(payload) -> str:
    return sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's result; its hash is the run's id."""

    method: str
    task: str
    seed: int
    backbone: str
    k_shot: int
    eval_cap: int | None
    config: dict = field(hash=False)
    dtype: str = "float32"  # the forward's compute dtype (bf16 on a GPU by default)

    @property
    def config_hash(self) -> str:
        return stable_hash(self.config)

    @property
    def run_id(self) -> str:
        return stable_hash(asdict(self))

    def label(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}/{self.backbone}"


class ResultsStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / "results.jsonl"

    def checkpoint_path(self, run_id: str) -> Path:
        """Where a long run keeps its mid-run state (harness/checkpoint.py) until its record is written."""
        return self.folder / "checkpoints" / f"{run_id}.pkl"

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill mid-write: that run is simply redone
        return out

    def finished_ids(self) -> set[str]:
        return {r["run_id"] for r in self.records() if r.get("status") == "ok"}

    def append(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a record cut short by a kill: end it so this one stays whole
                    handle.write(b"\n")
            handle.write((json.dumps(record, sort_keys=True) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
