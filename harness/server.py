"""The server side of the model service: holds the backbone and answers protocol requests.

Every transport ends here: the in-process ModelService calls `handle`, the HTTP app (harness/serve.py) calls
`handle_many` from its one compute thread. Requests are validated here, once, so both transports refuse the
same things with the same ProtocolError. A configured prompt is kept under a handle named by its content (the
same spec from two clients shares one set of projections); the least recently used is dropped past
`limits.max_prompts`, and a client whose handle was dropped configures it again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import numpy as np
import torch

from harness.backbones import Backbone
from harness.compiled import CompiledLayers
from harness.errors import HarnessError
from harness.features import KINDS, FeatureExtractor
from harness.meters import device_description
from harness.prompting import PromptSpec, draw_projections, placeholder_ids, project
from harness.protocol import (
    ConfigurePromptRequest, FeaturesRequest, FeaturesResponse, HiddenStdsRequest, LabelLogitsRequest, Limits,
    LogitsResponse, PromptedLogitsRequest, PromptHandle, ProtocolError, ServiceInfo, StdsResponse,
)
from harness.scoring import PromptBatch, label_token_ids, make_scorer, mask_string, transformer_layers


def length_buckets(lengths: list[int], most: int = 4, overhead: float = 0.05) -> list[list[int]]:
    """Indices grouped into at most `most` runs of similar length, minimising padded tokens plus, per extra
    forward, `overhead` x the single-forward padded tokens (each forward has a fixed cost)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    if n == 0:
        return []
    single = n * sorted_lengths[-1]
    # cost[k][j]: fewest padded tokens for the first j sorted items in k groups; the group i..j-1 pads to its last
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(most + 1)]
    cut = [[0] * (n + 1) for _ in range(most + 1)]
    cost[0][0] = 0
    for k in range(1, most + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = cost[k - 1][i] + (j - i) * sorted_lengths[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    best = min(range(1, most + 1), key=lambda k: cost[k][n] + (k - 1) * overhead * single)
    groups, j = [], n
    for k in range(best, 0, -1):
        i = cut[k][j]
        groups.append(order[i:j])
        j = i
    return [g for g in reversed(groups) if g]


def shared_slots(sent: np.ndarray) -> int:
    """How many leading slots every candidate sends alike (BBTv2 varies one layer's prompt per generation).
    Read from what the client sent, bit for bit: the projected vectors of equal z may differ in the last bit."""
    if len(sent) < 2:
        return 0
    same = (sent == sent[:1]).reshape(sent.shape[0], sent.shape[1], -1).all(axis=2).all(axis=0)
    return int(np.cumprod(same).sum())


def spec_handle(spec: PromptSpec) -> str:
    return "p-" + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:20]


class ModelServer:
    def __init__(
        self, backbone: Backbone, max_batch: int = 64, max_tokens: int = 65536, bucketing: bool = True,
        layer_reuse: bool = True, compile: str | None = None, limits: Limits | None = None,
    ):
        self._backbone = backbone
        self.scorer = make_scorer(backbone)  # the server's own interface: bench times it directly
        self._label_ids: dict[tuple[str, ...], list[int]] = {}
        # the server's memory bounds, invisible to clients: sequences per forward for plain queries, and tokens per
        # forward for prompted ones (a generation of candidates is split into as few forwards as fit)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        # prompted queries: group examples of similar length into separate forwards (less padding), and let
        # BBTv2's candidates share the layers below the one they differ in (see Scorer.prompted_label_logits)
        self.bucketing = bucketing
        self.layer_reuse = layer_reuse
        # torch.compile of the transformer layers (a mode name; None: eager), see harness/compiled.py
        self._compiled = CompiledLayers(backbone.model, compile) if compile else None
        self.limits = limits or Limits()
        self._bucket_cache: dict[tuple[str, ...], tuple] = {}
        self._prompts: OrderedDict[str, tuple[PromptSpec, dict]] = OrderedDict()  # handle -> (spec, A_j per slot)
        self.family = backbone.family
        self.mask = mask_string(backbone.tokenizer, self.family)
        self.hidden_size = backbone.model.get_input_embeddings().weight.shape[1]
        self.num_layers = len(transformer_layers(backbone.model))
        self.batching: dict = {"enabled": False}  # the HTTP app fills this in

    def info(self) -> ServiceInfo:
        b = self._backbone
        return ServiceInfo(
            name=b.name, family=self.family, mask=self.mask, hidden_size=self.hidden_size, num_layers=self.num_layers,
            dtype=str(next(b.model.parameters()).dtype).removeprefix("torch."), device=device_description(),
            identity=dict(b.identity), limits=asdict(self.limits), batching=dict(self.batching),
        )

    # --- dispatch -------------------------------------------------------------------------------------------
    def handle(self, request):
        """One request's response (raises ProtocolError for a request it refuses)."""
        return self.handle_many([request])[0]

    def handle_many(self, requests: list) -> list:
        """Responses to requests answered together: prompted requests that share texts, label words and prompt
        shape run in shared forwards, as do label-logits requests with the same label words (see serve.mergeable)."""
        first = requests[0]
        if len(requests) > 1 and isinstance(first, PromptedLogitsRequest):
            return self._prompted_many(requests)
        if len(requests) > 1 and isinstance(first, LabelLogitsRequest):
            return self._label_logits_many(requests)
        if len(requests) > 1:
            raise HarnessError(f"{type(first).__name__} requests are answered one at a time")
        handler = {
            LabelLogitsRequest: self._label_logits_many, PromptedLogitsRequest: self._prompted_many,
            FeaturesRequest: self._features, HiddenStdsRequest: self._hidden_stds, ConfigurePromptRequest: self._configure,
        }.get(type(first))
        if handler is None:
            raise ProtocolError(f"not a protocol request: {type(first).__name__}", 400, "bad_request")
        return handler(requests) if handler in (self._label_logits_many, self._prompted_many) else [handler(first)]

    @contextmanager
    def _forwarding(self, clock: list):
        """Around a request's forwards: inference mode, the compiled layers if set, and the server's time kept."""
        start = time.perf_counter()
        try:
            with torch.inference_mode(), (self._compiled.active() if self._compiled else nullcontext()):
                yield
        finally:
            clock.append(time.perf_counter() - start)

    # --- validation -----------------------------------------------------------------------------------------
    def check_texts(self, texts) -> None:
        limits = self.limits
        if not texts:
            raise ProtocolError("texts is empty; a query scores at least one text", 422, "empty")
        if len(texts) > limits.max_texts:
            raise ProtocolError(f"{len(texts)} texts in one request; the limit is {limits.max_texts}", 413, "too_many_texts")
        longest = max(len(t) for t in texts)
        if longest > limits.max_chars:
            raise ProtocolError(f"a text has {longest} characters; the limit is {limits.max_chars}", 413, "text_too_long")

    def _ids(self, label_words) -> list[int]:
        key = tuple(label_words)
        if not key:
            raise ProtocolError("label_words is empty; a query scores at least one label word", 422, "empty")
        if len(key) > self.limits.max_label_words:
            raise ProtocolError(f"{len(key)} label words; the limit is {self.limits.max_label_words}", 413, "too_many_labels")
        if key not in self._label_ids:
            try:
                self._label_ids[key] = label_token_ids(self._backbone.tokenizer, list(key))
            except HarnessError as exc:
                raise ProtocolError(f"label words {list(key)} cannot be scored: {exc}", 422, "bad_label_words") from None
        return self._label_ids[key]

    def _prompt(self, handle: str) -> tuple[PromptSpec, dict]:
        if handle not in self._prompts:
            raise ProtocolError(
                f"unknown prompt handle '{handle}' (never configured, or dropped: configure the prompt again)", 404,
                "unknown_prompt",
            )
        self._prompts.move_to_end(handle)
        return self._prompts[handle]

    def _check_sent(self, spec: PromptSpec, sent: np.ndarray) -> None:
        if spec.send == "z":
            shape, what = (spec.slots, spec.projection.dim), "[P, slots, d]"
        else:
            shape, what = (spec.slots, spec.n_tokens, self.hidden_size), "[P, slots, n_tokens, hidden]"
        if sent.ndim != len(shape) + 1 or tuple(sent.shape[1:]) != shape:
            raise ProtocolError(f"sent has shape {list(sent.shape)}; this prompt takes {what} = [P, {', '.join(map(str, shape))}]",
                                422, "bad_shape")
        if not 1 <= sent.shape[0] <= self.limits.max_candidates:
            raise ProtocolError(f"{sent.shape[0]} candidates; a request holds 1 to {self.limits.max_candidates}",
                                413 if sent.shape[0] else 422, "bad_candidates")
        if sent.dtype != np.float32:
            raise ProtocolError(f"sent must be float32, not {sent.dtype}", 422, "bad_dtype")
        if not np.isfinite(sent).all():
            raise ProtocolError("sent holds NaN or infinite values", 422, "non_finite")

    # --- queries --------------------------------------------------------------------------------------------
    def _configure(self, request: ConfigurePromptRequest) -> PromptHandle:
        spec, limits = request.spec, self.limits
        if spec.slots not in (1, self.num_layers):
            raise ProtocolError(f"a prompt has 1 slot or one per layer ({self.num_layers}), not {spec.slots}", 422, "invalid_prompt")
        if not 1 <= spec.n_tokens <= limits.max_prompt_tokens:
            raise ProtocolError(f"n_tokens {spec.n_tokens}: a prompt has 1 to {limits.max_prompt_tokens} tokens", 422, "invalid_prompt")
        if spec.send == "z":
            p = spec.projection
            if not 1 <= p.dim <= limits.max_dim:
                raise ProtocolError(f"intrinsic dimension {p.dim}: 1 to {limits.max_dim}", 422, "invalid_prompt")
            if not all(np.isfinite(s) and s >= 0 for s in p.stds):  # 0: a zero projection (every z gives p0)
                raise ProtocolError("projection stds must be finite and not negative", 422, "invalid_prompt")
            if p.dist not in ("normal", "uniform"):
                raise ProtocolError(f"projection dist must be 'normal' or 'uniform', not '{p.dist}'", 422, "invalid_prompt")
            values = spec.slots * p.dim * spec.n_tokens * self.hidden_size
            if values > limits.max_projection_values:
                raise ProtocolError(f"the prompt is too large: its projections would hold {values:,} values; the limit is {limits.max_projection_values:,}",
                                    413, "prompt_too_large")
        handle = spec_handle(spec)
        clock: list = []
        if handle in self._prompts:
            self._prompts.move_to_end(handle)
        else:
            matrices: dict = {}
            if spec.send == "z":  # the server draws its A_j now, a one-off cost, not inside the first query
                with self._forwarding(clock):
                    draw_projections(spec, self.hidden_size, matrices, self.scorer.device)
            self._prompts[handle] = (spec, matrices)
            while len(self._prompts) > limits.max_prompts or self._held() > limits.max_projection_total:
                self._prompts.popitem(last=False)
        return PromptHandle(handle, sum(clock))

    def _held(self) -> int:
        """Projection values held over all kept prompts."""
        return sum(a.numel() for _, matrices in self._prompts.values() for a in matrices.values())

    def projections(self, handle: str) -> dict:
        """The A_j the server holds for a configured prompt (the in-process transport shows them to tests)."""
        return self._prompts[handle][1] if handle in self._prompts else {}

    def _label_logits_many(self, requests: list[LabelLogitsRequest]) -> list[LogitsResponse]:
        """Label logits of each request's texts, their texts scored in shared forwards (same label words)."""
        ids = self._ids(requests[0].label_words)
        for r in requests:
            self.check_texts(r.texts)
            if tuple(r.label_words) != tuple(requests[0].label_words):
                raise HarnessError("label-logits requests merged with different label words")
        texts = [t for r in requests for t in r.texts]
        # length bucketing: forwards over texts of similar length waste little compute on padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        logits = np.zeros((len(texts), len(ids)), dtype=np.float32)
        clock: list = []
        with self._forwarding(clock):
            for start in range(0, len(texts), self.max_batch):
                chunk = order[start : start + self.max_batch]
                logits[chunk] = self.scorer.label_logits([texts[i] for i in chunk], ids).float().cpu().numpy()
        return _split(logits, [len(r.texts) for r in requests], clock[0])

    def _hidden_stds(self, request: HiddenStdsRequest) -> StdsResponse:
        self.check_texts(request.texts)
        clock: list = []
        with self._forwarding(clock):
            stds = np.asarray(self.scorer.hidden_stds(list(request.texts)), dtype=np.float32)
        return StdsResponse(stds, clock[0])

    def _features(self, request: FeaturesRequest) -> FeaturesResponse:
        if request.kind not in KINDS:
            raise ProtocolError(f"unknown feature kind '{request.kind}'; valid kinds: {', '.join(KINDS)}", 422, "bad_kind")
        self.check_texts(request.texts)
        backbone = self._backbone
        extractor = FeatureExtractor(backbone.model, backbone.tokenizer, self.family, self.scorer.max_length)
        clock: list = []
        with self._forwarding(clock):
            result = extractor.extract(list(request.texts), request.kind, self.max_batch)
        if request.kind == "pooled":
            return FeaturesResponse(result, None, clock[0])
        return FeaturesResponse(result.values, result.lengths, clock[0])

    def _prompted_many(self, requests: list[PromptedLogitsRequest]) -> list[LogitsResponse]:
        """P candidates per request, all requests' candidates in shared forwards (they share texts, label words
        and the prompt's shape: serve.mergeable). Layer reuse applies within one request only."""
        first = requests[0]
        self.check_texts(first.texts)
        ids = self._ids(first.label_words)
        specs = []
        for r in requests:
            spec, _ = self._prompt(r.handle)
            self._check_sent(spec, r.sent)
            specs.append(spec)
        clock: list = []
        with self._forwarding(clock):
            vectors = [self._vectors(r, spec) for r, spec in zip(requests, specs)]
            shared = shared_slots(first.sent) if len(requests) == 1 else 0
            logits = self._prompted(list(first.texts), ids, specs[0], torch.cat(vectors), shared, first.sequential)
        return _split(logits, [len(r.sent) for r in requests], clock[0])

    def _vectors(self, request: PromptedLogitsRequest, spec: PromptSpec) -> torch.Tensor:
        sent = np.array(request.sent)  # a writable copy: a decoded frame's arrays are read-only views of the body
        if spec.send == "z":  # the server applies A on its own device (a 20 x 500 x 50*hidden product per generation)
            return project(spec, sent, self.hidden_size, self._prompts[request.handle][1], self.scorer.device)
        return torch.as_tensor(sent).view(-1, spec.slots, spec.n_tokens, self.hidden_size)

    def _prompted(self, texts: list[str], ids: list[int], spec: PromptSpec, vectors: torch.Tensor, shared: int,
                  sequential: bool) -> np.ndarray:
        model = self._backbone.model
        dtype = next(model.parameters()).dtype
        placeholders = None
        if spec.mode == "add":
            table = model.get_input_embeddings()
            tokens = placeholder_ids(spec, table.weight.shape[0])
            placeholders = table(torch.tensor(tokens, device=self.scorer.device))
        groups, encs = self.encoded_buckets(texts)
        widest = max(len(g) * (e.input_ids.shape[1] + spec.n_tokens) for g, e in zip(groups, encs))
        per_forward = 1 if sequential else max(1, self.max_tokens // widest)
        shared = shared if self.layer_reuse and per_forward > 1 else 0
        logits = torch.zeros(vectors.shape[0], len(texts), len(ids))
        for start in range(0, vectors.shape[0], per_forward):
            batch = PromptBatch(vectors[start : start + per_forward].to(self.scorer.device, dtype), placeholders)
            outs = self.scorer.prompted_label_logits(encs, ids, batch, shared)
            for group, out in zip(groups, outs):
                logits[start : start + batch.size, group] = out.float().cpu().view(batch.size, len(group), len(ids))
        return logits.numpy()

    def encoded_buckets(self, texts: list[str]) -> tuple[list[list[int]], list]:
        """The examples' groups and their encodings; a method sends the same train set every generation, so
        the last few are kept."""
        key = tuple(texts)
        if key not in self._bucket_cache:
            groups = [list(range(len(texts)))]
            if self.bucketing:
                groups = length_buckets(self.scorer.encode(texts).attention_mask.sum(dim=1).tolist())
            if len(self._bucket_cache) >= 8:
                self._bucket_cache.pop(next(iter(self._bucket_cache)))
            self._bucket_cache[key] = groups, [self.scorer.encode([texts[i] for i in g]) for g in groups]
        return self._bucket_cache[key]


def _split(rows: np.ndarray, sizes: list[int], seconds: float) -> list[LogitsResponse]:
    """One response per merged request: its rows, and its share of the server's seconds (by rows)."""
    out, start, total = [], 0, sum(sizes)
    for size in sizes:
        out.append(LogitsResponse(np.ascontiguousarray(rows[start : start + size]), seconds * size / total))
        start += size
    return out
