"""The protocol and its wire encoding, without a server: round trips, strict decoding, the one byte accounting."""

import json
import struct

import numpy as np
import pytest

from harness.prompting import ProjectionSpec, PromptSpec
from harness.protocol import (
    ConfigurePromptRequest, FeaturesRequest, FeaturesResponse, HiddenStdsRequest, LabelLogitsRequest, LogitsResponse,
    PromptedLogitsRequest, PromptHandle, ProtocolError, StdsResponse, paper_bytes,
)
from harness.service import ModelService
from harness.wire import decode, encode
from tests.conftest import tiny_backbone

SPEC = PromptSpec(4, 2, "add", "z", ProjectionSpec(8, 3, (0.5, 0.25)))


def _frame(fields: dict, arrays: list[tuple[str, str, list[int], bytes]]) -> bytes:
    header = {"fields": fields, "arrays": [{"name": n, "dtype": d, "shape": s} for n, d, s, _ in arrays]}
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + b"".join(b for *_, b in arrays)


@pytest.mark.parametrize("obj", [
    LabelLogitsRequest(("a é text", "b"), (" good", " bad")),
    PromptedLogitsRequest("p-1", ("t",), (" good",), np.arange(2 * 2 * 8, dtype=np.float32).reshape(2, 2, 8), True),
    FeaturesRequest(("x",), "tokens"),
    HiddenStdsRequest(("x", "y")),
    ConfigurePromptRequest(SPEC),
    LogitsResponse(np.ones((3, 2), np.float32), 0.25),
    FeaturesResponse(np.ones((2, 3, 4), np.float32), np.array([3, 1], np.int32), 0.5),
    FeaturesResponse(np.ones((2, 4), np.float32)),
    StdsResponse(np.array([0.1, 2.0], np.float32)),
    PromptHandle("p-abc", 0.0),
])
def test_every_protocol_object_survives_the_wire(obj):
    back = decode(type(obj), encode(obj))
    assert back == obj  # the scalar fields (arrays are compared below)
    for name, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            got = getattr(back, name)
            assert got.dtype == value.dtype and np.array_equal(got, value)


def test_an_array_travels_as_raw_little_endian_bytes_after_a_json_header():
    body = encode(LogitsResponse(np.array([[1.5, -2.0]], np.float32), 0.5))
    (size,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + size])
    assert header == {"fields": {"server_seconds": 0.5}, "arrays": [{"name": "logits", "dtype": "float32", "shape": [1, 2]}]}
    assert body[4 + size :] == np.array([1.5, -2.0], "<f4").tobytes()


@pytest.mark.parametrize("body, code, status", [
    (b"\x01", "bad_frame", 400),
    (struct.pack("<I", 99) + b"{}", "bad_frame", 400),
    (struct.pack("<I", 3) + b"{x}", "bad_frame", 400),
    (_frame({"texts": ["a"], "label_words": ["b"], "extra": 1}, []), "unknown_field", 422),
    (_frame({"texts": ["a"]}, []), "missing_field", 422),
    (_frame({"texts": "a", "label_words": ["b"]}, []), "bad_type", 422),
    (_frame({"texts": ["a"], "label_words": ["b"]}, []) + b"\x00", "bad_frame", 400),
])
def test_malformed_label_logits_frames_are_named(body, code, status):
    with pytest.raises(ProtocolError) as caught:
        decode(LabelLogitsRequest, body)
    assert (caught.value.code, caught.value.status) == (code, status)


def test_prompted_frames_are_checked_for_dtype_rank_and_finiteness():
    fields = {"handle": "p", "texts": ["a"], "label_words": ["b"]}
    ok = np.zeros((1, 1, 2), "<f4")
    assert decode(PromptedLogitsRequest, _frame(fields, [("sent", "float32", [1, 1, 2], ok.tobytes())])).sent.shape == (1, 1, 2)
    cases = [
        ([("sent", "float64", [1, 1, 2], np.zeros(2).tobytes())], "bad_dtype"),
        ([("sent", "int32", [1, 1, 2], np.zeros(2, "<i4").tobytes())], "bad_dtype"),
        ([("sent", "float32", [1, 1, 1, 1, 2], ok.tobytes())], "bad_shape"),
        ([("sent", "float32", [1, 1, 2], np.array([0, np.nan], "<f4").tobytes())], "non_finite"),
        ([("sent", "float32", [1, 1, 2], np.array([np.inf, 0], "<f4").tobytes())], "non_finite"),
        ([("sent", "float32", [1, 1, 3], ok.tobytes())], "bad_frame"),  # shorter than its shape says
    ]
    for arrays, code in cases:
        with pytest.raises(ProtocolError) as caught:
            decode(PromptedLogitsRequest, _frame(fields, arrays))
        assert caught.value.code == code, arrays


def test_prompt_specs_are_read_strictly():
    good = json.loads(json.dumps({"spec": {**vars(SPEC), "projection": vars(SPEC.projection)}}))
    assert decode(ConfigurePromptRequest, _frame(good, [])).spec == SPEC
    for spec, code in [
        ({**good["spec"], "colour": "red"}, "unknown_field"),
        ({**good["spec"], "n_tokens": "4"}, "bad_type"),
        ({**good["spec"], "mode": "multiply"}, "invalid_prompt"),
        ({**good["spec"], "projection": {**good["spec"]["projection"], "stds": [0.5]}}, "invalid_prompt"),
    ]:
        with pytest.raises(ProtocolError) as caught:
            decode(ConfigurePromptRequest, _frame({"spec": spec}, []))
        assert caught.value.code == code


