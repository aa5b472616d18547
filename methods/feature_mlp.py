"""Feature-MLP: the service returns one feature vector per example; a small MLP learns the task on the user side.

The vector is the backbone's final hidden state pooled per family (harness/features.py: mlm first token, clm
last real token, seq2seq encoder mean). The MLP is trained on the 16-shot train split; after every epoch it is
scored on the dev split and the best dev epoch's weights are kept (ties on the metric go to the lower dev loss).
No gradient reaches the backbone. Training sends two queries (the whole train split, the whole dev split); eval
sends one query per `query_batch` examples.

| setting | default | source |
|---|---|---|
| input | auto: raw text fields for masked LMs and encoder-decoders, the task's prompt for causal LMs | the papers' probes read RoBERTa features of the input text; a causal LM's last-token state needs the prompt (Gemma sst2, 100 rows: raw 60.0, template 78.0) |
| model | Linear(hidden, 1024) → ReLU → Dropout → Linear(1024, labels) | a two-layer MLP; width 1024 gives the papers' "1M" tunable parameters on RoBERTa-large (1024 × 1024 + …) |
| hidden_size | 1024 | as above |
| dropout | 0.1 | our choice (the papers do not state one) |
| optimiser | AdamW, lr 1e-3, weight decay 0.01 | our choice: common settings for a small probe |
| epochs | 100, keep the best dev epoch | our choice; dev selection guards against over-fitting 32–224 examples |
| batch_size | 16 | our choice |
| standardize | yes (train split's mean / std per dimension) | our choice: a causal LM's hidden dimensions differ in scale by orders of magnitude |
| query_batch | 32 eval examples per query | as the manual prompt's queries |
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods import register
from methods.probe import FeatureProbe, ProbeConfig


@dataclass
class FeatureMLPConfig(ProbeConfig):
    hidden_size: int = 1024
    epochs: int = 100


@register
class FeatureMLP(FeatureProbe):
    name = "feature-mlp"
    rank = 40
    config_class = FeatureMLPConfig
    kind = "pooled"

    def build_model(self, input_size, num_labels):
        c = self.config
        return nn.Sequential(
            nn.Linear(input_size, c.hidden_size), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.hidden_size, num_labels)
        )
