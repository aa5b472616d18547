"""`harness check`: passes at the committed thresholds' level, fails loudly above what the code reaches."""

import yaml

import harness.runner as runner
from harness.check import DEFAULT_CONFIG, load_checks
from harness.cli import main
from tests.conftest import tiny_backbone


def write_config(tmp_path, threshold):
    config = {
        "backbone": "gemma3-270m",
        "seed": 42,
        "eval_cap": 40,
        "checks": [{"method": "manual", "task": "sst2", "min_score": threshold},
                   {"method": "bbt", "task": "sst2", "min_score": 0.0,
                    "config": {"budget": 20, "popsize": 10, "intrinsic_dim": 20, "n_tokens": 4}}],
    }
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_passes_then_fails_when_a_threshold_is_raised(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone("gpt2"))
    assert main(["check", "--config", str(write_config(tmp_path, 0.0)), "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "ok         manual/sst2" in out and "ok         bbt/sst2" in out
    assert main(["check", "--config", str(write_config(tmp_path, 100.1)), "--data-dir", str(shared_data)]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION manual/sst2" in captured.out
    assert "accuracy regression: manual/sst2" in captured.err and "< 100.10" in captured.err


def test_the_committed_gate_is_well_formed():
    raw = load_checks(DEFAULT_CONFIG)
    assert raw["backbone"] == "gemma3-270m" and raw["checks"]
    assert all(0 < c["min_score"] <= 100 for c in raw["checks"])
