"""The runner: expands a request into RunSpecs, skips finished ones, runs the rest and records each.

Call path: cli.run -> run_grid -> run_one (here, or in a Ray actor: harness/ray_executor.py) -> Method.fit /
Method.predict -> ModelService -> Scorer -> model.
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

from harness.backbones import Backbone, backbone_key, load_backbone
from harness.checkpoint import Checkpoint
from harness.data import FewShotSplit, TaskData, data_identity, load_task_data, make_split
from harness.errors import HarnessError
from harness.meters import measure
from harness.metrics import score
from harness.profiles import Profile
from harness.progress import GridProgress, RunProgress, duration
from harness.prompts import PromptFormat
from harness.ray_executor import RayOptions
from harness.record import Predictions, RunRecord, RunSpec
from harness.scoring import mask_string
from harness.service import ModelService
from harness.settings import method_config
from harness.store import ResultsStore
from harness.tasks import TaskCard, card_identity
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


@dataclass(frozen=True)
class Identities:
    """What names a grid's inputs beyond their names, so that an edited card, other data or other weights make new
    runs: per task the card's and the data's identity, and the backbone's (see RunSpec)."""

    cards: dict = field(default_factory=dict)  # task -> harness.tasks.card_identity
    data: dict = field(default_factory=dict)  # task -> harness.data.data_identity
    backbone: str = ""  # harness.backbones.backbone_key

    @classmethod
    def of(cls, cards: dict[str, TaskCard], tasks: list[str], data_dir: str | None, backbone_identity: dict) -> Identities:
        return cls(
            {t: card_identity(cards[t]) for t in tasks},
            {t: data_identity(cards[t], data_dir) for t in tasks},
            backbone_key(backbone_identity),
        )


def expand(
    methods: list[str], tasks: list[str], seeds: list[int], backbone: str, profile: Profile, dtype: str = "float32",
    ids: Identities | None = None,
) -> list[RunSpec]:
    ids = ids or Identities()
    specs = []
    for method in methods:
        # a method that uses no training data gives the same result for every split: run it once
        method_seeds = seeds if get_method(method).uses_train else seeds[:1]
        for task in tasks:
            config = asdict(method_config(method, profile, task))  # in the spec, so in the run's id
            for seed in method_seeds:
                specs.append(RunSpec(
                    method, task, seed, backbone, profile.shots(task), profile.eval_cap, config, dtype,
                    ids.cards.get(task, ""), ids.data.get(task, ""), ids.backbone,
                ))
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
) -> RunRecord:
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
        meters["resumed_at_calls" if cls.as_a_service else "resumed_at_steps"] = checkpoint.resumed_at
        if len(checkpoint.ran_on) > 1:  # the device or thread count changed at a resume
            meters["ran_on"] = checkpoint.ran_on
    gold = np.array([e["label"] for e in split.eval])
    return RunRecord(
        run_id=spec.run_id,
        status="ok",
        spec=spec,
        started=started,
        profile=profile.name,
        group=cls.group,
        as_a_service=cls.as_a_service,
        deployment_efficient=cls.deployment_efficient,
        tunable_parameters=method.tunable_parameters(),
        metric=card.metric,
        metrics=score(card, gold, preds),
        split={
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
        meters=meters,
        queries=service.meter.summary() if service else None,
        service_options=dict(service_options or {}) if service and remote is None else None,
        service=service.description() if service else None,
        backbone_identity=service.info.identity if service else backbone.identity,
        versions=package_versions(),
        trace=method.trace(),
        predictions=Predictions.of(split.eval_ids, preds, gold, card.positive_label if card.metric == "f1" else None),
    )


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


def wanted_backbone(spec: RunSpec) -> tuple[str, str]:
    """The backbone a run needs loaded, and in which dtype: black-box methods are served in the run's dtype;
    gradient methods keep float32 weights and compute in the run's dtype under autocast (half-precision weights
    would swallow small optimizer updates)."""
    return spec.backbone, spec.dtype if get_method(spec.method).as_a_service else "float32"


def run_grid(
    specs: list[RunSpec],
    cards: dict[str, TaskCard],
    profile: Profile,
    store: ResultsStore,
    data_dir: str | None = None,
    service_options: dict | None = None,
    remote: Remote | None = None,
    ray: RayOptions | None = None,
) -> GridSummary:
    """Runs the specs not yet finished in `store`. `service_options` switch the service's speed-ups
    (ModelService's bucketing, layer_reuse, compile); they change time, not results, so they are not part of a
    spec (each record keeps them). With `remote`, black-box methods query that server and no backbone is loaded
    here; a gradient method is refused before anything runs. With `ray`, the runs go to Ray actors
    (harness/ray_executor.py) and come back as records this process writes, as it does its own."""
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

    def done(spec: RunSpec, record: RunRecord) -> None:
        store.append(record)
        store.checkpoint_path(spec.run_id).unlink(missing_ok=True)  # the record holds all that is kept
        summary.ran.append(spec.label())
        summary.scores.append((spec.label(), record.metric, record.score, record.meters["wall_s"]))
        log.info("    %s = %.2f  (%s)", record.metric, record.score, duration(record.meters["wall_s"]))

    def failed(spec: RunSpec, error: str, record: RunRecord) -> None:
        log.error("%s failed: %s", spec.label(), error)
        store.append(record)
        summary.failed.append((spec.label(), error))

    # load every task's data first: a missing data dir fails before any compute is spent
    data = {task: load_task_data(cards[task], data_dir) for task in sorted({s.task for s in pending})}
    if ray is not None:
        from harness.ray_executor import run_on_ray

        run_on_ray(pending, cards, profile, store, data_dir, service_options, remote, ray, done, failed)
        return summary
    backbone, loaded = None, None
    progress = GridProgress(len(pending))
    for spec in pending:
        wanted = wanted_backbone(spec)
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
            failed(spec, f"{type(exc).__name__}: {exc}", RunRecord.failed(spec, traceback.format_exc(), time.time()))
            continue
        progress.finish(run)
        done(spec, record)
    progress.close()
    return summary
