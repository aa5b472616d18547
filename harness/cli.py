"""`harness run | report | list`."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from harness.backbones import DEFAULT_BACKBONE, DTYPES, REGISTRY, resolve_dtype, spec_identity
from harness.check import DEFAULT_CONFIG, run_checks, write_json
from harness.compiled import MODES as COMPILE_MODES
from harness.errors import HarnessError, unknown_name
from harness.profiles import PROFILES, default_profile, describe, get_profile
from harness.ray_executor import RayOptions
from harness.report import write_report
from harness.runner import Identities, expand, needs_weights, run_grid
from harness.settings import check_settings, merge_settings, parse_sets, read_config_file, settings_table
from harness.store import ResultsStore, published
from harness.tasks import load_cards
from methods import get_method, registry

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
        seeds = [int(s) for s in str(value).split(",")]
    except ValueError:
        raise HarnessError(f"--seeds takes integers separated by commas, not '{value}'") from None
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise HarnessError(f"--seeds: a split seed is between 0 and 2**32 - 1, not {bad[0]}")
    return seeds


def _eval_cap(value) -> int | None:
    """--eval-cap: 0 means every eval row; a negative cap is a mistake, not "all"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HarnessError(f"--eval-cap takes 0 (every eval row) or a positive number of rows, not {value!r}")
    return value or None


def report_path(args) -> Path:
    if args.report:
        return Path(args.report)
    if Path(args.results_dir) == Path(DEFAULT_RESULTS):
        return Path("reports/results.md")
    return Path(args.results_dir) / "results.md"


def cmd_run(args) -> int:
    # the command line wins over a --config file, which wins over the defaults; all is checked before anything loads
    file = read_config_file(args.config) if args.config else {}

    def pick(name: str, default=None):
        given = getattr(args, name)
        return given if given is not None else file.get(name, default)

    profile = get_profile(pick("profile") or default_profile())
    if pick("eval_cap") is not None:
        profile = replace(profile, eval_cap=_eval_cap(pick("eval_cap")))
    cards = load_cards(args.tasks_dir)
    methods = _names(str(pick("methods", "manual")), registry(), "method")
    tasks = _names(str(args.datasets if args.datasets is not None else file.get("tasks", "all")), cards, "task")
    seeds = _seeds(pick("seeds"), profile)
    settings = merge_settings(file.get("settings") or {}, parse_sets(args.set or []))
    check_settings(settings, methods, tasks, profile)
    profile = replace(profile, method_overrides=settings)
    remote = None
    if args.service_url:
        for method in methods:  # refused before any connection is tried
            if not registry()[method].as_a_service:
                raise HarnessError(needs_weights(method))
        remote, backbone, dtype, identity = _remote(args, pick("backbone"), pick("dtype", "auto"))
    else:
        backbone = pick("backbone") or DEFAULT_BACKBONE
        identity = spec_identity(backbone)
        dtype = resolve_dtype(pick("dtype", "auto"))
    log.info("profile %s: %s", profile.name, describe(profile))
    if settings:
        log.info("settings: %s", "; ".join(f"{m}: {v}" for m, v in settings.items()))
    log.info("backbone %s (%s); methods %s; tasks %s; seeds %s", backbone, dtype, methods, tasks, seeds)
    store = ResultsStore(args.results_dir, args.checkpoint_dir)
    ids = Identities.of(cards, tasks, args.data_dir, identity)  # a missing data file fails here, before any load
    specs = expand(methods, tasks, seeds, backbone, profile, dtype, ids)
    options = {"bucketing": args.bucketing, "layer_reuse": args.layer_reuse, "compile": args.compile}
    summary = run_grid(specs, cards, profile, store, args.data_dir, options, remote, _ray_options(args))
    path = report_path(args)
    write_report(published(path, store), path)
    for line in summary.lines():
        log.info("%s", line)
    log.info("results: %s; report: %s", store.path, path)
    return 1 if summary.failed else 0


def _ray_options(args) -> RayOptions | None:
    given = [flag for flag, value in (("--ray-address", args.ray_address), ("--cpus-per-run", args.cpus_per_run),
             ("--gpus-per-run", args.gpus_per_run), ("--actors", args.actors), ("--max-retries", args.max_retries))
             if value is not None]
    if args.executor != "ray":
        if given:
            raise HarnessError(f"{', '.join(given)} need(s) --executor ray")
        return None
    chosen = {k: v for k, v in (("address", args.ray_address), ("cpus_per_run", args.cpus_per_run),
              ("gpus_per_run", args.gpus_per_run), ("actors", args.actors), ("max_retries", args.max_retries)) if v is not None}
    return RayOptions(**chosen)


