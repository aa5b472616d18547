"""`harness check`: passes at the committed thresholds' level, fails loudly above what the code reaches, and refuses
a malformed gate before anything loads."""

import json

import pytest
import yaml

import harness.runner as runner
from harness.check import DEFAULT_CONFIG, load_checks
from harness.cli import main
from methods import registry
from tests.conftest import tiny_backbone

TINY_BBT = {"budget": 20, "popsize": 10, "intrinsic_dim": 20, "n_tokens": 4}


def write_config(tmp_path, threshold, **extra):
    config = {
        "backbone": "gemma3-270m",
        "seed": 42,
        "eval_cap": 40,
        "checks": [{"method": "manual", "task": "sst2", "min_score": threshold, "eval_cap": 20},
                   {"method": "bbt", "task": "sst2", "min_score": 0.0, "config": TINY_BBT}],
        **extra,
    }
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone("gpt2"))


def test_check_passes_then_fails_naming_the_check_and_its_score(tmp_path, shared_data, tiny, capsys):
    out_json = tmp_path / "check.json"
    config = write_config(tmp_path, 0.0)
    assert main(["check", "--config", str(config), "--data-dir", str(shared_data), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "ok         manual/sst2" in out and "ok         bbt/sst2" in out
    results = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert results["manual/sst2"]["ok"] and results["bbt/sst2"]["ok"]
    score = results["manual/sst2"]["score"]
    assert main(["check", "--config", str(write_config(tmp_path, 100.1)), "--data-dir", str(shared_data)]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION manual/sst2" in captured.out
    assert f"accuracy regression: manual/sst2 {score:.2f} < 100.10" in captured.err
    assert "bbt/sst2" not in captured.err  # only the failed check is named


def test_a_check_caps_its_own_eval_set_and_only_runs_what_is_asked(tmp_path, shared_data, tiny, capsys):
    out_json = tmp_path / "check.json"
    args = ["check", "--config", str(write_config(tmp_path, 0.0)), "--data-dir", str(shared_data), "--json", str(out_json)]
    assert main([*args, "--only", "manual/sst2"]) == 0
    results = json.loads(out_json.read_text())
    assert [r["name"] for r in results] == ["manual/sst2"] and results[0]["eval_cap"] == 20
    assert "bbt/sst2" not in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    ({"checks": [{"method": "manual", "task": "sst2", "min_score": 1, "min_scor": 2}]}, "unknown key(s) ['min_scor']"),
    ({"checks": [{"method": "manual", "task": "sst2"}]}, "lacks ['min_score']"),
    ({"checks": [{"method": "nope", "task": "sst2", "min_score": 1}]}, "nope"),
    ({"checks": [{"method": "manual", "task": "sst3", "min_score": 1}]}, "no task card 'sst3'"),
    ({"checks": [{"method": "bbt", "task": "sst2", "min_score": 1, "config": {"budjet": 1}}]}, "budjet"),
    ({"checks": [{"method": "manual", "task": "sst2", "min_score": 1}] * 2}, "listed twice"),
    ({"eval_cp": 3}, "unknown key(s) ['eval_cp']"),
])
def test_a_malformed_gate_fails_before_any_backbone_loads(tmp_path, monkeypatch, capsys, edit, message):
    def no_load(*args, **kwargs):
        raise AssertionError("a backbone was loaded for a malformed gate")

    monkeypatch.setattr(runner, "load_backbone", no_load)
    assert main(["check", "--config", str(write_config(tmp_path, 0.0, **edit))]) == 2
    assert message in capsys.readouterr().err


def test_only_names_an_unknown_check(tmp_path, capsys):
    assert main(["check", "--config", str(write_config(tmp_path, 0.0)), "--only", "icl/sst2"]) == 2
    assert "no check named icl/sst2; the checks are manual/sst2, bbt/sst2" in capsys.readouterr().err


def test_the_committed_gate_covers_every_kind_of_method():
    raw = load_checks(DEFAULT_CONFIG)
    assert raw["backbone"] == "gemma3-270m"
    assert all(0 < c["min_score"] <= 100 for c in raw["checks"])
    methods = registry()
    checked = {c["method"] for c in raw["checks"]}
    assert {"manual", "icl", "bbt", "bbtv2"} <= checked
    assert any(methods[m].__module__ == "methods.probe" or "feature" in m for m in checked)
    gradient = [m for m in checked if methods[m].group == "gradient-based"]
    assert len(gradient) >= 2
