"""The grid on Ray: a real local Ray cluster (2 CPUs, no dashboard), started here, with tiny random backbones."""

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import harness.runner as runner
from harness.profiles import get_profile
from harness.ray_executor import RayOptions
from harness.store import ResultsStore
from harness.synthetic import load_tiny
from harness.tasks import load_cards

ray = pytest.importorskip("ray")

LOADER = "harness.synthetic:load_tiny"
SMALL_BBT = {"popsize": 10, "intrinsic_dim": 10, "n_tokens": 4, "eval_every": 20}


@pytest.fixture(scope="module")
def cluster():
    # the workers import this checkout (the tests may run it from a PYTHONPATH rather than an install)
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray's actors run one torch thread each; the in-process reference does the same, so sums add up alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def specs(profile, methods=("manual", "bbt"), seeds=(13, 42)):
    return runner.expand(list(methods), ["sst2"], list(seeds), "tiny-gpt2", profile)


def outcome(store):
    return {r.spec.label(): (r.score, r.predictions, r.trace) for r in store.records() if r.ok}


def test_a_grid_on_ray_gives_the_in_process_results(cluster, one_thread, tmp_path, shared_data, monkeypatch):
    profile = replace(get_profile("quick"), eval_cap=24, method_overrides={"bbt": {"budget": 40, **SMALL_BBT}})
    grid = specs(profile)
    monkeypatch.setattr(runner, "load_backbone", load_tiny)
    local = ResultsStore(tmp_path / "local")
    assert not runner.run_grid(grid, load_cards(), profile, local, str(shared_data)).failed
    distributed = ResultsStore(tmp_path / "ray")
    summary = runner.run_grid(grid, load_cards(), profile, distributed, str(shared_data),
                              ray=RayOptions(actors=2, loader=LOADER))
    assert not summary.failed and len(summary.ran) == 3  # manual once, bbt for each seed
    assert outcome(distributed) == outcome(local)
    again = runner.run_grid(grid, load_cards(), profile, distributed, str(shared_data), ray=RayOptions(actors=2, loader=LOADER))
    assert again.ran == [] and len(again.skipped) == 3  # finished runs are skipped, as in process


def _kill_the_worker_after_its_first_checkpoint(folder: Path, killed: list, stop: threading.Event):
    while not stop.is_set():
        if any(folder.glob("*.pkl")):
            for pid in os.listdir("/proc"):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except (OSError, ValueError):
                    continue
                if pid.isdigit() and b"ray::RunWorker" in title:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
            if killed:
                return
        time.sleep(0.01)


def test_a_killed_actor_s_run_resumes_on_another_from_its_checkpoint(cluster, one_thread, tmp_path, shared_data, monkeypatch):
    profile = replace(get_profile("quick"), eval_cap=24, method_overrides={"bbt": {"budget": 400, **SMALL_BBT}})
    grid = specs(profile, methods=("bbt",), seeds=(13,))
    store = ResultsStore(tmp_path / "ray")
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_the_worker_after_its_first_checkpoint,
                              args=(store.checkpoints, killed, stop), daemon=True)
    killer.start()
    try:
        summary = runner.run_grid(grid, load_cards(), profile, store, str(shared_data), ray=RayOptions(actors=1, loader=LOADER))
    finally:
        stop.set()
    assert killed, "the run finished before its actor could be killed"
    assert not summary.failed and summary.ran == [grid[0].label()]
    (record,) = store.records()  # exactly one record for the run, and it is finished
    assert record.ok and record.meters["resumed_at_calls"]
    assert not list(store.checkpoints.glob("*.pkl"))
    # the resumed run ends where an uninterrupted one does (the same calls: pycma may stop it before the budget)
    monkeypatch.setattr(runner, "load_backbone", load_tiny)
    local = ResultsStore(tmp_path / "local")
    runner.run_grid(grid, load_cards(), profile, local, str(shared_data))
    assert outcome(store) == outcome(local)


def test_a_run_whose_actor_keeps_dying_is_recorded_as_failed_and_the_grid_goes_on(cluster, tmp_path, shared_data):
    profile = replace(get_profile("quick"), eval_cap=24)
    grid = runner.expand(["manual"], ["sst2", "rte"], [13], "tiny-gpt2", profile)
    store = ResultsStore(tmp_path)
    summary = runner.run_grid(grid, load_cards(), profile, store, str(shared_data),
                              ray=RayOptions(actors=1, max_retries=1, loader="tests.test_ray:dies"))
    assert [label for label, _ in summary.failed] == [s.label() for s in grid]  # each tried twice, then failed
    assert all("its actor died 2 times" in error for _, error in summary.failed) and summary.ran == []
    assert [r.status for r in store.records()] == ["failed", "failed"]  # and a rerun retries them


def dies(name, dtype="float32"):
    """A loader whose process dies as it loads (as one killed for memory would)."""
    os.kill(os.getpid(), signal.SIGKILL)
