"""Server-side scoring: one path per backbone family, each returning label-word logits.

- clm: the label word is the next token after the rendered input (read at its last real token);
- mlm: read at the single mask token;
- seq2seq: T5-style models read at decoder position 1 after `<start> <extra_id_0>`; BART-style denoisers read at
  the mask's position of the teacher-forced reconstruction.

Only the label-word rows of the output layer are applied (after an MLM head's transform), so no
full-vocabulary logits are ever formed; tests compare every path with the model's own full forward.

Black-box prompts (BBT, BBTv2) go right after the leading special token (<s>, [CLS], <bos>; at the start where
there is none). Slot 0 enters with the input embeddings, except in masked LMs, where it is added to the output of
the embeddings module (after its LayerNorm and dropout), as the reference's RoBERTa and BERT do; slot j >= 1 is
added to the hidden states entering layer j.

Gradient methods reuse these paths (`Scorer.encode` and `forward_label_logits` are differentiable) and may pass
`soft`: trainable inputs the body receives besides the text (see `SoftInputs`): virtual input vectors (prompt
tuning, at the same place as BBT's prompt) and per-layer key/value prefixes (P-tuning v2). The read positions move
with them.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
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

    def tile(self, times: int) -> "Encoded":
        """The batch repeated `times` times, candidate-major (row = candidate * N + example)."""
        return Encoded(self.input_ids.repeat(times, 1), self.attention_mask.repeat(times, 1), self.read_at.repeat(times))


@dataclass
class PromptBatch:
    """Prompt vectors of P candidates: [P, slots, n_tokens, hidden]. Slot 0 enters with the input embeddings, or
    with the embeddings module's output in masked LMs (added to the `placeholders` tokens in "add" mode, alone in
    "cat" mode); slot j >= 1 is added to the hidden states entering layer j."""

    vectors: torch.Tensor
    placeholders: torch.Tensor | None = None  # [n_tokens, hidden] embeddings of the placeholder tokens

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.vectors.shape[2]

    def rows(self, slot: int, n: int) -> torch.Tensor:
        """Slot vectors repeated for each of the n examples: [P * n, n_tokens, hidden]."""
        return self.vectors[:, slot].repeat_interleave(n, dim=0)

    def head(self, k: int) -> "PromptBatch":
        return PromptBatch(self.vectors[:k], self.placeholders)


class _Stop(Exception):
    """Raised by a capture hook: the layers above it are not needed."""


def _capture(module: torch.nn.Module, forward, inputs: bool = False) -> object:
    """Run forward() only as far as `module` and return what it returned (with `inputs`: its first input)."""
    seen = []

    def hook(module, args, output=None):
        seen.append(args[0] if inputs else output)
        raise _Stop

    handle = module.register_forward_pre_hook(hook) if inputs else module.register_forward_hook(hook)
    try:
        forward()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise HarnessError(f"the forward never reached {type(module).__name__}")
    return seen[0]


def _tile(output, times: int, n: int):
    """A layer's output for n rows, repeated for `times` candidates (candidate-major); tensors that are not
    per-row (a broadcast bias) stay as they are."""
    if isinstance(output, torch.Tensor):
        return output.repeat(times, *[1] * (output.dim() - 1)) if output.dim() and output.shape[0] == n else output
    if isinstance(output, (tuple, list)):
        return type(output)(_tile(o, times, n) for o in output)
    return output


@contextmanager
def _replaced(layers, output):
    """The given layers return `output` without computing: their work was done once, for all candidates."""
    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance (a compiled one)
    for layer in layers:
        layer.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def transformer_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer layers that deep prompts enter (the encoder's, for encoder-decoders)."""
    root = model.get_encoder() if model.config.is_encoder_decoder else model.base_model
    for module in root.modules():
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise HarnessError(f"cannot find the transformer layers of {type(model).__name__}")


