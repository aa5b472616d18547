"""Task data through the `datasets` library, and the BBT protocol's 16-shot splits.

Two sources, tried in this order: a local directory laid out like ../shared/data (`--data-dir` or
HARNESS_DATA_DIR: `<dir>/<card.local.train>` etc., JSON lines with the hub's field names), then the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.tasks import TaskCard

Example = dict  # the card's text fields plus "label"


@dataclass
class TaskData:
    train: list[Example]  # the whole training split (or the local pool)
    eval: list[Example]
    source: str  # "local:<dir>" or "hub:<path>/<name>"
    caveats: dict = field(default_factory=dict)  # train_is_pool / eval_subset notes that reports must carry


def data_dir(explicit: str | None = None) -> Path | None:
    chosen = explicit or os.environ.get("HARNESS_DATA_DIR")
    return Path(chosen) if chosen else None


def _clean(card: TaskCard, rows) -> list[Example]:
    out = []
    for row in rows:
        label = int(row["label"])
        if label in card.drop_labels:
            continue
        if not 0 <= label < card.num_labels:
            raise HarnessError(f"task '{card.name}': label {label} is outside 0..{card.num_labels - 1}")
        example = {"label": label}
        for name in card.fields:
            if name not in row:
                raise HarnessError(f"task '{card.name}': a row lacks the field '{name}' (has {sorted(row)})")
            text = str(row[name])
            for old, new in card.replace:
                text = text.replace(old, new)
            example[name] = " ".join(text.split())  # also strips the leading space DBpedia content carries
        out.append(example)
    return out


def _load_local(card: TaskCard, folder: Path) -> TaskData:
    import datasets

    if not card.local:
        raise HarnessError(f"task '{card.name}' has no local layout in {card.path}")
    files = {split: folder / card.local[split] for split in ("train", "eval")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise HarnessError(
            f"task '{card.name}': {', '.join(missing)} not found under the data dir {folder} "
            f"(expected the layout {card.local['train']}, {card.local['eval']})"
        )
    loaded = {}
    for split, path in files.items():  # one at a time: a split's extra columns need not match the other's
        try:
            loaded[split] = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as exc:  # datasets raises several types for malformed JSON
            raise HarnessError(f"task '{card.name}': could not read {path}: {exc}") from exc
    caveats = {k: card.local[k] for k in ("train_is_pool", "eval_subset") if k in card.local}
    return TaskData(_clean(card, loaded["train"]), _clean(card, loaded["eval"]), f"local:{folder}", caveats)


def _load_hub(card: TaskCard) -> TaskData:
    import datasets

    args = dict(card.hf)
    path = args.pop("path")
    loaded = datasets.load_dataset(path, args.pop("name", None), **args)
    return TaskData(_clean(card, loaded[card.train_split]), _clean(card, loaded[card.eval_split]), f"hub:{path}")


def load_task_data(card: TaskCard, explicit_dir: str | None = None) -> TaskData:
    folder = data_dir(explicit_dir)
    if folder is not None:
        return _load_local(card, folder)
    try:
        return _load_hub(card)
    except Exception as exc:
        raise HarnessError(
            f"task '{card.name}': no local data dir was given and the hub load of {card.hf} failed "
            f"({type(exc).__name__}: {str(exc)[:200]}).\nFix: pass --data-dir DIR or set HARNESS_DATA_DIR to a folder "
            f"laid out as {card.local.get('train', '<task>/train.jsonl')} and {card.local.get('eval', '<task>/eval.jsonl')}"
        ) from exc


@dataclass
class FewShotSplit:
    train: list[Example]
    dev: list[Example]
    eval: list[Example]
    seed: int
    split_hash: str  # train + dev content
    eval_hash: str
    eval_full_size: int
    eval_ids: list[int] = field(default_factory=list)  # each eval row's index in the task's eval split

    @property
    def eval_size(self) -> int:
        return len(self.eval)


def content_hash(rows: list[Example]) -> str:
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def few_shot(card: TaskCard, rows: list[Example], k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """BBT protocol: shuffle with numpy seed; walking in order, the first k per class go to train, the next k to dev.

    Candidates with a field over card.max_chars are skipped (the papers drop inputs over 512 tokens; a character
    bound keeps the split independent of the backbone's tokenizer).
    """
    order = np.random.RandomState(seed).permutation(len(rows))
    train, dev = [], []
    taken = [0] * card.num_labels
    for index in order:
        row = rows[index]
        if any(len(row[f]) > card.max_chars for f in card.fields):
            continue
        label = row["label"]
        if taken[label] < k:
            train.append(row)
        elif taken[label] < 2 * k:
            dev.append(row)
        else:
            continue
        taken[label] += 1
        if min(taken) == 2 * k:
            break
    short = [card.labels[i] for i, n in enumerate(taken) if n < 2 * k]
    if short:
        raise HarnessError(f"task '{card.name}': fewer than {2 * k} training examples for class(es) {short}")
    return train, dev


def eval_rows(card: TaskCard, rows: list[Example], cap: int | None, per_class_cap: int | None = None) -> list[int]:
    """The eval set's row indices: optionally capped per class (skewed local sets), then to `cap` rows, stratified.

    Sampling uses a fixed seed (0), not the split seed, so every method and seed is scored on the same rows.
    """
    rng = np.random.RandomState(0)
    by_class = [[i for i, r in enumerate(rows) if r["label"] == c] for c in range(card.num_labels)]
    if per_class_cap:
        by_class = [list(rng.permutation(ix)[:per_class_cap]) if len(ix) > per_class_cap else ix for ix in by_class]
    chosen = sorted(i for ix in by_class for i in ix)
    if cap and len(chosen) > cap:
        total = len(chosen)
        quota = [round(cap * len(ix) / total) for ix in by_class]  # proportional: keeps the class balance
        chosen = sorted(int(i) for ix, q in zip(by_class, quota) for i in rng.permutation(ix)[:q])
    return [int(i) for i in chosen]


def make_split(card: TaskCard, data: TaskData, k: int, seed: int, eval_cap: int | None) -> FewShotSplit:
    train, dev = few_shot(card, data.train, k, seed)
    per_class = card.local.get("eval_per_class_cap") if data.source.startswith("local:") else None
    ids = eval_rows(card, data.eval, eval_cap, per_class)
    rows = [data.eval[i] for i in ids]
    return FewShotSplit(train, dev, rows, seed, content_hash(train + dev), content_hash(rows), len(data.eval), ids)


_FILE_HASHES: dict[tuple, str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()[:16]
    return _FILE_HASHES[key]


def data_identity(card: TaskCard, explicit_dir: str | None = None) -> str:
    """What names a task's data without loading it: the local files' contents (not where they lie), or the hub
    location the card names (the hub's revision is recorded with each run's data source)."""
    folder = data_dir(explicit_dir)
    if folder is not None and card.local:
        files = {split: folder / card.local[split] for split in ("train", "eval")}
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            raise HarnessError(f"task '{card.name}': {', '.join(missing)} not found under the data dir {folder}")
        return "local:" + content_hash({split: _file_hash(p) for split, p in files.items()})
    return "hub:" + content_hash({"hf": card.hf, "splits": [card.train_split, card.eval_split]})
