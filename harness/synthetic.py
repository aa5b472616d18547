"""Tokenizers built here (no download), for random-weight models in tests and benchmarks.

- `synthetic_tokenizer`: word-level, one token per word; its vocabulary holds a few common words and every label
  word of every task card, so real templates tokenise (other words become <unk>, which keeps sequence lengths
  realistic). It stands in for the embedded backbones' tokenizers and for `harness bench --random`.
- `hub_tokenizer(kind)`: a tokenizer configured like the real one of a hub family (gpt2, roberta, bart, bert, t5):
  its model (byte-level BPE, WordPiece, Unigram) is made with the `tokenizers` library from a small corpus, and it
  is wrapped in that family's own transformers class with the real special tokens and settings. A missing special
  token (GPT-2 has no pad token) or a leading-space mismatch (" great" is one byte-level token, "great" another)
  then shows in the tests, not on a user's GPU.
- `tiny_model(kind)` / `tiny_backbone(kind)`: small random models of every family with those tokenizers, for the
  tests, benchmarks and a served test backbone (`harness serve --random --backbone tiny-gpt2`); weights come from
  torch.manual_seed(0), so two processes build the same model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import lru_cache

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<extra_id_0>"]
HUB_KINDS = ("gpt2", "roberta", "bart", "bert", "t5")
T5_EXTRA_IDS = 100  # <extra_id_0> .. <extra_id_99>, as t5-base


def _words() -> list[str]:
    from harness.tasks import load_cards

    words = "the a movie film was is it great bad good terrible about this that and of to in".split()
    for card in load_cards().values():
        for template in card.templates.values():
            words += [w.strip() for w in template.label_words]
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    return SPECIALS + [".", "?", ",", ":", "[", "]"] + _words()


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


def corpus() -> list[str]:
    """Every task card's templates filled with each of their label words, and every word both at the start of a
    line and after a space (byte-level BPE tells the two apart: "great" and " great" are different tokens)."""
    from harness.tasks import load_cards

    filler = "the movie was good and it is about a film"
    lines = []
    for card in load_cards().values():
        for template in card.templates.values():
            text = template.template
            for field in card.fields:
                text = text.replace("{" + field + "}", filler)
            for word in template.label_words:
                lines.append(text.replace(" {mask}", word).replace("{mask}", word.strip()) if "{mask}" in text else text + word)
    for word in _words():
        lines += [word, f"{filler} {word} .", f"{word.lower()} {word.capitalize()} ?"]
    return lines


def _byte_level_bpe(specials: list[str]) -> tuple[dict, list]:
    """Vocabulary and merges of a byte-level BPE trained on the corpus until every word is whole (specials first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus(), trainer)
    state = json.loads(model.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]


def _unigram_pieces() -> list[tuple[str, float]]:
    """SentencePiece-style pieces: "▁" + each corpus word, and every character alone, scored by log frequency."""
    counts = Counter()
    for line in corpus():
        for word in line.split():
            counts["▁" + word] += 1
            counts.update(word)
    counts["▁"] += 1
    total = sum(counts.values())
    return [(piece, math.log(count / total)) for piece, count in sorted(counts.items())]


