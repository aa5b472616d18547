"""The run record: what a finished (or failed) run leaves, written and read here and nowhere else.

A record is complete when it is written: the spec (hence the run's identity), the scores, the per-example
predictions, the split's hashes, the meters, the query accounting, the trace and the package versions.

Schema 2 (this one) adds to the spec the task card's, the data's and the backbone's identities, and stores the
predictions. Schema-1 records (no `schema` key) stay readable: their run ids cannot say which card or data they
used, so they are never taken for a schema-2 run, and reports mark them (`legacy`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from hashlib import sha256

import numpy as np

SCHEMA = 2
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # a predicted label id per character (up to 36 labels)


def stable_hash(payload) -> str:
    return sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's result; its hash is the run's id."""

    method: str
    task: str
    seed: int
    backbone: str
    k_shot: int
    eval_cap: int | None
    config: dict = field(hash=False)  # the method's config, every field
    dtype: str = "float32"  # the forward's compute dtype (bf16 on a GPU by default)
    card_id: str = ""  # harness.tasks.card_identity: the task card's content
    data_id: str = ""  # harness.data.data_identity: the task data's files (or hub location)
    backbone_id: str = ""  # harness.backbones.backbone_key: the weights (GGUF sha256, hub id)

    @property
    def run_id(self) -> str:
        return stable_hash(asdict(self))

    def label(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}/{self.backbone}"

    @classmethod
    def from_json(cls, raw: dict) -> RunSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})  # older specs lack the later fields: defaults


@dataclass(frozen=True)
class Predictions:
    """Which eval rows were scored, what was predicted and the gold labels, compactly: rows as [start, stop) ranges
    of row indices into the task's eval split (a capped eval set is a sorted sample, the full one a single range),
    labels and gold as one base-36 character per row, in the rows' order. The gold labels let a report pair two
    runs' predictions (a paired test) from the records alone, without the data files."""

    rows: list
    labels: str
    gold: str = ""  # empty in records written before the gold labels were stored
    positive: int | None = None  # the positive class, where the task's metric is F1

    @classmethod
    def of(cls, row_ids, labels, gold, positive: int | None = None) -> Predictions:
        row_ids = [int(i) for i in row_ids]
        if not len(row_ids) == len(labels) == len(gold):
            raise ValueError(f"{len(row_ids)} eval rows but {len(labels)} predictions and {len(gold)} gold labels")
        ranges: list[list[int]] = []
        for i in row_ids:
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return cls(ranges, _digits(labels), _digits(gold), positive)

    def row_ids(self) -> list[int]:
        return [i for start, stop in self.rows for i in range(start, stop)]

    def label_ids(self) -> np.ndarray:
        return _ids(self.labels)

    def gold_ids(self) -> np.ndarray | None:
        return _ids(self.gold) if self.gold else None


def _digits(labels) -> str:
    return "".join(DIGITS[int(label)] for label in labels)


def _ids(text: str) -> np.ndarray:
    return np.array([DIGITS.index(c) for c in text], dtype=np.int64)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    status: str  # ok | failed
    spec: RunSpec
    started: float = 0.0
    schema: int = SCHEMA
    profile: str = ""
    group: str = ""  # gradient-free | gradient-based
    as_a_service: bool = False
    deployment_efficient: bool = False
    tunable_parameters: int = 0
    metric: str = ""
    metrics: dict = field(default_factory=dict)  # {"score": ..., and the metric's parts}
    split: dict = field(default_factory=dict)  # seed, sizes, hashes, data source, caveats
    meters: dict = field(default_factory=dict)  # time, memory, threads, device
    queries: dict | None = None  # per phase: the service's query accounting (black-box methods)
    service_options: dict | None = None
    service: dict | None = None  # the transport (in process or HTTP), its URL and limits
    backbone_identity: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    trace: dict | None = None
    predictions: Predictions | None = None
    error: str | None = None  # a failed run's traceback
    # a schema-1 record as it was read, written back unchanged (so published records regenerate byte for byte)
    source: dict | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def legacy(self) -> bool:
        return self.schema < SCHEMA

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def backbone(self) -> str:
        return self.spec.backbone

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def score(self) -> float:
        return self.metrics["score"]

    def to_json(self) -> dict:
        if self.source is not None:
            return self.source
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        out["spec"] = asdict(self.spec)
        out["predictions"] = asdict(self.predictions) if self.predictions else None
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, raw: dict) -> RunRecord:
        schema = raw.get("schema", 1)
        if schema > SCHEMA:
            raise ValueError(f"record {raw.get('run_id')} has schema {schema}; this harness reads up to {SCHEMA}: upgrade it")
        known = {f.name for f in fields(cls)} - {"source", "spec", "predictions", "schema"}
        values = {k: v for k, v in raw.items() if k in known}
        spec = RunSpec.from_json(raw["spec"])
        predictions = Predictions(**raw["predictions"]) if raw.get("predictions") else None
        return cls(**values, spec=spec, schema=schema, predictions=predictions, source=raw if schema < SCHEMA else None)

    @classmethod
    def failed(cls, spec: RunSpec, error: str, started: float) -> RunRecord:
        return cls(run_id=spec.run_id, status="failed", spec=spec, started=started, error=error)
