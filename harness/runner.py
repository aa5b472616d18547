"""The runner: expands a request into RunSpecs, skips finished ones, runs the rest and records each.

Call path: cli.run -> run_grid -> run_one -> Method.fit / Method.predict -> ModelService -> Scorer -> model.
"""

from __future__ import annotations

import logging
import platform
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from harness.backbones import Backbone, load_backbone
from harness.checkpoint import Checkpoint
from harness.data import FewShotSplit, TaskData, load_task_data, make_split
from harness.errors import HarnessError
from harness.meters import measure
from harness.metrics import score
from harness.profiles import Profile
from harness.progress import GridProgress, RunProgress, duration
from harness.prompts import PromptFormat
from harness.scoring import mask_string
from harness.service import ModelService
from harness.store import ResultsStore, RunSpec
from harness.tasks import TaskCard
from methods import get_method, registry
from methods.base import RunContext

log = logging.getLogger("harness")
PACKAGES = ("bbt-harness", "torch", "transformers", "datasets", "numpy", "cma", "peft", "pandas")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def method_config(method: str, profile: Profile, overrides: dict | None = None, task: str | None = None):
    cls = get_method(method).config_class
    values = {**profile.overrides_for(method, task), **(overrides or {})}
    unknown = set(values) - set(cls.__dataclass_fields__)
    if unknown:
        raise HarnessError(f"method '{method}' has no setting(s) {sorted(unknown)}; it has {sorted(cls.__dataclass_fields__)}")
    return cls(**values)


def expand(
    methods: list[str], tasks: list[str], seeds: list[int], backbone: str, profile: Profile, dtype: str = "float32"
) -> list[RunSpec]:
    specs = []
    for method in methods:
        # a method that uses no training data gives the same result for every split: run it once
        method_seeds = seeds if get_method(method).uses_train else seeds[:1]
        for task in tasks:
            config = asdict(method_config(method, profile, task=task))  # in the spec, so in the run's id
            for seed in method_seeds:
                specs.append(RunSpec(method, task, seed, backbone, profile.k_shot, profile.eval_cap, config, dtype))
    return specs


@dataclass
class GridSummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    scores: list[tuple[str, str, float, float]] = field(default_factory=list)  # label, metric, score, wall s

    def lines(self) -> list[str]:
        """The end-of-grid summary: what ran (with scores), what was skipped, what failed and why."""
        out = [f"ran {len(self.ran)}, skipped {len(self.skipped)} (finished before), failed {len(self.failed)}"]
        out += [f"  ran     {label}: {metric} {value:.2f} ({duration(wall)})" for label, metric, value, wall in self.scores]
        out += [f"  skipped {label}" for label in self.skipped]
        out += [f"  FAILED  {label}: {error}" for label, error in self.failed]
        return out


def run_one(
    spec: RunSpec, card: TaskCard, data: TaskData, split: FewShotSplit, backbone: Backbone | None, profile: Profile,
    checkpoint_path: Path | None = None, progress: RunProgress | None = None, service_options: dict | None = None,
    remote: Remote | None = None,
) -> dict:
    """One run. Black-box methods query the backbone in process, or, with `remote`, the server at its URL (then
    `backbone` is None: this process never holds the model, and its own memory is the user side's)."""
    cls = get_method(spec.method)
    config = cls.config_class(**spec.config)
    if remote is not None and not cls.as_a_service:
        raise HarnessError(needs_weights(spec.method))
    service = None
    if cls.as_a_service:
        service = remote.connect() if remote is not None else ModelService(backbone, **(service_options or {}))
    family, mask = (service.family, service.mask) if service else (backbone.family, mask_string(backbone.tokenizer, backbone.family))
    prompt = PromptFormat(card, family, mask)
    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = Checkpoint(checkpoint_path, service.meter if service else None)
    # black-box methods get the service only; gradient methods own the model
    backbone_for_method = None if cls.as_a_service else backbone
    ctx = RunContext(
        card, prompt, spec.seed, service=service, backbone=backbone_for_method, checkpoint=checkpoint,
        dtype=spec.dtype, progress=progress or RunProgress(),
    )
    method = cls(config, ctx)
    started = time.time()
    train_phase = service.phase("train") if service else nullcontext()
    eval_phase = service.phase("eval") if service else nullcontext()
    try:
        with measure() as meters:
            with train_phase:
                method.fit(split.train, split.dev)
            meters["fit_s"] = time.time() - started
            with eval_phase:
                preds = method.predict(split.eval)
    finally:
        method.close()  # the backbone is shared by the next run: a method undoes its changes, even on failure
    meters["user_tensor_mb"] = method.user_tensor_bytes() / 2**20
    if remote is not None:  # measured apart from the model: this process is the user's, the server reports its own
        meters["client_rss_peak_mb"] = meters["cpu_rss_peak_mb"]
        meters["server_peak_rss_mb"] = service.stats()["peak_rss_mb"]
        service.close()
    # on a CPU the thread count changes the order of bf16/float32 sums, and a search can amplify the difference
    meters["torch_threads"] = torch.get_num_threads()
    if checkpoint is not None and checkpoint.resumed_at:  # the time of the interrupted attempts counts too
        meters["wall_s"] += checkpoint.earlier_s
        meters["fit_s"] += checkpoint.earlier_s
        meters["resumed_at_calls"] = checkpoint.resumed_at
    gold = np.array([e["label"] for e in split.eval])
    return {
        "run_id": spec.run_id,
        "status": "ok",
        "spec": asdict(spec),
        "method": spec.method,
        "task": spec.task,
        "seed": spec.seed,
        "backbone": spec.backbone,
        "profile": profile.name,
        "config_hash": spec.config_hash,
        "group": cls.group,
        "as_a_service": cls.as_a_service,
        "deployment_efficient": cls.deployment_efficient,
        "tunable_parameters": method.tunable_parameters(),
        "metric": card.metric,
        "metrics": score(card, gold, preds),
        "split": {
            "seed": split.seed,
            "k_shot": spec.k_shot,
            "train_size": len(split.train),
            "dev_size": len(split.dev),
            "split_hash": split.split_hash,
            "eval_hash": split.eval_hash,
            "eval_size": split.eval_size,
            "eval_full_size": split.eval_full_size,
            "data_source": data.source,
            "caveats": {**data.caveats, **_cap_caveat(split)},
        },
        "meters": meters,
        "queries": service.meter.summary() if service else None,
        "service_options": dict(service_options or {}) if service and remote is None else None,
        "service": service.description() if service else None,
        "backbone_identity": service.info.identity if service else backbone.identity,
        "versions": package_versions(),
        "started": started,
        "trace": method.trace(),
    }


