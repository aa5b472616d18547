"""Rendering an example with the task's template for the backbone's family (client side)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.data import Example
from harness.tasks import TaskCard


@dataclass(frozen=True)
class PromptFormat:
    card: TaskCard
    family: str
    mask: str  # what the service documents as its mask string ("" for causal LMs)

    @property
    def template(self) -> str:
        return self.card.template_for(self.family).template

    @property
    def label_words(self) -> list[str]:
        return list(self.card.template_for(self.family).label_words)

    def render(self, example: Example) -> str:
        # str.replace, not str.format: the texts themselves may contain braces
        text = self.template.replace("{mask}", self.mask)
        for name in self.card.fields:
            text = text.replace("{" + name + "}", example[name][: self.card.max_chars])
        return text

    def render_all(self, examples: list[Example]) -> list[str]:
        return [self.render(e) for e in examples]
