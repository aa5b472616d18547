"""Feature-BiLSTM: the service returns every token's final hidden state; a BiLSTM classifier learns on the user side.

Token features are [N, max_len, hidden], zero-padded, with int32 lengths (harness/features.py). The user-side
model runs a bidirectional LSTM over the real tokens only (packed sequences), pools its outputs over time (max
by default, over real positions only) and applies dropout and a linear classifier. Training and dev-based
selection are those of Feature-MLP (methods/probe.py): the best dev epoch's weights are kept. No gradient reaches
the backbone.

| setting | default | source |
|---|---|---|
| input | auto: raw text fields for masked LMs and encoder-decoders, the task's prompt for causal LMs | the papers' probes read RoBERTa features of the input text; a causal LM's last-token state needs the prompt (Gemma sst2, 100 rows: raw 60.0, template 78.0) |
| model | BiLSTM(hidden → 1024 per direction, 1 layer) → max pool → Dropout → Linear(2048, labels) | one layer of 1024 per direction gives the papers' "17M" tunable parameters on RoBERTa-large (2 × 4 × 1024 × 2048 + …) |
| hidden_size | 1024 per direction (the `quick` profile uses 256: 1024 costs ~5 s per step of 32 × 50 tokens on 2 CPU cores) | as above |
| layers | 1 | as above |
| pooling | max over real positions ("mean" possible) | our choice (the papers do not state one) |
| dropout | 0.1 | our choice |
| optimiser | AdamW, lr 1e-3, weight decay 0.01 | our choice |
| epochs | 30, keep the best dev epoch | our choice: an epoch costs far more than the MLP's |
| batch_size | 16 | our choice |
| standardize | yes (train split's mean / std per dimension over real tokens) | our choice, as for Feature-MLP |
| query_batch | 32 eval examples per query | as the manual prompt's queries |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from harness.errors import HarnessError
from methods import register
from methods.base import setting
from methods.probe import FeatureProbe, ProbeConfig

POOLINGS = ("max", "mean")


@dataclass
class FeatureBiLSTMConfig(ProbeConfig):
    hidden_size: int = setting(1024, "LSTM width per direction")
    layers: int = setting(1, "stacked BiLSTM layers")
    pooling: str = setting("max", "over the tokens' outputs: max | mean")
    epochs: int = 30

    # the paper-sized BiLSTM (1024 per direction) takes seconds per step of 32 x 50 tokens on 2 CPU cores
    profiles = {"quick": {"hidden_size": 256}}


class BiLSTMClassifier(nn.Module):
    def __init__(self, input_size: int, hidden: int, layers: int, num_labels: int, dropout: float, pooling: str):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_labels)
        self.pooling = pooling

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # packing keeps the backward direction from starting on padding
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        real = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        if self.pooling == "max":
            pooled = states.masked_fill(~real, float("-inf")).max(dim=1).values
        else:
            pooled = (states * real).sum(dim=1) / lengths.unsqueeze(1).to(states.dtype)
        return self.out(self.dropout(pooled))


@register
class FeatureBiLSTM(FeatureProbe):
    name = "feature-bilstm"
    rank = 41
    config_class = FeatureBiLSTMConfig
    kind = "tokens"

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.pooling not in POOLINGS:
            raise HarnessError(f"{cls.name}: pooling '{config.pooling}' is not one of {', '.join(POOLINGS)}")
        cls.require_positive(config, "layers")

    def build_model(self, input_size, num_labels):
        c = self.config
        return BiLSTMClassifier(input_size, c.hidden_size, c.layers, num_labels, c.dropout, c.pooling)
