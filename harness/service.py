"""The model-service boundary: all a black-box method may touch.

A method sends a query (a batch of rendered input texts and the label words it wants scored, plus any
parameters such as a prompt) and receives float32 label logits. The service counts queries and the bytes each
would carry over the wire, with the BBT paper's accounting: upload = UTF-8 text + label words + float32
parameters; download = the float32 array returned (N x |labels| x 4 B for label logits). It also keeps its own
time answering them, so a run's wall time splits into the server's part and the user's (an optimiser, a probe).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from harness.backbones import Backbone
from harness.compiled import CompiledLayers
from harness.errors import HarnessError
from harness.features import FeatureExtractor
from harness.prompting import PromptSpec, draw_projections, placeholder_ids, project
from harness.scoring import PromptBatch, label_token_ids, make_scorer, mask_string, transformer_layers


@dataclass
class PhaseCount:
    queries: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    seconds: float = 0.0  # the server's time answering them (forwards and their set-up), not the user's

    def per_query(self) -> dict:
        n = max(self.queries, 1)
        return {"upload_per_query_bytes": self.upload_bytes / n, "download_per_query_bytes": self.download_bytes / n}


class QueryMeter:
    """Counts queries, bytes and the server's seconds, separately for each phase (train, eval) of a run."""

    def __init__(self):
        self.phases: dict[str, PhaseCount] = defaultdict(PhaseCount)
        self.phase = "train"

    def record(self, upload: int, download: int) -> None:
        count = self.phases[self.phase]
        count.queries += 1
        count.upload_bytes += upload
        count.download_bytes += download

    def add_time(self, seconds: float) -> None:
        self.phases[self.phase].seconds += seconds

    def summary(self) -> dict:
        return {phase: {**vars(c), **c.per_query()} for phase, c in self.phases.items()}


def text_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def array_bytes(array: np.ndarray) -> int:
    return int(np.asarray(array, dtype=np.float32).nbytes)


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


