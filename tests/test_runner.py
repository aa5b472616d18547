"""The runner and results store: records, resume, failures, and what a black-box method can reach."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import harness.backbones as backbones
import harness.runner as runner
from harness.backbones import resolve_dtype
from harness.errors import HarnessError
from harness.profiles import get_profile
from harness.record import RunRecord, RunSpec
from harness.report import render
from harness.settings import method_config
from harness.store import ResultsStore
from harness.tasks import load_cards
from methods import get_method, registry
from tests.conftest import tiny_backbone

PROFILE = get_profile("quick")


def grid(tmp_path, shared_data, tasks=("sst2", "rte"), seeds=(13, 42)):
    specs = runner.expand(["manual"], list(tasks), list(seeds), "tiny-gpt2", PROFILE)
    store = ResultsStore(tmp_path)
    return runner.run_grid(specs, load_cards(), PROFILE, store, str(shared_data)), store


def test_record_has_what_reproduction_needs(tmp_path, shared_data, tiny):
    summary, store = grid(tmp_path, shared_data, tasks=("sst2",), seeds=(13,))
    assert len(summary.ran) == 1
    (record,) = store.records()
    assert record.status == "ok" and 0 <= record.score <= 100
    for key in ("run_id", "backbone_identity", "versions", "meters", "queries", "seed", "predictions"):
        assert getattr(record, key) is not None
    assert record.schema == 2 and not record.legacy
    assert len(record.predictions.row_ids()) == len(record.predictions.labels) == 400
    assert record.split["split_hash"] and record.split["eval_hash"] and record.split["eval_size"] == 400
    assert record.versions["torch"] and record.meters["device"].startswith("cpu")
    assert record.meters["torch_threads"] == torch.get_num_threads()  # bf16/float32 sums depend on it
    assert record.meters["server_gpu_peak_mb"] is None  # CPU: no GPU figure, not a zero
    assert record.queries["eval"]["queries"] == 13  # 400 rows in queries of 32


def test_manual_runs_once_per_task_whatever_the_seeds(tmp_path, shared_data, tiny):
    summary, _ = grid(tmp_path, shared_data)
    assert summary.ran == ["manual/sst2/seed13/tiny-gpt2", "manual/rte/seed13/tiny-gpt2"]


def test_resume_skips_finished_runs_and_survives_a_cut_line(tmp_path, shared_data, tiny):
    grid(tmp_path, shared_data, tasks=("sst2",))
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"run_id": "cut-short", "status": "o')  # a kill mid-write
    summary, store = grid(tmp_path, shared_data, tasks=("sst2", "rte"))
    assert summary.skipped == ["manual/sst2/seed13/tiny-gpt2"] and summary.ran == ["manual/rte/seed13/tiny-gpt2"]
    assert [r.task for r in store.records()] == ["sst2", "rte"]  # the cut line is ignored, the next one whole
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
    assert all(r.status == "failed" and "boom" in r.error for r in store.records())
    monkeypatch.undo()
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone("gpt2"))
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

    with pytest.raises(HarnessError, match="has no setting\\(s\\) \\['budget'\\]; its settings are: batch_size"):
        method_config("manual", PROFILE, settings={"manual": {"budget": 10}})


def _killed_at_first_checkpoint_then_resumed(spec, store, shared_data, monkeypatch):
    """Runs the spec in a grid that dies right after its first checkpoint, then in a grid that resumes it; returns
    the record."""
    from harness.checkpoint import Checkpoint

    save = Checkpoint.save

    def dies(self, state):
        save(self, state)
        raise RuntimeError("killed")

    monkeypatch.setattr(Checkpoint, "save", dies)
    assert len(runner.run_grid([spec], load_cards(), PROFILE, store, str(shared_data)).failed) == 1
    assert store.checkpoint_path(spec.run_id).exists()
    monkeypatch.setattr(Checkpoint, "save", save)
    assert runner.run_grid([spec], load_cards(), PROFILE, store, str(shared_data)).ran == [spec.label()]
    return store.records()[-1]


def test_an_interrupted_bbt_run_resumes_in_the_next_grid_and_counts_its_whole_time(tmp_path, shared_data, tiny, monkeypatch):
    settings = {"bbt": {"budget": 40, "popsize": 10, "intrinsic_dim": 10, "n_tokens": 4, "eval_every": 20}}
    config = method_config("bbt", PROFILE, settings=settings)
    spec = RunSpec("bbt", "sst2", 13, "tiny-gpt2", 16, 8, vars(config))
    store = ResultsStore(tmp_path)
    record = _killed_at_first_checkpoint_then_resumed(spec, store, shared_data, monkeypatch)
    assert record.meters["resumed_at_calls"] == [20] and record.trace["calls"] == 40
    assert "ran_on" not in record.meters  # both attempts computed here, with the same threads
    assert record.queries["train"]["queries"] == 40  # both attempts' calls, each once
    assert not store.checkpoint_path(spec.run_id).exists()
    # the report marks the resumed run's cells and says where it was taken up again
    text = render(store.records())
    cells = [line for line in text.split("### Comparison")[1].split("### Cost")[0].splitlines() if "| bbt " in line]
    assert len(cells) == 1 and " ‡" in cells[0]
    assert "- resumed runs (‡): interrupted, then resumed from a mid-run checkpoint: bbt/sst2/seed13 at 20 calls" in text


def test_the_paper_profile_gives_dbpedia_20000_calls_and_quick_its_own_budgets():
    """The reference README recommends 20,000 calls for DBpedia; the override lands in the spec (so in the run id)
    and only there. The quick profile's per-task budgets win over its method-wide one, and never the paper's."""
    def specs(profile):
        found = runner.expand(["bbt", "bbtv2"], ["sst2", "agnews", "dbpedia", "rte"], [42], "gemma3-270m", get_profile(profile))
        return {(s.method, s.task): s for s in found}

    paper, quick = specs("paper"), specs("quick")
    assert [paper[m, "dbpedia"].config["budget"] for m in ("bbt", "bbtv2")] == [20000, 20000]
    assert [paper[m, "sst2"].config["budget"] for m in ("bbt", "bbtv2")] == [8000, 8000]
    assert [quick["bbt", t].config["budget"] for t in ("sst2", "agnews", "dbpedia", "rte")] == [600, 300, 200, 200]
    assert {quick["bbtv2", t].config["rounds"] for t in ("sst2", "dbpedia")} == {1}
    assert quick["bbtv2", "sst2"].config == quick["bbtv2", "rte"].config  # BBT's per-task budgets are BBT's own
    assert [quick["bbt", t].k_shot for t in ("sst2", "dbpedia")] == [16, 4] and paper["bbt", "dbpedia"].k_shot == 16


def test_half_precision_serves_black_box_methods_and_autocasts_gradient_ones(tmp_path, shared_data, monkeypatch):

    loads, dtypes = [], {}

    def load(name, dtype="float32"):
        loads.append(dtype)
        backbone = tiny_backbone("gpt2")
        backbone.model.to(getattr(torch, dtype))
        return backbone

    monkeypatch.setattr(runner, "load_backbone", load)
    for name in ("manual", "bitfit"):
        cls = get_method(name)
        original = cls.fit

        def spy(self, train, dev, original=original, name=name):
            dtypes[name] = self.ctx.dtype
            return original(self, train, dev)

        monkeypatch.setattr(cls, "fit", spy)
    profile = replace(PROFILE, method_overrides={"bitfit": {"steps": 4, "eval_every": 2}})
    specs = runner.expand(["bitfit", "manual"], ["sst2"], [13], "tiny-gpt2", profile, "bfloat16")
    assert {s.dtype for s in specs} == {"bfloat16"}
    summary = runner.run_grid(specs, load_cards(), profile, ResultsStore(tmp_path), str(shared_data))
    assert not summary.failed
    assert loads == ["float32", "bfloat16"]  # gradient weights stay float32; the service gets bf16 weights
    assert dtypes == {"bitfit": "bfloat16", "manual": "bfloat16"}
    assert runner.expand(["manual"], ["sst2"], [13], "tiny-gpt2", profile)[0].run_id != specs[1].run_id


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == "float32"  # a named dtype is taken as given
    with pytest.raises(HarnessError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_two_conversions_of_the_embedded_backbone_at_once_both_go_on_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    # seen on a 2-core machine: two `harness run`s started together on an empty cache; the one that finished its
    # conversion second could not rename its folder onto the first one's, and its run died
    class Saved:  # stands in for the model and tokenizer the GGUF file gives
        config = None

        def save_pretrained(self, folder):
            Path(folder).mkdir(exist_ok=True)  # as transformers' save_pretrained does
            (Path(folder) / "weights").write_text(str(id(self)))

    monkeypatch.setattr(backbones, "_gguf_path", lambda spec: tmp_path / "model.gguf")
    monkeypatch.setattr(backbones, "_sha256", lambda path: "0" * 64)
    monkeypatch.setattr(backbones, "_auto", lambda family: type("Auto", (), {"from_pretrained": lambda *a, **k: Saved()}))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Saved())
    spec = replace(backbones.get_spec("gemma3-270m"), gguf_sha256=None)
    target = tmp_path / "gemma3-270m"
    backbones._convert_embedded(spec, target)
    first = (target / "weights").read_text()
    backbones._convert_embedded(spec, target)  # the slower process: began before the first had finished
    assert (target / "weights").read_text() == first and json.loads((target / "identity.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["gemma3-270m"]  # the loser's folder is not left behind

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Saved, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        backbones._convert_embedded(spec, tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["gemma3-270m"]  # nor a conversion's that failed half-way


@pytest.mark.embedded
def test_a_half_written_gguf_file_in_the_cache_is_joined_anew_not_refused(tmp_path, monkeypatch):
    # seen on a 2-core machine: two `harness run`s started together on an empty cache; one found the GGUF file the
    # other was still joining from its chunk packages ("already exists with an unexpected sha256") and died
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    spec = backbones.get_spec("gemma3-270m")
    target = tmp_path / "gguf" / spec.gguf_file
    target.parent.mkdir()
    target.write_bytes(b"GGUF" + bytes(4096))  # the other process, part-way through
    assert backbones._gguf_path(spec) == target and backbones._sha256(target) == spec.gguf_sha256
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no joining folder left behind
    assert backbones._gguf_path(spec) == target  # a finished file is taken as it is


def test_the_report_never_averages_runs_of_different_dtypes(tmp_path, shared_data, tiny):
    store = ResultsStore(tmp_path)
    profile = replace(PROFILE, method_overrides={"bbt": {"budget": 20}})
    for dtype in ("float32", "bfloat16"):
        specs = runner.expand(["manual", "bbt"], ["sst2"], [13], "tiny-gpt2", profile, dtype)
        assert not runner.run_grid(specs, load_cards(), profile, store, str(shared_data)).failed
    text = render(store.records())
    assert "## tiny-gpt2, profile `quick`, float32" in text and "## tiny-gpt2, profile `quick`, bfloat16" in text
    assert "‡" not in text  # no run here was resumed
    table = text.split("### Comparison")[1].split("### Cost")[0]
    assert not [line for line in table.splitlines() if line.startswith("|") and "±" in line]  # one run each, no spread
    for dtype in ("float32", "bfloat16"):
        versatility = text.split(f"## Versatility: BBT and BBTv2 across backbones, profile `quick`, {dtype}")[1]
        rows = [line for line in versatility.split("##")[0].splitlines() if line.startswith("| tiny-gpt2")]
        assert len(rows) == 1 and "±" not in rows[0]


def test_the_end_of_grid_summary_names_what_ran_was_skipped_and_failed(tmp_path, shared_data, tiny, monkeypatch):
    grid(tmp_path, shared_data, tasks=("sst2",), seeds=(13,))
    cls = get_method("manual")
    monkeypatch.setattr(cls, "predict", lambda self, examples: (_ for _ in ()).throw(RuntimeError("boom")))
    summary, _ = grid(tmp_path, shared_data, tasks=("sst2", "rte"), seeds=(13,))
    lines = summary.lines()
    assert lines[0] == "ran 0, skipped 1 (finished before), failed 1"
    assert "  skipped manual/sst2/seed13/tiny-gpt2" in lines
    assert any(line.startswith("  FAILED  manual/rte/seed13/tiny-gpt2: RuntimeError: boom") for line in lines)
    monkeypatch.undo()
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone("gpt2"))
    summary, _ = grid(tmp_path, shared_data, tasks=("rte",), seeds=(13,))
    assert summary.lines()[1].startswith("  ran     manual/rte/seed13/tiny-gpt2: accuracy ")


def test_run_progress_logs_an_estimate_of_the_time_left(caplog):
    from harness.progress import RunProgress, duration

    progress = RunProgress("bbt/sst2", log_every_s=0)
    progress.total(200, "call")
    with caplog.at_level("INFO", logger="harness"):
        progress.advance(20)
    assert "20/200 calls" in caplog.text and "left" in caplog.text
    assert (duration(59), duration(61), duration(3700)) == ("59s", "1m01s", "1h01m")


def test_a_resumed_run_estimates_from_its_own_pace(caplog):
    """Calls an earlier attempt made count as done, not as work this attempt did in its few seconds."""
    from harness.progress import RunProgress

    progress = RunProgress("bbt/agnews", log_every_s=0)
    progress.total(8000, "call", done=1000)
    progress.started -= 100  # this attempt: 50 calls in 100 s, so 6,950 calls left take 3 h 51 min
    with caplog.at_level("INFO", logger="harness"):
        progress.advance(50)
    assert "1050/8000 calls" in caplog.text and "~3h51m left" in caplog.text


def test_convergence_axes_label_calls_briefly():
    from harness.report import _calls_label

    assert [_calls_label(x) for x in (20, 200, 1000, 5000, 20000)] == ["20", "200", "1k", "5k", "20k"]


def test_an_average_over_part_of_the_tasks_says_how_many():
    import pandas as pd

    from harness.report import _task_cells

    runs = pd.DataFrame({"task": ["sst2", "sst2", "agnews"], "score": [60.0, 70.0, 80.0], "resumed_at": "", "legacy": False})
    assert _task_cells(runs, ["sst2", "agnews"], ["sst2", "agnews"])["avg"] == "72.50"
    assert _task_cells(runs, ["sst2", "rte"], ["sst2", "rte"]) == {"sst2": "65.00 ± 5.00", "rte": "–", "avg": "65.00 (1 task)"}
    assert _task_cells(runs, ["sst2", "agnews", "rte"], ["sst2", "agnews", "rte"])["avg"] == "72.50 (2 tasks)"


def test_the_seeds_column_names_a_task_that_ran_other_seeds():
    import pandas as pd

    from harness.report import _seeds

    runs = pd.DataFrame({"task": ["sst2", "sst2", "sst2", "agnews", "rte"], "seed": [13, 42, 100, 42, 42]})
    assert _seeds(runs, ["sst2", "agnews", "rte"]) == "42; sst2: 13,42,100"
    assert _seeds(runs[runs["task"] != "sst2"], ["sst2", "agnews", "rte"]) == "42"


def test_a_cpu_run_says_how_many_threads_it_had():
    from harness.meters import place

    assert place("cpu:x86_64 x2", 1) == "cpu:x86_64 x2 (1 thread)"
    assert place("cpu:x86_64 x2", 2) == "cpu:x86_64 x2 (2 threads)"
    assert place("cuda:NVIDIA H200", 1) == "cuda:NVIDIA H200"
    assert place("cpu:x86_64 x2", None) == "cpu:x86_64 x2"  # records from before threads were metered
    assert place("cpu:x86_64 x2 bf16", 1) == "cpu:x86_64 x2 bf16 (1 thread)"


def test_a_report_keeps_its_published_records_and_takes_the_stores_newer_ones(tmp_path):
    from harness.store import published

    def record(run_id, started, status="ok", score=50.0):
        spec = RunSpec("manual", run_id, 13, "tiny-gpt2", 16, None, {})
        return RunRecord(run_id, status, spec, started, metrics={"score": score})

    report = tmp_path / "reports" / "results.md"
    report.with_suffix(".jsonl").parent.mkdir()
    behind = [record("a", 1), record("b", 1), record("e", 5, score=90.0)]
    report.with_suffix(".jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in behind))
    store = ResultsStore(tmp_path / "local")
    for r in [record("b", 2, score=70.0), record("c", 2, status="failed"), record("d", 2), record("e", 3)]:
        store.append(r)
    kept = published(report, store)
    # b: the store's rerun is newer; e: the published record is newer than the store's (pulled after it ran)
    assert [(r.run_id, r.score) for r in kept] == [("a", 50.0), ("b", 70.0), ("d", 50.0), ("e", 90.0)]
    assert [json.loads(line) for line in report.with_suffix(".jsonl").read_text().splitlines()] == [r.to_json() for r in kept]
    # a side store's report sits beside it: the store is the report's records, left as it is (failures too)
    assert len(published(tmp_path / "local" / "results.md", store)) == 4
    assert len(store.records()) == 4


def test_what_the_gradient_methods_trained_is_listed_in_the_tables_method_order():
    import pandas as pd

    from harness.report import part_trained

    runs = pd.DataFrame({"method": ["prompt-tuning", "lora", "lora", "bitfit"], "group": "gradient-based",
                         "trained": ["50 input vectors", "LoRA r=8", "LoRA r=8", None]})
    assert list(part_trained(runs)) == ["lora", "prompt-tuning"]  # the registry's order, not the records'; none known for bitfit
    assert part_trained(runs)["lora"] == "LoRA r=8"


def test_a_run_resumed_on_another_device_records_where_each_stretch_ran(tmp_path, shared_data, tiny, monkeypatch):
    """A committed checkpoint lets another machine take a long run up; the search goes another way from there
    (other sums), so the record and the report say which calls ran where."""
    import harness.checkpoint

    places = iter(["cpu:x86_64 x2 bf16 (1 thread)", "cuda:NVIDIA H100 80GB HBM3"])
    monkeypatch.setattr(harness.checkpoint, "current_place", lambda: next(places))
    settings = {"bbt": {"budget": 40, "popsize": 10, "intrinsic_dim": 10, "n_tokens": 4, "eval_every": 20}}
    spec = RunSpec("bbt", "sst2", 13, "tiny-gpt2", 16, 8, vars(method_config("bbt", PROFILE, settings=settings)))
    store = ResultsStore(tmp_path)
    record = _killed_at_first_checkpoint_then_resumed(spec, store, shared_data, monkeypatch)
    assert record.meters["ran_on"] == [[0, "cpu:x86_64 x2 bf16 (1 thread)"], [20, "cuda:NVIDIA H100 80GB HBM3"]]
    assert ("bbt/sst2/seed13 at 20 calls (0-19 on cpu:x86_64 x2 bf16 (1 thread), 20- on cuda:NVIDIA H100 80GB HBM3)"
            in render(store.records()))


def test_an_interrupted_gradient_run_resumes_at_its_step_in_the_next_grid(tmp_path, shared_data, tiny, monkeypatch):
    config = method_config("lora", PROFILE, settings={"lora": {"steps": 4, "eval_every": 2, "batch_size": 4}})
    spec = RunSpec("lora", "sst2", 13, "tiny-gpt2", 16, 8, vars(config))
    store = ResultsStore(tmp_path)
    record = _killed_at_first_checkpoint_then_resumed(spec, store, shared_data, monkeypatch)
    assert record.meters["resumed_at_steps"] == [2] and "resumed_at_calls" not in record.meters
    assert len(record.trace["train_loss"]) == 4 and not store.checkpoint_path(spec.run_id).exists()
    assert "resumed from a mid-run checkpoint: lora/sst2/seed13 at 2 steps" in render(store.records())


def test_resumed_runs_are_listed_in_the_tables_method_and_task_order():
    import pandas as pd

    from harness.report import _resumed_at, resumed_runs

    assert _resumed_at({"resumed_at_calls": [40, 120]}) == "40, 120 calls"
    assert _resumed_at({"resumed_at_steps": [300]}) == "300 steps"  # a gradient baseline's trainer
    assert _resumed_at({}) == _resumed_at({"resumed_at_calls": []}) == ""
    moved = {"resumed_at_calls": [40, 120], "ran_on": [[0, None], [40, "A"], [120, "B"]]}  # None: not recorded
    assert _resumed_at(moved) == "40, 120 calls (0-39 on a device not recorded, 40-119 on A, 120- on B)"
    runs = pd.DataFrame({"method": ["bbt", "bbt", "bbtv2", "bbt", "bbt", "lora"],
                         "group": ["gradient-free"] * 5 + ["gradient-based"],
                         "task": ["rte", "snli", "mrpc", "mrpc", "sst2", "sst2"], "seed": 42,
                         "resumed_at": ["40 calls", "120 calls", "60 calls", "40 calls", "", "300 steps"]})
    assert resumed_runs(runs) == ("lora/sst2/seed42 at 300 steps; bbt/mrpc/seed42 at 40 calls; "
                                  "bbt/snli/seed42 at 120 calls; bbt/rte/seed42 at 40 calls; bbtv2/mrpc/seed42 at 60 calls")
    assert resumed_runs(runs[runs["resumed_at"] == ""]) == ""
