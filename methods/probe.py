"""What the feature-probe baselines (Feature-MLP, Feature-BiLSTM) share: the texts sent for features, the
user-side feature cache and standardisation, and the training loop with dev-based selection.

Both reach the backbone only through `service.features`; everything here runs on the user side in torch.
One training query sends the whole train split (and one more the whole dev split), as one BBT API call scores
the whole train set, so their bytes per query compare with the papers' cost table (Feature-MLP download =
N x hidden x 4 B; Feature-BiLSTM = N x max_len x hidden x 4 B, here plus N x 4 B of int32 lengths).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harness.data import Example
from harness.errors import HarnessError
from harness.metrics import score
from methods.base import Method, MethodConfig, setting

INPUTS = ("auto", "raw", "template")


@dataclass
class ProbeConfig(MethodConfig):
    """Fields both probes have; each probe's module documents its defaults and their source."""

    # "raw": the text fields joined by a newline (no prompt, as the papers' RoBERTa probes); "template": the task's
    # prompt; "auto": raw for masked LMs and encoder-decoders, template for causal LMs, whose last-token state
    # after a bare sentence says little about the label (Gemma sst2 Feature-MLP, 100 rows: raw 60.0, template 78.0)
    input: str = setting("auto", "what the features are of: auto | raw (the text fields) | template (the task's prompt)")
    hidden_size: int = setting(1024, "the probe's hidden width")
    dropout: float = setting(0.1, "dropout in the probe")
    lr: float = setting(1e-3, "Adam learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    epochs: int = setting(100, "training epochs over the 16-shot train split")
    batch_size: int = setting(16, "training examples per optimiser step (user side)")
    query_batch: int = setting(32, "examples per features query")
    standardize: bool = setting(True, "z-score each feature dimension with the train split's statistics")
    device: str = setting("cpu", "where the user-side probe trains: the user's machine, not the service's")


def tensor_bytes(tensors) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors if t is not None)


@dataclass
class FeatureSet:
    """User-side features: x is [N, hidden] (pooled) or [N, max_len, hidden] with lengths [N] (tokens)."""

    x: torch.Tensor
    lengths: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> "FeatureSet":
        if self.lengths is None:
            return FeatureSet(self.x[index])
        lengths = self.lengths[index]
        return FeatureSet(self.x[index, : int(lengths.max())], lengths)  # trim padding no row in the batch needs

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def nbytes(self) -> int:
        return tensor_bytes([self.x, self.lengths])


