"""`harness run --executor ray`: the grid on Ray, one long-lived model per actor, one writer.

Each actor (`RunWorker`) loads a backbone once (by name and dtype) and runs many runs with it; the driver hands an
idle actor the next pending run for the backbone it already holds, so weights are loaded once per actor, not once
per run. Actors return records; only the driver appends to the store (fsync'd, as in process). A run's checkpoint
goes to a folder every actor can reach (`--checkpoint-dir`, by default the store's), so a run whose actor died is
taken up by another actor from its last checkpoint, up to `max_retries` times, then recorded as failed. Ctrl-C
shuts Ray down, losing at most the runs in flight; the same command then finishes the grid.

With fractional GPUs (`--gpus-per-run 0.25`) four actors share one GPU. On a cluster (`ray start --head`, then
`--ray-address auto|HOST:PORT`) the actors go wherever Ray has room; the store and checkpoint folder must then be
on a filesystem the driver and every node share.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.record import RunRecord, RunSpec

log = logging.getLogger("harness")


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray started here; "auto" or HOST:PORT: an existing cluster
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    actors: int | None = None  # default: as many as the cluster's CPUs (GPUs) allow
    max_retries: int = 2  # a run whose actor dies is retried this many times, then recorded as failed
    # "module:function" loading a backbone (name, dtype) inside an actor; tests give tiny random ones
    loader: str = "harness.backbones:load_backbone"

    def __post_init__(self):
        if self.cpus_per_run <= 0 or self.gpus_per_run < 0 or self.max_retries < 0 or (self.actors is not None and self.actors < 1):
            raise HarnessError("--cpus-per-run must be positive, --gpus-per-run and --max-retries not negative, "
                               f"--actors at least 1; got {self}")


class RunWorker:
    """A Ray actor: holds one backbone at a time and the tasks' data, and runs the runs it is given."""

    def __init__(self, data_dir: str | None, service_options: dict | None, remote, threads: int, loader: str):
        import torch

        torch.set_num_threads(threads)
        module, _, name = loader.partition(":")
        self.load = getattr(__import__(module, fromlist=[name]), name)
        self.data_dir, self.service_options, self.remote = data_dir, service_options, remote
        self.backbone, self.loaded, self.data = None, None, {}

    def run(self, spec: RunSpec, card, profile, checkpoint: str) -> RunRecord:
        from harness.data import load_task_data, make_split
        from harness.progress import RunProgress
        from harness.runner import run_one, wanted_backbone

        wanted = wanted_backbone(spec)
        if self.remote is None and wanted != self.loaded:  # against a model server, an actor holds no weights
            self.backbone, self.loaded = None, None  # let the previous copy go before the next loads
            self.backbone, self.loaded = self.load(spec.backbone, dtype=wanted[1]), wanted
        if spec.task not in self.data:
            self.data[spec.task] = load_task_data(card, self.data_dir)
        data = self.data[spec.task]
        split = make_split(card, data, spec.k_shot, spec.seed, spec.eval_cap)
        progress = RunProgress(spec.label(), log_every_s=float("inf"))  # the driver logs the grid's progress
        return run_one(spec, card, data, split, self.backbone, profile, Path(checkpoint), progress,
                       self.service_options if self.remote is None else None, self.remote)


def _actor_count(ray, options: RayOptions, runs: int) -> int:
    if options.actors:
        return min(options.actors, runs)
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) // options.cpus_per_run)
    if options.gpus_per_run:
        fit = min(fit, int(resources.get("GPU", 0) // options.gpus_per_run))
    if fit < 1:
        raise HarnessError(f"the Ray cluster ({resources}) has no room for one run of {options.cpus_per_run} CPUs and "
                           f"{options.gpus_per_run} GPUs")
    return min(fit, runs)


def run_on_ray(pending: list[RunSpec], cards: dict, profile, store, data_dir, service_options, remote,
               options: RayOptions, on_record, on_failure) -> None:
    """Runs `pending` on Ray actors; `on_record(spec, record)` and `on_failure(spec, error, record)` are the
    in-process executor's own bookkeeping (store, summary, log), called here in the driver only."""
    try:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    except ImportError as exc:
        raise HarnessError("--executor ray needs Ray: pip install 'ray>=2.40' (or the project's [ray] extra)") from exc
    from harness.progress import GridProgress
    from harness.runner import wanted_backbone

    lost = (RayActorError, ActorDiedError, ActorUnavailableError)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    threads = max(1, int(options.cpus_per_run))
    gpus = 0.0 if remote is not None else options.gpus_per_run  # against a model server: CPU-only tasks
    worker = ray.remote(num_cpus=options.cpus_per_run, num_gpus=gpus, max_restarts=0)(RunWorker)
    count = _actor_count(ray, options, len(pending))
    log.info("Ray %s: %d actor(s), each %g CPU(s) and %g GPU(s); checkpoints in %s", ray.__version__, count,
             options.cpus_per_run, gpus, store.checkpoint_path("<run id>").parent)

    def new_actor():
        return worker.remote(data_dir, service_options, remote, threads, options.loader)

    # grouped by backbone (and dtype): an actor keeps what it loaded for the runs after
    queue = deque(sorted(pending, key=wanted_backbone))
    idle = [new_actor() for _ in range(count)]
    holds: dict = {}  # actor -> the (backbone, dtype) it was last given
    in_flight: dict = {}  # ObjectRef -> (actor, spec, progress)
    attempts: Counter = Counter()
    progress = GridProgress(len(pending), parallel=count)
    try:
        while queue or in_flight:
            while idle and queue:
                actor = idle.pop()
                held = holds.get(actor)
                spec = next((s for s in queue if wanted_backbone(s) == held), queue[0])
                queue.remove(spec)
                holds[actor] = wanted_backbone(spec)
                ref = actor.run.remote(spec, cards[spec.task], profile, str(store.checkpoint_path(spec.run_id)))
                in_flight[ref] = (actor, spec, progress.start(spec.label(), "Ray"))
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, spec, run = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except lost as exc:  # the actor's process is gone (killed, out of memory, a lost node)
                attempts[spec.run_id] += 1
                holds.pop(actor, None)
                idle.append(new_actor())
                if attempts[spec.run_id] <= options.max_retries:
                    log.warning("%s: its actor died (%s); retry %d of %d, from its last checkpoint", spec.label(),
                                type(exc).__name__, attempts[spec.run_id], options.max_retries)
                    queue.appendleft(spec)
                    progress.begun -= 1  # started again below
                    continue
                progress.finish(run)
                on_failure(spec, f"its actor died {attempts[spec.run_id]} times: {exc}",
                           RunRecord.failed(spec, traceback.format_exc(), time.time()))
                continue
            except RayTaskError as exc:
                idle.append(actor)
                progress.finish(run)
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, HarnessError):
                    raise cause  # a configuration error would fail every run alike: stop and say so
                on_failure(spec, f"{type(cause).__name__}: {cause}", RunRecord.failed(spec, str(exc), time.time()))
                continue
            idle.append(actor)
            progress.finish(run)
            on_record(spec, record)
    finally:  # Ctrl-C or an error: the runs in flight are lost (their checkpoints stay); the rest wait for a rerun
        progress.close()
        if started_here:
            ray.shutdown()
