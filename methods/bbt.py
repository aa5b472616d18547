"""BBT and BBTv2: derivative-free prompt search with CMA-ES (pycma) through the model service.

BBT (Sun et al., ICML 2022): a prompt of n_tokens vectors p = A z (+ p0) at the input layer; z in R^d is
optimised by CMA-ES on the 16-shot train set, one API call per candidate. BBTv2 (Sun et al., EMNLP 2022): a
prompt at every layer, each with its own projection and CMA-ES, optimised by divide and conquer. The optimiser
lives on the user side; the service receives z (or the prompt vectors, `send="prompt"`) and returns label logits.
Choices the papers leave open are listed in docs/bbt.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cma
import numpy as np

from harness.errors import HarnessError
from harness.metrics import score
from harness.prompting import ProjectionSpec, PromptSpec, draw_projections, project, projection_std
from methods import register
from methods.base import Method, MethodConfig, setting

LOSSES = ("auto", "ce", "hinge", "neg-metric")
ACCEPT = ("xbest", "generation-best", "global-best")
log = logging.getLogger("harness")


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = 2.0) -> float:
    """Multi-class margin loss (as torch's MultiMarginLoss): mean over examples of
    sum_{j != y} max(0, margin - s_y + s_j) / |labels|."""
    gold = logits[np.arange(len(labels)), labels][:, None]
    violations = np.maximum(0.0, margin - gold + logits)
    violations[np.arange(len(labels)), labels] = 0.0
    return float(violations.sum(axis=1).mean() / logits.shape[1])


@dataclass
class BBTConfig(MethodConfig):
    n_tokens: int = setting(50, "prompt tokens (per layer for BBTv2)")
    intrinsic_dim: int = setting(500, "d: the dimension CMA-ES searches (z in R^d)")
    popsize: int = setting(20, "CMA-ES population: candidates, hence API calls, per generation")
    sigma: float = setting(1.0, "CMA-ES's initial step size")
    alpha: float = setting(1.0, "projection std = alpha * sigma_hat / (sqrt(d) * sigma)")
    budget: int = setting(8000, "API calls, each one candidate scored on the train set")
    bound: float = setting(0.0, "box bound on z: 0 unbounded (the latest reference code), 5 for the paper era's [-5, 5]")
    loss: str = setting("auto", "auto (the task card's: ce, or hinge for pair tasks) | ce | hinge | neg-metric")
    margin: float = setting(2.0, "the hinge loss's margin")
    mode: str = setting("add", "add (into placeholder-token embeddings) | cat")
    dist: str = setting("normal", "projection init: normal | uniform")
    send: str = setting("z", "what travels per query: z (the server applies A) | prompt (the vectors)")
    eval_every: int = setting(100, "dev check (and checkpoint) period, in API calls")
    rounds: int = setting(0, "BBTv2 only: if set, spend rounds x popsize x layers calls instead of the budget",
                          unset="none; the call budget decides")
    batched: bool = setting(True, "one forward per generation (population batching) vs one per candidate")
    eval_batch_size: int = setting(32, "eval examples per query")

    # quick: a call costs ~1 s (sst2) to ~15 s (agnews) on a 2-core CPU; sst2's dev metric jumps between 200 and
    # 300 calls and agnews's still climbs at 200 (docs/bbt.md), so both get more
    profiles = {"quick": {"budget": 200, "eval_every": 40}}  # dev checks fall after whole generations (popsize 20)
    # the reference README recommends 20,000 API calls for DBpedia (in its BBT section); BBTv2 gets the same
    task_profiles = {"paper": {"dbpedia": {"budget": 20000}}, "quick": {"sst2": {"budget": 600}, "agnews": {"budget": 300}}}

    def idle(self) -> set[str]:
        return {"rounds"}  # BBT spends its budget; rounds is BBTv2's


@dataclass
class BBTv2Config(BBTConfig):
    # the reference README's BBTv2 command: the same projection std as BBT (alpha / sigma = 1), but CMA-ES starts
    # with a 5x smaller step
    sigma: float = 0.2
    alpha: float = 0.2
    accept: str = setting(
        "xbest", "what layer j keeps after each of its generations: xbest (the reference: its strategy's best so "
        "far) | generation-best | global-best (the generation's best, only when it beats every loss seen)",
    )

    profiles = {"quick": {"rounds": 1, "eval_every": 60}}  # one generation per layer: 18 x 20 calls on Gemma
    task_profiles = {"paper": BBTConfig.task_profiles["paper"]}  # BBT's quick budgets are not BBTv2's (rounds)

    def idle(self) -> set[str]:
        return {"budget"} if self.rounds else set()


class _BlackBoxPromptSearch(Method):
    """What BBT and BBTv2 share: the prompt protocol, losses, dev checks, prediction, trace."""

    config_class = BBTConfig
    group = "gradient-free"
    as_a_service = True
    deployment_efficient = True
    deep = False

    @classmethod
    def check_config(cls, config):
        choices = {"loss": LOSSES, "mode": ("add", "cat"), "dist": ("normal", "uniform"), "send": ("z", "prompt")}
        for name, allowed in choices.items():
            if getattr(config, name) not in allowed:
                raise HarnessError(f"{cls.name}: {name} must be one of {', '.join(allowed)}, not '{getattr(config, name)}'")
        cls.require_positive(config, "n_tokens", "intrinsic_dim", "popsize", "eval_every", "eval_batch_size")
        if config.popsize < 2:
            raise HarnessError(f"{cls.name}: popsize must be at least 2 (CMA-ES ranks candidates), got {config.popsize}")
        if config.sigma <= 0 or config.alpha < 0 or config.bound < 0 or config.rounds < 0:
            raise HarnessError(f"{cls.name}: sigma must be positive; alpha, bound and rounds not negative")
        if config.budget < config.popsize:
            raise HarnessError(f"{cls.name}: a budget of {config.budget} calls is below one generation ({config.popsize})")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.check_config(config)
        self.loss_name = ctx.card.loss if config.loss == "auto" else config.loss
        self.best_z: np.ndarray | None = None  # [slots, d]: the kept (best-dev) solution
        self.calls = 0
        self.setup_s = 0.0
        self.slots = 1
        self._trace = {"train": [], "dev": [], "stopped": []}
        self._best_dev = (-np.inf, np.inf)

    # --- the objective -------------------------------------------------------------------------------------
    def loss(self, logits: np.ndarray, labels: np.ndarray) -> float:
        if self.loss_name == "ce":
            return cross_entropy(logits, labels)
        if self.loss_name == "hinge":
            return hinge(logits, labels, self.config.margin)
        return -score(self.ctx.card, labels, logits.argmax(axis=1))["score"]

    def _sent(self, z: np.ndarray) -> np.ndarray:
        """What travels for candidates z [P, slots, d]: z itself, or the prompt vectors A z."""
        if self.config.send == "z":
            return z
        return project(self.spec, z, self.ctx.service.hidden_size, self._matrices).numpy()

    def evaluate(self, z: np.ndarray) -> tuple[list[float], np.ndarray]:
        """Score candidates [P, slots, d] on the train set: P API calls. Returns losses and logits."""
        logits = self.ctx.service.prompted_label_logits(
            self.train_texts, self.label_words, self._sent(z), sequential=not self.config.batched
        )
        self.calls += len(z)
        return [self.loss(l, self.train_labels) for l in logits], logits

    # --- setup shared by both ----------------------------------------------------------------------------
    def _setup(self, train, dev) -> None:
        service, prompt, cfg = self.ctx.service, self.ctx.prompt, self.config
        self.label_words = prompt.label_words
        self.train_texts = prompt.render_all(train)
        self.train_labels = np.array([e["label"] for e in train])
        self.dev_texts = prompt.render_all(dev)
        self.dev_labels = np.array([e["label"] for e in dev])
        slots = service.num_layers if self.deep else 1
        start = time.perf_counter()
        with service.phase("setup"):  # not API calls of the budget, but metered
            # the projection scale comes from statistics the service reports (one query), as the papers derive it
            sigma_hat = service.hidden_stds(self.train_texts)[:slots]
            stds = tuple(float(projection_std(s, cfg.intrinsic_dim, cfg.sigma, cfg.alpha)) for s in sigma_hat)
            projection = ProjectionSpec(cfg.intrinsic_dim, seed=self.ctx.seed, stds=stds, dist=cfg.dist)
            self.spec = PromptSpec(cfg.n_tokens, slots, cfg.mode, cfg.send, projection)
            service.configure_prompt(self.spec)  # send=z: the server draws its A now
            # send=prompt: A lives on this side; drawn now so the first query is not the one that pays for it
            self._matrices = draw_projections(self.spec, service.hidden_size, {}) if cfg.send == "prompt" else {}
        self.setup_s = time.perf_counter() - start  # one-off: the statistics query and drawing A (on either side)
        self.slots = slots

    def _strategy(self, slot: int) -> cma.CMAEvolutionStrategy:
        cfg = self.config
        # Each strategy samples from its own generator, pickled with it. pycma's default is numpy's global one:
        # BBTv2's strategies would share it, and a pickle copies it away from the sampler while pycma's other
        # draws (TPA's consistency check) stay on the global one, so a resumed run took another path.
        # seed=nan: pycma leaves numpy's global generator alone.
        stream = np.random.RandomState(1000 * self.ctx.seed + slot + 1)
        options = {"popsize": cfg.popsize, "randn": stream.randn, "seed": np.nan, "verbose": -9}
        if cfg.bound:
            options["bounds"] = [-cfg.bound, cfg.bound]
        return cma.CMAEvolutionStrategy(np.zeros(cfg.intrinsic_dim), cfg.sigma, options)

    def _stops(self, es: cma.CMAEvolutionStrategy, slot: int) -> bool:
        """pycma's own termination (the reference loops `while not es.stop()`), recorded with the calls spent."""
        reason = es.stop()
        if reason:
            why = {k: v.item() if isinstance(v, np.generic) else v for k, v in reason.items()}
            self._trace["stopped"].append({"slot": slot, "calls": self.calls, "reason": why})
            log.info("    %s: pycma stopped slot %d at %d calls (%s)", self.name, slot, self.calls, ", ".join(why))
        return bool(reason)

    def _record_train(self, best_loss: float, best_logits: np.ndarray) -> None:
        acc = float(np.mean(best_logits.argmax(axis=1) == self.train_labels) * 100)
        self._trace["train"].append({"calls": self.calls, "best_loss": best_loss, "best_accuracy": acc})

    def _dev_check(self, z: np.ndarray) -> None:
        """Score the incumbent on dev; keep it if it beats the best so far (metric, then lower dev loss)."""
        with self.ctx.service.phase("dev"):
            logits = self.ctx.service.prompted_label_logits(self.dev_texts, self.label_words, self._sent(z[None]))[0]
        metric = score(self.ctx.card, self.dev_labels, logits.argmax(axis=1))["score"]
        loss = self.loss(logits, self.dev_labels)
        self._trace["dev"].append({"calls": self.calls, "metric": metric, "loss": loss})
        best_train = self._trace["train"][-1]["best_loss"] if self._trace["train"] else float("nan")
        log.info("    %s %d calls: best train loss %.4f, dev %s %.2f", self.name, self.calls, best_train, self.ctx.card.metric, metric)
        if (metric, -loss) > (self._best_dev[0], -self._best_dev[1]):
            self._best_dev = (metric, loss)
            self.best_z = z.copy()

    def _save(self, loop: dict) -> None:
        """Checkpoint after a dev check: the journal of every generation's losses, which rebuilds the strategies
        (`_replay`), and what the run keeps. Pickled pycma strategies hold d x d matrices (4 MB for BBT at d = 500,
        74 MB for BBTv2's 18 on Gemma); the journal is at most a few hundred kB, small enough to carry between machines."""
        if self.ctx.checkpoint is not None:
            kept = {"calls": self.calls, "trace": self._trace, "best_dev": self._best_dev, "best_z": self.best_z}
            self.ctx.checkpoint.save({**{k: loop[k] for k in ("journal", "best_loss", "best_logits")}, **kept})

    def _resume(self, fresh: dict) -> dict:
        """The loop's state: `fresh`, or, if an interrupted attempt of this run saved one, its journal replayed."""
        saved = self.ctx.checkpoint.load() if self.ctx.checkpoint is not None else None
        if saved is None:
            return fresh
        self.calls, self._trace, self._best_dev, self.best_z = (
            saved["calls"], saved["trace"], saved["best_dev"], saved["best_z"])
        start = time.perf_counter()
        state = self._replay(fresh, saved["journal"])
        state["best_logits"] = saved["best_logits"]  # the only part the journal cannot give back
        if state["best_loss"] != saved["best_loss"] or len(state["journal"]) * self.config.popsize != self.calls:
            raise HarnessError(f"{self.name}: the checkpoint's journal does not replay to its own state; "
                               f"remove {self.ctx.checkpoint.path} to start the run afresh")
        log.info("    %s resumes at %d calls (%d generations replayed in %.1f s)", self.name, self.calls,
                 len(saved["journal"]), time.perf_counter() - start)
        return state

    def _tell(self, state: dict, es: cma.CMAEvolutionStrategy, z: np.ndarray, losses: list[float], logits=None) -> int:
        """CMA-ES's update for one generation, journaled, and the best train loss; returns the best candidate's
        index. The same code runs live and in a replay (logits None), so a resumed strategy is in the same state."""
        es.tell(list(z), losses)
        state["journal"].append([float(v) for v in losses])
        i = int(np.argmin(losses))
        if losses[i] < state["best_loss"]:
            state.update(best_loss=losses[i], best_logits=None if logits is None else logits[i])
        return i

    def _due(self, previous_calls: int) -> bool:
        every = self.config.eval_every
        return self.calls // every > previous_calls // every

    def _final_check(self, z: np.ndarray) -> None:
        """The whole budget is spent: make sure the last incumbent had its dev check too."""
        if not self._trace["dev"] or self._trace["dev"][-1]["calls"] != self.calls:
            self._dev_check(z)

    # --- prediction ----------------------------------------------------------------------------------------
    def predict(self, examples):
        service, prompt = self.ctx.service, self.ctx.prompt
        size = self.config.eval_batch_size
        preds = []
        for i in range(0, len(examples), size):
            texts = prompt.render_all(examples[i : i + size])
            logits = service.prompted_label_logits(texts, self.label_words, self._sent(self.best_z[None]))[0]
            preds.append(logits.argmax(axis=1))
        return np.concatenate(preds) if preds else np.zeros(0, dtype=int)

    def tunable_parameters(self) -> int:
        return self.config.intrinsic_dim * self.slots

    def trace(self):
        return {"loss": self.loss_name, "calls": self.calls, "best_dev": self._best_dev[0], **self._trace}


@register
class BBT(_BlackBoxPromptSearch):
    name = "bbt"
    rank = 50

    def fit(self, train, dev):
        self._setup(train, dev)
        state = self._resume(self._fresh())
        es = state["es"]
        self.ctx.progress.total(self.config.budget // self.config.popsize * self.config.popsize, "call", self.calls)
        stopped = bool(self._trace["stopped"])
        while self.calls + self.config.popsize <= self.config.budget and not stopped:
            before = self.calls
            z = np.asarray(es.ask())
            losses, logits = self.evaluate(z[:, None, :])
            self.ctx.progress.advance(len(z))
            self._tell(state, es, z, losses, logits)
            stopped = self._stops(es, 0)
            if stopped:
                self.ctx.progress.resize(self.calls)
            self._record_train(state["best_loss"], state["best_logits"])
            if self._due(before):
                self._dev_check(np.asarray(es.result.xfavorite)[None, :])  # pycma's incumbent: the mean
                self._save(state)
        self._final_check(np.asarray(es.result.xfavorite)[None, :])

    def _fresh(self) -> dict:
        return {"es": self._strategy(0), "best_loss": np.inf, "best_logits": None, "journal": []}

    def _replay(self, state, journal):
        es = state["es"]
        for losses in journal:
            self._tell(state, es, np.asarray(es.ask()), losses)
            es.stop()  # as the live loop asks it: pycma's stop check keeps state of its own
        return state


@register
class BBTv2(_BlackBoxPromptSearch):
    name = "bbtv2"
    rank = 51
    config_class = BBTv2Config
    deep = True

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.accept not in ACCEPT:
            raise HarnessError(f"bbtv2: accept must be one of {', '.join(ACCEPT)}, not '{config.accept}'")

    def fit(self, train, dev):
        self._setup(train, dev)
        cfg = self.config
        rounds = cfg.rounds or cfg.budget // (cfg.popsize * self.slots)
        if rounds == 0:
            raise HarnessError(
                f"bbtv2: a budget of {cfg.budget} calls cannot give one round over {self.slots} layers "
                f"({cfg.popsize * self.slots} calls); raise it"
            )
        state = self._resume(self._fresh())
        incumbent, steps = state["incumbent"], rounds * self.slots
        stopped = {s["slot"] for s in self._trace["stopped"]}  # layers pycma stopped; the others go on

        def planned(step: int) -> int:  # the calls spent so far plus those of the generations still to run
            return self.calls + cfg.popsize * sum(s % self.slots not in stopped for s in range(step, steps))

        self.ctx.progress.total(planned(state["step"]), "call", self.calls)
        for step in range(state["step"], steps):
            slot, es = step % self.slots, state["strategies"][step % self.slots]
            if slot in stopped:
                continue
            before = self.calls
            z = np.asarray(es.ask())
            candidates = np.repeat(incumbent[None], len(z), axis=0)
            candidates[:, slot] = z
            losses, logits = self.evaluate(candidates)
            self.ctx.progress.advance(len(z))
            self._generation(state, slot, z, losses, logits)
            self._record_train(state["best_loss"], state["best_logits"])
            if self._stops(es, slot):
                stopped.add(slot)
                self.ctx.progress.resize(planned(step + 1))
            if self._due(before):
                self._dev_check(incumbent)
                self._save(state)
            if len(stopped) == self.slots:
                break
        self._final_check(incumbent)

    def _fresh(self) -> dict:
        return {
            "strategies": [self._strategy(slot) for slot in range(self.slots)],
            "incumbent": np.zeros((self.slots, self.config.intrinsic_dim)),  # other layers stay frozen at their best
            "best_loss": np.inf,
            "best_logits": None,
            "journal": [],
            "step": 0,  # round * layers + layer: the next generation to run
        }

    def _generation(self, state, slot, z, losses, logits=None) -> None:
        """Layer `slot`'s generation: its strategy's update, then what the layer keeps (`accept`)."""
        es, best_before = state["strategies"][slot], state["best_loss"]
        i = self._tell(state, es, z, losses, logits)
        if self.config.accept == "xbest":
            state["incumbent"][slot] = es.result.xbest
        elif self.config.accept == "generation-best" or losses[i] < best_before:
            state["incumbent"][slot] = z[i]

    def _replay(self, state, journal):
        stopped = set()
        for losses in journal:
            while state["step"] % self.slots in stopped and len(stopped) < self.slots:
                state["step"] += 1  # the live loop skips a stopped layer's turns the same way
            slot, es = state["step"] % self.slots, state["strategies"][state["step"] % self.slots]
            self._generation(state, slot, np.asarray(es.ask()), losses)
            if es.stop():
                stopped.add(slot)
            state["step"] += 1
        return state