class FeatureProbe(Method):
    """A user-side torch model trained on features the service returns; subclasses give the kind and model."""

    kind: ClassVar[str]  # "pooled" | "tokens"
    group = "gradient-free"  # no gradient ever reaches the backbone
    as_a_service = True
    deployment_efficient = True  # the backbone serves every task unchanged
    uses_train = True

    def __init__(self, config: ProbeConfig, ctx):
        super().__init__(config, ctx)
        self.check_config(config)
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.best_state: dict | None = None
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cached: list[FeatureSet] = []
        self.eval_batch_bytes = 0
        self.history: list[dict] = []
        self.best_epoch = 0

    # --- what a subclass provides
    def build_model(self, input_size: int, num_labels: int) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: ProbeConfig) -> None:
        name = cls.name
        if config.input not in INPUTS:
            raise HarnessError(f"{name}: input '{config.input}' is not one of {', '.join(INPUTS)}")
        cls.require_positive(config, "hidden_size", "epochs", "batch_size", "query_batch")
        if not 0 <= config.dropout < 1:
            raise HarnessError(f"{name}: dropout must be in [0, 1), got {config.dropout}")
        if config.lr <= 0 or config.weight_decay < 0:
            raise HarnessError(f"{name}: lr must be positive and weight_decay not negative; got {config}")

    # --- the service side of the conversation
    def texts(self, examples: list[Example]) -> list[str]:
        prompt = self.ctx.prompt
        use = self.config.input
        if use == "template" or (use == "auto" and prompt.family == "clm"):
            return prompt.render_all(examples)
        card = prompt.card
        return ["\n".join(e[f][: card.max_chars] for f in card.fields) for e in examples]

    def query(self, examples: list[Example]) -> FeatureSet:
        """One features query; arrays are wrapped without a copy, then standardised (a new user-side tensor)."""
        got = self.ctx.service.features(self.texts(examples), self.kind)
        device = self.config.device
        if self.kind == "pooled":
            features = FeatureSet(torch.from_numpy(np.asarray(got)).to(device))
        else:
            features = FeatureSet(torch.from_numpy(got.values).to(device), torch.from_numpy(got.lengths).long().to(device))
        return self.standardized(features)

    def standardized(self, features: FeatureSet) -> FeatureSet:
        if self.stats is None:
            return features
        mean, std = self.stats
        x = (features.x - mean) / std
        if features.lengths is not None:  # keep padding at zero
            x = x * _real(features).unsqueeze(-1)
        return FeatureSet(x, features.lengths)

    def fit_stats(self, features: FeatureSet) -> None:
        """Per-dimension mean and std over the train split's vectors (real tokens only, for token features)."""
        if not self.config.standardize:
            return
        rows = features.x if features.lengths is None else features.x[_real(features).bool()]
        self.stats = (rows.mean(dim=0), rows.std(dim=0).clamp(min=1e-6))

    # --- the user side: training with dev-based selection
    def fit(self, train, dev):
        labels = self.ctx.card.num_labels
        x_train = self.query(train)  # one query: the whole train split (standardisation not fitted yet)
        self.fit_stats(x_train)
        x_train = self.standardized(x_train)
        x_dev = self.query(dev)  # one query: the whole dev split
        self.cached = [x_train, x_dev]
        y_train = torch.tensor([e["label"] for e in train], device=self.config.device)
        gold_dev = np.array([e["label"] for e in dev])
        # fork the RNG so the seed fixes initialisation, shuffling and dropout without touching global state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.seed)
            self.model = self.build_model(x_train.x.shape[-1], labels).to(self.config.device)
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
            )
            best_key = None
            self.ctx.progress.total(self.config.epochs, "epoch")
            for epoch in range(1, self.config.epochs + 1):
                loss = self.train_epoch(x_train, y_train)
                self.ctx.progress.advance()
                dev_logits = self.logits(x_dev)
                dev_loss = float(F.cross_entropy(dev_logits, torch.as_tensor(gold_dev, device=dev_logits.device)))
                dev_score = score(self.ctx.card, gold_dev, dev_logits.argmax(dim=1).cpu().numpy())["score"]
                self.history.append({"epoch": epoch, "train_loss": loss, "dev_loss": dev_loss, "dev_score": dev_score})
                key = (dev_score, -dev_loss)  # 32 dev rows tie often on the metric: the lower dev loss breaks ties
                if best_key is None or key > best_key:
                    best_key, self.best_epoch = key, epoch
                    self.best_state = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.best_state)

    def train_epoch(self, x: FeatureSet, y: torch.Tensor) -> float:
        self.model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), self.config.batch_size):
            index = order[i : i + self.config.batch_size]
            loss = F.cross_entropy(self.forward(x.take(index)), y[index.to(y.device)])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(index)
        return total / len(x)

    def forward(self, x: FeatureSet) -> torch.Tensor:
        return self.model(x.x) if x.lengths is None else self.model(x.x, x.lengths)

    @torch.no_grad()
    def logits(self, x: FeatureSet) -> torch.Tensor:
        self.model.eval()
        return self.forward(x)

    def predict(self, examples):
        if self.model is None:
            raise HarnessError(f"{self.name}: predict before fit")
        preds = []
        for i in range(0, len(examples), self.config.query_batch):
            features = self.query(examples[i : i + self.config.query_batch])
            self.eval_batch_bytes = max(self.eval_batch_bytes, features.nbytes)
            preds.append(self.logits(features).argmax(dim=1).cpu().numpy())
        return np.concatenate(preds) if preds else np.zeros(0, dtype=int)

    # --- the cost row
    def tunable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.model else 0

    def user_tensor_bytes(self) -> int:
        """Torch tensors held on the user side: parameters, their gradients, AdamW's two moments, the kept best
        dev state, the cached (standardised) train/dev features and statistics, plus the largest eval batch."""
        if self.model is None:
            return 0
        params = list(self.model.parameters())
        held = tensor_bytes(params) + tensor_bytes(p.grad for p in params)
        held += tensor_bytes(t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
        held += tensor_bytes(self.best_state.values())
        held += sum(f.nbytes for f in self.cached) + tensor_bytes(self.stats or ())
        return held + self.eval_batch_bytes

    def trace(self):
        if not self.history:
            return None
        return {"best_epoch": self.best_epoch, "epochs": self.history}


def _real(features: FeatureSet) -> torch.Tensor:
    """[N, max_len] float mask of real token positions."""
    positions = torch.arange(features.x.shape[1], device=features.lengths.device)
    return (positions.unsqueeze(0) < features.lengths.unsqueeze(1)).to(features.x.dtype)
