"""The model-service protocol: one typed request and response per query, and the papers' byte accounting.

Both transports carry these objects unchanged: the in-process one hands them to `harness.server.ModelServer`,
the HTTP one (harness/client.py, harness/serve.py) encodes them with `harness.wire`. So a method gets the same
answer, the same errors and the same metered bytes whichever way its queries travel.

The papers' accounting (`paper_bytes`), in one place: upload = the texts' and label words' UTF-8 bytes plus the
float32 parameters sent; download = every array returned. A prompted request of P candidates counts as P
queries, each with one candidate's parameters (the BBT paper's "one API call" scores one candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.prompting import PromptSpec

PROTOCOL = "bbt-harness/1"


class ProtocolError(HarnessError):
    """A request the server will not answer: `status` is the HTTP status it maps to, `code` a stable name."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What one request may hold; the server refuses more with a 4xx (and reports these in /v1/info)."""

    max_texts: int = 512  # texts per request (dbpedia's 16-shot train split is 224)
    max_chars: int = 16384  # characters per text (a pair task's two fields plus ICL demonstrations)
    max_label_words: int = 64
    max_candidates: int = 256  # prompt candidates per prompted request (BBT's popsize is 20)
    max_prompt_tokens: int = 256  # n_tokens of a prompt spec
    max_dim: int = 4096  # intrinsic dimension d of a projection
    # float32 values of the A_j a send=z prompt makes the server hold: BBTv2 on RoBERTa-large holds 24 x 500 x 50 x 1024
    # (2.5 GB), so one prompt may hold 4 GiB and all kept prompts 8 GiB (least recently used dropped first)
    max_projection_values: int = 2**30
    max_projection_total: int = 2**31
    max_prompts: int = 16  # prompt handles kept (least recently used dropped first)
    max_body_bytes: int = 256 * 2**20  # one request body
    max_in_flight: int = 64  # requests being answered or queued at once; more get 503


# --- requests -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelLogitsRequest:
    route: ClassVar[str] = "/v1/label-logits"
    texts: tuple[str, ...]
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class PromptedLogitsRequest:
    """`sent`: float32 [P, slots, d] for a send="z" prompt, [P, slots, n_tokens, hidden] for send="prompt"."""

    route: ClassVar[str] = "/v1/prompted-label-logits"
    handle: str
    texts: tuple[str, ...]
    label_words: tuple[str, ...]
    sent: np.ndarray = field(compare=False)
    sequential: bool = False


@dataclass(frozen=True)
class FeaturesRequest:
    route: ClassVar[str] = "/v1/features"
    texts: tuple[str, ...]
    kind: str = "pooled"


@dataclass(frozen=True)
class HiddenStdsRequest:
    route: ClassVar[str] = "/v1/hidden-stds"
    texts: tuple[str, ...]


@dataclass(frozen=True)
class ConfigurePromptRequest:
    route: ClassVar[str] = "/v1/prompts"
    spec: PromptSpec


REQUESTS = (LabelLogitsRequest, PromptedLogitsRequest, FeaturesRequest, HiddenStdsRequest, ConfigurePromptRequest)
ROUTES = {cls.route: cls for cls in REQUESTS}


# --- responses: each carries the server's seconds answering it (its forwards and their set-up) -----------------


@dataclass(frozen=True)
class LogitsResponse:
    logits: np.ndarray = field(compare=False)  # float32 [N, labels], or [P, N, labels] for a prompted request
    server_seconds: float = 0.0


@dataclass(frozen=True)
class FeaturesResponse:
    values: np.ndarray = field(compare=False)  # float32 [N, hidden] (pooled) or [N, max_len, hidden] (tokens)
    lengths: np.ndarray | None = field(default=None, compare=False)  # int32 [N] for tokens
    server_seconds: float = 0.0


@dataclass(frozen=True)
class StdsResponse:
    stds: np.ndarray = field(compare=False)  # float32 [layers]
    server_seconds: float = 0.0


@dataclass(frozen=True)
class PromptHandle:
    handle: str  # names the configured prompt in later prompted requests
    server_seconds: float = 0.0


RESPONSES = {
    LabelLogitsRequest: LogitsResponse,
    PromptedLogitsRequest: LogitsResponse,
    FeaturesRequest: FeaturesResponse,
    HiddenStdsRequest: StdsResponse,
    ConfigurePromptRequest: PromptHandle,
}


@dataclass(frozen=True)
class ServiceInfo:
    """What the service documents to its users (an API's public facts, not model internals)."""

    name: str
    family: str
    mask: str
    hidden_size: int
    num_layers: int
    dtype: str
    device: str
    identity: dict
    limits: dict
    batching: dict
    protocol: str = PROTOCOL


# --- the papers' accounting --------------------------------------------------------------------------------------


def text_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def array_bytes(array: np.ndarray) -> int:
    return int(np.asarray(array, dtype=np.float32).nbytes)


def paper_bytes(request, response) -> list[tuple[int, int]]:
    """(upload, download) bytes of each metered query a request and its response make, by the papers' accounting."""
    if isinstance(request, LabelLogitsRequest):
        return [(text_bytes(request.texts) + text_bytes(request.label_words), array_bytes(response.logits))]
    if isinstance(request, PromptedLogitsRequest):
        up = text_bytes(request.texts) + text_bytes(request.label_words) + array_bytes(request.sent[0])
        return [(up, array_bytes(candidate)) for candidate in response.logits]
    if isinstance(request, FeaturesRequest):
        down = int(response.values.nbytes) + (int(response.lengths.nbytes) if response.lengths is not None else 0)
        return [(text_bytes(request.texts), down)]  # the kind names the endpoint, like a URL: not counted
    if isinstance(request, HiddenStdsRequest):
        return [(text_bytes(request.texts), array_bytes(response.stds))]
    if isinstance(request, ConfigurePromptRequest):
        return [(request.spec.wire_bytes(), 0)]
    raise TypeError(f"not a protocol request: {type(request).__name__}")
