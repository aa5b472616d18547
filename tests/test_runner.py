"""The runner and results store: records, resume, failures, and what a black-box method can reach."""

import json

import pytest

import harness.runner as runner
from harness.profiles import get_profile
from harness.store import ResultsStore
from harness.tasks import load_cards
from methods import get_method, registry
from tests.conftest import tiny_backbone

PROFILE = get_profile("quick")


@pytest.fixture
def tiny(monkeypatch):
    loads = []

    def load(name):
        loads.append(name)
        return tiny_backbone("gpt2")

    monkeypatch.setattr(runner, "load_backbone", load)
    return loads


def grid(tmp_path, shared_data, tasks=("sst2", "rte"), seeds=(13, 42)):
    specs = runner.expand(["manual"], list(tasks), list(seeds), "tiny-gpt2", PROFILE)
    store = ResultsStore(tmp_path)
    return runner.run_grid(specs, load_cards(), PROFILE, store, str(shared_data)), store


def test_record_has_what_reproduction_needs(tmp_path, shared_data, tiny):
    summary, store = grid(tmp_path, shared_data, tasks=("sst2",), seeds=(13,))
    assert len(summary.ran) == 1
    (record,) = store.records()
    assert record["status"] == "ok" and 0 <= record["metrics"]["score"] <= 100
    for key in ("run_id", "config_hash", "backbone_identity", "versions", "meters", "queries", "seed"):
        assert record[key] is not None
    assert record["split"]["split_hash"] and record["split"]["eval_hash"] and record["split"]["eval_size"] == 400
    assert record["versions"]["torch"] and record["meters"]["device"].startswith("cpu")
    assert record["meters"]["server_gpu_peak_mb"] is None  # CPU: no GPU figure, not a zero
    assert record["queries"]["eval"]["queries"] == 13  # 400 rows in queries of 32


def test_manual_runs_once_per_task_whatever_the_seeds(tmp_path, shared_data, tiny):
    summary, _ = grid(tmp_path, shared_data)
    assert summary.ran == ["manual/sst2/seed13/tiny-gpt2", "manual/rte/seed13/tiny-gpt2"]


def test_resume_skips_finished_runs_and_survives_a_cut_line(tmp_path, shared_data, tiny):
    grid(tmp_path, shared_data, tasks=("sst2",))
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"run_id": "cut-short", "status": "o')  # a kill mid-write
    summary, store = grid(tmp_path, shared_data, tasks=("sst2", "rte"))
    assert summary.skipped == ["manual/sst2/seed13/tiny-gpt2"] and summary.ran == ["manual/rte/seed13/tiny-gpt2"]
    assert [r["task"] for r in store.records()] == ["sst2", "rte"]  # the cut line is ignored, the next one whole
    loads_before = len(tiny)
    summary, _ = grid(tmp_path, shared_data, tasks=("sst2", "rte"))
    assert summary.ran == [] and len(summary.skipped) == 2
    assert len(tiny) == loads_before  # nothing to do: the backbone is not even loaded


def test_a_failed_run_is_recorded_and_retried(tmp_path, shared_data, tiny, monkeypatch):
    cls = get_method("manual")

    def broken(self, examples):
        raise RuntimeError("boom")

    monkeypatch.setattr(cls, "predict", broken)
    summary, store = grid(tmp_path, shared_data, tasks=("sst2", "rte"), seeds=(13,))
    assert len(summary.failed) == 2 and "boom" in summary.failed[0][1]
    assert all(r["status"] == "failed" and "boom" in r["error"] for r in store.records())
    monkeypatch.undo()
    monkeypatch.setattr(runner, "load_backbone", lambda name: tiny_backbone("gpt2"))
    summary, _ = grid(tmp_path, shared_data, tasks=("sst2", "rte"), seeds=(13,))
    assert len(summary.ran) == 2


def test_black_box_methods_get_the_service_and_not_the_model(tmp_path, shared_data, tiny, monkeypatch):
    seen = {}
    cls = get_method("manual")
    original = cls.fit

    def spy(self, train, dev):
        seen["ctx"] = self.ctx
        return original(self, train, dev)

    monkeypatch.setattr(cls, "fit", spy)
    grid(tmp_path, shared_data, tasks=("sst2",), seeds=(13,))
    assert seen["ctx"].backbone is None and seen["ctx"].service is not None
    for name, method in registry().items():
        if method.as_a_service:
            assert method.group == "gradient-free", name


def test_unknown_method_setting_is_an_error():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="has no setting\\(s\\) \\['budget'\\]"):
        runner.method_config("manual", PROFILE, {"budget": 10})
