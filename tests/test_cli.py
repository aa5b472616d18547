"""The command line: clear errors for bad input, and the report from the store."""

import json

import pytest

import harness.runner as runner
from harness.cli import main
from tests.conftest import tiny_backbone


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--methods", "bbt9"], "unknown method 'bbt9'; valid methods: "),  # the list grows with each method
        (["run", "--datasets", "sst2,imdb"], "unknown task 'imdb'; valid tasks: agnews, dbpedia"),
        (["run", "--backbone", "llama-70b"], "unknown backbone 'llama-70b'; valid backbones: bart-large"),
        (["run", "--profile", "fast"], "unknown profile 'fast'; valid profiles: paper, quick"),
        (["run", "--seeds", "1,x"], "--seeds takes integers"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    assert main(argv + ["--results-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_compile_mode_is_refused_by_the_parser(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--compile", "fast", "--results-dir", str(tmp_path)])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_missing_data_is_a_clear_error_before_any_compute(capsys, tmp_path):
    code = main(["run", "--datasets", "sst2", "--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path)])
    assert code == 2
    assert "not found under the data dir" in capsys.readouterr().err


def test_run_then_report(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone("gpt2"))
    monkeypatch.setattr("harness.cli.spec_identity", lambda name: {"source": "test", "name": name})  # the tiny backbone is not in the registry
    report = tmp_path / "report.md"
    argv = ["run", "--datasets", "sst2,mrpc,dbpedia", "--backbone", "tiny-gpt2", "--eval-cap", "60",
            "--data-dir", str(shared_data), "--results-dir", str(tmp_path), "--report", str(report)]
    assert main(argv) == 0
    from harness.store import ResultsStore

    # each record keeps the service's switches it ran with (they change time, not results)
    options = {r.service_options["compile"] for r in ResultsStore(tmp_path).records()}
    assert options == {None}
    text = report.read_text()
    assert "| gradient-free | manual" in text
    for fragment in ("sst2 †", "dbpedia †", "mrpc (F1) †", "n/a (CPU)", "profile `quick`", "torch 2.", "pool of 3,607"):
        assert fragment in text, fragment
    # the published numbers appear only in the labelled side-by-side view, beside ours
    side = text.split("### Beside the published numbers")[1]
    assert "published (the BBT and BBTv2 papers, roberta-large" in side and " / 79.82 " in side
    assert "79.82" not in text.split("### Beside the published numbers")[0]
    assert main(["report", "--results-dir", str(tmp_path), "--report", str(report), "--print"]) == 0
    assert "### Cost" in capsys.readouterr().out
    # the report's records travel beside it: with the local store gone, it regenerates the same tables
    twin = report.with_suffix(".jsonl")
    assert sorted(r.task for r in ResultsStore(tmp_path).records()) == sorted(
        json.loads(line)["spec"]["task"] for line in twin.read_text().splitlines())
    (tmp_path / "results.jsonl").unlink()
    assert main(["report", "--results-dir", str(tmp_path / "fresh"), "--report", str(report)]) == 0
    assert report.read_text() == text


def test_a_side_store_gets_its_report_beside_it_not_over_the_committed_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--results-dir", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / "results.md").exists() and not (tmp_path / "reports").exists()
    assert main(["report"]) == 0
    assert (tmp_path / "reports" / "results.md").exists()


def test_report_draws_convergence_figures_and_the_versatility_table(tmp_path, shared_data, monkeypatch):
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone(name.removeprefix("tiny-")))
    monkeypatch.setattr("harness.cli.spec_identity", lambda name: {"source": "test", "name": name})
    report = tmp_path / "out" / "report.md"
    common = ["--datasets", "sst2", "--eval-cap", "20", "--data-dir", str(shared_data), "--results-dir", str(tmp_path),
              "--report", str(report), "--set", "bbt.budget=200"]  # not quick's 600 on sst2: the figures need few calls
    assert main(["run", "--methods", "bbt,bbtv2", "--backbone", "tiny-gpt2", *common]) == 0
    assert main(["run", "--methods", "bbt", "--backbone", "tiny-roberta", *common]) == 0
    png = tmp_path / "out" / "convergence-tiny-gpt2-sst2.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "![convergence-tiny-gpt2-sst2](convergence-tiny-gpt2-sst2.png)" in text
    stale = tmp_path / "out" / "convergence-gone-sst2.png"  # a figure of runs the records no longer hold
    stale.write_bytes(png.read_bytes())
    assert main(["report", "--results-dir", str(tmp_path), "--report", str(report)]) == 0
    assert png.exists() and not stale.exists()
    versatility = text.split("## Versatility: BBT and BBTv2 across backbones, profile `quick`")[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in versatility.splitlines() if line.startswith("| tiny-")]
    # backbone, method and the calls each spent (BBTv2's one round: 2 layers x popsize 20)
    assert [(r[0], r[1], r[-1]) for r in rows] == [("tiny-gpt2", "bbt", "200"), ("tiny-gpt2", "bbtv2", "40"), ("tiny-roberta", "bbt", "200")]
