"""Paired tests from stored predictions, the report's marks, its departures line and the matched-budget figures."""

from math import comb

import numpy as np
import pytest

from harness.paired import mcnemar, pair_runs, permutation
from harness.record import Predictions, RunRecord, RunSpec
from harness.report import render, write_report


def record(method, task, seed, preds, gold, metric="accuracy", group="gradient-free", config=None, trace=None,
           cap=None, positive=None, rows=None, k_shot=16):
    spec = RunSpec(method, task, seed, "tiny-gpt2", k_shot, cap, config or {})
    rows = list(range(len(gold))) if rows is None else rows
    predictions = Predictions.of(rows, preds, gold, positive)
    gold, preds = np.asarray(gold), np.asarray(preds)
    score = 100 * float(np.mean(gold == preds))
    return RunRecord(
        spec.run_id, "ok", spec, 1.0, profile="quick", group=group, metric=metric, tunable_parameters=0,
        metrics={"score": score}, meters={"wall_s": 1.0, "fit_s": 1.0, "device": "cpu:x86_64 x2"},
        split={"eval_size": len(gold), "eval_full_size": len(gold), "caveats": {}, "train_size": 32},
        versions={}, trace=trace, predictions=predictions,
    )


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_rows():
    # 10 rows only a got right, 2 only b, 88 both: two-sided, 2 * P(X >= 10) for X ~ Bin(12, 1/2)
    a = np.array([True] * 10 + [False] * 2 + [True] * 88)
    b = np.array([False] * 10 + [True] * 2 + [True] * 88)
    expected = 2 * sum(comb(12, k) for k in range(10, 13)) / 2**12
    assert mcnemar(a, b) == pytest.approx(expected)
    assert mcnemar(a, a) == 1.0  # no discordant row: no evidence either way
    assert mcnemar(b, a) == pytest.approx(expected)


def test_the_f1_permutation_test_tells_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    good = np.where(rng.random(200) < 0.9, gold, 1 - gold)
    assert permutation(gold, good, good, positive=1) == 1.0
    assert permutation(gold, good, np.zeros(200, dtype=int), positive=1) < 0.001
    noisy = np.where(rng.random(200) < 0.02, 1 - good, good)  # a few rows flipped: no real difference
    assert permutation(gold, good, noisy, positive=1) > 0.05


def test_runs_pair_row_by_row_pooled_over_seeds_and_with_a_zero_shot_methods_only_run():
    gold = [0, 1] * 50
    manual = record("manual", "sst2", 13, [0] * 100, gold)  # right on the 50 zeros
    better = [record("bbt", "sst2", s, gold[:90] + [1 - g for g in gold[90:]], gold) for s in (13, 42)]
    result = pair_runs(better, [manual])
    assert result.rows == 200 and result.difference == pytest.approx(40.0)
    assert result.significant and result.test == "McNemar"
    # rows are matched by id, not by position: the same predictions listed over other row ids pair nowhere
    elsewhere = record("manual", "sst2", 13, [0] * 100, gold, rows=list(range(1000, 1100)))
    assert pair_runs(better, [elsewhere]) is None
    with pytest.raises(ValueError, match="gold label"):
        pair_runs(better, [record("manual", "sst2", 13, [0] * 100, [1 - g for g in gold])])


def test_f1_tasks_pair_on_f1():
    gold = [1, 0] * 60
    a = record("bbt", "mrpc", 42, gold, gold, metric="f1", positive=1)
    b = record("manual", "mrpc", 42, [1] * 120, gold, metric="f1", positive=1)
    result = pair_runs([a], [b])
    assert result.test == "permutation" and result.difference == pytest.approx(100 * (1 - 2 / 3))


