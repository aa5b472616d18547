"""Server-side scoring: one path per backbone family, each returning label-word logits.

- clm: the label word is the next token after the rendered input (read at its last real token);
- mlm: read at the single mask token;
- seq2seq: T5-style models read at decoder position 1 after `<start> <extra_id_0>`; BART-style denoisers read at
  the mask's position of the teacher-forced reconstruction.

Only the label-word rows of the output layer are applied, so no full-vocabulary logits are ever formed for
clm/seq2seq; tests compare every path with the model's own full forward.

Gradient methods reuse these paths (`Scorer.encode` and `forward_label_logits` are differentiable) and may pass
`soft`: trainable inputs the body receives besides the text (see `SoftInputs`): virtual input vectors (prompt
tuning) and per-layer key/value prefixes (P-tuning v2). The read positions move with them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from harness.errors import HarnessError


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """The label id is the FIRST sub-token of each label word (as in the BBT reference)."""
    ids = []
    for word in label_words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if not pieces:
            raise HarnessError(f"label word {word!r} tokenizes to nothing")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise HarnessError(f"label words {label_words} share a first sub-token {ids}; choose distinct words")
    return ids


def mask_string(tokenizer, family: str) -> str:
    """The text that plays the mask in a template for this family."""
    if family == "clm":
        return ""
    if family == "seq2seq" and getattr(tokenizer, "mask_token", None) is None:
        return "<extra_id_0>"  # T5 sentinel
    if tokenizer.mask_token is None:
        raise HarnessError(f"{type(tokenizer).__name__} has no mask token for a {family} template")
    return tokenizer.mask_token


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    read_at: torch.Tensor  # position whose hidden state predicts the label word, per row


class SoftInputs(Protocol):
    """Trainable inputs a gradient method adds to the body; either may return None.

    - `input_prompt(n)`: [n, P, hidden] vectors placed before the input embeddings (the encoder's, for seq2seq);
      the read positions of clm/mlm move P to the right.
    - `kv_prefix(n)`: (cache, K): a fresh cache holding K key/value vectors at every layer (the decoder's
      self-attention, for seq2seq, as peft does); the attention mask gains K leading ones.
    """

    def input_prompt(self, n: int) -> torch.Tensor | None: ...

    def kv_prefix(self, n: int) -> tuple[object, int] | None: ...


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _cache_kwarg(module) -> str:
    """transformers 5 renames `past_key_values` to `cache` model by model."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _restricted_head(model, hidden: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """Apply only the label rows of the output embedding (+ bias / final bias / softcap where the model has them)."""
    head = model.get_output_embeddings()
    ids = torch.as_tensor(label_ids, device=hidden.device)
    bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
    logits = F.linear(hidden, head.weight[ids], bias)
    final_bias = getattr(model, "final_logits_bias", None)  # BART
    if final_bias is not None:
        logits = logits + final_bias[0, ids]
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class Scorer:
    """Tokenises rendered texts and returns [N, n_labels] label logits for one family."""

    family = ""

    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = next(model.parameters()).device

    def encode(self, texts: list[str]) -> Encoded:
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=False)
        if batch.input_ids.shape[1] > self.max_length:
            raise HarnessError(
                f"an input has {batch.input_ids.shape[1]} tokens, over the backbone's limit {self.max_length}; "
                "lower the task card's max_chars"
            )
        input_ids = batch.input_ids.to(self.device)
        attention_mask = batch.attention_mask.to(self.device)
        return Encoded(input_ids, attention_mask, self._read_positions(input_ids, attention_mask))

    def _mask_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask_id = self.tokenizer.convert_tokens_to_ids(mask_string(self.tokenizer, self.family))
        hits = input_ids == mask_id
        if not torch.all(hits.sum(dim=1) == 1):
            raise HarnessError("each input must contain exactly one mask token; check the task card's template")
        return hits.int().argmax(dim=1)

    @torch.no_grad()
    def label_logits(self, texts: list[str], label_ids: list[int]) -> torch.Tensor:
        return self.forward_label_logits(self.encode(texts), label_ids)

    def forward_label_logits(self, enc: Encoded, label_ids: list[int], soft: SoftInputs | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _prompted(self, enc: Encoded, soft: SoftInputs | None, embedder) -> tuple[dict, int]:
        """The body's (or encoder's) keyword inputs with any input prompt placed first, and its length."""
        kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        prompt = soft.input_prompt(enc.input_ids.shape[0]) if soft is not None else None
        if prompt is None:
            return kwargs, 0
        embeds = embedder.get_input_embeddings()(enc.input_ids)  # the module the body would apply (Gemma scales)
        kwargs = {
            "inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": _ones_before(enc.attention_mask, prompt.shape[1]),
        }
        return kwargs, prompt.shape[1]

    def _prefixed(self, kwargs: dict, soft: SoftInputs | None, body, length: int) -> dict:
        """Adds a per-layer key/value prefix (and its attention-mask ones) to a body's keyword inputs."""
        prefix = soft.kv_prefix(length) if soft is not None else None
        if prefix is None:
            return kwargs
        cache, k = prefix
        return {**kwargs, _cache_kwarg(body): cache, "attention_mask": _ones_before(kwargs["attention_mask"], k)}

    def _check_length(self, kwargs: dict) -> None:
        if kwargs["attention_mask"].shape[1] > self.max_length:
            raise HarnessError(
                f"an input with its prompt/prefix has {kwargs['attention_mask'].shape[1]} positions, over the "
                f"backbone's limit {self.max_length}; shorten the prompt or lower the task card's max_chars"
            )

    def _body_hidden(self, enc: Encoded, soft: SoftInputs | None) -> torch.Tensor:
        """clm/mlm: the body's hidden states at the read positions."""
        body = self.model.base_model
        kwargs, shift = self._prompted(enc, soft, self.model)
        kwargs = self._prefixed(kwargs, soft, body, enc.input_ids.shape[0])
        self._check_length(kwargs)
        hidden = body(**kwargs).last_hidden_state
        return self._rows(hidden, enc.read_at + shift)

    def _rows(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


class CausalScorer(Scorer):
    family = "clm"

    def _read_positions(self, input_ids, attention_mask):
        return attention_mask.sum(dim=1) - 1  # right padding: the last real token

    def forward_label_logits(self, enc, label_ids, soft=None):
        return _restricted_head(self.model, self._body_hidden(enc, soft), label_ids)


class MaskedScorer(Scorer):
    family = "mlm"

    def _read_positions(self, input_ids, attention_mask):
        return self._mask_positions(input_ids)

    def forward_label_logits(self, enc, label_ids, soft=None):
        rows = self._body_hidden(enc, soft)
        # the MLM head has a transform (dense, activation, norm) before the decoder: run it on the mask rows only
        head = _mlm_head(self.model)
        return head(rows)[:, label_ids]


def _mlm_head(model) -> torch.nn.Module:
    prefix = model.base_model_prefix
    heads = [module for name, module in model.named_children() if name != prefix]
    if len(heads) != 1:
        raise HarnessError(f"cannot find the MLM head of {type(model).__name__}")
    return heads[0]


class Seq2SeqScorer(Scorer):
    family = "seq2seq"

    @property
    def sentinel(self) -> bool:
        return getattr(self.tokenizer, "mask_token", None) is None

    def _read_positions(self, input_ids, attention_mask):
        if self.sentinel:
            return torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        return self._mask_positions(input_ids)

    def _decoder_inputs(self, enc: Encoded) -> torch.Tensor:
        start = self.model.config.decoder_start_token_id
        n = enc.input_ids.shape[0]
        if self.sentinel:
            sentinel = self.tokenizer.convert_tokens_to_ids("<extra_id_0>")
            return torch.tensor([[start, sentinel]], device=self.device).expand(n, 2)
        # denoising: the decoder reconstructs the input; it is causal, so nothing after the mask is needed
        shifted = torch.cat([torch.full((n, 1), start, device=self.device), enc.input_ids[:, :-1]], dim=1)
        return shifted[:, : int(enc.read_at.max()) + 1]

    def forward_label_logits(self, enc, label_ids, soft=None):
        encoder, decoder = self.model.get_encoder(), self.model.get_decoder()
        enc_kwargs, _ = self._prompted(enc, soft, encoder)  # an input prompt goes to the encoder only
        self._check_length(enc_kwargs)
        encoded = encoder(**enc_kwargs)
        decoder_ids = self._decoder_inputs(enc)
        dec_kwargs = {}
        prefixed = self._prefixed({"attention_mask": torch.ones_like(decoder_ids)}, soft, decoder, len(decoder_ids))
        if len(prefixed) > 1:  # a key/value prefix: the decoder's mask must cover it (without one it needs none)
            self._check_length(prefixed)
            dec_kwargs = prefixed
        decoded = decoder(
            input_ids=decoder_ids,
            encoder_hidden_states=encoded.last_hidden_state,
            encoder_attention_mask=enc_kwargs["attention_mask"],
            **dec_kwargs,
        )
        rows = self._rows(decoded.last_hidden_state, enc.read_at)
        if getattr(self.model.config, "tie_word_embeddings", False) and self.model.config.model_type in ("t5", "mt5"):
            rows = rows * self.model.config.d_model**-0.5  # T5 rescales before a tied head
        return _restricted_head(self.model, rows, label_ids)


SCORERS = {cls.family: cls for cls in (CausalScorer, MaskedScorer, Seq2SeqScorer)}


def make_scorer(backbone) -> Scorer:
    limit = getattr(backbone.model.config, "max_position_embeddings", None) or 512
    if backbone.model.config.model_type in ("roberta", "xlm-roberta"):
        limit -= 2  # RoBERTa's position ids start after the padding index
    return SCORERS[backbone.family](backbone.model, backbone.tokenizer, max_length=min(limit, 4096))
