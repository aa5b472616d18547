"""A word-level tokenizer built here (no download): for random-weight models in tests and benchmarks.

Its vocabulary holds a few common words and every label word of every task card, so real templates tokenise
(other words become <unk>, one token per word, which keeps sequence lengths realistic).
"""

from __future__ import annotations

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<extra_id_0>"]


def vocabulary() -> list[str]:
    from harness.tasks import load_cards

    words = "the a movie film was is it great bad good terrible about this that and of to in".split()
    for card in load_cards().values():
        for template in card.templates.values():
            words += [w.strip() for w in template.label_words]
    return SPECIALS + [".", "?", ",", ":", "[", "]"] + list(dict.fromkeys(words))


def synthetic_tokenizer(mask: bool = True, bos: bool = True):
    """mask/bos: a BERT/RoBERTa/GPT-style tokenizer with <mask> and <s>; otherwise T5-style (a sentinel, no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    else:
        model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    extra = {"mask_token": "<mask>"} if mask else {"additional_special_tokens": ["<extra_id_0>"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )
