"""Task cards: small declarative YAML files in `datasets/`, in any folder given with --tasks-dir (or
HARNESS_TASKS_DIR), or in an installed package's folder declared in the `bbt_harness.tasks` entry-point group
(its value a module, whose folder holds the cards, or a callable returning the folder).

Adding a task needs only a new card; this module validates cards so a malformed one fails with a clear error.
A card's identity (`card_identity`) hashes everything in it that can change a result, so an edited card makes
its runs new runs.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from harness.backbones import FAMILIES
from harness.errors import HarnessError, unknown_name

CARDS_DIR = Path(__file__).resolve().parent.parent / "datasets"
ENTRY_POINT_GROUP = "bbt_harness.tasks"
METRICS = ("accuracy", "f1")


@dataclass(frozen=True)
class Template:
    template: str
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class TaskCard:
    name: str
    fields: tuple[str, ...]
    labels: tuple[str, ...]
    metric: str
    templates: dict  # family -> Template
    hf: dict = field(default_factory=dict)  # load_dataset arguments
    local: dict = field(default_factory=dict)  # train / eval file paths under the data dir, plus caveats
    train_split: str = "train"
    eval_split: str = "validation"
    description: str = ""
    replace: tuple = ()
    drop_labels: tuple = ()
    positive_label: int = 1
    loss: str = "ce"  # the training loss black-box methods use by default: ce | hinge (BBT recommends hinge for pairs)
    max_chars: int = 2000  # longer training candidates are skipped, longer eval fields cut (~512 tokens)
    path: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def template_for(self, family: str) -> Template:
        if family not in self.templates:
            raise HarnessError(f"task '{self.name}' has no template for the {family} family; add one to {self.path}")
        return self.templates[family]


def _parse(path: Path) -> TaskCard:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise HarnessError(f"task card {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise HarnessError(f"task card {path} must be a mapping")
    missing = [key for key in ("name", "fields", "labels", "metric", "templates") if key not in raw]
    if missing:
        raise HarnessError(f"task card {path} lacks {', '.join(missing)}")
    if raw["metric"] not in METRICS:
        raise HarnessError(f"task card {path}: metric '{raw['metric']}' is not one of {', '.join(METRICS)}")
    if raw.get("loss", "ce") not in ("ce", "hinge"):
        raise HarnessError(f"task card {path}: loss '{raw['loss']}' is not one of ce, hinge")
    templates = {}
    for family, entry in raw["templates"].items():
        if family not in FAMILIES:
            raise HarnessError(f"task card {path}: template family '{family}' is not one of {', '.join(FAMILIES)}")
        words = tuple(entry.get("label_words", ()))
        if len(words) != len(raw["labels"]):
            raise HarnessError(
                f"task card {path}: {family} has {len(words)} label words for {len(raw['labels'])} labels"
            )
        text = entry.get("template", "")
        if family != "clm" and "{mask}" not in text:
            raise HarnessError(f"task card {path}: the {family} template needs a {{mask}} slot")
        unknown = {f for f in raw["fields"] if "{" + f + "}" not in text}
        if unknown:
            raise HarnessError(f"task card {path}: the {family} template does not use field(s) {sorted(unknown)}")
        templates[family] = Template(text, words)
    known = set(TaskCard.__dataclass_fields__) - {"path"}
    extra = set(raw) - known
    if extra:
        raise HarnessError(f"task card {path}: unknown key(s) {sorted(extra)}")
    values = {**raw, "templates": templates, "path": str(path)}
    for key in ("fields", "labels", "drop_labels"):
        values[key] = tuple(raw.get(key, ()))
    values["replace"] = tuple(tuple(pair) for pair in raw.get("replace", ()))
    return TaskCard(**values)


def card_identity(card: TaskCard) -> str:
    """A hash of everything in the card that can change a result: fields, labels, templates and label words, the
    loss, max_chars, replacements, dropped labels, the data's location and splits (not its description or path)."""
    content = {k: v for k, v in asdict(card).items() if k not in ("description", "path")}
    return sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _entry_point_dirs() -> list[Path]:
    dirs = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            folder = Path(loaded.__file__).parent if inspect.ismodule(loaded) else Path(loaded())
        except Exception as exc:
            raise HarnessError(f"the '{entry.name}' task-card entry point ({entry.value}) failed to give a folder: {exc}") from exc
        if not folder.is_dir():
            raise HarnessError(f"the '{entry.name}' task-card entry point ({entry.value}) names {folder}, not a folder")
        dirs.append(folder)
    return dirs


def card_dirs(extra: list[str] | None = None) -> list[Path]:
    """Where cards are read from, the first winning a name clash: --tasks-dir, HARNESS_TASKS_DIR, packages' entry
    points, then this project's datasets/."""
    dirs = [Path(d) for d in (extra or [])]
    env = os.environ.get("HARNESS_TASKS_DIR")
    if env:
        dirs += [Path(d) for d in env.split(os.pathsep)]
    return dirs + _entry_point_dirs() + [CARDS_DIR]


def load_cards(extra_dirs: list[str] | None = None) -> dict[str, TaskCard]:
    """All task cards, the first folder winning on a name clash (so a user's card can override a built-in)."""
    cards: dict[str, TaskCard] = {}
    for folder in card_dirs(extra_dirs):
        for path in sorted(folder.glob("*.yaml")):
            card = _parse(path)
            cards.setdefault(card.name, card)
    return cards


def get_card(name: str, extra_dirs: list[str] | None = None) -> TaskCard:
    cards = load_cards(extra_dirs)
    if name not in cards:
        raise unknown_name("task", name, cards)
    return cards[name]
