"""Reports: markdown tables made from run records with pandas, one function per table.

Every table says which backbone, device, profile and package versions it comes from, and the data caveats
(training pools, eval subsets and caps) of the tasks it shows.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from harness.record import RunRecord

TASK_ORDER = ["sst2", "yelpp", "agnews", "dbpedia", "mrpc", "snli", "rte"]  # the papers' column order
GROUP_ORDER = ["gradient-based", "gradient-free"]


def _device(meters: dict) -> str:
    """The device, and on a CPU the threads torch used where they were fewer than the cores: a run given one
    thread beside another run takes longer, and its train time should say why."""
    device, threads = meters["device"], meters.get("torch_threads")
    cores = device.rsplit(" x", 1)[-1] if device.startswith("cpu:") else None
    if threads and cores and cores.isdigit() and threads < int(cores):
        return f"{device} ({threads} thread{'s' * (threads > 1)})"
    return device


def load_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per finished run (the latest record of each run id)."""
    ok = {r.run_id: r for r in records if r.ok}
    rows = []
    for r in ok.values():
        queries = r.queries or {}
        phase = queries.get("train") if queries.get("train", {}).get("queries") else queries.get("eval", {})
        meters = r.meters
        rows.append(
            {
                "method": r.method,
                "task": r.task,
                "seed": r.seed,
                "backbone": r.backbone,
                "dtype": r.dtype,
                "profile": r.profile,
                "group": r.group,
                "score": r.score,
                "metric": r.metric,
                "tunable": r.tunable_parameters,
                "as_a_service": r.as_a_service,
                "deployment_efficient": r.deployment_efficient,
                "fit_s": meters.get("fit_s"),
                "wall_s": meters["wall_s"],
                "device": _device(meters),
                "server_gpu_mb": meters.get("server_gpu_peak_mb"),
                "cpu_rss_mb": meters.get("cpu_rss_peak_mb"),
                "user_mb": meters.get("user_heap_peak_mb", 0) + meters.get("user_tensor_mb", 0),
                "upload_b": (phase or {}).get("upload_per_query_bytes"),
                "download_b": (phase or {}).get("download_per_query_bytes"),
                # measured where the run went over HTTP (harness run --service-url): absent for in-process runs
                "transport": (r.service or {}).get("transport", "in-process"),
                "wire_up_b": (phase or {}).get("wire_up_per_query_bytes"),
                "wire_down_b": (phase or {}).get("wire_down_per_query_bytes"),
                "latency_s": (phase or {}).get("latency_per_query_s"),
                "server_s": (phase or {}).get("server_per_query_s"),
                "client_rss_mb": meters.get("client_rss_peak_mb"),
                "server_rss_mb": meters.get("server_peak_rss_mb"),
                "eval_size": r.split["eval_size"],
                "eval_full_size": r.split["eval_full_size"],
                "caveats": r.split["caveats"],
                "versions": r.versions,
                "trained": (r.trace or {}).get("trained") if r.group == "gradient-based" else None,
                # a search by API calls (BBT, BBTv2) says how many it spent
                "calls": (r.trace or {}).get("calls"),
                # the calls at which an interrupted attempt's checkpoint was taken up again ("" if it never was)
                "resumed_at": ", ".join(str(c) for c in meters.get("resumed_at_calls") or []),
                "legacy": r.legacy,
            }
        )
    return pd.DataFrame(rows)


def _ordered_tasks(tasks) -> list[str]:
    return [t for t in TASK_ORDER if t in set(tasks)] + sorted(set(tasks) - set(TASK_ORDER))


def _method_order(frame: pd.DataFrame) -> list[str]:
    from methods import registry

    known = list(registry())  # registration order: the papers' row order
    groups = frame.groupby("method")["group"].first()
    return sorted(groups.index, key=lambda m: (GROUP_ORDER.index(groups[m]), known.index(m) if m in known else 99, m))


def _cell(scores: pd.Series) -> str:
    if len(scores) == 1:
        return f"{scores.iloc[0]:.2f}"
    return f"{scores.mean():.2f} ± {scores.std(ddof=0):.2f}"


def _task_cells(runs: pd.DataFrame, tasks: list[str], headers: list[str]) -> dict[str, str]:
    """One row's score cells (mean ± std over seeds, or – where a task has no run) and the average over tasks."""
    row, means = {}, []
    for task, header in zip(tasks, headers):
        part = runs[runs["task"] == task]
        scores = part["score"]
        resumed = bool((part["resumed_at"] != "").any())
        legacy = bool(part["legacy"].any())
        row[header] = (_cell(scores) + RESUMED * resumed + LEGACY * legacy) if len(scores) else "–"
        if len(scores):
            means.append(scores.mean())
    partial = "" if len(means) == len(tasks) else f" ({len(means)} task{'s' * (len(means) > 1)})"
    row["avg"] = f"{sum(means) / len(means):.2f}{partial}"
    return row


