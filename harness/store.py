"""The results store: one JSON line per finished run, appended (and flushed to disk) as the run ends.

A run is named by its RunSpec's id; a rerun skips ids already recorded as finished, so an interrupted grid
resumes where it stopped and loses at most the run in flight. Failed runs are recorded too and retried.

The store is a local cache (not committed); a report's own records travel with it instead (see `published`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.record import RunRecord, RunSpec  # noqa: F401  (RunSpec: the store's key, imported from here too)


class ResultsStore:
    def __init__(self, folder: str | Path, checkpoints: str | Path | None = None):
        self.folder = Path(folder)
        self.path = self.folder / "results.jsonl"
        self.checkpoints = Path(checkpoints) if checkpoints else self.folder / "checkpoints"

    def checkpoint_path(self, run_id: str) -> Path:
        """Where a long run keeps its mid-run state (harness/checkpoint.py) until its record is written (a folder
        every Ray worker can reach, with --checkpoint-dir)."""
        return self.checkpoints / f"{run_id}.pkl"

    def records(self) -> list[RunRecord]:
        return read_records(self.path)

    def finished_ids(self) -> set[str]:
        return {r.run_id for r in self.records() if r.ok}

    def append(self, record: RunRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a record cut short by a kill: end it so this one stays whole
                    handle.write(b"\n")
            handle.write((json.dumps(record.to_json(), sort_keys=True) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())


def read_records(path: Path) -> list[RunRecord]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill mid-write: that run is simply redone
        out.append(RunRecord.from_json(raw))
    return out


def published(report: str | Path, store: ResultsStore) -> list[RunRecord]:
    """The records a report is made from: those already behind it, in its .jsonl twin (reports/results.jsonl is
    committed beside reports/results.md), updated by the store's finished runs (of two records of a run id, the one
    started last wins); the twin is rewritten with them. So a fresh checkout regenerates the committed tables, and a run
    adds to them rather than replacing them with only what this machine's store holds."""
    twin = Path(report).with_suffix(".jsonl")
    if twin.resolve() == store.path.resolve():  # a side store's report sits beside it: the store is its twin
        return store.records()
    latest: dict[str, RunRecord] = {}
    for r in read_records(twin) + store.records():  # a store's record wins a tie: it may be a rerun of the same moment
        kept = latest.get(r.run_id)
        if r.ok and (kept is None or r.started >= kept.started):
            latest[r.run_id] = r
    records = [latest[run_id] for run_id in sorted(latest)]
    if records:
        twin.parent.mkdir(parents=True, exist_ok=True)
        partial = twin.with_suffix(".jsonl.partial")  # written whole, then swapped in: a kill leaves the old twin
        partial.write_text("".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records))
        partial.replace(twin)
    return records
