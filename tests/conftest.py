"""Shared fixtures: small randomly initialised models of every family, built from a config with a tokenizer
made here (no download), and the real task data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.backbones import Backbone
from harness.synthetic import synthetic_tokenizer

SHARED_DATA = Path(os.environ.get("HARNESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def tiny_model(kind: str, layers: int = 2):
    """A (family, model, tokenizer) triple of a small random model of the named architecture."""
    import transformers as tf

    torch.manual_seed(0)
    vocab = len(synthetic_tokenizer())
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "roberta":
        config = tf.RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=256, **common)
        return "mlm", tf.RobertaForMaskedLM(config), synthetic_tokenizer()
    if kind == "bert":
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=256, **common)
        return "mlm", tf.BertForMaskedLM(config), synthetic_tokenizer()
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=2, n_positions=256, **common)
        return "clm", tf.GPT2LMHeadModel(config), synthetic_tokenizer()
    if kind == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=16, intermediate_size=64, max_position_embeddings=256,
                                     final_logit_softcapping=30.0, **common)
        return "clm", tf.Gemma3ForCausalLM(config), synthetic_tokenizer()
    if kind == "t5":
        config = tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2, decoder_start_token_id=0,
                             vocab_size=vocab, pad_token_id=0, eos_token_id=2)
        return "seq2seq", tf.T5ForConditionalGeneration(config), synthetic_tokenizer(mask=False, bos=False)
    if kind == "bart":
        config = tf.BartConfig(d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_position_embeddings=256, decoder_start_token_id=2, forced_eos_token_id=2, **common)
        model = tf.BartForConditionalGeneration(config)
        torch.nn.init.normal_(model.final_logits_bias, std=0.5)  # non-zero, so the test sees it applied
        return "seq2seq", model, synthetic_tokenizer()
    raise ValueError(kind)


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