def test_the_report_marks_significant_cells_and_says_where_the_profile_departs(tmp_path):
    gold = [0, 1] * 100
    runs = [
        record("manual", "sst2", 42, [0] * 200, gold, cap=400),
        record("bbt", "sst2", 42, gold, gold, config={"budget": 300}, cap=400),  # 100% vs 50%
        record("icl", "sst2", 42, [0] * 198 + [1, 1], gold, cap=400),  # one row apart from manual
        record("manual", "dbpedia", 42, [0] * 200, gold, cap=400, k_shot=4),
        record("bbtv2", "sst2", 42, gold, gold, config={"rounds": 1}, cap=400),
        record("bbtv2", "dbpedia", 42, gold, gold, config={"rounds": 1, "budget": 8000}, cap=400, k_shot=4),
        record("bbt", "dbpedia", 42, gold, gold, config={"rounds": 1, "budget": 300}, cap=400, k_shot=4),
    ]
    text = render(runs)
    comparison = text.split("### Comparison")[1].split("###")[0]
    cells = {row[1]: row[3] for row in ([c.strip() for c in line.split("|")[1:-1]] for line in comparison.splitlines()
                                        if line.startswith("| gradient"))}
    assert cells == {"manual": "50.00", "icl": "50.00", "bbt": "100.00 ▲", "bbtv2": "100.00 ▲"}  # icl: two rows apart, no mark
    assert "bbt − manual" in text and "+50.00 (p < 0.001) ▲" in text
    assert "eval capped at 400 rows per task" in text and "1 split (seed 42), not the papers' 3" in text
    assert "seeds 42; 1 of the 8 cells not run); 7s of wall time in all (the sum of the runs' own)" in text  # wall_s 1.0 each
    assert "bbt on sst2: budget 300 (paper 8000)" in text and "bbt on dbpedia: budget 300 (paper 20000)\n" in text
    # rounds decide BBTv2's calls, so its budget (paper: 20,000 on dbpedia) is no departure; BBT ignores rounds
    assert "bbtv2 on sst2, dbpedia: rounds 1 (paper: none; the call budget decides)" in text  # not "(paper 0)"
    assert "dbpedia: 4 shots per class (the papers: 16)" in text and "### Comparison (16-shot; dbpedia 4-shot;" in text


def test_the_report_says_which_searches_pycma_stopped_before_their_budget():
    gold = [0, 1] * 10
    stop = lambda slot, calls, why: {"slot": slot, "calls": calls, "reason": {why: 1}}  # noqa: E731
    runs = [
        record("manual", "mrpc", 42, gold, gold),
        record("bbt", "mrpc", 42, gold, gold, config={"budget": 8000},
               trace={"calls": 4740, "stopped": [stop(0, 4740, "tolflatfitness")]}),
        record("bbt", "rte", 42, gold, gold, config={"budget": 8000}, trace={"calls": 8000, "stopped": []}),
        record("bbtv2", "mrpc", 42, gold, gold, config={"budget": 8000},
               trace={"calls": 7000, "stopped": [stop(3, 1200, "tolfun"), stop(0, 3000, "tolflatfitness")]}),
        record("bbtv2", "rte", 42, gold, gold, config={"budget": 8000, "rounds": 1},  # rounds decide, not the budget
               trace={"calls": 360, "stopped": [stop(2, 200, "tolfun")]}),
    ]
    line = next(line for line in render(runs).splitlines() if line.startswith("- searches stopped"))
    assert line.split(": ", 1)[1] == (
        "bbt/mrpc/seed42 at 4740 calls (tolflatfitness; budget 8000); bbtv2/mrpc/seed42: layer 3 at 1200 calls "
        "(tolfun), layer 0 at 3000 calls (tolflatfitness); 7000 calls spent (budget 8000); bbtv2/rte/seed42: layer 2 "
        "at 200 calls (tolfun); 360 calls spent (rounds 1)")


def test_a_plugin_search_without_a_call_budget_is_named_stopped_without_one(monkeypatch):
    from dataclasses import dataclass

    import methods
    from methods.base import Method, MethodConfig

    @dataclass
    class AnnealConfig(MethodConfig):
        steps: int = 100

    class Anneal(Method):  # an outside package's search that reports its early stop as BBT does
        name, config_class, group, as_a_service, deployment_efficient = (
            "anneal", AnnealConfig, "gradient-free", True, True)

    methods.get_method("bbt")  # discovery first, so it does not run again inside the report
    monkeypatch.setitem(methods._REGISTRY, "anneal", Anneal)
    gold = [0, 1] * 10
    runs = [record("manual", "sst2", 42, gold, gold),
            record("anneal", "sst2", 42, gold, gold, config={"steps": 100},
                   trace={"calls": 40, "stopped": [{"slot": 0, "calls": 40, "reason": {"cooled": 1}}]})]
    line = next(line for line in render(runs).splitlines() if line.startswith("- searches stopped"))
    assert line.split(": ", 1)[1] == "anneal/sst2/seed42 at 40 calls (cooled)"