@lru_cache(maxsize=None)
def _trained(kind: str):
    """The trained model behind each family's tokenizer (cached: building the wrapper is cheap, training is not)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if kind == "gpt2":
        vocab, merges = _byte_level_bpe([])
        return {**vocab, "<|endoftext|>": len(vocab)}, merges  # GPT-2: the one special token, last
    if kind in ("roberta", "bart"):
        vocab, merges = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])  # ids 0-3 as in roberta-large/bart-large
        return {**vocab, "<mask>": len(vocab)}, merges  # <mask> last (50264 in the real vocabularies)
    if kind == "bert":
        model = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        model.normalizer = normalizers.BertNormalizer(lowercase=True)
        model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        model.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=100_000, special_tokens=specials, show_progress=False))
        return model.get_vocab(), None
    if kind == "t5":
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _unigram_pieces()
        sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]  # <extra_id_0> has the last id
        return pieces + sentinels, None
    raise ValueError(f"no hub-like tokenizer for '{kind}'; one of {', '.join(HUB_KINDS)}")


def hub_tokenizer(kind: str):
    """A fresh tokenizer configured like the real one of this hub family (see the module docstring):

    - gpt2: byte-level BPE; bos = eos = unk = <|endoftext|>, no pad token, add_prefix_space False;
    - roberta, bart: byte-level BPE; <s> <pad> </s> <unk> (ids 0-3) and <mask> (last, lstrip as in the real
      tokenizer, so "was <mask>" puts no lone space token before the mask); <s> ... </s> added;
    - bert: uncased WordPiece (lower-casing normaliser); [PAD] [UNK] [CLS] [SEP] [MASK]; [CLS] ... [SEP] added;
    - t5: Unigram over metaspace pieces; <pad> = 0, </s> = 1 (appended), <unk> = 2, sentinels <extra_id_0..99>.
    """
    import transformers as tf
    from tokenizers import AddedToken

    vocab, merges = _trained(kind)
    if kind == "gpt2":
        return tf.GPT2Tokenizer(vocab=dict(vocab), merges=list(merges), add_prefix_space=False)
    if kind in ("roberta", "bart"):
        mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
        cls = tf.RobertaTokenizer if kind == "roberta" else tf.BartTokenizer
        return cls(vocab=dict(vocab), merges=list(merges), mask_token=mask)
    if kind == "bert":
        return tf.BertTokenizer(vocab=dict(vocab), do_lower_case=True)
    return tf.T5Tokenizer(vocab=list(vocab), extra_ids=T5_EXTRA_IDS)


TINY_KINDS = ("roberta", "bert", "gpt2", "gemma3", "t5", "bart")


def tiny_model(kind: str, layers: int = 2):
    """A (family, model, tokenizer) triple of a small random model of the named architecture. The hub families get
    a tokenizer configured like their real one (harness.synthetic.hub_tokenizer) and the special-token ids of their
    real configs; Gemma 3 (an embedded backbone, whose real tokenizer its own tests load) gets the word-level one."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokenizer = hub_tokenizer(kind) if kind in HUB_KINDS else synthetic_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    # the real position limits: the small vocabularies split unseen words into many pieces, so texts run longer
    if kind == "roberta":
        config = tf.RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, **ids)
        return "mlm", _nonzero_head_bias(tf.RobertaForMaskedLM(config)), tokenizer
    if kind == "bert":
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                               vocab_size=len(tokenizer))
        return "mlm", _nonzero_head_bias(tf.BertForMaskedLM(config)), tokenizer
    if kind == "gpt2":  # like the real config: no pad token id
        config = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=2, n_positions=1024, **ids)
        return "clm", tf.GPT2LMHeadModel(config), tokenizer
    if kind == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=16, intermediate_size=64, max_position_embeddings=256,
                                     final_logit_softcapping=30.0, pad_token_id=tokenizer.pad_token_id, **ids)
        return "clm", tf.Gemma3ForCausalLM(config), tokenizer
    if kind == "t5":  # the real vocab_size (32128) exceeds the tokenizer's (32100): so does this one
        config = tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2, vocab_size=len(tokenizer) + 28,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             decoder_start_token_id=tokenizer.pad_token_id)
        return "seq2seq", tf.T5ForConditionalGeneration(config), tokenizer
    if kind == "bart":
        config = tf.BartConfig(d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                               decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id,
                               forced_eos_token_id=tokenizer.eos_token_id, **ids)
        model = tf.BartForConditionalGeneration(config)
        torch.nn.init.normal_(model.final_logits_bias, std=0.5)  # non-zero, so the test sees it applied
        return "seq2seq", model, tokenizer
    raise ValueError(kind)


def _nonzero_head_bias(model):
    """The MLM head's output bias starts at zero in a random model; a pretrained one is not (the scoring keeps it,
    as the reference does: see docs/bbt.md), so make it non-zero for the tests to see it applied."""
    import torch

    torch.nn.init.normal_(model.get_output_embeddings().bias, std=0.5)
    return model


def tiny_backbone(kind: str, layers: int = 2):
    from harness.backbones import Backbone

    family, model, tokenizer = tiny_model(kind, layers)
    model.eval()
    identity = {"source": "test", "model_type": model.config.model_type, "name": f"tiny-{kind}"}
    return Backbone(name=f"tiny-{kind}", family=family, model=model, tokenizer=tokenizer, identity=identity)


def load_tiny(name: str, dtype: str = "float32"):
    """`load_backbone`'s stand-in for the tiny models (named tiny-<kind>): for tests that load a backbone in
    another process (a Ray actor, a server), where a monkeypatch does not reach."""
    import torch

    backbone = tiny_backbone(name.removeprefix("tiny-"))
    backbone.model.to(getattr(torch, dtype))
    return backbone
