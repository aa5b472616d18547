"""`harness check`: the accuracy regression gate.

Runs the small fixed configurations listed in `regression.yaml` (committed at the repository root) from scratch
and fails, naming each one, if a score falls below its committed threshold. A check is only worth its run time if
a broken method falls below its threshold: `scripts/gate-mutations` breaks the code on purpose and shows which
checks catch each break (docs/gate.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from harness.backbones import get_spec, resolve_dtype, spec_identity
from harness.errors import HarnessError
from harness.profiles import Profile
from harness.runner import Identities, expand, run_grid
from harness.store import ResultsStore
from harness.tasks import load_cards

log = logging.getLogger("harness")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "regression.yaml"
TOP_KEYS = {"backbone", "seed", "k_shot", "eval_cap", "dtype", "checks"}
CHECK_KEYS = {"method", "task", "min_score", "config", "eval_cap"}


def check_name(check: dict) -> str:
    return f"{check['method']}/{check['task']}"


def load_checks(path: str | Path) -> dict:
    """The gate's configuration, validated before anything loads: a typo must not silently skip a check."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"no regression config at {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise HarnessError(f"{path} must be a mapping with keys {sorted(TOP_KEYS)}")
    for key in ("backbone", "seed", "checks"):
        if key not in raw:
            raise HarnessError(f"{path} lacks '{key}'")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise HarnessError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    names = set()
    for check in raw["checks"]:
        missing = {"method", "task", "min_score"} - set(check)
        if missing:
            raise HarnessError(f"{path}: a check lacks {sorted(missing)}: {check}")
        unknown = set(check) - CHECK_KEYS
        if unknown:
            raise HarnessError(f"{path}: check {check_name(check)} has unknown key(s) {sorted(unknown)}; valid: {sorted(CHECK_KEYS)}")
        if check_name(check) in names:
            raise HarnessError(f"{path}: check {check_name(check)} is listed twice")
        names.add(check_name(check))
    return raw


def select(raw: dict, only: list[str] | None) -> list[dict]:
    if not only:
        return list(raw["checks"])
    known = {check_name(c): c for c in raw["checks"]}
    missing = [name for name in only if name not in known]
    if missing:
        raise HarnessError(f"no check named {', '.join(missing)}; the checks are {', '.join(known)}")
    return [known[name] for name in only]


def run_checks(path: str | Path, data_dir: str | None, tasks_dir=None, only: list[str] | None = None) -> list[dict]:
    """Each check with its measured score and verdict."""
    raw = load_checks(path)
    checks = select(raw, only)
    cards = load_cards(tasks_dir)
    get_spec(raw["backbone"])
    dtype = resolve_dtype(raw.get("dtype", "auto"))  # what `harness run` would use on this machine
    k_shot, seed = raw.get("k_shot", 16), raw["seed"]
    profile = Profile("check", "regression gate", (seed,), k_shot, raw.get("eval_cap"))
    specs = []
    for check in checks:  # every check's settings are validated before the backbone loads
        if check["task"] not in cards:
            raise HarnessError(f"check {check_name(check)}: no task card '{check['task']}'")
        settings = {check["method"]: check.get("config") or {}}
        ids = Identities.of(cards, [check["task"]], data_dir, spec_identity(raw["backbone"]))
        checked = replace(profile, eval_cap=check.get("eval_cap", raw.get("eval_cap")), method_overrides=settings)
        specs += expand([check["method"]], [check["task"]], [seed], raw["backbone"], checked, dtype, ids)
    with tempfile.TemporaryDirectory() as folder:  # always measured afresh, never taken from a results store
        store = ResultsStore(folder)
        summary = run_grid(specs, cards, profile, store, data_dir)
        if summary.failed:
            raise HarnessError("regression check runs failed: " + "; ".join(f"{l}: {e}" for l, e in summary.failed))
        records = {r.run_id: r for r in store.records() if r.ok}
    results = []
    for check, spec in zip(checks, specs):
        record = records[spec.run_id]
        results.append({
            **check, "name": check_name(check), "dtype": spec.dtype, "score": record.score,
            "ok": record.score >= check["min_score"], "seconds": record.meters["wall_s"],
            "threads": record.meters.get("torch_threads"),
        })
    return results


def write_json(results: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
