"""`harness check`: the accuracy regression gate.

Runs the small fixed configurations listed in `regression.yaml` (committed at the repository root) from scratch
and fails, naming each one, if a score falls below its committed threshold.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from harness.backbones import resolve_dtype
from harness.errors import HarnessError
from harness.profiles import Profile
from harness.runner import method_config, run_grid
from harness.store import ResultsStore, RunSpec
from harness.tasks import load_cards

log = logging.getLogger("harness")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "regression.yaml"


def load_checks(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"no regression config at {path}")
    raw = yaml.safe_load(path.read_text())
    for key in ("backbone", "seed", "checks"):
        if key not in raw:
            raise HarnessError(f"{path} lacks '{key}'")
    for check in raw["checks"]:
        missing = {"method", "task", "min_score"} - set(check)
        if missing:
            raise HarnessError(f"{path}: a check lacks {sorted(missing)}: {check}")
    return raw


def run_checks(path: str | Path, data_dir: str | None, tasks_dir=None) -> list[dict]:
    """Each check with its measured score and verdict."""
    raw = load_checks(path)
    profile = Profile("check", "regression gate", (raw["seed"],), raw.get("k_shot", 16), raw.get("eval_cap"))
    dtype = resolve_dtype(raw.get("dtype", "auto"))  # what `harness run` would use on this machine
    specs = []
    for check in raw["checks"]:
        config = asdict(method_config(check["method"], profile, check.get("config"), check["task"]))
        specs.append(RunSpec(check["method"], check["task"], raw["seed"], raw["backbone"], profile.k_shot, profile.eval_cap, config, dtype))
    with tempfile.TemporaryDirectory() as folder:  # always measured afresh, never taken from a results store
        store = ResultsStore(folder)
        summary = run_grid(specs, load_cards(tasks_dir), profile, store, data_dir)
        if summary.failed:
            raise HarnessError("regression check runs failed: " + "; ".join(f"{l}: {e}" for l, e in summary.failed))
        scores = {r["run_id"]: r["metrics"]["score"] for r in store.records() if r["status"] == "ok"}
    results = []
    for spec, check in zip(specs, raw["checks"]):
        measured = scores[spec.run_id]
        results.append({**check, "dtype": spec.dtype, "score": measured, "ok": measured >= check["min_score"]})
    return results