def test_the_papers_accounting_is_one_function_of_request_and_response():
    texts, words = ("ab", "é"), (" x",)
    assert paper_bytes(LabelLogitsRequest(texts, words), LogitsResponse(np.zeros((2, 1), np.float32))) == [(2 + 2 + 2, 8)]
    sent = np.zeros((3, 2, 8), np.float32)
    per = paper_bytes(PromptedLogitsRequest("p", texts, words, sent), LogitsResponse(np.zeros((3, 2, 1), np.float32)))
    assert per == [(6 + 2 * 8 * 4, 8)] * 3  # three queries, each one candidate's z
    tokens = FeaturesResponse(np.zeros((2, 5, 4), np.float32), np.zeros(2, np.int32))
    assert paper_bytes(FeaturesRequest(texts, "tokens"), tokens) == [(4, 2 * 5 * 4 * 4 + 2 * 4)]
    assert paper_bytes(ConfigurePromptRequest(SPEC), PromptHandle("p")) == [(SPEC.wire_bytes(), 0)]


def test_the_method_side_offers_no_path_to_the_weights():
    """What a method can reach on a service: the documented facts and the queries, nothing that holds the model."""
    service = ModelService(tiny_backbone("gpt2"))
    public = {name for name in dir(service) if not name.startswith("_")}
    assert public == {
        "backbone_name", "configure_prompt", "description", "family", "features", "hidden_size", "hidden_stds", "info",
        "label_logits", "mask", "meter", "num_layers", "phase", "prompted_label_logits", "transport",
    }
    import torch

    for name in public:
        value = getattr(service, name)
        assert not isinstance(value, torch.nn.Module) and "tokenizer" not in type(value).__name__.lower(), name


def test_a_dropped_prompt_is_configured_again_and_answers_the_same():
    """Two clients of one server that keeps one prompt: each query of one drops the other's prompt, which its
    client declares again (metered as setup) before resending; the answers do not change."""
    from harness.protocol import Limits
    from harness.server import ModelServer

    server = ModelServer(tiny_backbone("gpt2"), limits=Limits(max_prompts=1))
    a, b = ModelService(server), ModelService(server)
    a.configure_prompt(PromptSpec(3, 1, "add", "z", ProjectionSpec(8, 1, (0.5,))))
    z = np.random.RandomState(0).randn(2, 1, 8).astype(np.float32)
    texts, words = ["the movie was good .", "bad film ."], [" good", " bad"]
    first = a.prompted_label_logits(texts, words, z)
    b.configure_prompt(PromptSpec(3, 1, "add", "z", ProjectionSpec(8, 2, (0.5,))))  # drops a's
    np.testing.assert_array_equal(a.prompted_label_logits(texts, words, z), first)
    assert a.meter.summary()["setup"]["queries"] == 1
    assert a.meter.summary()["train"]["queries"] == 1 + 2 + 2  # the first configure, then two prompted requests of 2
    with pytest.raises(ProtocolError, match="too large") as caught:
        ModelServer(tiny_backbone("gpt2"), limits=Limits(max_projection_values=100)).handle(
            ConfigurePromptRequest(PromptSpec(3, 1, "add", "z", ProjectionSpec(8, 1, (0.5,)))))
    assert caught.value.status == 413


def test_bench_serve_figures_and_their_page():
    from harness.serve_bench import per_call_s, render, throughput

    def fit(start, end, calls=60, setup=1.0, fit_s=7.0):
        return {"calls": calls, "fit_s": fit_s, "setup_s": setup, "started": start, "ended": end, "rss_peak_mb": 400.0,
                "device": "cpu:x86_64 x2", "queries": {"train": {
                    "upload_per_query_bytes": 4359.0, "download_per_query_bytes": 256.0, "wire_up_per_query_bytes": 2100.0,
                    "wire_down_per_query_bytes": 262.0, "latency_per_query_s": 0.05, "server_per_query_s": 0.04}}}

    local = {**fit(0, 4, fit_s=4.0), "rss_peak_mb": 1500.0}
    http = fit(0, 7)
    assert per_call_s(http) == pytest.approx(0.1) and per_call_s(local) == pytest.approx(0.05)
    batched, unbatched = [fit(10, 20), fit(11, 22)], [fit(10, 40), fit(12, 41)]
    assert throughput(batched) == pytest.approx(120 / 12) and throughput(unbatched) == pytest.approx(120 / 31)
    stats = {"peak_rss_mb": 1300.0, "requests": 20, "groups": 12, "merged_requests": 16}
    page = render({"http": http, "in_process": local, "batched": batched, "unbatched": unbatched,
                   "server_stats_batched": stats, "backbone": "gemma3-270m", "random": False, "task": "sst2",
                   "calls": 60, "clients": 2, "dtype": "float32"}, "harness bench-serve")
    assert "**2.000×**" in page and "cpu:x86_64 x2" in page and "| on | 10.00 |" in page and "| off | 3.87 |" in page
    assert "| the papers' accounting | 4359 B | 256 B |" in page and "2.58× the throughput" in page
