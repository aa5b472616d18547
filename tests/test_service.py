"""The service boundary: byte accounting (BBT paper: float32; one query = the whole train set), its time, its switches."""

import numpy as np
import pytest

from harness.data import load_task_data, make_split
from harness.errors import HarnessError
from harness.prompts import PromptFormat
from harness.service import ModelService, text_bytes
from harness.tasks import get_card
from tests.conftest import tiny_backbone


@pytest.mark.parametrize("task, n, labels", [("sst2", 32, 2), ("agnews", 64, 4)])
def test_bytes_per_query_on_the_train_set(task, n, labels, shared_data):
    card = get_card(task)
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, None)
    service = ModelService(tiny_backbone("gpt2"))
    prompt = PromptFormat(card, service.family, service.mask)
    texts = prompt.render_all(split.train)
    logits = service.label_logits(texts, prompt.label_words)
    assert logits.shape == (n, labels) and logits.dtype == np.float32
    count = service.meter.phases["train"]
    assert count.queries == 1
    assert count.download_bytes == n * labels * 4  # sst2: 32 x 2 x 4 B = 256 B; agnews: 64 x 4 x 4 B = 1 KB
    assert count.upload_bytes == sum(len(t.encode()) for t in texts) + sum(len(w.encode()) for w in prompt.label_words)


def test_phases_are_counted_apart_and_chunking_is_invisible():
    service = ModelService(tiny_backbone("roberta"), max_batch=2)
    texts = [f"the movie was {service.mask} ."] * 5
    with service.phase("eval"):
        one = service.label_logits(texts, [" good", " bad"])
    whole = ModelService(tiny_backbone("roberta"), max_batch=64).label_logits(texts, [" good", " bad"])
    np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-6)
    summary = service.meter.summary()
    assert summary["eval"]["queries"] == 1 and "train" not in summary  # 3 forwards, one query
    assert summary["eval"]["download_bytes"] == 5 * 2 * 4
    assert summary["eval"]["upload_bytes"] == text_bytes(texts) + text_bytes([" good", " bad"])


def test_length_bucketing_keeps_each_row_with_its_text():
    service = ModelService(tiny_backbone("gpt2"), max_batch=2)
    texts = ["the movie was great and it was good and the film was", "bad", "a film about the movie", "it was"]
    together = service.label_logits(texts, [" good", " bad"])
    alone = np.concatenate([service.label_logits([t], [" good", " bad"]) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_compiled_layers_give_the_eager_logits(kind):
    """torch.compile of the layers (opt-in) changes time only: the same logits as eager for BBT- and BBTv2-shaped
    queries (deep-prompt hooks, layer reuse, a cache for a causal LM), and the backbone is left eager after."""
    from torch._dynamo.utils import counters

    from harness.prompting import ProjectionSpec, PromptSpec
    from harness.scoring import transformer_layers

    graphs = counters["stats"]["unique_graphs"]
    backbone = tiny_backbone(kind)
    eager, compiled = ModelService(backbone), ModelService(backbone, compile="default")
    spec = PromptSpec(3, 2, "add", "z", ProjectionSpec(8, 0, (0.5, 0.5)))
    for service in (eager, compiled):
        service.configure_prompt(spec)
    mask = eager.mask
    texts = [f"good {mask}", f"the movie was good and the film was good . {mask}", f"bad film {mask} ."]
    z = np.random.RandomState(0).randn(4, 2, 8).astype(np.float32)
    z[:, 0] = z[0, 0]  # BBTv2's generation: slot 0 shared, so the layers below slot 1 are reused
    for sent, batch in ((z, texts), (z[:1], texts[:2]), (np.random.RandomState(1).randn(4, 2, 8).astype(np.float32), texts)):
        np.testing.assert_allclose(
            compiled.prompted_label_logits(batch, [" good", " bad"], sent),
            eager.prompted_label_logits(batch, [" good", " bad"], sent), rtol=1e-4, atol=1e-5,
        )
    np.testing.assert_allclose(compiled.label_logits(texts, [" good"]), eager.label_logits(texts, [" good"]), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # the layers did run compiled
    assert not any("forward" in vars(layer) for layer in transformer_layers(backbone.model))


def test_unknown_compile_mode_is_an_error():
    with pytest.raises(HarnessError, match="unknown torch.compile mode 'fast'"):
        ModelService(tiny_backbone("gpt2"), compile="fast")


def test_the_server_s_time_is_kept_per_phase():
    service = ModelService(tiny_backbone("roberta"))
    with service.phase("eval"):
        service.label_logits([f"a {service.mask} ."], [" good"])
    summary = service.meter.summary()
    assert summary["eval"]["seconds"] > 0 and "train" not in summary