RESUMED = " ‡"  # a cell with a run that was interrupted and resumed from its checkpoint
LEGACY = " §"  # a cell with a schema-1 record, whose identity does not cover the task card, data or backbone


def _markdown(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)  # cells are formatted already; tabulate would re-parse numbers


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def comparison_table(frame: pd.DataFrame) -> str:
    """Methods x tasks, mean ± std over seeds, with the tunable parameters and the average over tasks."""
    tasks = _ordered_tasks(frame["task"])
    rows = []
    for method in _method_order(frame):
        part = frame[frame["method"] == method]
        row = {"group": part["group"].iloc[0], "method": method, "tunable params": _params(part["tunable"].max())}
        row |= _task_cells(part, tasks, [_task_header(frame, task) for task in tasks])
        row["seeds"] = _seeds(part, tasks)
        rows.append(row)
    return _markdown(rows)


def _seeds(runs: pd.DataFrame, tasks: list[str]) -> str:
    """The seeds behind a row; where a task ran other seeds than the rest, it is named, so a ± is never read
    as covering tasks that had one seed."""
    by_task = {t: ",".join(str(s) for s in sorted(runs[runs["task"] == t]["seed"].unique())) for t in tasks}
    by_task = {t: seeds for t, seeds in by_task.items() if seeds}
    usual = Counter(by_task.values()).most_common(1)[0][0]
    others = [f"{t}: {seeds}" for t, seeds in by_task.items() if seeds != usual]
    return "; ".join([usual, *others])


def _task_header(frame: pd.DataFrame, task: str) -> str:
    part = frame[frame["task"] == task]
    metric = part["metric"].iloc[0]
    subset = (part["eval_size"] < part["eval_full_size"]).any() or any("eval_subset" in c for c in part["caveats"])
    return task + (" (F1)" if metric == "f1" else "") + (" †" if subset else "")


def _mb(value) -> str:
    return "n/a (CPU)" if value is None or pd.isna(value) else f"{value / 1024:.1f} GB" if value > 1024 else f"{value:.0f} MB"


def _server_mem(part: pd.DataFrame) -> str:
    """GPU peak; on a CPU, say so and give the process's peak resident memory, labelled (not a GPU figure)."""
    gpu = part["server_gpu_mb"].max()
    if not pd.isna(gpu):
        return _mb(gpu)
    rss = part["cpu_rss_mb"].max() if "cpu_rss_mb" in part else None
    return "n/a (CPU)" if rss is None or pd.isna(rss) else f"n/a (CPU); process RSS peak {_mb(rss)}"


def _bytes(value) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value / 1024:.2f} KB" if value >= 1024 else f"{value:.0f} B"


def cost_table(frame: pd.DataFrame, tasks=("sst2", "agnews")) -> str:
    """The BBT paper's cost table: flags, score, training time, memory, bytes per query."""
    rows = []
    tasks = [t for t in tasks if t in set(frame["task"])]
    wired = "transport" in frame and (frame["transport"] == "http").any()
    for method in _method_order(frame):
        part = frame[(frame["method"] == method) & frame["task"].isin(tasks)]
        if part.empty:
            continue
        by_task = {t: part[part["task"] == t] for t in tasks}

        def each(fn):
            return " / ".join(fn(p) if len(p) else "–" for p in by_task.values())

        served = bool(part["as_a_service"].iloc[0])
        rows.append(
            {
                "method": method,
                "deployment-efficient": "yes" if part["deployment_efficient"].iloc[0] else "no",
                "as-a-service": "yes" if served else "no",
                "device": ", ".join(sorted(part["device"].unique())),
                "score": each(lambda p: f"{p['score'].mean():.1f}"),
                "train time": each(lambda p: f"{p['fit_s'].mean() / 60:.1f} min"),
                "user mem": each(lambda p: f"{p['user_mb'].max():.0f} MB") if served else "–",
                "server mem": each(_server_mem),
                "upload/query": each(lambda p: _bytes(p["upload_b"].mean())) if served else "–",
                "download/query": each(lambda p: _bytes(p["download_b"].mean())) if served else "–",
            }
        )
        if wired:
            rows[-1] |= _measured(part, by_task) if served else dict.fromkeys(MEASURED, "–")
    header = f"Tasks: {' / '.join(tasks)}. Per-query bytes are those of training queries (of eval queries where a method sends none)."
    if wired:
        header += (" Where a run went over HTTP (`harness run --service-url`), the last columns are measured: the request and "
                   "response bodies per query (up / down), the latency the client saw per query against the server's compute "
                   "time, and the peak resident memory of the client process, which holds no model (the user side), against "
                   "the server process's.")
    return header + "\n\n" + _markdown(rows)


