"""Methods and task cards from outside this repo, settings from the command line, and a run's identity."""

import json
import textwrap
import time

import pytest

import methods
from harness.cli import main
from harness.errors import HarnessError
from harness.profiles import get_profile
from harness.record import SCHEMA, Predictions, RunRecord
from harness.settings import coerce, method_config, parse_sets
from harness.store import ResultsStore, read_records
from methods import registry

PLUGIN = '''
"""An outside package's method: the majority label of the train split (a black-box method that sends nothing)."""
from collections import Counter
from dataclasses import dataclass

import numpy as np

from methods.base import Method, MethodConfig, setting


@dataclass
class MajorityConfig(MethodConfig):
    fallback: int = setting(0, "the label predicted before fit")


class Majority(Method):
    name = "majority"
    config_class = MajorityConfig
    group = "gradient-free"
    as_a_service = True
    deployment_efficient = True

    def fit(self, train, dev):
        self.label = Counter(e["label"] for e in train).most_common(1)[0][0]

    def predict(self, examples):
        return np.full(len(examples), getattr(self, "label", self.config.fallback))
'''

CARD = """
name: sst2-mine
description: sst2 with my own label words
local: {train: sst2/train.jsonl, eval: sst2/validation.jsonl}
fields: [sentence]
labels: [negative, positive]
metric: accuracy
templates:
  clm: {template: "{sentence} . All in all, it was", label_words: [" bad", " good"]}
"""


@pytest.fixture
def fresh_registry():
    """Discovery runs again in the test (it is cached per process), and the test's plug-ins leave with it."""
    saved = dict(methods._REGISTRY)
    methods._discovered = False
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(saved)
    methods._discovered = False


