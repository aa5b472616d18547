"""Manual prompt: the task's template and label words, no tuning (zero-shot), through the service."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from methods import register
from methods.base import Method, MethodConfig, setting


@dataclass
class ManualConfig(MethodConfig):
    batch_size: int = setting(32, "examples per query")


def predict_with_service(method: Method, examples, batch_size: int) -> np.ndarray:
    """Score examples through the service, one query per batch, and take the best label word."""
    service, prompt = method.ctx.service, method.ctx.prompt
    preds = []
    for i in range(0, len(examples), batch_size):
        logits = service.label_logits(prompt.render_all(examples[i : i + batch_size]), prompt.label_words)
        preds.append(logits.argmax(axis=1))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=int)


@register
class ManualPrompt(Method):
    name = "manual"
    rank = 10  # the papers' row order
    config_class = ManualConfig
    group = "gradient-free"
    as_a_service = True
    deployment_efficient = True
    uses_train = False

    def predict(self, examples):
        return predict_with_service(self, examples, self.config.batch_size)
