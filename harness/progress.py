"""Progress of a grid and of the run in flight, each with an estimate of the time left.

On a terminal these are tqdm bars (the grid's runs, and the run's calls or steps below it). When the output is
not a terminal (a log file of a background run), the same facts go into log lines instead, at most once a
minute for a run, so the log stays readable.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("harness")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunProgress:
    """What a method reports: `total(n, unit, done)` once, then `advance(k)` as work is done. Methods with no loop
    (zero-shot scoring) report nothing."""

    def __init__(self, label: str = "", bar: bool = False, log_every_s: float = 60.0):
        self.label, self.bar, self.log_every_s = label, bar, log_every_s
        self.done, self.size, self.unit = 0, 0, ""
        self.resumed = 0  # work an earlier attempt did: it counts as done, not toward this attempt's rate
        self.started = self.logged = time.time()
        self._tqdm = None

    def total(self, size: int, unit: str, done: int = 0) -> None:
        """`size` units in all, `done` of them by an earlier attempt this run resumes from."""
        self.size, self.unit, self.done, self.resumed = size, unit, done, done
        if self.bar:
            self._tqdm = tqdm(total=size, initial=done, unit=unit, desc=self.label, position=1, leave=False,
                              dynamic_ncols=True)

    def resize(self, size: int) -> None:
        """The work in all has changed (a search that stops early)."""
        self.size = size
        if self._tqdm is not None:
            self._tqdm.total = size
            self._tqdm.refresh()

    def advance(self, k: int = 1) -> None:
        self.done += k
        if self._tqdm is not None:
            self._tqdm.update(k)
        elif self.size and time.time() - self.logged >= self.log_every_s:
            self.logged = time.time()
            log.info("    %d/%d %ss, %s", self.done, self.size, self.unit, self.left())

    def left(self) -> str:
        elapsed = time.time() - self.started
        ran = self.done - self.resumed
        if not ran or not self.size:
            return f"{duration(elapsed)} elapsed"
        return f"{duration(elapsed)} elapsed, ~{duration(elapsed * (self.size - self.done) / ran)} left"

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


class GridProgress:
    """The grid's runs: a bar (or log prefix) with the runs done and an estimate of the time left, from the
    mean time of the runs finished so far (runs differ in cost, so it is a rough guide early on)."""

    def __init__(self, runs: int, parallel: int = 1):
        self.runs, self.done, self.spent, self.parallel = runs, 0, 0.0, parallel  # parallel: runs in flight at once
        self.begun = 0
        self.bar = sys.stderr.isatty()
        self._tqdm = tqdm(total=runs, unit="run", desc="grid", position=0, dynamic_ncols=True) if self.bar else None

    def start(self, label: str, where: str = "") -> RunProgress:
        left = ""
        if self.done:
            left = f"; grid ~{duration(self.spent / self.done * (self.runs - self.done) / self.parallel)} left"
        self.begun += 1
        log.info("[%d/%d] %s%s%s", self.begun, self.runs, label, f" on {where}" if where else "", left)
        return RunProgress(label, bar=self.bar and self.parallel == 1)  # runs elsewhere report no bar here

    def finish(self, run: RunProgress) -> None:
        run.close()
        self.done += 1
        self.spent += time.time() - run.started
        if self._tqdm is not None:
            self._tqdm.update(1)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
