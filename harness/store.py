"""The results store: one JSON line per finished run, appended (and flushed to disk) as the run ends.

A run is named by its RunSpec's id; a rerun skips ids already recorded as finished, so an interrupted grid
resumes where it stopped and loses at most the run in flight. Failed runs are recorded too and retried.

The store is a local cache (not committed); a report's own records travel with it instead (see `published`).
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
        return read_records(self.path)

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


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill mid-write: that run is simply redone
    return out


def published(report: str | Path, store: ResultsStore) -> list[dict]:
    """The records a report is made from: those already behind it, in its .jsonl twin (reports/results.jsonl is
    committed beside reports/results.md), updated by the store's finished runs (of two records of a run id, the one
    started last wins); the twin is rewritten with them. So a fresh checkout regenerates the committed tables, and a run
    adds to them rather than replacing them with only what this machine's store holds."""
    twin = Path(report).with_suffix(".jsonl")
    if twin.resolve() == store.path.resolve():  # a side store's report sits beside it: the store is its twin
        return store.records()
    latest: dict[str, dict] = {}
    for r in read_records(twin) + store.records():  # a store's record wins a tie: it may be a rerun of the same moment
        kept = latest.get(r["run_id"])
        if r.get("status") == "ok" and (kept is None or r.get("started", 0) >= kept.get("started", 0)):
            latest[r["run_id"]] = r
    records = [latest[run_id] for run_id in sorted(latest)]
    if records:
        twin.parent.mkdir(parents=True, exist_ok=True)
        partial = twin.with_suffix(".jsonl.partial")  # written whole, then swapped in: a kill leaves the old twin
        partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        partial.replace(twin)
    return records
