"""In-context learning (GPT-3 / LM-BFF style): labelled demonstrations before each test input, no tuning.

Demonstrations come from the 16-shot train split, are rendered with the task's template and label words, and
are placed before the test input; the prediction is the best label word by the same label-word logits as the
manual prompt, through the service. Nothing is learned, but the result depends on the split (which
demonstrations exist) and on the seed (which are chosen, and their order), so it runs once per split.

How demonstrations are chosen:
- the train split is shuffled with the run's seed; each class's candidates keep that shuffled order;
- they are taken in class-balanced rounds (one demonstration per class per round); a round is kept only if
  the whole round fits the budget, so every class has the same number of demonstrations; rounds stop at the
  budget, at `max_per_class`, or when a class runs out;
- the kept demonstrations are shuffled again (same seed), so their label order follows no fixed pattern and
  the class nearest the test input (recency bias) is random rather than always the last label;
- the same demonstrations precede every test input of a run (the std over splits measures the choice).

How they are rendered: clm: the template followed by the label word (" positive", as the service scores it);
mlm / seq2seq: the template with the mask slot filled by the label word (stripped of its leading space: the word
stands where the mask stood). Demonstrations are joined by `separator`, and the test input, rendered exactly as
the manual prompt renders it, follows the last separator.

How they fit the context: the client has no tokenizer, so the budget is in characters, `max_demo_chars`, for
the whole demonstration block (separators included). English BPE text runs at roughly 4 characters a token, so
the default 1,500 characters (~375 tokens) leaves ~135 tokens for the test input inside a 512-token window like
that of the papers' RoBERTa-large (the backbone of their ICL row). So that at least one full round always
fits, each demonstration's text fields are cut (at a word boundary) to make a demonstration at most
max_demo_chars // num_labels characters; the template, label word and separator are never cut. The
test input is never cut (beyond the card's max_chars, as for every method); if demonstrations plus a long
test input exceed the backbone's limit, the service raises a HarnessError: lower max_demo_chars.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from harness.data import Example
from harness.errors import HarnessError
from harness.prompts import PromptFormat
from methods import register
from methods.base import Method, MethodConfig, setting


@dataclass
class ICLConfig(MethodConfig):
    max_demo_chars: int = setting(1500, "characters for the whole demonstration block (see the module docstring)")
    max_per_class: int = setting(16, "demonstrations per class at most (16 = all of a 16-shot train split)")
    separator: str = setting("\n", "between demonstrations, and between the last one and the test input")
    batch_size: int = setting(32, "test inputs per query")


@dataclass
class Demonstrations:
    prefix: str  # the demonstration block, ending with the separator; "" when there is none
    examples: list[Example]  # in the order they appear
    field_chars: int  # each demonstration's text fields were cut to this many characters

    def per_class(self, num_labels: int) -> list[int]:
        return [sum(e["label"] == c for e in self.examples) for c in range(num_labels)]


def cut_text(text: str, limit: int) -> str:
    """At most `limit` characters, cut at the last space when there is one (no half words)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def render_demonstration(prompt: PromptFormat, example: Example, field_chars: int) -> str:
    """One labelled example: the template with its answer in place, text fields cut to field_chars."""
    word = prompt.label_words[example["label"]]
    cut = {**example, **{f: cut_text(example[f], field_chars) for f in prompt.card.fields}}
    if prompt.family == "clm":
        return prompt.render(cut) + word  # the label word is the next token after the template
    return replace(prompt, mask=word.strip()).render(cut)  # the label word fills the mask slot


def field_budget(prompt: PromptFormat, max_demo_chars: int, separator: str) -> int:
    """Characters each text field of a demonstration may keep so that one round (one per class) fits."""
    card = prompt.card
    per_demo = max_demo_chars // card.num_labels
    empty = {f: "" for f in card.fields}
    overhead = max(len(render_demonstration(prompt, {**empty, "label": c}, 0)) for c in range(card.num_labels))
    chars = (per_demo - overhead - len(separator)) // len(card.fields)
    if chars < 1:
        raise HarnessError(
            f"icl: max_demo_chars={max_demo_chars} cannot hold one demonstration per class for task '{card.name}' "
            f"({card.num_labels} classes, {overhead + len(separator)} characters of template each); raise it"
        )
    return chars


def build_demonstrations(prompt: PromptFormat, train: list[Example], config: ICLConfig, seed: int) -> Demonstrations:
    card = prompt.card
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(train))
    by_class = [[train[i] for i in order if train[i]["label"] == c] for c in range(card.num_labels)]
    field_chars = field_budget(prompt, config.max_demo_chars, config.separator)
    rounds = min(config.max_per_class, min(len(pool) for pool in by_class))
    chosen, used = [], 0
    for r in range(rounds):
        batch = [render_demonstration(prompt, pool[r], field_chars) for pool in by_class]
        cost = sum(len(text) + len(config.separator) for text in batch)
        if used + cost > config.max_demo_chars:
            break  # a partial round would unbalance the classes
        chosen += [(text, pool[r]) for text, pool in zip(batch, by_class)]
        used += cost
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    prefix = "".join(text + config.separator for text, _ in chosen)
    return Demonstrations(prefix, [example for _, example in chosen], field_chars)


@register
class InContextLearning(Method):
    name = "icl"
    rank = 30
    config_class = ICLConfig
    group = "gradient-free"
    as_a_service = True
    deployment_efficient = True
    uses_train = True  # the demonstrations come from the split

    @classmethod
    def check_config(cls, config: ICLConfig) -> None:
        if config.max_demo_chars < 1 or config.max_per_class < 1 or config.batch_size < 1:
            raise HarnessError(f"icl: max_demo_chars, max_per_class and batch_size must be positive; got {config}")

    def __init__(self, config: ICLConfig, ctx):
        super().__init__(config, ctx)
        self.check_config(config)
        self.demos: Demonstrations | None = None

    def fit(self, train, dev):
        self.demos = build_demonstrations(self.ctx.prompt, train, self.config, self.ctx.seed)

    def texts(self, examples: list[Example]) -> list[str]:
        """What the service receives: the demonstration block, then the test input rendered in full."""
        if self.demos is None:
            raise HarnessError("icl: predict before fit (the demonstrations come from the train split)")
        return [self.demos.prefix + self.ctx.prompt.render(e) for e in examples]

    def predict(self, examples):
        service, words = self.ctx.service, self.ctx.prompt.label_words
        preds = []
        for i in range(0, len(examples), self.config.batch_size):
            try:
                logits = service.label_logits(self.texts(examples[i : i + self.config.batch_size]), words)
            except HarnessError as exc:  # the service knows the token limit; the client can only shorten the block
                raise HarnessError(f"icl: {exc}; or lower max_demo_chars (now {self.config.max_demo_chars})") from exc
            preds.append(logits.argmax(axis=1))
        return np.concatenate(preds) if preds else np.zeros(0, dtype=int)

    def trace(self):
        if self.demos is None:
            return None
        return {
            "demonstrations": len(self.demos.examples),
            "per_class": self.demos.per_class(self.ctx.card.num_labels),
            "demo_chars": len(self.demos.prefix),
            "field_chars": self.demos.field_chars,
        }
