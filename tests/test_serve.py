"""`harness serve` in a subprocess on 127.0.0.1 with a tiny random backbone: black-box methods over HTTP equal
in process, every malformed request gets a 4xx JSON error and the server keeps serving, keys, concurrent clients,
and a server killed in the middle of a BBT run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from harness.client import RemoteService, ServiceUnavailable
from harness.data import load_task_data, make_split
from harness.errors import HarnessError
from harness.prompting import ProjectionSpec, PromptSpec
from harness.prompts import PromptFormat
from harness.protocol import LabelLogitsRequest, PromptedLogitsRequest, ProtocolError
from harness.serve_bench import free_port, start_server, stop_server
from harness.service import ModelService
from harness.store import read_records
from harness.tasks import get_card
from harness.wire import MEDIA_TYPE, encode
from methods import get_method
from methods.base import RunContext
from tests.conftest import tiny_backbone

KEY = "test-key-0123456789abcdef"
# a server answers in seconds on an idle machine; on this shared 2-core one, niced under other jobs, importing
# torch and transformers alone has taken minutes: the limit bounds a hung start, not a slow one
STARTUP_S = 600
WORDS = [" good", " bad"]


def _env() -> dict:
    # the server sums float32 products in the same order as this process: same thread count
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@contextlib.contextmanager
def served(*args: str, port: int | None = None):
    port = port or free_port()
    process = start_server(["--random", "--backbone", "tiny-gpt2", "--dtype", "float32", "--device", "cpu", *args],
                           port, timeout_s=STARTUP_S, env=_env())
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    with served("--api-key-file", str(key_file), "--max-texts", "64", "--max-chars", "2000") as (url, _):
        yield url


def _post(url: str, request, key: str | None = KEY, body: bytes | None = None, media: str = MEDIA_TYPE) -> httpx.Response:
    headers = {"Content-Type": media, **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(url + request.route, content=encode(request) if body is None else body, headers=headers, timeout=STARTUP_S)


def _split(task="sst2", eval_cap=24):
    card = get_card(task)
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / task / "train.jsonl").exists():
        pytest.skip("no task data")
    return card, make_split(card, load_task_data(card, str(SHARED_DATA)), 16, 42, eval_cap)


# --- black-box methods over HTTP equal in process


CONFIGS = {
    "manual": {},
    "icl": {"max_demo_chars": 400},
    "feature-mlp": {"epochs": 4, "hidden_size": 16},
    "feature-bilstm": {"epochs": 2, "hidden_size": 8},
    "bbt": {"budget": 40, "popsize": 10, "intrinsic_dim": 20, "n_tokens": 4, "eval_every": 20},
    "bbtv2": {"budget": 40, "popsize": 10, "intrinsic_dim": 20, "n_tokens": 4, "eval_every": 20},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_black_box_methods_over_http_predict_as_in_process(name, server):
    card, split = _split()

    def run(service):
        cls = get_method(name)
        method = cls(cls.config_class(**CONFIGS[name]), RunContext(card, PromptFormat(card, service.family, service.mask), 42, service=service))
        method.fit(split.train, split.dev)
        with service.phase("eval"):
            return method.predict(split.eval), method.trace(), service.meter.summary()

    local = run(ModelService(tiny_backbone("gpt2")))
    remote = run(RemoteService(server, KEY))
    np.testing.assert_array_equal(remote[0], local[0])
    assert remote[1] == local[1]  # BBT's whole search (losses, dev checks) is the same
    for phase, counts in local[2].items():  # the papers' accounting is the same; the wire's is measured besides
        assert {k: v for k, v in remote[2][phase].items() if k in counts and k != "seconds"} == {
            k: v for k, v in counts.items() if k != "seconds"}
        assert remote[2][phase]["requests"] >= 1 and remote[2][phase]["wire_up_bytes"] > 0
        assert remote[2][phase]["latency_s"] >= remote[2][phase]["seconds"] > 0


def test_harness_run_over_http_records_the_service_and_refuses_gradient_methods(server, tmp_path, shared_data):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    common = ["--service-url", server, "--api-key-file", str(key_file), "--datasets", "sst2", "--eval-cap", "16",
              "--data-dir", str(shared_data), "--results-dir", str(tmp_path / "results"), "--profile", "quick"]
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--methods", "manual", *common],
                          capture_output=True, text=True, timeout=2 * STARTUP_S, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = read_records(tmp_path / "results" / "results.jsonl")
    assert record.backbone == "tiny-gpt2" and record.spec.backbone_id  # the server's identity names the weights
    assert record.service["transport"] == "http"
    assert record.service["url"] == server and record.backbone_identity["name"] == "tiny-gpt2"
    assert record.meters["client_rss_peak_mb"] > 0 and record.meters["server_peak_rss_mb"] > 0
    assert record.queries["eval"]["wire_down_per_query_bytes"] > 0
    report = (tmp_path / "results" / "results.md").read_text()
    assert "wire up↑ down↓ per query" in report and "client RSS (server RSS)" in report
    refused = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--methods", "lora", *common],
                             capture_output=True, text=True, timeout=STARTUP_S, env=_env())
    assert refused.returncode == 2 and "method 'lora' is gradient-based" in refused.stderr


# --- bad input: a clear 4xx, and the next valid request is answered


def _spec(handle_dim=8):
    return PromptSpec(3, 1, "add", "z", ProjectionSpec(handle_dim, 0, (0.5,)))


def test_every_malformed_request_gets_a_4xx_and_the_server_keeps_serving(server):
    client = RemoteService(server, KEY)
    client.configure_prompt(_spec())
    handle = client._handle
    texts = ("the movie was good .", "bad film .")
    good = client.label_logits(list(texts), WORDS)
    z = np.zeros((2, 1, 8), np.float32)
    header = lambda fields, arrays=(): json.dumps({"fields": fields, "arrays": list(arrays)}).encode()  # noqa: E731
    frame = lambda fields, arrays=(), data=b"": len(header(fields, arrays)).to_bytes(4, "little") + header(fields, arrays) + data  # noqa: E731
    sent_spec = lambda dtype, shape: {"name": "sent", "dtype": dtype, "shape": shape}  # noqa: E731
    fields = {"handle": handle, "texts": list(texts), "label_words": WORDS}
    cases = {
        "wrong shape": (PromptedLogitsRequest(handle, texts, tuple(WORDS), np.zeros((2, 1, 9), np.float32)), None, 422, "bad_shape"),
        "NaN": (PromptedLogitsRequest(handle, texts, tuple(WORDS), np.full((2, 1, 8), np.nan, np.float32)), None, 422, "non_finite"),
        "inf": (PromptedLogitsRequest(handle, texts, tuple(WORDS), np.full((2, 1, 8), np.inf, np.float32)), None, 422, "non_finite"),
        "wrong dtype": (PromptedLogitsRequest, frame(fields, [sent_spec("float64", [2, 1, 8])], np.zeros(16).tobytes()), 422, "bad_dtype"),
        "int array": (PromptedLogitsRequest, frame(fields, [sent_spec("int32", [2, 1, 8])], np.zeros(16, np.int32).tobytes()), 422, "bad_dtype"),
        "too many texts": (LabelLogitsRequest(("a",) * 65, tuple(WORDS)), None, 413, "too_many_texts"),
        "text too long": (LabelLogitsRequest(("a" * 2001,), tuple(WORDS)), None, 413, "text_too_long"),
        "unknown field": (LabelLogitsRequest, frame({"texts": ["a"], "label_words": WORDS, "temperature": 0.5}), 422, "unknown_field"),
        "empty texts": (LabelLogitsRequest((), tuple(WORDS)), None, 422, "empty"),
        "empty label words": (LabelLogitsRequest(texts, ()), None, 422, "empty"),
        "no candidates": (PromptedLogitsRequest(handle, texts, tuple(WORDS), np.zeros((0, 1, 8), np.float32)), None, 422, "bad_candidates"),
        "unknown handle": (PromptedLogitsRequest("p-nope", texts, tuple(WORDS), z), None, 404, "unknown_prompt"),
        "label words sharing a token": (LabelLogitsRequest(texts, (" good", " good")), None, 422, "bad_label_words"),
        "label word of no token": (LabelLogitsRequest(texts, (" good", "")), None, 422, "bad_label_words"),
        "not a frame": (LabelLogitsRequest, b"{\"texts\": []}", 400, "bad_frame"),
        "JSON body": (LabelLogitsRequest, None, 415, "bad_media_type"),
    }
    for name, (request, body, status, code) in cases.items():
        if isinstance(request, type):
            request_obj = request
            body = body if body is not None else b"{}"
            media = "application/json" if name == "JSON body" else MEDIA_TYPE
            response = httpx.post(server + request_obj.route, content=body, timeout=STARTUP_S,
                                  headers={"Content-Type": media, "Authorization": f"Bearer {KEY}"})
        else:
            response = _post(server, request)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (name, response.text)
        assert response.json()["error"]["message"], name
        np.testing.assert_array_equal(client.label_logits(list(texts), WORDS), good)  # still serving, same answer
    unknown = httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_route"
    with pytest.raises(ProtocolError, match="cannot be scored"):  # the client raises the server's message
        client.label_logits(list(texts), [" good", " good"])


def test_keys_are_required_and_compared(server):
    request = LabelLogitsRequest(("a",), tuple(WORDS))
    assert _post(server, request, key=None).status_code == 401
    assert _post(server, request, key=KEY[:-1] + "x").status_code == 403
    assert _post(server, request).status_code == 200
    assert httpx.get(server + "/v1/info").status_code == 401
    assert httpx.get(server + "/v1/health").json() == {"status": "ok"}  # liveness needs no key and says nothing else
    with pytest.raises(ProtocolError, match="403"):
        RemoteService(server, "wrong")


def test_binding_beyond_loopback_needs_a_key():
    done = subprocess.run([sys.executable, "-m", "harness.cli", "serve", "--host", "0.0.0.0", "--random", "--backbone", "tiny-gpt2"],
                          capture_output=True, text=True, timeout=STARTUP_S)
    assert done.returncode == 2 and "needs an API key" in done.stderr


def test_info_names_the_backbone_and_limits(server):
    info = httpx.get(server + "/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["name"] == "tiny-gpt2" and info["family"] == "clm" and info["hidden_size"] == 32
    assert info["limits"]["max_texts"] == 64 and info["batching"]["enabled"] is True and info["protocol"] == "bbt-harness/1"


# --- concurrent clients


def test_concurrent_clients_are_all_answered_as_alone(server):
    """8 clients for at most 6 s (and at most 40 requests each): prompted requests on shared texts (which the
    server may batch across clients) and plain ones; every answer equals what a sequential in-process service gives."""
    card, split = _split()
    texts = PromptFormat(card, "clm", "").render_all(split.train)[:12]
    local = ModelService(tiny_backbone("gpt2"))
    specs = [PromptSpec(4, 1, "add", "z", ProjectionSpec(16, seed, (0.3,))) for seed in range(8)]
    zs = [np.random.RandomState(seed).randn(3, 4, 1, 16).astype(np.float32) for seed in range(8)]
    expected = []
    for spec, z in zip(specs, zs):
        local.configure_prompt(spec)
        expected.append([local.prompted_label_logits(texts, WORDS, zi) for zi in z])
    plain = local.label_logits(texts[:8], WORDS)
    sent, answered, mismatched, errors = [0] * 8, [0] * 8, [], []
    deadline = time.monotonic() + 6.0

    def client(i):
        try:
            service = RemoteService(server, KEY)
            service.configure_prompt(specs[i])
            for n in range(40):
                if time.monotonic() > deadline:
                    break
                sent[i] += 1
                if n % 3 == 2:
                    got, want = service.label_logits(texts[:8], WORDS), plain
                else:
                    got, want = service.prompted_label_logits(texts, WORDS, zs[i][n % 3]), expected[i][n % 3]
                answered[i] += 1
                if not np.allclose(got, want, rtol=1e-4, atol=1e-5) or not (got.argmax(-1) == want.argmax(-1)).all():
                    mismatched.append((i, n))
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STARTUP_S)
    assert not errors and not mismatched
    assert sent == answered and min(answered) >= 1
    stats = httpx.get(server + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["merged_requests"] > 0  # some requests did share a forward
    assert stats["in_flight"] == 0  # nothing left hanging


# --- a server that dies in the middle of a run


def test_a_bbt_run_survives_a_server_killed_mid_run(tmp_path, shared_data):
    from harness import runner
    from harness.profiles import Profile
    from harness.runner import Remote
    from harness.store import ResultsStore
    from harness.tasks import load_cards

    # a checkpoint every 2 generations; the kill comes at the first, 18 generations before the end
    profile = Profile("tiny", "test", (42,), eval_cap=16, method_overrides={
        "bbt": {"budget": 200, "popsize": 10, "intrinsic_dim": 20, "n_tokens": 4, "eval_every": 20}})
    specs = runner.expand(["bbt"], ["sst2"], [42], "tiny-gpt2", profile)
    store = ResultsStore(tmp_path)
    checkpoint = store.checkpoint_path(specs[0].run_id)
    port = free_port()
    failure = []
    with served(port=port) as (url, process):
        remote = Remote(url)

        def attempt():
            try:
                runner.run_grid(specs, load_cards(), profile, store, str(shared_data), remote=remote)
            except HarnessError as exc:
                failure.append(exc)

        thread = threading.Thread(target=attempt)
        thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not checkpoint.exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpoint.exists(), "the run made no checkpoint"
        process.kill()  # no shutdown: the connection just drops
        thread.join(timeout=STARTUP_S)
    assert failure and isinstance(failure[0], ServiceUnavailable) and "stopped answering" in str(failure[0])
    assert not store.finished_ids()
    with served(port=port) as (url, _):
        summary = runner.run_grid(specs, load_cards(), profile, store, str(shared_data), remote=Remote(url))
    assert not summary.failed and summary.ran
    (record,) = store.records()
    assert record.meters["resumed_at_calls"] and 20 <= record.meters["resumed_at_calls"][0] < 200
    assert record.trace["calls"] == 200 and not checkpoint.exists()
