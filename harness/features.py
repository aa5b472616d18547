"""Server-side feature extraction: the backbone's final hidden states, for the feature-probe baselines.

The service (harness.service.ModelService.features) calls this and returns float32 arrays; a client sees only
those arrays, never the model. Two kinds:

- `pooled`: one vector per text, [N, hidden]. Which state stands for the text depends on the family:
  - mlm: the final hidden state of the first token ([CLS] for BERT, <s> for RoBERTa), as the papers'
    Feature-MLP reads it;
  - clm: the final hidden state of the last real token (right padding), the only state that has seen the
    whole text in a causal model (a mean over tokens would weigh early tokens that saw little context);
  - seq2seq: the mean of the encoder's final hidden states over real tokens (T5 has no [CLS]-like token and
    BART's first encoder token is not trained as a summary; the encoder is what reads the input).
- `tokens`: every real token's final hidden state, [N, max_len, hidden], zero past each text's length, plus
  the lengths as int32 [N] (they travel with the array: download = features + lengths bytes). max_len is the
  longest text of the whole query, so a query is one rectangular array however the server chunks it.
  Special tokens the tokenizer adds (BOS/CLS/EOS) count as real tokens. For seq2seq these are encoder states.

"Final hidden state" is the base model's last_hidden_state, i.e. after the final layer norm where the model
has one (GPT-2's ln_f, Gemma's final RMSNorm), which is what the LM head reads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from harness.errors import HarnessError

KINDS = ("pooled", "tokens")


class TokenFeatures(NamedTuple):
    values: np.ndarray  # float32 [N, max_len, hidden], zero past each length
    lengths: np.ndarray  # int32 [N], real tokens per text

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.lengths.nbytes)


class FeatureExtractor:
    def __init__(self, model, tokenizer, family: str, max_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.max_length = max_length
        self.device = next(model.parameters()).device

    def _encode(self, texts: list[str]):
        self.tokenizer.padding_side = "right"  # the clm pooling reads the last real token at length - 1
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=False)
        if batch.input_ids.shape[1] > self.max_length:
            raise HarnessError(
                f"an input has {batch.input_ids.shape[1]} tokens, over the backbone's limit {self.max_length}; "
                "lower the task card's max_chars"
            )
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "seq2seq":
            body = self.model.get_encoder()
        else:
            body = self.model.base_model
        return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "mlm":
            return hidden[:, 0]
        if self.family == "clm":
            last = attention_mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    @torch.inference_mode()
    def extract(self, texts: list[str], kind: str, max_batch: int):
        """[N, hidden] float32 (pooled) or TokenFeatures (tokens), computed in chunks of max_batch texts."""
        if kind not in KINDS:
            raise HarnessError(f"unknown feature kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        if not texts:
            raise HarnessError("a features query needs at least one text")
        chunks, lengths = [], []
        for i in range(0, len(texts), max_batch):
            input_ids, attention_mask = self._encode(texts[i : i + max_batch])
            hidden = self._hidden(input_ids, attention_mask).float()
            if kind == "pooled":
                chunks.append(self._pool(hidden, attention_mask).cpu())
            else:
                # zero the padding positions so the array carries nothing but the real tokens' states
                chunks.append((hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)).cpu())
                lengths.append(attention_mask.sum(dim=1).cpu())
        if kind == "pooled":
            return torch.cat(chunks).numpy().astype(np.float32, copy=False)
        width = max(c.shape[1] for c in chunks)
        padded = [torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks]
        values = torch.cat(padded).numpy().astype(np.float32, copy=False)
        return TokenFeatures(values, torch.cat(lengths).numpy().astype(np.int32))
