"""Reports: markdown tables made from run records with pandas, one function per table.

Every table says which backbone, device, profile and package versions it comes from, and the data caveats
(training pools, eval subsets and caps) of the tasks it shows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.meters import place
from harness.metrics import accuracy, f1
from harness.paired import ALPHA, RESAMPLES, Paired, pair_runs
from harness.progress import duration
from harness.record import RunRecord

TASK_ORDER = ["sst2", "yelpp", "agnews", "dbpedia", "mrpc", "snli", "rte"]  # the papers' column order
GROUP_ORDER = ["gradient-based", "gradient-free"]


CELL = ["backbone", "profile", "dtype", "method", "task", "seed"]


def load_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per finished run (the latest record of each run id). A legacy (schema-1) record gives way to a
    current one of the same backbone, profile, dtype, method, task and seed: its run id cannot say it is the same
    run, and averaging the two as if they were two seeds would mix old code with new."""
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
                "k_shot": r.spec.k_shot,
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
                "device": place(meters["device"], meters.get("torch_threads")),
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
                # where an interrupted attempt's checkpoint was taken up again ("" if it never was)
                "resumed_at": _resumed_at(meters),
                "legacy": r.legacy,
                "record": r,
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    cells = list(zip(frame[CELL].itertuples(index=False, name=None), frame["legacy"]))
    current = {cell for cell, legacy in cells if not legacy}
    return frame[[not (legacy and cell in current) for cell, legacy in cells]].reset_index(drop=True)


def _ordered_tasks(tasks) -> list[str]:
    return [t for t in TASK_ORDER if t in set(tasks)] + sorted(set(tasks) - set(TASK_ORDER))


def _rank(method: str) -> int:
    """A method's place in the registry's order (the papers' row order; plug-ins after); unknown methods last."""
    from methods import registry

    known = list(registry())
    return known.index(method) if method in known else len(known)


def _method_order(frame: pd.DataFrame) -> list[str]:
    groups = frame.groupby("method")["group"].first()
    return sorted(groups.index, key=lambda m: (GROUP_ORDER.index(groups[m]), _rank(m), m))


def _cell(scores: pd.Series) -> str:
    if len(scores) == 1:
        return f"{scores.iloc[0]:.2f}"
    return f"{scores.mean():.2f} ± {scores.std(ddof=0):.2f}"


def _task_cells(runs: pd.DataFrame, tasks: list[str], headers: list[str], marks: dict | None = None) -> dict[str, str]:
    """One row's score cells (mean ± std over seeds, or – where a task has no run) and the average over tasks;
    `marks` adds each task's significance mark."""
    row, means = {}, []
    for task, header in zip(tasks, headers):
        part = runs[runs["task"] == task]
        scores = part["score"]
        resumed = bool((part["resumed_at"] != "").any())
        legacy = bool(part["legacy"].any())
        mark = (marks or {}).get(task, "")
        row[header] = (_cell(scores) + mark + RESUMED * resumed + LEGACY * legacy) if len(scores) else "–"
        if len(scores):
            means.append(scores.mean())
    partial = "" if len(means) == len(tasks) else f" ({len(means)} task{'s' * (len(means) > 1)})"
    row["avg"] = f"{sum(means) / len(means):.2f}{partial}"
    return row


BETTER, WORSE = " ▲", " ▼"  # significantly above / below the manual prompt on the same rows (harness/paired.py)
RESUMED = " ‡"  # a cell with a run that was interrupted and resumed from its checkpoint
LEGACY = " §"  # a cell with a schema-1 record, whose identity does not cover the task card, data or backbone


def _markdown(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)  # cells are formatted already; tabulate would re-parse numbers


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def comparison_table(frame: pd.DataFrame, tests: dict[tuple[str, str], Paired]) -> str:
    """Methods x tasks, mean ± std over seeds, with the tunable parameters and the average over tasks; ▲ / ▼ where
    a paired test (`tests`, from paired_tests against the manual prompt) puts the method above / below it."""
    tasks = _ordered_tasks(frame["task"])
    rows = []
    for method in _method_order(frame):
        part = frame[frame["method"] == method]
        row = {"group": part["group"].iloc[0], "method": method, "tunable params": _params(part["tunable"].max())}
        marks = {task: _mark(tests.get((method, task))) for task in tasks}
        row |= _task_cells(part, tasks, [_task_header(frame, task) for task in tasks], marks)
        row["seeds"] = _seeds(part, tasks)
        rows.append(row)
    return _markdown(rows)


