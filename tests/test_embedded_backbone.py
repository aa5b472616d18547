"""The embedded default backbone (a real Gemma-3-270M from PyPI): loads right, not only loads.

The first test converts the GGUF file once to the local cache (about a minute); later loads take seconds.
"""

import numpy as np
import pytest

from harness.scoring import label_token_ids
from harness.service import ModelService
from harness.tasks import load_cards

pytestmark = pytest.mark.embedded


def test_gemma_ranks_sentiment_words_sensibly(gemma):
    # transformers 5.17 loads this file wrongly and still "works": check behaviour, as OFFLINE.md advises
    service = ModelService(gemma)
    logits = service.label_logits(
        ["The movie was wonderful. It was", "The movie was dreadful. It was"], [" bad", " great"]
    )
    assert logits[0, 1] > logits[0, 0] and logits[1, 0] > logits[1, 1]
    assert gemma.identity["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_gemma_label_ids_are_the_first_subtokens(gemma):
    tokenizer = gemma.tokenizer
    assert label_token_ids(tokenizer, [" bad", " great"]) == [4287, 1822]
    word = " transportation"
    assert label_token_ids(tokenizer, [word])[0] == tokenizer(word, add_special_tokens=False).input_ids[0]
    for card in load_cards().values():  # every card's causal-LM label words are distinct for this tokenizer
        ids = label_token_ids(tokenizer, list(card.template_for("clm").label_words))
        assert len(set(ids)) == card.num_labels


def test_gemma_padding_does_not_change_scores(gemma):
    service = ModelService(gemma)
    texts = ["A short one. The sentiment is", "A much longer sentence about a film that went on and on. The sentiment is"]
    together = service.label_logits(texts, [" negative", " positive"])
    alone = np.concatenate([service.label_logits([t], [" negative", " positive"]) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
