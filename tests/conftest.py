"""Shared fixtures: small randomly initialised models of every family, built from a config with a tokenizer
made here (no download) and configured like the family's real one, and the real task data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.backbones import Backbone
from harness.synthetic import HUB_KINDS, hub_tokenizer, synthetic_tokenizer

SHARED_DATA = Path(os.environ.get("HARNESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def tiny_model(kind: str, layers: int = 2):
    """A (family, model, tokenizer) triple of a small random model of the named architecture. The hub families get
    a tokenizer configured like their real one (harness.synthetic.hub_tokenizer) and the special-token ids of their
    real configs; Gemma 3 (an embedded backbone, whose real tokenizer its own tests load) gets the word-level one."""
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
    torch.nn.init.normal_(model.get_output_embeddings().bias, std=0.5)
    return model


def tiny_backbone(kind: str, layers: int = 2) -> Backbone:
    family, model, tokenizer = tiny_model(kind, layers)
    model.eval()
    identity = {"source": "test", "model_type": model.config.model_type, "name": f"tiny-{kind}"}
    return Backbone(name=f"tiny-{kind}", family=family, model=model, tokenizer=tokenizer, identity=identity)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.jsonl").exists():
        pytest.skip(f"the task data is not at {SHARED_DATA}; set HARNESS_DATA_DIR")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma():
    from harness.backbones import load_backbone

    return load_backbone("gemma3-270m")
