"""Shared fixtures: small randomly initialised models of every family, built from a config with a tokenizer
made here (no download) and configured like the family's real one, and the real task data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.synthetic import tiny_backbone, tiny_model  # noqa: F401  (the tests' tiny random backbones)

SHARED_DATA = Path(os.environ.get("HARNESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.jsonl").exists():
        pytest.skip(f"the task data is not at {SHARED_DATA}; set HARNESS_DATA_DIR")
    return SHARED_DATA


@pytest.fixture
def tiny(monkeypatch):
    """The runner loads a tiny random GPT-2-like backbone whatever it is asked for; returns the names asked for."""
    import harness.runner as runner

    loads = []

    def load(name, dtype="float32"):
        loads.append(name)
        return tiny_backbone("gpt2")

    monkeypatch.setattr(runner, "load_backbone", load)
    return loads


@pytest.fixture
def tiny_cli(tiny, monkeypatch):
    """`tiny` for whole `harness run` commands: the backbone's identity is not read from its (absent) weights."""
    monkeypatch.setattr("harness.cli.spec_identity", lambda name: {"source": "test", "name": name})
    return tiny


@pytest.fixture(scope="session")
def gemma():
    from harness.backbones import load_backbone

    return load_backbone("gemma3-270m")