BASELINE = "manual"
CONTRASTS = [("bbtv2", "bbt")]  # pairs beyond "each method against the manual prompt"


def paired_tests(frame: pd.DataFrame, against: str, methods=None) -> dict[tuple[str, str], Paired]:
    """(method, task) -> the paired test of the method's runs against `against`'s on the same rows."""
    out = {}
    for task in _ordered_tasks(frame["task"]):
        base = frame[(frame["task"] == task) & (frame["method"] == against)]["record"].tolist()
        if not base:
            continue
        for method in methods or _method_order(frame):
            runs = frame[(frame["task"] == task) & (frame["method"] == method)]["record"].tolist()
            if method != against and runs:
                result = pair_runs(runs, base)
                if result:
                    out[(method, task)] = result
    return out


def _mark(result: Paired | None) -> str:
    if result is None or not result.significant:
        return ""
    return BETTER if result.difference > 0 else WORSE


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def paired_table(frame: pd.DataFrame, against_baseline: dict[tuple[str, str], Paired]) -> str | None:
    """Each method against the manual prompt (`against_baseline`: paired_tests against it) and BBTv2 against BBT:
    the difference in points on the same rows and its p-value."""
    tasks = _ordered_tasks(frame["task"])
    rows = []
    for against, methods in [(BASELINE, None), *[(b, [a]) for a, b in CONTRASTS]]:
        tests = against_baseline if methods is None else paired_tests(frame, against, methods)
        for method in methods or _method_order(frame):
            if method == against or not any((method, t) in tests for t in tasks):
                continue
            row = {"comparison": f"{method} − {against}"}
            for task in tasks:
                result = tests.get((method, task))
                row[task] = "–" if result is None else f"{result.difference:+.2f} ({_p(result.p_value)}){_mark(result)}"
            rows.append(row)
    if not rows:
        return None
    header = (
        "Each cell: the difference in points between two methods on the same eval rows (pooled over the seeds both "
        "ran) and the two-sided p-value of a paired test: exact McNemar for accuracy, a paired permutation test "
        f"({RESAMPLES:,} resamples) for F1. {BETTER.strip()} / {WORSE.strip()}: significant at p < {ALPHA} "
        "(not corrected for the number of comparisons); the same marks stand in the comparison table. Runs recorded "
        "without per-example predictions (§) cannot be paired (–)."
    )
    return header + "\n\n" + _markdown(rows)


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
        devices = each(lambda p: ", ".join(sorted(p["device"].unique())))  # per task: runs of one row may differ
        rows.append(
            {
                "method": method,
                "deployment-efficient": "yes" if part["deployment_efficient"].iloc[0] else "no",
                "as-a-service": "yes" if served else "no",
                "device": devices if part["device"].nunique() > 1 else part["device"].iloc[0],
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _shots(frame: pd.DataFrame) -> str:
    """"16-shot", or "16-shot; dbpedia 4-shot" where a task's runs used other shots per class."""
    usual = int(frame["k_shot"].mode().iloc[0])
    others = [f"{task} {int(k)}-shot" for task in _ordered_tasks(frame["task"])
              for k in sorted(frame[frame["task"] == task]["k_shot"].unique()) if k != usual]
    return "; ".join([f"{usual}-shot", *others])


def _resumed_at(meters: dict) -> str:
    """"40 calls" (a search), "300 steps" (a trainer), "40, 120 calls" (resumed twice), or "" (never resumed); where
    a resume moved the run to another device or thread count, where each stretch ran: "120 calls (0-119 on A, 120- on B)"."""
    for unit in ("calls", "steps"):
        at = meters.get(f"resumed_at_{unit}")
        if at:
            text = f"{', '.join(str(c) for c in at)} {unit}"
            stretches = meters.get("ran_on", [])
            if stretches:
                ends = [start - 1 for start, _ in stretches[1:]] + [""]
                text += " (" + ", ".join(f"{start}-{end} on {where or 'a device not recorded'}"
                                         for (start, where), end in zip(stretches, ends)) + ")"
            return text
    return ""


def _in_table_order(part: pd.DataFrame) -> list:
    """part's rows in the tables' method and task order, then by seed (not the records')."""
    if part.empty:
        return []
    methods, tasks = _method_order(part), _ordered_tasks(part["task"])
    return sorted(part.itertuples(), key=lambda r: (methods.index(r.method), tasks.index(r.task), r.seed))


def resumed_runs(frame: pd.DataFrame) -> str:
    """The runs resumed from a checkpoint."""
    resumed = _in_table_order(frame[frame["resumed_at"] != ""])
    return "; ".join(f"{r.method}/{r.task}/seed{r.seed} at {r.resumed_at}" for r in resumed)


def _configs(r: RunRecord):
    """(the paper profile's config for r's method and task, r's own: the same with r's recorded values), or
    (None, None) for a method no longer registered."""
    from harness.profiles import get_profile
    from harness.settings import method_config

    try:
        paper = method_config(r.method, get_profile("paper"), r.task, settings={})
    except HarnessError:
        return None, None
    names = {f.name for f in fields(paper)}
    return paper, replace(paper, **{k: v for k, v in r.spec.config.items() if k in names})


def stopped_runs(frame: pd.DataFrame) -> str:
    """The searches pycma's own criteria ended, or froze layers of, before their call budget (BBT: "at 4740 calls");
    a BBTv2 run whose other layers went on names each frozen layer, then the calls it spent."""
    def planned(r) -> list[str]:
        """What the run's configuration allowed it: BBTv2's rounds where they decide, else the call budget; none
        for a plug-in whose configuration has no call budget."""
        ran = _configs(r)[1]
        if ran is None:
            return ["budget ?"]
        if "budget" in ran.idle():
            return [f"rounds {ran.rounds}"]
        return [f"budget {ran.budget}"] if hasattr(ran, "budget") else []

    def where(r) -> str:
        stops, calls = r.trace["stopped"], r.trace.get("calls")
        why = [", ".join(sorted(s["reason"])) for s in stops]
        if len(stops) == 1 and stops[0]["calls"] == calls:
            return f" at {calls} calls ({'; '.join([why[0], *planned(r)])})"
        layers = ", ".join(f"layer {s['slot']} at {s['calls']} calls ({w})" for s, w in zip(stops, why))
        return f": {layers}; {calls} calls spent" + "".join(f" ({p})" for p in planned(r))

    stopped = _in_table_order(frame[frame["record"].map(lambda r: bool((r.trace or {}).get("stopped")))])
    return "; ".join(f"{r.method}/{r.task}/seed{r.seed}{where(r.record)}" for r in stopped)


def one_class_scores(frame: pd.DataFrame) -> str:
    """Each task's score for predicting its best single class on every eval row, from the gold labels the records
    keep: the floor a method has to clear (mrpc's F1 gives predicting "equivalent" everywhere 81, above the papers'
    BBT). Runs scored on different rows give a range."""
    cells = []
    for task in _ordered_tasks(frame["task"]):
        scores = set()
        for r in frame.loc[frame["task"] == task, "record"]:
            p = r.predictions
            gold, positive = (p.gold_ids(), p.positive) if p is not None else (None, None)
            if gold is None or not len(gold) or (r.metric == "f1" and positive is None):
                continue  # a legacy record without gold labels (or without the class its F1 counts)
            if r.metric == "f1":
                scores.add(round(100 * f1(gold, np.full_like(gold, positive), positive), 2))
            else:
                scores.add(round(100 * max(accuracy(gold, np.full_like(gold, c)) for c in set(gold.tolist())), 2))
        if scores:
            name = f"{task} (F1)" if (frame.loc[frame["task"] == task, "metric"] == "f1").any() else task
            low, high = min(scores), max(scores)
            cells.append(f"{name} {low:.2f}" if low == high else f"{name} {low:.2f}–{high:.2f}")
    return ", ".join(cells)


def provenance(frame: pd.DataFrame) -> str:
    grid = frame["method"].nunique() * frame["task"].nunique() * frame["seed"].nunique()
    empty = grid - len(frame[["method", "task", "seed"]].drop_duplicates())
    lines = [
        f"- backbone: {', '.join(sorted(frame['backbone'].unique()))}",
        f"- device: {', '.join(sorted(frame['device'].unique()))}; compute dtype: {', '.join(sorted(frame['dtype'].unique()))}",
        f"- profile: {', '.join(sorted(frame['profile'].unique()))}",
        f"- runs: {len(frame)} ({_count(frame['method'].nunique(), 'method')} × {_count(frame['task'].nunique(), 'task')}, seeds "
        f"{', '.join(str(s) for s in sorted(frame['seed'].unique()))}"
        + (f"; {empty} of the {grid} cells not run" if empty else "")  # "60 (12 methods × 7 tasks)" read as a full grid
        + f"); {duration(frame['wall_s'].sum())} of wall time in all (the sum of the runs' own)",
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
    runs = resumed_runs(frame)
    if runs:
        lines.append(f"- resumed runs (‡): interrupted, then resumed from a mid-run checkpoint: {runs}")
    stopped = stopped_runs(frame)
    if stopped:
        lines.append(f"- searches stopped before their budget by pycma's own criteria (`es.stop()`): {stopped}")
    legacy = frame[frame["legacy"]]
    if len(legacy):
        lines.append(f"- legacy records (§): {len(legacy)} of {len(frame)} runs were recorded before a run's identity covered "
                     "the task card, the data files and the backbone's weights (record schema 1), and without per-example "
                     "predictions; a rerun records them anew")
    lines += departures(frame)
    floor = one_class_scores(frame)
    if floor:
        lines.append(f"- one class predicted for every eval row (the best class, from the records' gold labels): {floor}")
    lines.append("- data caveats († = scored on a subset of the eval split):" if caveats else "- data caveats: none")
    return "\n".join(lines + caveats)


def departures(frame: pd.DataFrame) -> list[str]:
    """Where these runs depart from the papers' protocol (the `paper` profile): eval caps, seeds, and each method's
    settings that differ from the paper profile's, read from the runs' own specs."""
    from harness.profiles import get_profile

    paper = get_profile("paper")
    out = []
    caps = sorted({int(c) for c in frame["record"].map(lambda r: r.spec.eval_cap) if c})
    if caps:
        out.append(f"eval capped at {', '.join(map(str, caps))} rows per task (the papers score the whole eval set)")
    for task in _ordered_tasks(frame["task"]):
        shots = sorted({int(k) for k in frame[frame["task"] == task]["k_shot"]} - {paper.shots(task)})
        if shots:
            out.append(f"{task}: {', '.join(map(str, shots))} shots per class (the papers: {paper.shots(task)})")
    seeds = sorted(set(frame["seed"]))
    if len(seeds) < len(paper.seeds):
        out.append(f"{len(seeds)} split{'s' * (len(seeds) > 1)} (seed {', '.join(map(str, seeds))}), not the papers' "
                   f"{len(paper.seeds)}")
    for method in _method_order(frame):
        by_change: dict[str, list[str]] = {}
        for r in frame[frame["method"] == method]["record"]:
            config, own = _configs(r)
            if config is None:  # a method no longer registered
                continue
            theirs, ran = asdict(config), asdict(own)
            idle = own.idle()  # e.g. quick BBTv2's budget on dbpedia: its rounds decide
            off = {f.name: f.metadata["unset"] for f in fields(config)  # "rounds 1 (paper: none; ...)", not "paper 0"
                   if f.metadata.get("unset") and theirs[f.name] == f.default}
            changed = [f"{k} {v} (paper: {off[k]})" if k in off else f"{k} {v} (paper {theirs[k]})"
                       for k, v in sorted(ran.items()) if theirs[k] != v and k not in idle]
            if changed:
                by_change.setdefault(", ".join(changed), []).append(r.task)
        for change, tasks in by_change.items():
            out.append(f"{method} on {', '.join(_ordered_tasks(set(tasks)))}: {change}")
    return ["- departures from the papers' protocol:" if out else "- departures from the papers' protocol: none",
            *[f"  - {line}" for line in out]]


def part_trained(frame: pd.DataFrame) -> dict[str, str]:
    """Per gradient method, what it trained on this backbone (e.g. BitFit on a model without biases)."""
    if "trained" not in frame:
        return {}
    known = frame.dropna(subset=["trained"])
    return {m: "; ".join(sorted(set(known.loc[known["method"] == m, "trained"]))) for m in _method_order(known)}


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
        against_manual = paired_tests(part, BASELINE)  # the comparison's marks and the paired table share them
        sections += [
            f"## {backbone}, profile `{profile}`, {dtype}",
            provenance(part),
            f"### Comparison ({_shots(part)}; mean ± std over seeds; mrpc is F1; {BETTER.strip()} / {WORSE.strip()}: "
            f"above / below the manual prompt in a paired test, p < {ALPHA})",
            comparison_table(part, against_manual),
            *(["### Paired tests", table] if (table := paired_table(part, against_manual)) else []),
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


def _line_colors(n: int) -> list:
    """n distinct colours: matplotlib's 10-colour cycle repeats from the 11th line, which a task's full grid reaches."""
    from matplotlib import colormaps

    # tab20 holds (dark, light) pairs of one hue, its dark ten being tab10: the dark ten first, then the light
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [colormaps["tab20"](order[i % 20]) for i in range(n)]


def convergence_figures(records: list[RunRecord], folder: Path) -> list[Path]:
    """PNG per backbone and task: BBT and BBTv2's best train loss and dev metric by API call, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    traced = [r for r in records if r.ok and _searched_by_calls(r)]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in traced:
        groups.setdefault((r.backbone, r.task), []).append(r)
    paths = []
    for (backbone, task), runs in sorted(groups.items()):
        legend_height = 0.22 * ((len(runs) + 1) // 2)  # one legend below both axes: inside, it hid the dev lines
        height = 3.6 + legend_height
        figure, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(10, height))
        ordered = sorted(runs, key=lambda r: (_rank(r.method), r.method, r.seed, r.profile, r.dtype))
        for r, color in zip(ordered, _line_colors(len(ordered))):
            where = place(r.meters["device"], r.meters.get("torch_threads"))
            label = f"{r.method} seed {r.seed}, {r.profile}, {r.dtype}, {where}"
            train, dev = r.trace["train"], r.trace["dev"]
            loss_ax.plot([t["calls"] for t in train], [t["best_loss"] for t in train], color=color, label=label)
            dev_ax.plot([d["calls"] for d in dev], [d["metric"] for d in dev], marker="o", markersize=3, color=color,
                        label=label)
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


def _searched_by_calls(r: RunRecord) -> bool:
    """A BBT / BBTv2 record: its trace has the best train loss by API call."""
    train = (r.trace or {}).get("train")
    return bool(train) and "best_loss" in train[0]


def _spent(r: RunRecord) -> list[tuple[int, float]] | None:
    """(training examples forwarded, dev metric) at each dev check of a search by API call (one call forwards the
    whole train set) or a gradient method (one step forwards, and backpropagates, a batch); None for the rest."""
    trace, train_size = r.trace or {}, r.split.get("train_size") or 0
    if _searched_by_calls(r):
        return [(d["calls"] * train_size, d["metric"]) for d in trace["dev"]]
    if r.group == "gradient-based" and trace.get("dev"):
        batch = r.spec.config.get("batch_size", 0)
        return [(d["step"] * batch, d["dev_score"]) for d in trace["dev"]]
    return None


def budget_figures(records: list[RunRecord], folder: Path) -> list[Path]:
    """PNG per backbone and task: the dev metric of BBT, BBTv2 and the gradient methods against the training
    examples they had forwarded by then, so methods that spend their forwards differently sit on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.ok and _spent(r):
            groups.setdefault((r.backbone, r.task), []).append(r)
    paths = []
    for (backbone, task), runs in sorted(groups.items()):
        figure, ax = plt.subplots(figsize=(8, 4.6))
        ordered = sorted(runs, key=lambda r: (_rank(r.method), r.method, r.seed, r.profile, r.dtype))
        for r, color in zip(ordered, _line_colors(len(ordered))):
            points = _spent(r)
            style = "-" if r.group == "gradient-free" else "--"
            ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o", markersize=3, color=color,
                    label=f"{r.method} seed {r.seed}, {r.profile}, {r.dtype}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_calls_label))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="training examples forwarded (a gradient step also backpropagates its batch)",
               ylabel=f"dev {runs[0].metric}", title=f"{backbone}, {task}: dev metric by forwards spent")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
        figure.tight_layout()
        path = folder / f"budget-{backbone}-{task}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(records: list[RunRecord], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(records)
    figures = convergence_figures(records, out.parent)
    budgets = budget_figures(records, out.parent)
    stale = set(out.parent.glob("convergence-*.png")) | set(out.parent.glob("budget-*.png"))
    for path in stale - set(figures) - set(budgets):  # of runs no longer in the records
        path.unlink()
    if figures:
        text += "\n## Convergence (BBT, BBTv2)\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    if budgets:
        text += ("\n## Matched budget: dev metric by training forwards (BBT, BBTv2, gradient methods)\n\n"
                 + "\n".join(f"![{p.stem}]({p.name})" for p in budgets) + "\n")
    out.write_text(text)
    return out
