"""`harness run | report | list`."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from harness.backbones import DEFAULT_BACKBONE, DTYPES, REGISTRY, get_spec, resolve_dtype
from harness.check import DEFAULT_CONFIG, run_checks, write_json
from harness.compiled import MODES as COMPILE_MODES
from harness.errors import HarnessError, unknown_name
from harness.profiles import PROFILES, default_profile, get_profile
from harness.report import write_report
from harness.runner import expand, needs_weights, run_grid
from harness.store import ResultsStore, published
from harness.tasks import load_cards
from methods import registry

log = logging.getLogger("harness")
DEFAULT_RESULTS = "results"


def _names(value: str, valid, kind: str) -> list[str]:
    names = list(valid) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in valid:
            raise unknown_name(kind, name, valid)
    return names


def _seeds(value: str | None, profile) -> list[int]:
    if value is None:
        return list(profile.seeds)
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise HarnessError(f"--seeds takes integers separated by commas, not '{value}'") from None


def report_path(args) -> Path:
    if args.report:
        return Path(args.report)
    if Path(args.results_dir) == Path(DEFAULT_RESULTS):
        return Path("reports/results.md")
    return Path(args.results_dir) / "results.md"


def cmd_run(args) -> int:
    profile = get_profile(args.profile or default_profile())
    if args.eval_cap is not None:
        profile = replace(profile, eval_cap=args.eval_cap or None)
    cards = load_cards(args.tasks_dir)
    methods = _names(args.methods, registry(), "method")
    tasks = _names(args.datasets, cards, "task")
    seeds = _seeds(args.seeds, profile)
    remote = None
    if args.service_url:
        for method in methods:  # refused before any connection is tried
            if not registry()[method].as_a_service:
                raise HarnessError(needs_weights(method))
        remote, backbone, dtype = _remote(args)
    else:
        backbone = args.backbone or DEFAULT_BACKBONE
        get_spec(backbone)
        dtype = resolve_dtype(args.dtype)
    log.info("profile %s: %s", profile.name, profile.description)
    log.info("backbone %s (%s); methods %s; tasks %s; seeds %s", backbone, dtype, methods, tasks, seeds)
    store = ResultsStore(args.results_dir)
    specs = expand(methods, tasks, seeds, backbone, profile, dtype)
    options = {"bucketing": args.bucketing, "layer_reuse": args.layer_reuse, "compile": args.compile}
    summary = run_grid(specs, cards, profile, store, args.data_dir, options, remote)
    path = report_path(args)
    write_report(published(path, store), path)
    for line in summary.lines():
        log.info("%s", line)
    log.info("results: %s; report: %s", store.path, path)
    return 1 if summary.failed else 0


def _remote(args):
    """The server named by --service-url: its backbone and dtype (from /v1/info) stand in for --backbone and
    --dtype, which may only repeat them; the server's own options replace this side's service switches."""
    from harness.client import read_key
    from harness.runner import Remote

    remote = Remote(args.service_url, read_key(args.api_key_file))
    service = remote.connect()
    info = service.info
    service.close()
    if args.backbone and args.backbone != info.name:
        raise HarnessError(f"--backbone {args.backbone}, but the server at {args.service_url} serves {info.name}")
    if args.dtype != "auto" and args.dtype != info.dtype:
        raise HarnessError(f"--dtype {args.dtype}, but the server at {args.service_url} computes in {info.dtype}")
    if args.compile or not args.bucketing or not args.layer_reuse:
        raise HarnessError("--compile, --no-bucketing and --no-layer-reuse are the server's options: give them to `harness serve`")
    log.info("model service %s: %s (%s, %s) on %s", args.service_url, info.name, info.family, info.dtype, info.device)
    return remote, info.name, info.dtype


def cmd_serve(args) -> int:
    from harness.backbones import DTYPES, default_device, load_backbone
    from harness.bench import random_backbone
    from harness.client import read_key
    from harness.protocol import Limits
    from harness.serve import ServeConfig, is_loopback, serve
    from harness.server import ModelServer

    key = read_key(args.api_key_file)
    if not is_loopback(args.host) and not key:  # refused before anything loads
        raise HarnessError(f"binding to {args.host} (not a loopback address) needs an API key: pass --api-key-file")
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    if args.random:
        backbone = random_backbone(args.backbone, device, DTYPES[dtype])
    else:
        backbone = load_backbone(args.backbone, device=device, dtype=dtype)
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_candidates=args.max_candidates,
                    max_prompt_tokens=args.max_prompt_tokens, max_prompts=args.max_prompts, max_in_flight=args.max_in_flight)
    server = ModelServer(backbone, bucketing=args.bucketing, layer_reuse=args.layer_reuse, compile=args.compile, limits=limits)
    serve(server, ServeConfig(args.host, args.port, key, args.batching, args.batch_window_ms, args.max_batch_requests))
    return 0


def cmd_bench_serve(args) -> int:
    from harness.serve_bench import bench_serve_command

    print(bench_serve_command(args))
    return 0


def cmd_report(args) -> int:
    path = report_path(args)
    write_report(published(path, ResultsStore(args.results_dir)), path)
    print(path.read_text() if args.print else f"wrote {path}")
    return 0


def cmd_check(args) -> int:
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    results = run_checks(args.config, args.data_dir, args.tasks_dir, only)
    if args.json:
        write_json(results, args.json)
    for r in results:
        verdict = "ok" if r["ok"] else "REGRESSION"
        print(f"{verdict:10s} {r['name']} ({r['dtype']}, {r['threads']} threads): {r['score']:.2f} "
              f"(threshold {r['min_score']:.2f}; {r['seconds']:.0f} s)")
    failed = [r for r in results if not r["ok"]]
    if failed:
        names = ", ".join(f"{r['name']} {r['score']:.2f} < {r['min_score']:.2f}" for r in failed)
        print(f"harness: error: accuracy regression: {names}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from harness.bench import bench_command

    print(bench_command(args))
    return 0


def cmd_list(args) -> int:
    print("methods:")
    for name, cls in registry().items():
        print(f"  {name:16s} {cls.group}, as-a-service: {'yes' if cls.as_a_service else 'no'}")
    print("tasks:")
    for name, card in load_cards(args.tasks_dir).items():
        print(f"  {name:16s} {card.description} ({card.metric}; {card.path})")
    print("backbones:")
    for name, spec in REGISTRY.items():
        default = " [default]" if name == DEFAULT_BACKBONE else ""
        print(f"  {name:20s} {spec.family:8s} {spec.source}: {spec.model_id}{default}")
    print("profiles:")
    for name, profile in PROFILES.items():
        print(f"  {name:16s} {profile.description}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--results-dir", default=DEFAULT_RESULTS, help="the results store (default: results/)")
        p.add_argument("--report", help="where the markdown report is written, its records beside it as .jsonl "
                       "(default: reports/results.md, or results.md inside --results-dir when that is not the "
                       "default, so a side store never touches the committed report)")
        p.add_argument("--tasks-dir", action="append", help="extra folder of task cards (repeatable)")

    run = sub.add_parser("run", help="run methods x tasks x seeds on one backbone; finished runs are skipped")
    run.add_argument("--methods", default="manual", help="comma-separated method names, or 'all'")
    run.add_argument("--datasets", default="all", help="comma-separated task names, or 'all'")
    run.add_argument("--seeds", help="comma-separated split seeds (default: the profile's)")
    run.add_argument("--backbone", help=f"a registered backbone (default {DEFAULT_BACKBONE}; with --service-url, the server's)")
    run.add_argument("--service-url", help="run the black-box methods against `harness serve` at this URL (no model here)")
    run.add_argument("--api-key-file", help="the server's API key, in a file (with --service-url)")
    run.add_argument("--profile", help="paper | quick (default: paper with a GPU, quick without)")
    run.add_argument("--eval-cap", type=int, help="score at most N eval rows per task, stratified (0: all)")
    run.add_argument("--data-dir", help="local task data laid out like shared/data (else HARNESS_DATA_DIR, else the hub)")
    run.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="compute dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    run.add_argument("--no-bucketing", dest="bucketing", action="store_false",
                     help="prompted queries: one padded forward instead of forwards by similar length")
    run.add_argument("--no-layer-reuse", dest="layer_reuse", action="store_false",
                     help="BBTv2: compute every layer for every candidate instead of reusing the shared lower layers")
    run.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE",
                     help=f"torch.compile the backbone's layers for service queries ({' | '.join(COMPILE_MODES)}; default: eager)")
    common(run)
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="regenerate the markdown report from its records and the results store")
    report.add_argument("--print", action="store_true", help="also print the report")
    common(report)
    report.set_defaults(func=cmd_report)

    check = sub.add_parser("check", help="the accuracy regression gate: small fixed runs against committed thresholds")
    check.add_argument("--config", default=str(DEFAULT_CONFIG), help="the checks and thresholds (default: regression.yaml)")
    check.add_argument("--data-dir", help="local task data (else HARNESS_DATA_DIR, else the hub)")
    check.add_argument("--tasks-dir", action="append")
    check.add_argument("--only", help="run only these checks, comma-separated method/task names (default: all)")
    check.add_argument("--json", help="also write each check's score and verdict to this JSON file")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="BBT's per-call cost: the reference code's loop against the default path")
    bench.add_argument("--backbone", default=DEFAULT_BACKBONE, help="a registered backbone, or an architecture with --random")
    bench.add_argument("--random", action="store_true", help="random weights of the named architecture (timing only)")
    bench.add_argument("--task", default="sst2")
    bench.add_argument("--calls", type=int, default=100, help="API calls on the default path (a multiple of 20)")
    bench.add_argument("--reference-calls", type=int, default=10, help="API calls on the reference-style loop")
    bench.add_argument("--seed", type=int, default=42)
    bench.add_argument("--no-bbtv2", dest="bbtv2", action="store_false", help="skip BBTv2's layer-reuse timing")
    bench.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                       help="skip timing a whole BBT run (CMA-ES and dev checks included) of --calls calls")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE",
                       help="also time the default path, and the end-to-end fit, with the backbone's layers under "
                            "torch.compile(mode=MODE)")
    bench.add_argument("--data-dir")
    bench.add_argument("--out", default="reports/performance.md")
    bench.set_defaults(func=cmd_bench)

    srv = sub.add_parser("serve", help="the model service over HTTP: one backbone for many tuning clients")
    srv.add_argument("--backbone", default=DEFAULT_BACKBONE, help="a registered backbone, or an architecture with --random")
    srv.add_argument("--random", action="store_true",
                     help="random weights of the named architecture (e.g. roberta-large; tiny-gpt2 etc. for tests)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --api-key-file)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key-file", help="require this key (first line of the file) on every route but /v1/health")
    srv.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    srv.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    srv.add_argument("--no-batching", dest="batching", action="store_false",
                     help="answer every request alone (default: concurrent requests that can share forwards do)")
    srv.add_argument("--batch-window-ms", type=float, default=2.0, help="wait this long for more requests to batch")
    srv.add_argument("--max-batch-requests", type=int, default=8, help="requests answered in one group at most")
    srv.add_argument("--max-texts", type=int, default=512, help="texts per request")
    srv.add_argument("--max-chars", type=int, default=16384, help="characters per text")
    srv.add_argument("--max-candidates", type=int, default=256, help="prompt candidates per request")
    srv.add_argument("--max-prompt-tokens", type=int, default=256, help="n_tokens of a prompt")
    srv.add_argument("--max-prompts", type=int, default=16, help="configured prompts kept (least recently used dropped)")
    srv.add_argument("--max-in-flight", type=int, default=64, help="requests in flight; more get 503")
    srv.add_argument("--no-bucketing", dest="bucketing", action="store_false")
    srv.add_argument("--no-layer-reuse", dest="layer_reuse", action="store_false")
    srv.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE")
    srv.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="the model service's cost over HTTP: in-process vs loopback, bytes, memory, "
                        "concurrent clients with batching on and off")
    bs.add_argument("--backbone", default=DEFAULT_BACKBONE, help="a registered backbone, or an architecture with --random")
    bs.add_argument("--random", action="store_true", help="random weights of the named architecture (timing only)")
    bs.add_argument("--task", default="sst2")
    bs.add_argument("--calls", type=int, default=60, help="BBT API calls per client (a multiple of 20)")
    bs.add_argument("--clients", type=int, default=4, help="concurrent BBT clients for the throughput rows")
    bs.add_argument("--dtype", default="float32", choices=["auto", *DTYPES])
    bs.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    bs.add_argument("--seed", type=int, default=42)
    bs.add_argument("--data-dir")
    bs.add_argument("--out", default="reports/serving.md")
    bs.set_defaults(func=cmd_bench_serve)

    listing = sub.add_parser("list", help="list methods, tasks, backbones and profiles")
    listing.add_argument("--tasks-dir", action="append")
    listing.set_defaults(func=cmd_list)
    return top


def _quiet_libraries() -> None:
    """The libraries' own progress bars (data files, weight loading) would bury the grid's log, as would a
    deprecation warning peft 0.21 triggers in transformers 5 on every PEFT run (not ours to fix)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries()
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
