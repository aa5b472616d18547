"""`harness bench-serve`: what serving over HTTP costs a BBT client, measured in separate processes.

It starts `harness serve` on 127.0.0.1 and runs BBT fits of `--calls` API calls, each in a process of its own:
- one over HTTP and one in process (the model loaded in the client): seconds per call for each, and their ratio
  (the transport's overhead on loopback);
- the HTTP client's bytes per query on the wire (request and response bodies) beside the papers' accounting,
  its latency per query beside the server's compute time, and its peak resident memory (no model in it: the
  user side, measured) beside the server's and the in-process client's;
- `--clients` BBT clients at once against one server, with batching on and then off (a server restarted with
  --no-batching): calls per second over all clients. The clients tune on the same split (seed --seed) with
  different CMA-ES and projection seeds, the case batching merges: shared texts and label words.
It prints the figures side by side and writes them, with the device and the command, to --out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError


STARTUP_S = 20.0  # seconds for concurrent client processes to import torch and connect before they start together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, timeout_s: float = 900.0, env: dict | None = None) -> subprocess.Popen:
    """`harness serve` on 127.0.0.1:port with `args`, returned once /v1/health answers."""
    import httpx

    command = [sys.executable, "-m", "harness.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    # its log goes to a file, not a pipe nobody reads (a full pipe would stall the server)
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env or os.environ.copy())
    process.log = log
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise HarnessError(f"the server exited ({process.returncode}): {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1.0).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise HarnessError(f"the server did not answer within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if getattr(process, "log", None):
        process.log.close()


# --- a client process: one BBT fit, its figures as JSON on stdout -------------------------------------------------


def client_main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--url")
    p.add_argument("--api-key-file")
    p.add_argument("--backbone")
    p.add_argument("--random", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", default="sst2")
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir")
    p.add_argument("--start-at", type=float, default=0.0)
    args = p.parse_args(argv)
    print(json.dumps(bbt_client(args)))


def bbt_client(args) -> dict:
    from harness.data import load_task_data, make_split
    from harness.meters import measure
    from harness.prompts import PromptFormat
    from harness.tasks import get_card
    from methods import get_method
    from methods.base import RunContext

    card = get_card(args.task)
    split = make_split(card, load_task_data(card, args.data_dir), 16, args.split_seed, None)
    if args.url:
        from harness.client import RemoteService, read_key

        service = RemoteService(args.url, read_key(args.api_key_file))
    else:
        service = _in_process(args)
    cls = get_method("bbt")
    # one dev check (at the end) and the whole budget in training calls, for both transports alike
    config = cls.config_class(budget=args.calls, eval_every=10**9)
    method = cls(config, RunContext(card, PromptFormat(card, service.family, service.mask), args.seed, service=service))
    time.sleep(max(0.0, args.start_at - time.time()))
    with measure() as meters:
        started = time.time()
        method.fit(split.train, split.dev)
        ended = time.time()
    summary = service.meter.summary()
    out = {
        "transport": service.transport, "calls": method.calls, "fit_s": meters["wall_s"], "setup_s": method.setup_s,
        "started": started, "ended": ended, "rss_peak_mb": meters["cpu_rss_peak_mb"], "queries": summary,
        "device": meters["device"],
    }
    if args.url:
        out["server"] = service.stats()
    return out


def _in_process(args):
    from harness.backbones import DTYPES, load_backbone
    from harness.bench import random_backbone
    from harness.service import ModelService

    if args.random:
        return ModelService(random_backbone(args.backbone, args.device, DTYPES[args.dtype]))
    return ModelService(load_backbone(args.backbone, device=args.device, dtype=args.dtype))


def _client_command(options: list[str]) -> list[str]:
    return [sys.executable, "-m", "harness.serve_bench", *options]


def run_clients(commands: list[list[str]], timeout_s: float = 3600.0) -> list[dict]:
    """Client processes started together; their JSON results."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout_s)
        if process.returncode != 0:
            raise HarnessError(f"a bench client failed ({process.returncode}): {err.decode()[-2000:]}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def per_call_s(result: dict) -> float:
    """Seconds per API call of a fit: its time after the one-off setup, over its calls (the final dev check,
    one query, is inside both transports' figures alike)."""
    return (result["fit_s"] - result["setup_s"]) / result["calls"]


def throughput(results: list[dict]) -> float:
    """Calls per second over concurrent clients: all their calls over the span from the first start to the last end."""
    return sum(r["calls"] for r in results) / (max(r["ended"] for r in results) - min(r["started"] for r in results))


def bench_serve(backbone: str, random: bool, task: str, calls: int, clients: int, dtype: str, device: str, seed: int,
                data_dir: str | None) -> dict:
    if calls % 20:
        raise HarnessError("--calls must be a multiple of the popsize (20)")
    common = ["--task", task, "--calls", str(calls), "--split-seed", str(seed), "--dtype", dtype, "--device", device]
    common += ["--data-dir", data_dir] if data_dir else []
    serve_args = ["--backbone", backbone, "--dtype", dtype, "--device", device] + (["--random"] if random else [])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    figures: dict = {"load_before": os.getloadavg()[0]}
    server = start_server(serve_args, port)
    try:
        # one client at a time first: the per-call comparison, bytes and memory
        (http,) = run_clients([_client_command(["--url", url, "--seed", str(seed), *common])])
        seeds = [seed + i for i in range(clients)]
        start = time.time() + STARTUP_S  # the clients fit together, once all have imported and connected
        figures["batched"] = run_clients([
            _client_command(["--url", url, "--seed", str(s), "--start-at", str(start), *common]) for s in seeds
        ])
        import httpx

        figures["server_stats_batched"] = httpx.get(f"{url}/v1/stats").json()
    finally:
        stop_server(server)
    local = ["--backbone", backbone, *(["--random"] if random else [])]
    (inproc,) = run_clients([_client_command([*local, "--seed", str(seed), *common])])
    server = start_server([*serve_args, "--no-batching"], port)
    try:
        start = time.time() + STARTUP_S
        figures["unbatched"] = run_clients([
            _client_command(["--url", url, "--seed", str(s), "--start-at", str(start), *common]) for s in seeds
        ])
    finally:
        stop_server(server)
    figures.update(load_after=os.getloadavg()[0], cores=os.cpu_count(), http=http, in_process=inproc, backbone=backbone, random=random, task=task, calls=calls,
                   clients=clients, dtype=dtype)
    return figures


def render(f: dict, command: str) -> str:
    http, local = f["http"], f["in_process"]
    train = http["queries"]["train"]
    ratio = per_call_s(http) / per_call_s(local)
    on, off = throughput(f["batched"]), throughput(f["unbatched"])
    stats = f["server_stats_batched"]
    name = f"random-weight {f['backbone']}" if f["random"] else f["backbone"]
    lines = [
        "# Serving: BBT over HTTP against in process",
        "",
        f"Generated by `{command}`; device: **{http['device']}** (server and clients on the same machine, loopback).",
        "",
        f"- backbone {name}, {f['dtype']}; task {f['task']}; BBT with {f['calls']} API calls per fit (popsize 20, "
        "one dev check at the end), every fit in a process of its own",
        *([f"- load average {f['load_before']:.1f} before and {f['load_after']:.1f} after, on {f['cores']} cores: "
           "other jobs shared the machine, so read the times as this moment's, the ratios as the robust part"]
          if "load_before" in f else []),
        "",
        "## One client",
        "",
        "| | in process | over HTTP (loopback) |",
        "|---|---|---|",
        f"| seconds per API call | {per_call_s(local):.4f} | {per_call_s(http):.4f} (**{ratio:.3f}×**) |",
        f"| peak resident memory of the client process | {local['rss_peak_mb']:.0f} MB (model inside) | "
        f"{http['rss_peak_mb']:.0f} MB (no model: the user side, measured) |",
        f"| peak resident memory of the server process | – | {stats['peak_rss_mb']:.0f} MB |",
        "",
        "Per training query over HTTP (one query = one candidate scored on the train set; a request carries a "
        "generation of 20):",
        "",
        "| | upload | download |",
        "|---|---|---|",
        f"| the papers' accounting | {train['upload_per_query_bytes']:.0f} B | {train['download_per_query_bytes']:.0f} B |",
        f"| on the wire (request / response bodies) | {train['wire_up_per_query_bytes']:.0f} B | "
        f"{train['wire_down_per_query_bytes']:.0f} B |",
        "",
        f"Latency per query seen by the client: {1000 * train['latency_per_query_s']:.2f} ms, of which the server computed "
        f"{1000 * train['server_per_query_s']:.2f} ms (the rest: encoding, HTTP, loopback, decoding: "
        f"{1000 * (train['latency_per_query_s'] - train['server_per_query_s']):.2f} ms).",
        "",
        f"## {f['clients']} clients at once against one server",
        "",
        "Same split, different CMA-ES and projection seeds (batching merges requests with the same texts and label "
        "words; each keeps its own projection).",
        "",
        "| batching | calls per second, all clients | seconds per call, mean over clients |",
        "|---|---|---|",
        f"| on | {on:.2f} | {sum(map(per_call_s, f['batched'])) / len(f['batched']):.3f} |",
        f"| off | {off:.2f} | {sum(map(per_call_s, f['unbatched'])) / len(f['unbatched']):.3f} |",
        "",
        f"Batching on: {on / off:.2f}× the throughput; the server answered {stats['requests']} requests in "
        f"{stats['groups']} groups ({stats['merged_requests']} requests shared a forward with another). One client "
        f"alone: {1 / per_call_s(http):.2f} calls per second.",
    ]
    return "\n".join(lines) + "\n"


def bench_serve_command(args) -> str:
    from harness.backbones import default_device, resolve_dtype

    device = args.device or default_device()
    figures = bench_serve(args.backbone, args.random, args.task, args.calls, args.clients,
                          resolve_dtype(args.dtype, device), device, args.seed, args.data_dir)
    text = render(figures, "harness " + " ".join(args.argv))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(figures, indent=1))
    return text


if __name__ == "__main__":
    client_main(sys.argv[1:])
