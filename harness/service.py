"""The model-service boundary: all a black-box method may touch.

A method sends a query (a batch of rendered input texts and the label words it wants scored, plus any
parameters such as a prompt) and receives float32 label logits. `ServiceClient` is what a method holds: it turns
each call into a protocol request (harness/protocol.py), sends it over a transport and meters it: queries, the
papers' bytes per query (`protocol.paper_bytes`), and the server's seconds answering them, so a run's wall time
splits into the server's part and the user's (an optimiser, a probe). Two transports:
- `ModelService(backbone)`: in-process, the server (harness/server.py) in the same process;
- `RemoteService(url)` (harness/client.py): HTTP to `harness serve`, which also meters the bytes on the wire,
  the latency the client sees and the requests sent.
Neither offers a path to the weights: a method sees only the public methods below.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from harness.backbones import Backbone
from harness.errors import HarnessError
from harness.features import TokenFeatures
from harness.prompting import PromptSpec
from harness.protocol import (
    ConfigurePromptRequest, FeaturesRequest, HiddenStdsRequest, LabelLogitsRequest, PromptedLogitsRequest, ProtocolError,
    ServiceInfo, array_bytes, paper_bytes, text_bytes,
)
from harness.server import ModelServer, length_buckets, shared_slots  # noqa: F401  (their home was here)

__all__ = ["ModelService", "ServiceClient", "QueryMeter", "PhaseCount", "text_bytes", "array_bytes"]


@dataclass
class PhaseCount:
    queries: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    seconds: float = 0.0  # the server's time answering them (forwards and their set-up), not the user's
    # measured by a transport with a wire (HTTP), zero in process: requests sent, body bytes each way, and the
    # seconds from sending a request to holding its decoded answer
    requests: int = 0
    wire_up_bytes: int = 0
    wire_down_bytes: int = 0
    latency_s: float = 0.0

    def per_query(self) -> dict:
        n = max(self.queries, 1)
        out = {"upload_per_query_bytes": self.upload_bytes / n, "download_per_query_bytes": self.download_bytes / n}
        if self.requests:
            out |= {"wire_up_per_query_bytes": self.wire_up_bytes / n, "wire_down_per_query_bytes": self.wire_down_bytes / n,
                    "latency_per_query_s": self.latency_s / n, "server_per_query_s": self.seconds / n}
        return out


WIRE_FIELDS = ("requests", "wire_up_bytes", "wire_down_bytes", "latency_s")


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

    def add_wire(self, up: int, down: int, latency_s: float) -> None:
        count = self.phases[self.phase]
        count.requests += 1
        count.wire_up_bytes += up
        count.wire_down_bytes += down
        count.latency_s += latency_s

    def summary(self) -> dict:
        out = {}
        for phase, c in self.phases.items():
            values = vars(c) if c.requests else {k: v for k, v in vars(c).items() if k not in WIRE_FIELDS}
            out[phase] = {**values, **c.per_query()}
        return out


class ServiceClient:
    """What a black-box method holds: the service's documented facts and its queries, over some transport."""

    transport = ""

    def __init__(self, info: ServiceInfo):
        self.info = info
        self.meter = QueryMeter()
        self._spec: PromptSpec | None = None
        self._handle: str | None = None

    # --- the transport: a subclass sends one request and returns its response
    def _send(self, request):
        raise NotImplementedError

    def _call(self, request):
        response = self._send(request)
        for up, down in paper_bytes(request, response):
            self.meter.record(up, down)
        self.meter.add_time(response.server_seconds)
        return response

    # What the service documents to its users (an API's public facts, not model internals).
    @property
    def family(self) -> str:
        return self.info.family

    @property
    def mask(self) -> str:
        return self.info.mask

    @property
    def backbone_name(self) -> str:
        return self.info.name

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @contextmanager
    def phase(self, name: str):
        previous, self.meter.phase = self.meter.phase, name
        try:
            yield
        finally:
            self.meter.phase = previous

    def label_logits(self, texts: list[str], label_words: list[str]) -> np.ndarray:
        """One query: [len(texts), len(label_words)] float32 logits of each label word's first token."""
        return self._call(LabelLogitsRequest(tuple(texts), tuple(label_words))).logits

    def hidden_stds(self, texts: list[str]) -> np.ndarray:
        """One query: the scale of each prompt slot's target (see Scorer.hidden_stds), for projection stds."""
        return self._call(HiddenStdsRequest(tuple(texts))).stds

    def configure_prompt(self, spec: PromptSpec) -> None:
        """Declare, once, how later prompted queries are to be read (metered as one query)."""
        if spec.slots not in (1, self.num_layers):
            raise HarnessError(f"a prompt has 1 slot or one per layer ({self.num_layers}), not {spec.slots}")
        self._handle = self._call(ConfigurePromptRequest(spec)).handle
        self._spec = spec

    def prompted_label_logits(self, texts: list[str], label_words: list[str], sent: np.ndarray, sequential: bool = False) -> np.ndarray:
        """P queries in one request, one per prompt candidate: [P, len(texts), labels] float32.

        `sent` is [P, slots, d] (send="z") or [P, slots, n_tokens, hidden] (send="prompt"). By default the
        candidates share forwards (population batching, chunked to max_tokens); `sequential` runs
        one candidate per forward. Each candidate is metered as its own query either way.
        """
        if self._handle is None:
            raise HarnessError("configure_prompt must be called before prompted queries")
        request = PromptedLogitsRequest(self._handle, tuple(texts), tuple(label_words), np.asarray(sent, dtype=np.float32), sequential)
        try:
            return self._call(request).logits
        except ProtocolError as exc:
            if exc.code != "unknown_prompt":
                raise
        # the server dropped the prompt (or restarted): declare it again, once, and resend
        with self.phase("setup"):
            self.configure_prompt(self._spec)
        return self._call(request).logits

    def features(self, texts: list[str], kind: str = "pooled"):
        """One query: the backbone's final hidden states (pooling per family: see harness/features.py).

        kind "pooled": float32 [len(texts), hidden]; kind "tokens": TokenFeatures(values float32
        [len(texts), max_len, hidden] zero-padded, lengths int32 [len(texts)]). Upload = the texts' UTF-8 bytes
        (the kind names the endpoint, like a URL, and is not counted); download = every array returned.
        """
        response = self._call(FeaturesRequest(tuple(texts), kind))
        return response.values if response.lengths is None else TokenFeatures(response.values, response.lengths)

    def description(self) -> dict:
        """What a run record keeps of the service it used."""
        return {"transport": self.transport, "backbone": self.info.name, "identity": self.info.identity,
                "dtype": self.info.dtype, "device": self.info.device}


class ModelService(ServiceClient):
    """The in-process transport: the server lives in this process and answers each request directly."""

    transport = "in-process"

    def __init__(self, backbone: Backbone | ModelServer, **server_options):
        self._server = backbone if isinstance(backbone, ModelServer) else ModelServer(backbone, **server_options)
        super().__init__(self._server.info())

    def _send(self, request):
        return self._server.handle(request)

    # test hooks of the in-process transport: what the server holds for this client's prompt (no weights)
    @property
    def _projections(self) -> dict:
        return self._server.projections(self._handle) if self._handle else {}

    def _encoded_buckets(self, texts: list[str]):
        return self._server.encoded_buckets(texts)
