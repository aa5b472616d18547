"""`harness serve`: the model service over HTTP (FastAPI under uvicorn), one backbone for many tuning clients.

Routes: GET /v1/health (open: says only "ok"), GET /v1/info (the backbone's identity, family, sizes, limits),
GET /v1/stats (the server's memory and requests answered), and one POST per query type (protocol.ROUTES) whose
bodies are frames (harness/wire.py). Every refusal is a JSON error with a 4xx status, and the server goes on.

One compute thread answers queries in arrival order. With batching on (the default), requests that can share
forwards are answered together: prompted requests with the same texts, label words and prompt shape (several
clients tuning on one task; each keeps its own projection), and label-logits requests with the same label words.
The thread waits up to `window_ms` for more only while other requests are still arriving, so a lone client
never waits.

Keys: with --api-key-file, every route but /v1/health needs `Authorization: Bearer <key>` (401 without one, 403
for a wrong one; compared in constant time). Binding to anything but a loopback address needs a key: the server
refuses to start without one.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at runtime
import asyncio
import collections
import hmac
import ipaddress
import logging
import resource
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import psutil

from harness.errors import HarnessError
from harness.protocol import ROUTES, LabelLogitsRequest, PromptedLogitsRequest, ProtocolError
from harness.server import ModelServer
from harness.wire import MEDIA_TYPE, decode, encode, error_body

log = logging.getLogger("harness")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    batching: bool = True
    window_ms: float = 2.0  # how long the compute thread waits for more requests to share a forward
    max_batch_requests: int = 8  # requests answered in one group at most


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def merge_key(server: ModelServer, request) -> tuple | None:
    """Requests with equal keys can be answered in shared forwards; None: answered alone."""
    if isinstance(request, LabelLogitsRequest):
        return ("label", request.label_words)
    if isinstance(request, PromptedLogitsRequest) and not request.sequential:
        try:
            spec, _ = server._prompt(request.handle)
        except ProtocolError:
            return None  # answered alone, with its error
        return ("prompted", request.texts, request.label_words, spec.n_tokens, spec.slots, spec.mode, spec.placeholder_start)
    return None


class _Job:
    __slots__ = ("request", "future", "key")

    def __init__(self, request):
        self.request, self.future, self.key = request, Future(), False  # key: False until computed


class Batcher:
    """The compute thread: takes queued requests in order, groups those that can share forwards, answers them."""

    def __init__(self, server: ModelServer, config: ServeConfig):
        self.server, self.config = server, config
        self.queue: collections.deque[_Job] = collections.deque()
        self.cond = threading.Condition()
        self.arriving = 0  # requests accepted by the app and not yet queued (their bodies still being read)
        self.counts = {"requests": 0, "groups": 0, "merged_requests": 0, "server_seconds": 0.0}
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    def arrive(self, delta: int) -> None:
        with self.cond:
            self.arriving += delta
            self.cond.notify_all()

    def submit(self, request) -> Future:
        job = _Job(request)
        with self.cond:
            self.queue.append(job)
            self.arriving -= 1
            self.cond.notify_all()
        return job.future

    def _key(self, job: _Job):
        if job.key is False:
            job.key = merge_key(self.server, job.request)
        return job.key

    def _group(self) -> list[_Job]:
        with self.cond:
            while not self.queue:
                self.cond.wait()
            group = [self.queue.popleft()]
            key = self._key(group[0]) if self.config.batching else None
            if key is None:
                return group
            deadline = time.monotonic() + self.config.window_ms / 1000
            while len(group) < self.config.max_batch_requests:
                for job in [j for j in self.queue if self._key(j) == key][: self.config.max_batch_requests - len(group)]:
                    self.queue.remove(job)
                    group.append(job)
                left = deadline - time.monotonic()
                if len(group) >= self.config.max_batch_requests or self.arriving <= 0 or left <= 0:
                    return group
                self.cond.wait(left)
            return group

    def _run(self) -> None:
        while True:
            group = self._group()
            try:
                responses = self.server.handle_many([job.request for job in group])
            except Exception as exc:
                if len(group) == 1:
                    group[0].future.set_exception(exc)
                    self._count(group, [])
                    continue
                # one bad request must not fail the others it was grouped with: answer each alone
                for job in group:
                    try:
                        job.future.set_result(self.server.handle(job.request))
                    except Exception as alone:
                        job.future.set_exception(alone)
                self._count(group, [])
                continue
            for job, response in zip(group, responses):
                job.future.set_result(response)
            self._count(group, responses)

    def _count(self, group, responses) -> None:
        self.counts["requests"] += len(group)
        self.counts["groups"] += 1
        self.counts["merged_requests"] += len(group) if len(group) > 1 else 0
        self.counts["server_seconds"] += sum(getattr(r, "server_seconds", 0.0) for r in responses)


def create_app(server: ModelServer, config: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    server.batching = {"enabled": config.batching, "window_ms": config.window_ms, "max_batch_requests": config.max_batch_requests}
    batcher = Batcher(server, config)
    limits = server.limits
    info = asdict(server.info())
    state = {"in_flight": 0, "started": time.time()}
    app = FastAPI(title="bbt-harness model service", docs_url=None, redoc_url=None, openapi_url=None)
    key = config.api_key.encode() if config.api_key else None

    def error(status: int, code: str, message: str, headers: dict | None = None):
        return JSONResponse(error_body(code, message), status_code=status, headers=headers)

    def refused(request: Request):
        """None when the request may proceed, else the 401/403 answer."""
        if key is None:
            return None
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not given[7:].strip():
            return error(401, "missing_key", "this server needs an API key: 'Authorization: Bearer <key>'",
                         {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[7:].strip().encode(), key):
            return error(403, "wrong_key", "the API key is not this server's")
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):  # not reached by the frame routes; kept so no error leaves in another shape
        return error(422, "invalid_request", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown routes and methods: the same JSON error shape
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def get_info(request: Request):
        return refused(request) or info

    @app.get("/v1/stats")
    async def get_stats(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        process = psutil.Process()
        return {
            "rss_mb": process.memory_info().rss / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "uptime_s": time.time() - state["started"],
            "in_flight": state["in_flight"],
            **batcher.counts,
        }

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ProtocolError(f"the body has {declared} bytes; the limit is {limits.max_body_bytes}", 413, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ProtocolError(f"the body exceeds the limit of {limits.max_body_bytes} bytes", 413, "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def endpoint(cls):
        async def answer(request: Request):
            if (denied := refused(request)) is not None:
                return denied
            if state["in_flight"] >= limits.max_in_flight:
                return error(503, "busy", f"{state['in_flight']} requests in flight; the limit is {limits.max_in_flight}: retry later")
            state["in_flight"] += 1
            batcher.arrive(+1)
            queued = False
            try:
                media = request.headers.get("content-type", "").split(";")[0].strip()
                if media != MEDIA_TYPE:
                    raise ProtocolError(f"content type {media or 'none'!r}; this route takes {MEDIA_TYPE} (docs/serving.md)",
                                        415, "bad_media_type")
                query = decode(cls, await read_body(request))
                future = batcher.submit(query)
                queued = True
                response = await asyncio.wrap_future(future)
                return Response(encode(response), media_type=MEDIA_TYPE)
            except ProtocolError as exc:
                return error(exc.status, exc.code, str(exc))
            except HarnessError as exc:  # the scorer's own refusals (too many tokens, no mask in a text, ...)
                return error(422, "unprocessable", str(exc))
            except Exception as exc:  # a bug: say so, keep serving
                log.exception("answering %s failed", cls.__name__)
                return error(500, "internal", f"{type(exc).__name__}: {exc}")
            finally:
                state["in_flight"] -= 1
                if not queued:
                    batcher.arrive(-1)

        return answer

    for route, cls in ROUTES.items():
        app.post(route)(endpoint(cls))
    return app


def serve(server: ModelServer, config: ServeConfig) -> None:
    """Run until stopped (SIGINT / SIGTERM)."""
    import uvicorn

    if not is_loopback(config.host) and not config.api_key:
        raise HarnessError(f"binding to {config.host} (not a loopback address) needs an API key: pass --api-key-file")
    app = create_app(server, config)
    print(f"serving {server.info().name} ({server.family}) on http://{config.host}:{config.port}"
          f"{' (API key required)' if config.api_key else ''}; batching {'on' if config.batching else 'off'}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                limit_concurrency=server.limits.max_in_flight * 2)