MEASURED = ("wire up↑ down↓ per query", "latency per query (server)", "client RSS (server RSS)")


def _measured(part: pd.DataFrame, by_task: dict) -> dict:
    """The measured cost cells of an HTTP run (– for a task whose runs went in process)."""

    def each(fn):
        cells = []
        for p in by_task.values():
            http = p[p["transport"] == "http"]
            cells.append(fn(http) if len(http) else "–")
        return " / ".join(cells)

    return {
        MEASURED[0]: each(lambda p: f"↑{_bytes(p['wire_up_b'].mean())} ↓{_bytes(p['wire_down_b'].mean())}"),
        MEASURED[1]: each(lambda p: f"{1000 * p['latency_s'].mean():.1f} ms ({1000 * p['server_s'].mean():.1f} ms)"),
        MEASURED[2]: each(lambda p: f"{_mb(p['client_rss_mb'].max())} ({_mb(p['server_rss_mb'].max())})"),
    }


def provenance(frame: pd.DataFrame) -> str:
    lines = [
        f"- backbone: {', '.join(sorted(frame['backbone'].unique()))}",
        f"- device: {', '.join(sorted(frame['device'].unique()))}; compute dtype: {', '.join(sorted(frame['dtype'].unique()))}",
        f"- profile: {', '.join(sorted(frame['profile'].unique()))}",
        f"- runs: {len(frame)} ({frame['method'].nunique()} methods × {frame['task'].nunique()} tasks, seeds "
        f"{', '.join(str(s) for s in sorted(frame['seed'].unique()))})",
    ]
    versions = sorted({", ".join(f"{k} {v}" for k, v in sorted(r.items())) for r in frame["versions"]})
    lines += [f"- packages: {v}" for v in versions]
    trained = part_trained(frame)
    if trained:
        lines.append("- what the gradient methods trained: " + "; ".join(f"{m}: {t}" for m, t in trained.items()))
    caveats = []
    for task in _ordered_tasks(frame["task"]):
        part = frame[frame["task"] == task]
        found = {k: v for c in part["caveats"] for k, v in c.items()}
        if found:
            caveats.append(f"  - {task}: " + "; ".join(found.values()))
    resumed = frame[frame["resumed_at"] != ""]
    if len(resumed):
        runs = "; ".join(f"{r.method}/{r.task}/seed{r.seed} at {r.resumed_at} calls" for r in resumed.itertuples())
        lines.append(f"- resumed runs (‡): interrupted, then resumed from a mid-run checkpoint: {runs}")
    legacy = frame[frame["legacy"]]
    if len(legacy):
        lines.append(f"- legacy records (§): {len(legacy)} of {len(frame)} runs were recorded before a run's identity covered "
                     "the task card, the data files and the backbone's weights (record schema 1), and without per-example "
                     "predictions; a rerun records them anew")
    lines.append("- data caveats († = scored on a subset of the eval split):" if caveats else "- data caveats: none")
    return "\n".join(lines + caveats)


def part_trained(frame: pd.DataFrame) -> dict[str, str]:
    """Per gradient method, what it trained on this backbone (e.g. BitFit on a model without biases)."""
    if "trained" not in frame:
        return {}
    known = frame.dropna(subset=["trained"])
    return {m: "; ".join(sorted(set(part["trained"]))) for m, part in known.groupby("method", sort=False)}


def versatility_table(frame: pd.DataFrame) -> str | None:
    """The searches by API call (BBT, BBTv2) on every backbone run (the BBTv2 paper's versatility table): backbone x
    method rows."""
    part = frame[frame["calls"].notna()]
    if part.empty:
        return None
    tasks = _ordered_tasks(part["task"])
    rows = []
    for (backbone, method), runs in sorted(part.groupby(["backbone", "method"])):
        row = {"backbone": backbone, "method": method, **_task_cells(runs, tasks, tasks)}
        row["budget (calls)"] = ", ".join(str(int(c)) for c in sorted(runs["calls"].dropna().unique()))
        rows.append(row)
    return _markdown(rows)


PAPER = Path(__file__).resolve().parent / "paper_results.yaml"


