"""The mutation suite stays usable: every mutant still applies to the code it breaks and names checks that exist.

(Running it takes the gate's time once per mutant: `scripts/gate-mutations`, docs/gate.md.)"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

from harness.check import DEFAULT_CONFIG, check_name, load_checks

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    loader = importlib.machinery.SourceFileLoader("gate_mutations", str(ROOT / "scripts" / "gate-mutations"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


SCRIPT = load_script()


@pytest.mark.parametrize("mutant", SCRIPT.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_and_targets_committed_checks(mutant, tmp_path):
    checks = {check_name(c) for c in load_checks(DEFAULT_CONFIG)["checks"]}
    assert set(mutant.checks) <= checks
    for name, text, replacement in mutant.patches:
        source = (ROOT / name).read_text()
        assert text in source, f"{mutant.name}: {name} no longer has {text!r}"
        assert source.replace(text, replacement) != source


def test_the_issue_s_mutants_are_all_there():
    names = {m.name for m in SCRIPT.MUTANTS}
    assert {"bbt-loss-sign", "bbt-predict-z0", "bbtv2-loss-sign", "bbtv2-predict-z0", "trainer-no-step",
            "icl-no-demos", "probe-shuffled-labels", "scorer-label-words-swapped"} <= names