def test_the_report_gives_what_one_class_for_every_row_would_score():
    gold = [0, 1, 1, 1] * 5  # 75% class 1
    pairs = [1, 1, 1, 0, 0] * 4  # 60% positive: F1 of "1" everywhere = 2 * 0.6 / 1.6 = 75
    runs = [record("manual", "sst2", 42, [0] * 20, gold), record("bbt", "sst2", 42, gold, gold),
            record("manual", "mrpc", 42, [0] * 20, pairs, metric="f1", positive=1),
            # a record without the class its F1 counts is left out (without the guard, the report raises TypeError)
            record("bbt", "mrpc", 42, [0] * 20, [1] * 20, metric="f1", rows=list(range(20, 40))),
            record("manual", "rte", 42, [0] * 10, [0] * 7 + [1] * 3),
            record("bbt", "rte", 42, [0] * 10, [0] * 6 + [1] * 4, rows=list(range(10, 20)))]  # other rows: a range
    line = next(line for line in render(runs).splitlines() if line.startswith("- one class predicted"))
    assert line.split(": ", 1)[1] == "sst2 75.00, mrpc (F1) 75.00, rte 60.00–70.00"


def test_the_cost_table_gives_each_task_its_device_where_they_differ():
    from harness.report import cost_table, load_frame

    gold = [0, 1] * 20

    def on(task, threads):
        r = record("bbt", task, 42, gold, gold)
        return RunRecord(**{**r.__dict__, "meters": {**r.meters, "torch_threads": threads}})

    def device_cell(runs):
        table = cost_table(load_frame(runs))
        return [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]][3]

    assert device_cell([on("sst2", 2), on("agnews", 1)]) == "cpu:x86_64 x2 (2 threads) / cpu:x86_64 x2 (1 thread)"
    assert device_cell([on("sst2", 1), on("agnews", 1)]) == "cpu:x86_64 x2 (1 thread)"


def test_legacy_records_without_gold_labels_are_not_paired():
    gold = [0, 1] * 20
    old = record("manual", "sst2", 42, [0] * 40, gold)
    old = RunRecord(**{**old.__dict__, "predictions": Predictions(old.predictions.rows, old.predictions.labels)})
    assert pair_runs([record("bbt", "sst2", 42, gold, gold)], [old]) is None


def test_a_current_record_supersedes_a_legacy_one_of_the_same_cell_only():
    from harness.report import load_frame

    gold = [0, 1] * 20

    def legacy(method, seed, preds):
        r = record(method, "sst2", seed, preds, gold)
        return RunRecord(**{**r.__dict__, "run_id": f"old-{method}-{seed}", "schema": 1, "predictions": None})

    runs = [legacy("bbt", 42, [0] * 40), legacy("bbt", 13, [0] * 40), legacy("icl", 42, [0] * 40),
            record("bbt", "sst2", 42, gold, gold)]
    frame = load_frame(runs)
    kept = sorted(zip(frame["method"], frame["seed"], frame["legacy"], frame["score"]))
    # bbt seed 42 is the current record alone (100, not the mean with the old 50); other cells keep their legacy record
    assert kept == [("bbt", 13, True, 50.0), ("bbt", 42, False, 100.0), ("icl", 42, True, 50.0)]


def test_the_matched_budget_figure_puts_calls_and_steps_on_one_axis(tmp_path):
    from harness.report import _spent

    gold = [0, 1] * 10
    bbt = record("bbt", "sst2", 42, gold, gold, trace={
        "calls": 200, "train": [{"calls": 100, "best_loss": 1.0}], "dev": [{"calls": 100, "metric": 60.0}, {"calls": 200, "metric": 70.0}]})
    lora = record("lora", "sst2", 42, gold, gold, group="gradient-based", config={"batch_size": 8}, trace={
        "dev": [{"step": 50, "dev_score": 80.0}]})
    assert _spent(bbt) == [(3200, 60.0), (6400, 70.0)]  # a call forwards the 32-example train set
    assert _spent(lora) == [(400, 80.0)]  # a step forwards a batch of 8
    write_report([bbt, lora], tmp_path / "results.md")
    assert (tmp_path / "budget-tiny-gpt2-sst2.png").stat().st_size > 0
    assert "![budget-tiny-gpt2-sst2](budget-tiny-gpt2-sst2.png)" in (tmp_path / "results.md").read_text()


def test_every_line_of_a_full_tasks_figure_has_its_own_colour(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from harness.report import budget_figures

    colours, plot = [], Axes.plot

    def spy(self, *args, **kwargs):
        lines = plot(self, *args, **kwargs)
        colours.extend(line.get_color() for line in lines)
        return lines

    monkeypatch.setattr(Axes, "plot", spy)
    gold = [0, 1] * 10
    runs = [record("lora", "sst2", seed, gold, gold, group="gradient-based", config={"batch_size": 8},
                   trace={"dev": [{"step": 25, "dev_score": 80.0}]}) for seed in range(12)]
    budget_figures(runs, tmp_path)
    assert len(colours) == 12 and len({str(c) for c in colours}) == 12  # matplotlib's own cycle repeats at 11