def side_by_side(frame: pd.DataFrame) -> str:
    """Our mean beside the papers' published number, per method and task; the papers' backbone is named."""
    import yaml

    paper = yaml.safe_load(PAPER.read_text())
    tasks = _ordered_tasks(frame["task"])
    rows = []
    for method in _method_order(frame):
        part = frame[frame["method"] == method]
        published = paper["results"].get(method, {})
        row = {"method": method}
        for task in tasks:
            ours = part[part["task"] == task]["score"]
            mine = f"{ours.mean():.2f}" if len(ours) else "–"
            theirs = f"{published[task]:.2f}" if task in published else "–"
            row[task] = f"{mine} / {theirs}"
        rows.append(row)
    backbone = ", ".join(sorted(frame["backbone"].unique()))
    header = (
        f"Each cell: **this run ({backbone})** / **published (the BBT and BBTv2 papers, {paper['backbone']}, "
        "3 splits, full eval sets)**. Different backbones, sizes and eval subsets: read the published column as "
        "context, not as a target this backbone should meet."
    )
    return header + "\n\n" + _markdown(rows)


def render(records: list[RunRecord]) -> str:
    frame = load_frame(records)
    if frame.empty:
        return "# Results\n\nNo finished runs yet.\n"
    sections = ["# Results", "Generated by `harness report` from the run records in the .jsonl file beside it; do not edit by hand."]
    # runs in different dtypes are different runs (the dtype is in the spec): never averaged together, here or in
    # the versatility table
    for (backbone, profile, dtype), part in frame.groupby(["backbone", "profile", "dtype"]):
        sections += [
            f"## {backbone}, profile `{profile}`, {dtype}",
            provenance(part),
            "### Comparison (16-shot; mean ± std over seeds; mrpc is F1)",
            comparison_table(part),
            "### Cost",
            cost_table(part),
            "### Beside the published numbers",
            side_by_side(part),
        ]
    for (profile, dtype), part in frame.groupby(["profile", "dtype"]):
        table = versatility_table(part)
        if table:
            sections += [f"## Versatility: BBT and BBTv2 across backbones, profile `{profile}`, {dtype}", table]
    return "\n\n".join(sections) + "\n"


def _calls_label(x: float, _pos=None) -> str:
    """Axis label for a number of calls: 200, 5k (not 10^2 or 5,000, which crowd the axis)."""
    return f"{x / 1000:g}k" if x >= 1000 else f"{x:g}"


def convergence_figures(records: list[RunRecord], folder: Path) -> list[Path]:
    """PNG per backbone and task: BBT and BBTv2's best train loss and dev metric by API call, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    traced = [r for r in records if r.ok and (r.trace or {}).get("train")]
    traced = [r for r in traced if "best_loss" in r.trace["train"][0]]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in traced:
        groups.setdefault((r.backbone, r.task), []).append(r)
    paths = []
    for (backbone, task), runs in sorted(groups.items()):
        legend_height = 0.22 * ((len(runs) + 1) // 2)  # one legend below both axes: inside, it hid the dev lines
        height = 3.6 + legend_height
        figure, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(10, height))
        for r in sorted(runs, key=lambda r: (r.method, r.seed, r.profile, r.dtype)):
            label = f"{r.method} seed {r.seed}, {r.profile}, {r.dtype}, {_device(r.meters)}"
            train, dev = r.trace["train"], r.trace["dev"]
            loss_ax.plot([t["calls"] for t in train], [t["best_loss"] for t in train], label=label)
            dev_ax.plot([d["calls"] for d in dev], [d["metric"] for d in dev], marker="o", markersize=3, label=label)
        for ax in (loss_ax, dev_ax):
            ax.set_xscale("log")  # quick runs (hundreds of calls) and the paper's budget (thousands) on one axis
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))  # 20, 50, 100, ...: labelled on any span
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_calls_label))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # matplotlib's minor labels overlap on short spans
        loss_ax.set(xlabel="API calls", ylabel=f"best train loss ({runs[0].trace.get('loss', '')})", title=f"{task}: train")
        dev_ax.set(xlabel="API calls", ylabel=f"dev {runs[0].metric}", title=f"{task}: dev checks")
        figure.legend(*dev_ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
        figure.suptitle(f"{backbone}: black-box prompt search by API call")
        figure.tight_layout(rect=(0, (legend_height + 0.1) / height, 1, 1))
        path = folder / f"convergence-{backbone}-{task}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(records: list[RunRecord], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(records)
    figures = convergence_figures(records, out.parent)
    for stale in set(out.parent.glob("convergence-*.png")) - set(figures):  # of runs no longer in the records
        stale.unlink()
    if figures:
        text += "\n## Convergence (BBT, BBTv2)\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    out.write_text(text)
    return out
