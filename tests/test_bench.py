"""`harness bench`: the reference-style loop and the default path score the same candidates alike."""

import numpy as np
import pytest
import torch

from harness.bench import non_embedding_parameters, reference_call, render, run_bench, time_bbtv2_reuse
from harness.prompting import ProjectionSpec, PromptSpec, placeholder_ids, project
from harness.scoring import PromptBatch, label_token_ids, make_scorer
from harness.service import ModelService
from tests.conftest import tiny_backbone


@pytest.mark.parametrize("kind", ["gpt2", "gemma3", "roberta", "t5"])
def test_reference_style_and_default_paths_agree(kind):
    """Same candidates, same label logits (float32, within 1e-4): the speed-ups change nothing but time."""
    backbone = tiny_backbone(kind)
    service = ModelService(backbone)
    spec = PromptSpec(4, 1, "add", "z", ProjectionSpec(16, 0, (0.5,)))
    service.configure_prompt(spec)
    texts = [f"the movie was good . {service.mask}", f"bad film , it was {service.mask} ."]
    words = [" good", " bad"]
    z = np.random.RandomState(1).randn(3, 1, 16).astype(np.float32)
    fast = service.prompted_label_logits(texts, words, z)
    scorer = make_scorer(backbone)
    table = backbone.model.get_input_embeddings()
    placeholders = table(torch.tensor(placeholder_ids(spec, table.weight.shape[0])))
    enc = scorer.encode(texts)
    ids = label_token_ids(backbone.tokenizer, words)
    with torch.no_grad():
        for i in range(3):
            vectors = project(spec, z[i : i + 1], table.weight.shape[1], {})
            ref = reference_call(scorer, enc, ids, PromptBatch(vectors, placeholders))
            np.testing.assert_allclose(fast[i], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_bench_reports_both_paths_and_the_floor():
    backbone = tiny_backbone("gpt2")
    texts = ["the movie was good . it was"] * 4
    results, facts = run_bench(
        backbone, texts, [" good", " bad"], calls=20, reference_calls=2, n_tokens=4, dim=8, popsize=10, compile="default"
    )
    reference, default, compiled = results
    assert (reference.calls, default.calls, compiled.calls) == (2, 20, 20)
    # the compiled row does the same work; its first generation (compiling) is timed as one-off setup
    assert compiled.path == "default + torch.compile (default)" and compiled.floor_seconds == default.floor_seconds
    assert 0 < compiled.setup_seconds < compiled.seconds
    assert facts["tokens_per_call_needed"] < facts["tokens_per_call_full"]  # the shared prefix saves work
    assert 0 < default.floor_seconds and 0 < reference.floor_seconds
    assert facts["non_embedding_parameters"] == non_embedding_parameters(backbone.model) > 0
    bbtv2 = time_bbtv2_reuse(backbone, texts, [" good", " bad"], popsize=4, n_tokens=4, dim=8, probes=2)
    assert bbtv2["slots"] == [0, 1] and len(bbtv2["with"]) == len(bbtv2["without"]) == 2
    text = render(results, facts, "harness bench --random", bbtv2)
    assert "reference-style" in text and "Speed-up of the default path" in text and facts["device"] in text
    assert "Speed-up of the default + torch.compile (default) path" in text
    assert "with reuse" in text


def test_end_to_end_timing_runs_a_whole_bbt_fit(shared_data):
    from harness.bench import BenchResult, time_bbt_run
    from harness.data import load_task_data, make_split
    from harness.prompts import PromptFormat
    from harness.tasks import get_card

    card = get_card("sst2")
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, 8)
    backbone = tiny_backbone("gpt2")
    default = BenchResult("default", 20, 1.0, 0.5)
    result = time_bbt_run(backbone, card, PromptFormat(card, "clm", ""), split, 40, 42, default, "cpu")
    assert result.calls == 40 and result.seconds > 0 and result.floor_seconds == 1.0
    # the one-off setup is timed apart: extrapolation adds it once, not once per `calls`
    assert 0 < result.setup_seconds < result.seconds
    assert result.seconds_for(40) == pytest.approx(result.seconds)
    assert result.seconds_for(8000) < 200 * result.seconds
    # the time splits into the server's forwards (train, dev), the setup and the user side, and adds up
    parts = result.parts
    assert min(parts.values()) > 0 and sum(parts.values()) == pytest.approx(result.seconds)
    assert parts["setup"] == result.setup_seconds
    text = render([default, default, result], _facts(), "harness bench")
    assert "8,000 calls would take" in text and "Where its time went (40 calls)" in text


def _facts() -> dict:
    return {"device": "cpu", "backbone": "tiny", "dtype": "float32", "examples_per_call": 4, "padded_length": 8,
            "prompt_tokens": 4, "non_embedding_parameters": 1, "matmul_tflops": 1.0, "tokens_per_call_full": 1,
            "tokens_per_call_needed": 1}