def install_plugin(root, monkeypatch):
    """A package installed as pip would leave it: its module and a dist-info folder whose entry_points.txt declares
    a method and a folder of task cards; importlib.metadata finds it on sys.path."""
    package = root / "my_plugin"
    (package / "cards").mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN)
    (package / "cards" / "__init__.py").write_text("")
    (package / "cards" / "sst2-mine.yaml").write_text(CARD)
    info = root / "my_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [bbt_harness.methods]
        majority = my_plugin:Majority

        [bbt_harness.tasks]
        my-cards = my_plugin.cards
    """))
    monkeypatch.syspath_prepend(str(root))


def test_an_installed_package_adds_a_method_and_task_cards_through_entry_points(
    tmp_path, shared_data, monkeypatch, fresh_registry, tiny_cli
):
    install_plugin(tmp_path / "site", monkeypatch)
    assert list(registry())[-1] == "majority"  # after the built-in methods (rank)
    argv = ["run", "--methods", "majority,manual", "--datasets", "sst2-mine", "--backbone", "tiny-gpt2", "--eval-cap", "40",
            "--data-dir", str(shared_data), "--results-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    records = {r.method: r for r in ResultsStore(tmp_path / "r").records()}
    assert records["majority"].ok and records["majority"].score == 50.0  # a stratified 40 rows: half are the majority
    assert records["manual"].ok and records["manual"].task == "sst2-mine"
    assert "| gradient-free | majority" in (tmp_path / "r" / "results.md").read_text()


def test_a_broken_plugin_is_named(tmp_path, monkeypatch, fresh_registry):
    info = tmp_path / "bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bbt_harness.methods]\nbroken = no_such_module:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HarnessError, match="the 'broken' method entry point \\(no_such_module:Thing, from package bad\\)"):
        registry()


def test_set_reaches_the_methods_config_and_the_run_id(tmp_path, shared_data, tiny_cli):
    argv = ["run", "--methods", "bbt", "--datasets", "sst2", "--backbone", "tiny-gpt2", "--eval-cap", "20",
            "--data-dir", str(shared_data), "--results-dir", str(tmp_path), "--set", "bbt.budget=40", "--set", "bbt.popsize=10"]
    assert main(argv) == 0
    (record,) = ResultsStore(tmp_path).records()
    assert record.spec.config["budget"] == 40 and record.spec.config["popsize"] == 10 and record.trace["calls"] == 40
    assert main(argv[:-2] + ["--set", "bbt.popsize=20"]) == 0  # another setting: another run, not a skip
    assert len(ResultsStore(tmp_path).records()) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "bbt.budgte=300"], "method 'bbt' has no setting(s) ['budgte']; its settings are: alpha, batched, bound, budget"),
        (["--set", "bbt.budget=lots"], "bbt.budget: expected an int, got 'lots'"),
        (["--set", "bbt.budget=10"], "bbt: a budget of 10 calls is below one generation (20)"),
        (["--set", "bbt.loss=mse"], "bbt: loss must be one of auto, ce, hinge, neg-metric, not 'mse'"),
        (["--set", "bbt.sigma=nan"], "bbt.sigma: expected a float, got 'nan'"),
        (["--set", "budget=300"], "expected METHOD.FIELD=VALUE"),
        (["--set", "bbtv2.sigma=0.2"], "settings for 'bbtv2', which is not among the methods run (bbt)"),
        (["--set", "lora2.r=4"], "unknown method 'lora2'"),
        (["--eval-cap", "-5"], "--eval-cap takes 0 (every eval row) or a positive number of rows, not -5"),
        (["--seeds", "-1"], "--seeds: a split seed is between 0 and 2**32 - 1, not -1"),
    ],
)
def test_a_bad_setting_fails_fast_naming_what_is_valid_without_loading_a_backbone(argv, message, tmp_path, capsys, tiny_cli):
    registry()  # imports done (a one-off cost of the process), so the time below is the check's own
    started = time.perf_counter()
    code = main(["run", "--methods", "bbt", "--datasets", "sst2", "--results-dir", str(tmp_path), *argv])
    elapsed = time.perf_counter() - started
    assert code == 2 and message in capsys.readouterr().err
    assert tiny_cli == [] and elapsed < 1.0  # nothing loaded


def test_a_config_file_sets_the_grid_and_the_command_line_wins(tmp_path, shared_data, tiny_cli):
    config = tmp_path / "grid.yaml"
    config.write_text(textwrap.dedent("""
        methods: [manual, bbt]
        tasks: [sst2]
        eval_cap: 20
        settings:
          bbt: {budget: 40, popsize: 10}
    """))
    argv = ["run", "--config", str(config), "--backbone", "tiny-gpt2", "--data-dir", str(shared_data),
            "--results-dir", str(tmp_path / "r")]
    assert main([*argv, "--set", "bbt.budget=20"]) == 0
    records = {r.method: r for r in ResultsStore(tmp_path / "r").records()}
    assert set(records) == {"manual", "bbt"} and records["bbt"].spec.config["budget"] == 20
    assert records["bbt"].spec.eval_cap == 20
    config.write_text("methods: [manual]\nbudget: 3\n")
    assert main(argv) == 2


def test_editing_a_task_card_makes_its_runs_new_runs(tmp_path, shared_data, tiny_cli):
    cards = tmp_path / "cards"
    cards.mkdir()
    card = cards / "mine.yaml"
    card.write_text(CARD.replace("sst2-mine", "mine"))
    argv = ["run", "--methods", "manual", "--datasets", "mine", "--backbone", "tiny-gpt2", "--eval-cap", "20",
            "--data-dir", str(shared_data), "--tasks-dir", str(cards), "--results-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged: skipped
    assert len(ResultsStore(tmp_path / "r").records()) == 1
    card.write_text(CARD.replace("sst2-mine", "mine").replace('" good"', '" great"'))  # another label word
    assert main(argv) == 0
    first, second = ResultsStore(tmp_path / "r").records()
    assert first.spec.card_id != second.spec.card_id and first.run_id != second.run_id
    card.write_text(CARD.replace("sst2-mine", "mine").replace('" good"', '" great"').replace("with my own", "with other"))
    assert main(argv) == 0  # a description is not part of the card's identity: skipped
    assert len(ResultsStore(tmp_path / "r").records()) == 2


def test_other_data_files_make_new_runs(tmp_path, shared_data, tiny_cli):
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    for name in ("train.jsonl", "validation.jsonl"):
        (data / name).write_bytes((shared_data / "sst2" / name).read_bytes())
    argv = ["run", "--methods", "manual", "--datasets", "sst2", "--backbone", "tiny-gpt2", "--eval-cap", "20",
            "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    with open(data / "validation.jsonl", "a") as handle:
        handle.write(json.dumps({"sentence": "an added row", "label": 1, "idx": 99999}) + "\n")
    assert main(argv) == 0
    first, second = ResultsStore(tmp_path / "r").records()
    assert first.spec.data_id != second.spec.data_id and first.spec.card_id == second.spec.card_id


def test_records_round_trip_and_older_records_stay_readable(tmp_path):
    predictions = Predictions.of([3, 4, 5, 9, 10, 20], [0, 1, 1, 13, 2, 0], [0, 1, 0, 13, 3, 0])
    assert predictions.rows == [[3, 6], [9, 11], [20, 21]] and predictions.labels == "011d20"
    assert predictions.row_ids() == [3, 4, 5, 9, 10, 20] and predictions.label_ids().tolist() == [0, 1, 1, 13, 2, 0]
    assert predictions.gold == "010d30" and predictions.gold_ids().tolist() == [0, 1, 0, 13, 3, 0]
    with pytest.raises(ValueError, match="5 gold labels"):
        Predictions.of([3, 4, 5, 9, 10, 20], [0, 1, 1, 13, 2, 0], [0, 1, 0, 13, 3])
    old = {  # a schema-1 record, as the committed reports hold them: no schema, no identities, no predictions
        "run_id": "0123456789abcdef", "status": "ok", "method": "manual", "task": "sst2", "seed": 42,
        "backbone": "gemma3-270m", "profile": "quick", "config_hash": "x", "group": "gradient-free",
        "spec": {"method": "manual", "task": "sst2", "seed": 42, "backbone": "gemma3-270m", "k_shot": 16,
                 "eval_cap": 400, "config": {"batch_size": 32}},
        "metrics": {"score": 54.25}, "meters": {"wall_s": 1.0, "device": "cpu:x86_64 x2"}, "started": 1.0,
    }
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(old, sort_keys=True) + "\n")
    (record,) = read_records(path)
    assert record.legacy and record.schema == 1 and record.spec.dtype == "float32" and record.spec.card_id == ""
    assert record.score == 54.25 and record.predictions is None
    assert record.to_json() == old  # written back as it was read
    new = RunRecord(record.spec.run_id, "ok", record.spec, 2.0, metrics={"score": 1.0}, predictions=predictions)
    assert RunRecord.from_json(json.loads(json.dumps(new.to_json()))) == new and new.schema == SCHEMA
    with pytest.raises(ValueError, match="schema 3"):
        RunRecord.from_json({**new.to_json(), "schema": 3})


def test_settings_are_read_by_their_fields_type():
    assert parse_sets(["bbt.budget=2000", "bbtv2.sigma = 0.2"]) == {"bbt": {"budget": "2000"}, "bbtv2": {"sigma": "0.2"}}
    assert coerce("x", int, "1_000") == 1000 and coerce("x", float, "1e-3") == 0.001 and coerce("x", float, 3) == 3.0
    assert coerce("x", bool, "false") is False and coerce("x", int | None, "none") is None
    assert coerce("x", list[str] | None, "q_proj, v_proj") == ["q_proj", "v_proj"]
    for kind, value in ((int, "2.5"), (int, True), (bool, "maybe"), (float, "inf"), (str, 3)):
        with pytest.raises(HarnessError):
            coerce("x", kind, value)
    lora = method_config("lora", get_profile("quick"), "sst2", {"lora": {"target_modules": "q_proj,v_proj", "r": "4"}})
    assert lora.target_modules == ["q_proj", "v_proj"] and lora.r == 4 and lora.steps == 100  # quick's value stays


@pytest.mark.parametrize("name", list(registry()))
def test_every_setting_of_every_method_has_help_and_a_valid_default(name, capsys):
    cls = registry()[name]
    for field, default, help in cls.config_class.describe():
        assert help, f"{name}.{field} has no help"
    cls.check_config(cls.config_class())  # the defaults pass the method's own check
    for profile in ("paper", "quick"):
        for task in ("sst2", "dbpedia"):
            method_config(name, get_profile(profile), task)
    assert main(["list", "--method", name]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[:3] == ["setting", "default", "paper"]
