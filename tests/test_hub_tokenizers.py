"""The hub families' tokenizers as they really behave (special tokens, padding, leading spaces), built here
(harness.synthetic.hub_tokenizer), and the backbone and scoring paths on them."""

import numpy as np
import pytest

from harness.backbones import Backbone
from harness.errors import HarnessError
from harness.scoring import label_token_ids, make_scorer, mask_string
from harness.service import ModelService
from harness.synthetic import HUB_KINDS, T5_EXTRA_IDS, hub_tokenizer
from harness.tasks import load_cards
from tests.conftest import tiny_model

FAMILY = {"gpt2": "clm", "roberta": "mlm", "bart": "seq2seq", "bert": "mlm", "t5": "seq2seq"}
# what each family's tokenizer makes of a template's tail, special tokens included
TEMPLATE = {
    "gpt2": ("the movie was", ["the", "Ġmovie", "Ġwas"]),
    "roberta": ("the movie was <mask> .", ["<s>", "the", "Ġmovie", "Ġwas", "<mask>", "Ġ.", "</s>"]),  # <mask> takes its space
    "bart": ("the movie was <mask> .", ["<s>", "the", "Ġmovie", "Ġwas", "<mask>", "Ġ.", "</s>"]),
    "bert": ("The movie was [MASK] . Great", ["[CLS]", "the", "movie", "was", "[MASK]", ".", "great", "[SEP]"]),  # uncased
    "t5": ("the movie was <extra_id_0> .", ["▁the", "▁movie", "▁was", "<extra_id_0>", "▁.", "</s>"]),  # </s> appended
}


@pytest.mark.parametrize("kind", HUB_KINDS)
def test_hub_tokenizers_have_the_real_special_tokens_and_settings(kind):
    tok = hub_tokenizer(kind)
    text, tokens = TEMPLATE[kind]
    assert tok.convert_ids_to_tokens(tok(text).input_ids) == tokens
    last = len(tok) - 1
    if kind == "gpt2":
        assert tok.pad_token is None and tok.add_prefix_space is False
        assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>" and tok.eos_token_id == last
    elif kind in ("roberta", "bart"):
        assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, last]
        assert tok.added_tokens_decoder[last].lstrip and not tok.added_tokens_decoder[0].lstrip
    elif kind == "bert":
        assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert tok.tokenize("GREAT Movie") == ["great", "movie"]
    else:
        assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2] and tok.bos_token is None
        assert tok.convert_tokens_to_ids(["<extra_id_0>", f"<extra_id_{T5_EXTRA_IDS - 1}>"]) == [last, last - T5_EXTRA_IDS + 1]
        assert mask_string(tok, "seq2seq") == "<extra_id_0>"


@pytest.mark.parametrize("kind", HUB_KINDS)
def test_every_card_s_label_ids_are_the_words_as_their_template_writes_them(kind):
    """A label id is the token the word has where it is read: written into the template in the mask's place (or
    after a causal template, following a space), it tokenizes to that id at the read position. A leading-space
    mismatch fails here: " World" is "ĠWorld" in byte-level BPE, but a template that opens with the mask writes
    "World"."""
    tok = hub_tokenizer(kind)
    family = FAMILY[kind]
    mask = mask_string(tok, family)
    for card in load_cards().values():
        template = card.template_for(family)
        text = template.template
        for field in card.fields:
            text = text.replace("{" + field + "}", "the movie was good")
        words = list(template.label_words)
        ids = label_token_ids(tok, words)
        assert len(set(ids)) == len(words), (card.name, words)
        for word, label_id in zip(words, ids):
            if family == "clm":
                at = len(tok(text).input_ids)
                written = tok(text + " " + word.strip()).input_ids
            else:
                at = tok(text.replace("{mask}", mask)).input_ids.index(tok.convert_tokens_to_ids(mask))
                written = tok(text.replace("{mask}", word.strip())).input_ids
            assert written[at] == label_id, (card.name, word, tok.convert_ids_to_tokens([written[at], label_id]))


def test_gpt2_without_a_pad_token_is_served():
    """GPT-2's tokenizer has no pad token, so a padded batch failed on the first query; the backbone pads with
    <|endoftext|> on the right and the scores read the last real token, as for each text alone."""
    family, model, tokenizer = tiny_model("gpt2")
    assert tokenizer.pad_token is None
    backbone = Backbone("tiny-gpt2", family, model.eval(), tokenizer, {"source": "test"})
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    service = ModelService(backbone)
    texts = ["the movie was great . The sentiment is", "bad . The sentiment is", "a film about the movie and it is good"]
    words = [" negative", " positive"]
    together = service.label_logits(texts, words)
    alone = np.concatenate([service.label_logits([t], words) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert make_scorer(backbone).insert_at == 0  # no <bos> is added: BBT's prompt goes first


def test_a_tokenizer_with_nothing_to_pad_with_is_an_error():
    family, model, tokenizer = tiny_model("bert")
    tokenizer.pad_token = None  # BERT has no end-of-text token to fall back on
    with pytest.raises(HarnessError, match="neither a pad nor an end-of-text token"):
        Backbone("tiny-bert", family, model, tokenizer, {"source": "test"})
