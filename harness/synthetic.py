"""A word-level tokenizer built here (no download), and tiny random models of every family with it: for tests,
benchmarks and a served test backbone (`harness serve --random --backbone tiny-gpt2`).

Its vocabulary holds a few common words and every label word of every task card, so real templates tokenise
(other words become <unk>, one token per word, which keeps sequence lengths realistic). A tiny model's weights
come from torch.manual_seed(0), so two processes build the same model.
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


TINY_KINDS = ("roberta", "bert", "gpt2", "gemma3", "t5", "bart")


def tiny_model(kind: str):
    """A (family, model, tokenizer) triple of a small random model of the named architecture."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    vocab = len(synthetic_tokenizer())
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "roberta":
        config = tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=256, **common)
        return "mlm", tf.RobertaForMaskedLM(config), synthetic_tokenizer()
    if kind == "bert":
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=256, **common)
        return "mlm", tf.BertForMaskedLM(config), synthetic_tokenizer()
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **common)
        return "clm", tf.GPT2LMHeadModel(config), synthetic_tokenizer()
    if kind == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=16, intermediate_size=64, max_position_embeddings=256,
                                     final_logit_softcapping=30.0, **common)
        return "clm", tf.Gemma3ForCausalLM(config), synthetic_tokenizer()
    if kind == "t5":
        config = tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
                             vocab_size=vocab, pad_token_id=0, eos_token_id=2)
        return "seq2seq", tf.T5ForConditionalGeneration(config), synthetic_tokenizer(mask=False, bos=False)
    if kind == "bart":
        config = tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_position_embeddings=256, decoder_start_token_id=2, forced_eos_token_id=2, **common)
        model = tf.BartForConditionalGeneration(config)
        torch.nn.init.normal_(model.final_logits_bias, std=0.5)  # non-zero, so the test sees it applied
        return "seq2seq", model, synthetic_tokenizer()
    raise ValueError(kind)


def tiny_backbone(kind: str):
    from harness.backbones import Backbone

    family, model, tokenizer = tiny_model(kind)
    model.eval()
    identity = {"source": "test", "model_type": model.config.model_type, "name": f"tiny-{kind}"}
    return Backbone(name=f"tiny-{kind}", family=family, model=model, tokenizer=tokenizer, identity=identity)
