"""The service boundary's byte accounting (BBT paper: float32; one query = the whole train set)."""

import numpy as np
import pytest

from harness.data import load_task_data, make_split
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
