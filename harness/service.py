"""The model-service boundary: all a black-box method may touch.

A method sends a query (a batch of rendered input texts and the label words it wants scored, plus any
parameters such as a prompt) and receives float32 label logits. The service counts queries and the bytes each
would carry over the wire, with the BBT paper's accounting: upload = UTF-8 text + label words + float32
parameters; download = the float32 array returned (N x |labels| x 4 B for label logits).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from harness.backbones import Backbone
from harness.features import FeatureExtractor
from harness.scoring import label_token_ids, make_scorer, mask_string


@dataclass
class PhaseCount:
    queries: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0

    def per_query(self) -> dict:
        n = max(self.queries, 1)
        return {"upload_per_query_bytes": self.upload_bytes / n, "download_per_query_bytes": self.download_bytes / n}


class QueryMeter:
    """Counts queries and bytes, separately for each phase (train, eval) of a run."""

    def __init__(self):
        self.phases: dict[str, PhaseCount] = defaultdict(PhaseCount)
        self.phase = "train"

    def record(self, upload: int, download: int) -> None:
        count = self.phases[self.phase]
        count.queries += 1
        count.upload_bytes += upload
        count.download_bytes += download

    def summary(self) -> dict:
        return {phase: {**vars(c), **c.per_query()} for phase, c in self.phases.items()}


def text_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def array_bytes(array: np.ndarray) -> int:
    return int(np.asarray(array, dtype=np.float32).nbytes)


class ModelService:
    """Server side: holds the backbone; a method sees only this object's public methods."""

    def __init__(self, backbone: Backbone, max_batch: int = 64):
        self._backbone = backbone
        self._scorer = make_scorer(backbone)
        self._label_ids: dict[tuple[str, ...], list[int]] = {}
        self.max_batch = max_batch  # sequences per forward: the server's memory bound, invisible to clients
        self.meter = QueryMeter()

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

    @contextmanager
    def phase(self, name: str):
        previous, self.meter.phase = self.meter.phase, name
        try:
            yield
        finally:
            self.meter.phase = previous

    def label_logits(self, texts: list[str], label_words: list[str]) -> np.ndarray:
        """One query: [len(texts), len(label_words)] float32 logits of each label word's first token."""
        key = tuple(label_words)
        if key not in self._label_ids:
            self._label_ids[key] = label_token_ids(self._backbone.tokenizer, label_words)
        ids = self._label_ids[key]
        with torch.inference_mode():
            chunks = [
                self._scorer.label_logits(texts[i : i + self.max_batch], ids).float().cpu()
                for i in range(0, len(texts), self.max_batch)
            ]
        logits = torch.cat(chunks).numpy()
        self.meter.record(text_bytes(texts) + text_bytes(label_words), array_bytes(logits))
        return logits

    def features(self, texts: list[str], kind: str = "pooled"):
        """One query: the backbone's final hidden states (pooling per family: see harness/features.py).

        kind "pooled": float32 [len(texts), hidden]; kind "tokens": TokenFeatures(values float32
        [len(texts), max_len, hidden] zero-padded, lengths int32 [len(texts)]). Upload = the texts' UTF-8 bytes
        (the kind names the endpoint, like a URL, and is not counted); download = every array returned.
        """
        backbone = self._backbone
        extractor = FeatureExtractor(backbone.model, backbone.tokenizer, self.family, self._scorer.max_length)
        result = extractor.extract(texts, kind, self.max_batch)
        self.meter.record(text_bytes(texts), int(result.nbytes))
        return result