class ModelService:
    """Server side: holds the backbone; a method sees only this object's public methods."""

    def __init__(
        self, backbone: Backbone, max_batch: int = 64, max_tokens: int = 65536, bucketing: bool = True,
        layer_reuse: bool = True, compile: str | None = None,
    ):
        self._backbone = backbone
        self._scorer = make_scorer(backbone)
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
        self._bucket_cache: dict[tuple[str, ...], tuple] = {}
        self.meter = QueryMeter()
        self._prompt: PromptSpec | None = None
        self._projections: dict = {}

    # What the service documents to its users (an API's public facts, not model internals).
    @property
    def family(self) -> str:
        return self._backbone.family

    @property
    def mask(self) -> str:
        return mask_string(self._backbone.tokenizer, self.family)

    @property
    def backbone_name(self) -> str:
        return self._backbone.name

    @property
    def hidden_size(self) -> int:
        return self._backbone.model.get_input_embeddings().weight.shape[1]

    @property
    def num_layers(self) -> int:
        return len(transformer_layers(self._backbone.model))

    @contextmanager
    def phase(self, name: str):
        previous, self.meter.phase = self.meter.phase, name
        try:
            yield
        finally:
            self.meter.phase = previous

    @contextmanager
    def _forwarding(self):
        """Around a query's forwards: inference mode, the compiled layers if set, and the server's time kept."""
        start = time.perf_counter()
        try:
            with torch.inference_mode(), (self._compiled.active() if self._compiled else nullcontext()):
                yield
        finally:
            self.meter.add_time(time.perf_counter() - start)

    def _ids(self, label_words: list[str]) -> list[int]:
        key = tuple(label_words)
        if key not in self._label_ids:
            self._label_ids[key] = label_token_ids(self._backbone.tokenizer, label_words)
        return self._label_ids[key]

    def label_logits(self, texts: list[str], label_words: list[str]) -> np.ndarray:
        """One query: [len(texts), len(label_words)] float32 logits of each label word's first token."""
        ids = self._ids(label_words)
        # length bucketing: forwards over texts of similar length waste little compute on padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        logits = np.zeros((len(texts), len(ids)), dtype=np.float32)
        with self._forwarding():
            for start in range(0, len(texts), self.max_batch):
                chunk = order[start : start + self.max_batch]
                logits[chunk] = self._scorer.label_logits([texts[i] for i in chunk], ids).float().cpu().numpy()
        self.meter.record(text_bytes(texts) + text_bytes(label_words), array_bytes(logits))
        return logits

    def hidden_stds(self, texts: list[str]) -> np.ndarray:
        """One query: the scale of each prompt slot's target (see Scorer.hidden_stds), for projection stds."""
        with self._forwarding():
            stds = np.asarray(self._scorer.hidden_stds(texts), dtype=np.float32)
        self.meter.record(text_bytes(texts), array_bytes(stds))
        return stds

    def configure_prompt(self, spec: PromptSpec) -> None:
        """Declare, once, how later prompted queries are to be read (metered as one query)."""
        if spec.slots not in (1, self.num_layers):
            raise HarnessError(f"a prompt has 1 slot or one per layer ({self.num_layers}), not {spec.slots}")
        self._prompt, self._projections = spec, {}
        if spec.send == "z":  # the server draws its A_j now, a one-off cost, not inside the first query
            draw_projections(spec, self.hidden_size, self._projections, self._scorer.device)
        self.meter.record(spec.wire_bytes(), 0)

    def prompted_label_logits(self, texts: list[str], label_words: list[str], sent: np.ndarray, sequential: bool = False) -> np.ndarray:
        """P queries in one request, one per prompt candidate: [P, len(texts), labels] float32.

        `sent` is [P, slots, d] (send="z") or [P, slots, n_tokens, hidden] (send="prompt"). By default the
        candidates share forwards (population batching, chunked to max_tokens); `sequential` runs
        one candidate per forward. Each candidate is metered as its own query either way.
        """
        if self._prompt is None:
            raise HarnessError("configure_prompt must be called before prompted queries")
        sent = np.asarray(sent, dtype=np.float32)
        with self._forwarding():
            logits = self._prompted(texts, self._ids(label_words), sent, sequential)
        per_query_upload = text_bytes(texts) + text_bytes(label_words) + array_bytes(sent[0])
        for candidate in logits:
            self.meter.record(per_query_upload, array_bytes(candidate))
        return logits

    def _prompted(self, texts: list[str], ids: list[int], sent: np.ndarray, sequential: bool) -> np.ndarray:
        spec, hidden = self._prompt, self.hidden_size
        if spec.send == "z":  # the server applies A on its own device (a 20 x 500 x 50*hidden product per generation)
            vectors = project(spec, sent, hidden, self._projections, self._scorer.device)
        else:
            vectors = torch.as_tensor(sent).view(-1, spec.slots, spec.n_tokens, hidden)
        model = self._backbone.model
        dtype = next(model.parameters()).dtype
        placeholders = None
        if spec.mode == "add":
            table = model.get_input_embeddings()
            tokens = placeholder_ids(spec, table.weight.shape[0])
            placeholders = table(torch.tensor(tokens, device=self._scorer.device))
        groups, encs = self._encoded_buckets(texts)
        widest = max(len(g) * (e.input_ids.shape[1] + spec.n_tokens) for g, e in zip(groups, encs))
        per_forward = 1 if sequential else max(1, self.max_tokens // widest)
        shared = shared_slots(sent) if self.layer_reuse and per_forward > 1 else 0
        logits = torch.zeros(vectors.shape[0], len(texts), len(ids))
        for start in range(0, vectors.shape[0], per_forward):
            batch = PromptBatch(vectors[start : start + per_forward].to(self._scorer.device, dtype), placeholders)
            outs = self._scorer.prompted_label_logits(encs, ids, batch, shared)
            for group, out in zip(groups, outs):
                logits[start : start + batch.size, group] = out.float().cpu().view(batch.size, len(group), len(ids))
        return logits.numpy()

    def _encoded_buckets(self, texts: list[str]) -> tuple[list[list[int]], list]:
        """The examples' groups and their encodings; a method sends the same train set every generation, so
        the last few are kept."""
        key = tuple(texts)
        if key not in self._bucket_cache:
            groups = [list(range(len(texts)))]
            if self.bucketing:
                groups = length_buckets(self._scorer.encode(texts).attention_mask.sum(dim=1).tolist())
            if len(self._bucket_cache) >= 4:
                self._bucket_cache.pop(next(iter(self._bucket_cache)))
            self._bucket_cache[key] = groups, [self._scorer.encode([texts[i] for i in g]) for g in groups]
        return self._bucket_cache[key]

    def features(self, texts: list[str], kind: str = "pooled"):
        """One query: the backbone's final hidden states (pooling per family: see harness/features.py).

        kind "pooled": float32 [len(texts), hidden]; kind "tokens": TokenFeatures(values float32
        [len(texts), max_len, hidden] zero-padded, lengths int32 [len(texts)]). Upload = the texts' UTF-8 bytes
        (the kind names the endpoint, like a URL, and is not counted); download = every array returned.
        """
        backbone = self._backbone
        extractor = FeatureExtractor(backbone.model, backbone.tokenizer, self.family, self._scorer.max_length)
        with self._forwarding():
            result = extractor.extract(texts, kind, self.max_batch)
        self.meter.record(text_bytes(texts), int(result.nbytes))
        return result