def _remote(args, backbone: str | None, dtype: str):
    """The server named by --service-url: its backbone and dtype (from /v1/info) stand in for --backbone and
    --dtype, which may only repeat them; the server's own options replace this side's service switches."""
    from harness.client import read_key
    from harness.runner import Remote

    remote = Remote(args.service_url, read_key(args.api_key_file))
    service = remote.connect()
    info = service.info
    service.close()
    if backbone and backbone != info.name:
        raise HarnessError(f"--backbone {backbone}, but the server at {args.service_url} serves {info.name}")
    if dtype != "auto" and dtype != info.dtype:
        raise HarnessError(f"--dtype {dtype}, but the server at {args.service_url} computes in {info.dtype}")
    if args.compile or not args.bucketing or not args.layer_reuse:
        raise HarnessError("--compile, --no-bucketing and --no-layer-reuse are the server's options: give them to `harness serve`")
    log.info("model service %s: %s (%s, %s) on %s", args.service_url, info.name, info.family, info.dtype, info.device)
    return remote, info.name, info.dtype, info.identity


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
    if args.method:
        return _list_method(args.method)
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
        print(f"  {name:16s} {describe(profile)}")
    return 0


def _list_method(name: str) -> int:
    """A method's settings: each with its default, the profiles' values where the method sets one, and its help."""
    cls = get_method(name)
    print(f"{name}: {cls.group}, as-a-service: {'yes' if cls.as_a_service else 'no'} ({cls.__module__})")
    print(f"set with --set {name}.FIELD=VALUE, or in a --config file: settings: {{{name}: {{FIELD: VALUE}}}}\n")
    rows = [{k: str(v) for k, v in row.items()} for row in settings_table(cls, list(PROFILES))]
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]}  # help, last, is not padded
    for row in [dict(zip(columns, columns)), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns[:-1]) + "  " + row[columns[-1]])
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
    run.add_argument("--methods", help="comma-separated method names, or 'all' (default: manual)")
    run.add_argument("--datasets", help="comma-separated task names, or 'all' (default: all)")
    run.add_argument("--set", action="append", metavar="METHOD.FIELD=VALUE",
                     help="a method's setting, e.g. bbt.budget=2000 (repeatable; `harness list --method M` lists them)")
    run.add_argument("--config", help="a YAML file of methods, tasks, seeds, profile, backbone, dtype, eval_cap and "
                     "settings ({method: {field: value}}); the command line wins over it")
    run.add_argument("--seeds", help="comma-separated split seeds (default: the profile's)")
    run.add_argument("--backbone", help=f"a registered backbone (default {DEFAULT_BACKBONE}; with --service-url, the server's)")
    run.add_argument("--service-url", help="run the black-box methods against `harness serve` at this URL (no model here)")
    run.add_argument("--api-key-file", help="the server's API key, in a file (with --service-url)")
    run.add_argument("--profile", help="paper | quick (default: paper with a GPU, quick without)")
    run.add_argument("--eval-cap", type=int, help="score at most N eval rows per task, stratified (0: all)")
    run.add_argument("--data-dir", help="local task data laid out like shared/data (else HARNESS_DATA_DIR, else the hub)")
    run.add_argument("--dtype", choices=["auto", *DTYPES],
                     help="compute dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    run.add_argument("--no-bucketing", dest="bucketing", action="store_false",
                     help="prompted queries: one padded forward instead of forwards by similar length")
    run.add_argument("--no-layer-reuse", dest="layer_reuse", action="store_false",
                     help="BBTv2: compute every layer for every candidate instead of reusing the shared lower layers")
    run.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE",
                     help=f"torch.compile the backbone's layers for service queries ({' | '.join(COMPILE_MODES)}; default: eager)")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: one run at a time in this process (default); ray: runs on Ray actors, each holding a backbone")
    run.add_argument("--ray-address", help="an existing Ray cluster: auto or HOST:PORT (default: a local Ray started here)")
    run.add_argument("--cpus-per-run", type=float, help="CPUs (and torch threads) per Ray actor (default 1)")
    run.add_argument("--gpus-per-run", type=float, help="GPUs per Ray actor; a fraction shares a GPU (default 0)")
    run.add_argument("--actors", type=int, help="Ray actors (default: as many as the cluster's CPUs/GPUs allow)")
    run.add_argument("--max-retries", type=int, help="retries of a run whose Ray actor died (default 2)")
    run.add_argument("--checkpoint-dir", help="where long runs checkpoint (default: <results-dir>/checkpoints; with Ray "
                     "on several machines, a folder every node reaches)")
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
    listing.add_argument("--method", help="list this method's settings: default, profile values, help")
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