def embedding_scale(model) -> float:
    """Some models (Gemma) multiply embeddings by a constant inside the embedding module."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)
    return float(scale)


class SoftInputs(Protocol):
    """Trainable inputs a gradient method adds to the body; either may return None.

    - `input_prompt(n)`: [n, P, hidden] vectors placed among the input embeddings (the encoder's, for seq2seq)
      where BBT's prompt goes: after the leading special token (<bos>, <s>, [CLS]), else first; the read positions
      of clm/mlm move P to the right.
    - `kv_prefix(n)`: (cache, K): a fresh cache holding K key/value vectors at every layer (the decoder's
      self-attention, for seq2seq, as peft does); the attention mask gains K leading ones.
    """

    def input_prompt(self, n: int) -> torch.Tensor | None: ...

    def kv_prefix(self, n: int) -> tuple[object, int] | None: ...


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _insert(sequence: torch.Tensor, at: int, piece: torch.Tensor) -> torch.Tensor:
    """`piece` placed inside `sequence` (along dim 1) before position `at`."""
    return torch.cat([sequence[:, :at], piece.to(sequence.dtype), sequence[:, at:]], dim=1)


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
        first = tokenizer("a").input_ids[0]
        self.insert_at = 1 if first in tokenizer.all_special_ids else 0  # prompts go after <s>/[CLS]/<bos>
        self.lead_ids = [first] if self.insert_at else []

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
    def label_logits(self, texts: list[str], label_ids: list[int], prompt: PromptBatch | None = None) -> torch.Tensor:
        return self.forward_label_logits(self.encode(texts), label_ids, prompt)

    def forward_label_logits(
        self, enc: Encoded, label_ids: list[int], prompt: PromptBatch | None = None, soft: SoftInputs | None = None
    ) -> torch.Tensor:
        """[N, labels] without a prompt; [P * N, labels] (candidate-major) with P black-box prompt candidates.

        `prompt` is what the service applies for black-box methods (BBT, BBTv2: after <s>, deep slots added to
        the hidden states); `soft` is a gradient method's trainable inputs (placed first, key/value prefixes).
        """
        if prompt is None:
            return self._soft_label_logits(enc, label_ids, soft)
        if soft is not None:
            raise HarnessError("a query takes black-box prompt candidates or trainable soft inputs, not both")
        return self.prompted_label_logits([enc], label_ids, prompt)[0]

    def prompted_label_logits(
        self, buckets: list[Encoded], label_ids: list[int], prompt: PromptBatch, shared: int = 0
    ) -> list[torch.Tensor]:
        """[P * N_b, labels] (candidate-major) for each bucket of examples, P prompt candidates.

        `shared`: the candidates' first `shared` slots are the same (BBTv2 changes one layer's prompt per
        generation), so the layers below slot `shared` run once, for the first candidate, and their output is
        repeated for all."""
        return [
            self._reusing(shared, prompt, enc.input_ids.shape[0], lambda batch, enc=enc: self._prompted_forward(enc, label_ids, batch))
            for enc in buckets
        ]

    def _reusing(self, shared: int, prompt: PromptBatch, n: int, forward) -> torch.Tensor:
        """forward(prompt), with the output of layers below `shared` computed for the first candidate only."""
        if shared == 0 or prompt.size == 1:
            return forward(prompt)
        layers = transformer_layers(self.model)
        below = _capture(layers[shared - 1], lambda: forward(prompt.head(1)))
        with _replaced(layers[:shared], _tile(below, prompt.size, n)):
            return forward(prompt)

    def _prompted_forward(self, enc: Encoded, label_ids: list[int], prompt: PromptBatch) -> torch.Tensor:
        embeds, mask, tiled = self.prompted_inputs(enc, prompt)
        with self.deep_prompts(prompt, enc.input_ids.shape[0]):
            read_at = self._shift(tiled.read_at, prompt.n_tokens)
            return self._label_logits({"inputs_embeds": embeds}, mask, read_at, tiled, label_ids)

    def prompted_inputs(self, enc: Encoded, prompt: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, Encoded]:
        """The batch tiled for P candidates, slot 0's vectors inserted after the leading special token:
        (input embeddings, attention mask, the tiled encoding)."""
        tiled = enc.tile(prompt.size)
        embeds = self.model.get_input_embeddings()(tiled.input_ids)
        embeds = _insert(embeds, self.insert_at, self._slot0_inputs(prompt, enc.input_ids.shape[0]))
        ones = torch.ones(tiled.attention_mask.shape[0], prompt.n_tokens, dtype=tiled.attention_mask.dtype, device=self.device)
        return embeds, _insert(tiled.attention_mask, self.insert_at, ones), tiled

    def _slot0_inputs(self, prompt: PromptBatch, n: int) -> torch.Tensor:
        """The input embeddings at the prompt positions, [P * n, n_tokens, hidden]: slot 0's vectors (+ the
        placeholder tokens' embeddings in "add" mode)."""
        first = prompt.rows(0, n)
        return first if prompt.placeholders is None else first + prompt.placeholders

    def _shift(self, read_at: torch.Tensor, width: int) -> torch.Tensor:
        return read_at + width  # the read position moves right by the prompt's length

    @contextmanager
    def deep_prompts(self, prompt: PromptBatch, n: int):
        """Add slot j's vectors to the hidden states entering layer j, at the prompt positions (and, in masked LMs,
        slot 0's to the embeddings' output: see MaskedScorer)."""
        handles = []
        at, width = self.insert_at, prompt.n_tokens
        layers = transformer_layers(self.model)
        for slot in range(1, prompt.vectors.shape[1]):
            vectors = prompt.rows(slot, n)

            def hook(module, args, kwargs, vectors=vectors):
                hidden = args[0] if args else kwargs["hidden_states"]
                if hidden.shape[0] != vectors.shape[0]:
                    return None  # e.g. a decoder layer of another stack sharing the class: leave it alone
                span = hidden[:, at : at + width] + vectors.to(hidden.dtype)
                hidden = torch.cat([hidden[:, :at], span, hidden[:, at + width :]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

            handles.append(layers[slot].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _label_logits(self, inputs: dict, attention_mask, read_at, tiled: Encoded, label_ids) -> torch.Tensor:
        """The family's label logits for black-box prompted inputs (embeddings already hold the prompt)."""
        raise NotImplementedError

    def _soft_label_logits(self, enc: Encoded, label_ids: list[int], soft: SoftInputs | None) -> torch.Tensor:
        """The family's label logits for plain inputs, or with a gradient method's soft inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def hidden_stds(self, texts: list[str]) -> list[float]:
        """Per prompt slot, the scale of what the slot's vectors are added to: slot 0, the word-embedding matrix
        (with the model's embedding scale); slot j >= 1, the clipped std of the real tokens' hidden states
        entering layer j on these texts (BBTv2)."""
        from harness.prompting import clipped_std

        enc = self.encode(texts)
        real = enc.attention_mask.bool()
        seen: dict[int, torch.Tensor] = {}
        layers = transformer_layers(self.model)
        handles = [
            layer.register_forward_pre_hook(
                lambda module, args, kwargs, j=j: seen.__setitem__(j, (args[0] if args else kwargs["hidden_states"])),
                with_kwargs=True,
            )
            for j, layer in enumerate(layers)
        ]
        try:
            self.forward_label_logits(enc, [0])
        finally:
            for handle in handles:
                handle.remove()
        weight = self.model.get_input_embeddings().weight
        stds = [float(weight.float().std()) * embedding_scale(self.model)]
        return stds + [clipped_std(seen[j][real]) for j in range(1, len(layers))]


    def _prompted(self, enc: Encoded, soft: SoftInputs | None, embedder) -> tuple[dict, int]:
        """The body's (or encoder's) keyword inputs with any input prompt placed after the leading special token,
        and its length."""
        kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        prompt = soft.input_prompt(enc.input_ids.shape[0]) if soft is not None else None
        if prompt is None:
            return kwargs, 0
        embeds = embedder.get_input_embeddings()(enc.input_ids)  # the module the body would apply (Gemma scales)
        ones = enc.attention_mask.new_ones(enc.attention_mask.shape[0], prompt.shape[1])
        kwargs = {  # where BBT's prompt goes, so both prompt methods see one layout
            "inputs_embeds": _insert(embeds, self.insert_at, prompt),
            "attention_mask": _insert(enc.attention_mask, self.insert_at, ones),
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


def _common_opening(enc: Encoded) -> int:
    """How many leading tokens all rows share, leaving each row at least its last real token to run."""
    if enc.input_ids.shape[0] < 2:
        return 0
    limit = max(0, int(enc.attention_mask.sum(dim=1).min()) - 1)
    same = (enc.input_ids[:, :limit] == enc.input_ids[:1, :limit]).all(dim=0)
    return int(same.int().cumprod(dim=0).sum())


class CausalScorer(Scorer):
    family = "clm"
    # compute the keys and values of a black-box prompt once per candidate (see prompted_label_logits), and those
    # of the texts' common opening once per query (see label_logits)
    share_prefix = True
    min_shared = 32  # tokens: a shorter common opening is not worth a forward of its own

    def _read_positions(self, input_ids, attention_mask):
        return attention_mask.sum(dim=1) - 1  # right padding: the last real token

    @torch.no_grad()
    def label_logits(self, texts: list[str], label_ids: list[int], prompt: PromptBatch | None = None) -> torch.Tensor:
        """Texts that open with the same tokens (ICL's demonstrations, ~375 tokens before a ~60-token input) run
        that opening once: its keys and values, computed for one row, are repeated for every row, and only the
        rest of each text runs on top. A causal LM's opening tokens cannot see what follows them, so this is the
        plain forward's result (tests compare the two)."""
        enc = self.encode(texts)
        common = _common_opening(enc) if prompt is None and self.share_prefix else 0
        window = getattr(self.model.config, "sliding_window", None)  # a cache past the window keeps only its end
        if common < self.min_shared or (window and enc.input_ids.shape[1] > window):
            return self.forward_label_logits(enc, label_ids, prompt)
        from transformers import DynamicCache

        body = self.model.base_model
        cache = DynamicCache(config=self.model.config)
        kwargs = {_cache_kwarg(body): cache, "use_cache": True}
        body(input_ids=enc.input_ids[:1, :common], **kwargs)
        cache.batch_repeat_interleave(enc.input_ids.shape[0])
        hidden = body(input_ids=enc.input_ids[:, common:], attention_mask=enc.attention_mask, **kwargs)
        return _restricted_head(self.model, self._rows(hidden.last_hidden_state, enc.read_at - common), label_ids)

    def _soft_label_logits(self, enc, label_ids, soft):
        return _restricted_head(self.model, self._body_hidden(enc, soft), label_ids)

    def prompted_label_logits(self, buckets, label_ids, prompt, shared=0):
        """A causal LM's prompt positions cannot attend to the examples after them, so their keys and values
        depend on the candidate only: compute them once per candidate ([<bos>] + prompt, with the deep slots
        applied), repeat that cache for each bucket's examples, and run only the example tokens on top."""
        if not self.share_prefix:
            return super().prompted_label_logits(buckets, label_ids, prompt, shared)
        caches = {prompt.size: self._prefix_cache(prompt)}
        if shared and prompt.size > 1:
            caches[1] = self._prefix_cache(prompt.head(1))
        out = []
        for enc in buckets:
            forward = lambda batch, enc=enc: self._on_prefix(enc, label_ids, batch, caches[batch.size])  # noqa: E731
            out.append(self._reusing(shared, prompt, enc.input_ids.shape[0], forward))
        return out

    def _prefix_cache(self, prompt: PromptBatch):
        from transformers import DynamicCache

        embed = self.model.get_input_embeddings()
        first = self._slot0_inputs(prompt, 1)
        lead = torch.tensor([self.lead_ids], dtype=torch.long, device=self.device).view(1, -1)
        head = embed(lead).expand(prompt.size, self.insert_at, -1)  # the shared <bos>, if any
        cache = DynamicCache(config=self.model.config)
        with self.deep_prompts(prompt, 1):
            self.model.base_model(inputs_embeds=torch.cat([head, first.to(head.dtype)], dim=1), cache=cache, use_cache=True)
        return cache

    def _on_prefix(self, enc: Encoded, label_ids, prompt: PromptBatch, prefix) -> torch.Tensor:
        """The examples run on a copy of the candidates' prefix cache (the forward appends to it)."""
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(enc.input_ids.shape[0])
        tiled = enc.tile(prompt.size)
        at = self.insert_at
        ones = torch.ones(tiled.input_ids.shape[0], at + prompt.n_tokens, dtype=tiled.attention_mask.dtype, device=self.device)
        mask = torch.cat([ones, tiled.attention_mask[:, at:]], dim=1)
        body = self.model.base_model
        hidden = body(input_ids=tiled.input_ids[:, at:], attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
        return _restricted_head(self.model, self._rows(hidden, tiled.read_at - at), label_ids)

    def _label_logits(self, inputs, attention_mask, read_at, tiled, label_ids):
        hidden = self.model.base_model(**inputs, attention_mask=attention_mask).last_hidden_state
        return _restricted_head(self.model, self._rows(hidden, read_at), label_ids)


class MaskedScorer(Scorer):
    """Slot 0 of a black-box prompt is added to the output of the embeddings module (word + position + token-type
    embeddings, LayerNorm, dropout) at the prompt positions, as the reference's RoBERTa and BERT add it to
    `embedding_output`; the input embeddings there hold the placeholder tokens ("add" mode), or nothing that
    survives ("cat" mode: the vectors replace the embeddings' output, as the reference concatenates them after it)."""

    family = "mlm"

    def _read_positions(self, input_ids, attention_mask):
        return self._mask_positions(input_ids)

    def _slot0_inputs(self, prompt, n):
        rows = prompt.size * n
        if prompt.placeholders is not None:
            return prompt.placeholders.expand(rows, -1, -1)
        return prompt.vectors.new_zeros(rows, prompt.n_tokens, prompt.vectors.shape[-1])

    @contextmanager
    def deep_prompts(self, prompt, n):
        vectors = prompt.rows(0, n)
        at, width, add = self.insert_at, prompt.n_tokens, prompt.placeholders is not None

        def hook(module, args, output):
            span = vectors.to(output.dtype)
            if add:
                span = output[:, at : at + width] + span
            return torch.cat([output[:, :at], span, output[:, at + width :]], dim=1)

        embeddings = getattr(self.model.base_model, "embeddings", None)
        if embeddings is None:
            raise HarnessError(f"cannot find the embeddings module of {type(self.model).__name__} to add the prompt to")
        handle = embeddings.register_forward_hook(hook)
        try:
            with super().deep_prompts(prompt, n):
                yield
        finally:
            handle.remove()

    def _soft_label_logits(self, enc, label_ids, soft):
        return _mlm_label_logits(self.model, self._body_hidden(enc, soft), label_ids)

    def _label_logits(self, inputs, attention_mask, read_at, tiled, label_ids):
        hidden = self.model.base_model(**inputs, attention_mask=attention_mask).last_hidden_state
        return _mlm_label_logits(self.model, self._rows(hidden, read_at), label_ids)


def _mlm_label_logits(model, rows: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """The MLM head on the read rows only: its transform (dense, activation, norm), then only the label rows of
    its decoder (never the full vocabulary)."""
    transformed = _capture(model.get_output_embeddings(), lambda: _mlm_head(model)(rows), inputs=True)
    return _restricted_head(model, transformed, label_ids)


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

    def _soft_label_logits(self, enc, label_ids, soft):
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
        return self._head(self._rows(decoded.last_hidden_state, enc.read_at), label_ids)

    def _shift(self, read_at, width):
        return read_at  # read in the decoder, which never sees the prompt

    def _label_logits(self, inputs, attention_mask, read_at, tiled, label_ids):
        encoded = self.model.get_encoder()(**inputs, attention_mask=attention_mask)
        decoded = self.model.get_decoder()(
            input_ids=self._decoder_inputs(tiled),
            encoder_hidden_states=encoded.last_hidden_state,
            encoder_attention_mask=attention_mask,
        )
        return self._head(self._rows(decoded.last_hidden_state, read_at), label_ids)

    def _head(self, rows, label_ids):
        if getattr(self.model.config, "tie_word_embeddings", False) and self.model.config.model_type in ("t5", "mt5"):
            rows = rows * self.model.config.d_model**-0.5  # T5 rescales before a tied head
        return _restricted_head(self.model, rows, label_ids)


SCORERS = {cls.family: cls for cls in (CausalScorer, MaskedScorer, Seq2SeqScorer)}


def make_scorer(backbone) -> Scorer:
    limit = getattr(backbone.model.config, "max_position_embeddings", None) or 512
    if backbone.model.config.model_type in ("roberta", "xlm-roberta"):
        limit -= 2  # RoBERTa's position ids start after the padding index
    return SCORERS[backbone.family](backbone.model, backbone.tokenizer, max_length=min(limit, 4096))
