"""The HTTP transport: a method's queries sent to `harness serve` (harness/serve.py) with httpx.

Each query is one POST of a frame (harness/wire.py); the client meters, beside the papers' accounting, what it
measures itself: the request and response body bytes, and the seconds from sending to holding the decoded answer
(against the server's own compute seconds, which the response carries). A server that stops answering makes the
query raise ServiceUnavailable, a HarnessError: the grid stops with that message, and BBT/BBTv2 resume from their
last checkpoint when run again. A request the server refuses (4xx) raises a ProtocolError with its message.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness.errors import HarnessError
from harness.protocol import RESPONSES, ProtocolError, ServiceInfo
from harness.service import ServiceClient
from harness.wire import MEDIA_TYPE, decode, encode


class ServiceUnavailable(HarnessError):
    pass


def read_key(path: str | Path | None) -> str | None:
    """An API key from a file (its first line); None for no file."""
    if path is None:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise HarnessError(f"cannot read the API key file {path}: {exc.strerror}") from None
    if not key:
        raise HarnessError(f"the API key file {path} is empty")
    return key


def _httpx():
    try:
        import httpx
    except ImportError:
        raise HarnessError("the HTTP client needs httpx: pip install 'bbt-harness[serve]'") from None
    return httpx


class RemoteService(ServiceClient):
    transport = "http"

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        httpx = _httpx()
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fails fast (a dead server); a read may wait behind other clients' forwards
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))
        super().__init__(ServiceInfo(**self._get("/v1/info")))

    def _unavailable(self, exc) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the model service at {self.url} stopped answering ({type(exc).__name__}: {exc}); start it again and "
            "rerun: finished runs are kept, and BBT/BBTv2 resume from their last checkpoint"
        )

    def _refused(self, response) -> ProtocolError:
        try:
            error = response.json()["error"]
            code, message = error["code"], error["message"]
        except Exception:
            code, message = "http_error", response.text[:200]
        return ProtocolError(f"the model service refused the request ({response.status_code} {code}): {message}",
                             response.status_code, code)

    def _get(self, path: str) -> dict:
        httpx = _httpx()
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        if response.status_code != 200:
            raise self._refused(response)
        return response.json()

    def stats(self) -> dict:
        """The server's own figures (its memory, requests answered); see serve.py's /v1/stats."""
        return self._get("/v1/stats")

    def _send(self, request):
        httpx = _httpx()
        body = encode(request)
        start = time.perf_counter()
        try:
            response = self._http.post(request.route, content=body, headers={"Content-Type": MEDIA_TYPE})
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        if response.status_code != 200:
            raise self._refused(response)
        # a bytearray, so the arrays are writable (the methods own them, as in process)
        answer = decode(RESPONSES[type(request)], bytearray(response.content), finite=False)
        self.meter.add_wire(len(body), len(response.content), time.perf_counter() - start)
        return answer

    def description(self) -> dict:
        return {**super().description(), "url": self.url}

    def close(self) -> None:
        self._http.close()