@dataclass(frozen=True)
class Remote:
    """A model server to run black-box methods against (`harness run --service-url`)."""

    url: str
    api_key: str | None = None

    def connect(self):
        from harness.client import RemoteService

        return RemoteService(self.url, self.api_key)


def needs_weights(method: str) -> str:
    return (f"method '{method}' is gradient-based: it trains the backbone's weights, which a model service does not "
            "give; run it without --service-url (black-box methods: "
            f"{', '.join(m for m, c in registry().items() if c.as_a_service)})")


def _cap_caveat(split: FewShotSplit) -> dict:
    if split.eval_size < split.eval_full_size:
        return {"eval_capped": f"scored on {split.eval_size} of {split.eval_full_size} eval rows"}
    return {}


def run_grid(
    specs: list[RunSpec],
    cards: dict[str, TaskCard],
    profile: Profile,
    store: ResultsStore,
    data_dir: str | None = None,
    service_options: dict | None = None,
    remote: Remote | None = None,
) -> GridSummary:
    """Runs the specs not yet finished in `store`. `service_options` switch the service's speed-ups
    (ModelService's bucketing, layer_reuse, compile); they change time, not results, so they are not part of a
    spec (each record keeps them). With `remote`, black-box methods query that server and no backbone is loaded
    here; a gradient method is refused before anything runs."""
    if remote is not None:
        for spec in specs:
            if not get_method(spec.method).as_a_service:
                raise HarnessError(needs_weights(spec.method))
    summary = GridSummary()
    finished = store.finished_ids()
    pending = []
    for spec in specs:
        if spec.run_id in finished:
            summary.skipped.append(spec.label())
        else:
            pending.append(spec)
    log.info("%d run(s) to do, %d already finished", len(pending), len(summary.skipped))
    if not pending:
        return summary
    # load every task's data first: a missing data dir fails before any compute is spent
    data = {task: load_task_data(cards[task], data_dir) for task in sorted({s.task for s in pending})}
    backbone, loaded = None, None
    progress = GridProgress(len(pending))
    for spec in pending:
        # black-box methods are served in the run's dtype; gradient methods keep float32 weights and compute in
        # it under autocast (half-precision weights would swallow small optimizer updates)
        wanted = (spec.backbone, spec.dtype if get_method(spec.method).as_a_service else "float32")
        if remote is None and wanted != loaded:
            backbone, loaded = None, None  # let the previous copy go before the next loads
            backbone, loaded = load_backbone(spec.backbone, dtype=wanted[1]), wanted
        run = progress.start(spec.label())
        split = make_split(cards[spec.task], data[spec.task], spec.k_shot, spec.seed, spec.eval_cap)
        try:
            record = run_one(
                spec, cards[spec.task], data[spec.task], split, backbone, profile,
                store.checkpoint_path(spec.run_id), run, service_options, remote,
            )
        except HarnessError:
            progress.close()
            raise  # a configuration error would fail every run alike: stop and say so
        except Exception as exc:
            progress.finish(run)
            log.error("%s failed: %s", spec.label(), exc)
            store.append({"run_id": spec.run_id, "status": "failed", "spec": asdict(spec), "error": traceback.format_exc()})
            summary.failed.append((spec.label(), f"{type(exc).__name__}: {exc}"))
            continue
        progress.finish(run)
        store.append(record)
        store.checkpoint_path(spec.run_id).unlink(missing_ok=True)  # the record holds all that is kept
        summary.ran.append(spec.label())
        summary.scores.append((spec.label(), record["metric"], record["metrics"]["score"], record["meters"]["wall_s"]))
        log.info(
            "    %s = %.2f  (%s)", record["metric"], record["metrics"]["score"], duration(record["meters"]["wall_s"])
        )
    progress.close()
    return summary
