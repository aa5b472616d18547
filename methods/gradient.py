"""The gradient baselines: prompt tuning, P-tuning v2, LoRA, adapters, BitFit and full model tuning.

All six are prompt-based fine-tuning on the same 16-shot splits, templates and label words as the black-box
methods: the input is rendered with the task's template, the loss is cross-entropy over the label-word logits
that `harness.scoring` reads for the backbone's family (mask / next token / decoder position), the model is
selected on the dev split and scores the eval split. They own the model (`ctx.backbone`), so they are not
as-a-service; the one trainer is `harness.trainer.Trainer`. The defaults and where they come from are in the
README ("Gradient baselines").

The runner shares one loaded backbone across runs, so a method changes it in place only for the span of its
run and `close()` puts it back: peft modules are unloaded, hooks removed, trained weights restored from a copy,
`requires_grad` flags and train/eval modes reset. Tests check the backbone's state afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from harness.backbones import DTYPES
from harness.errors import HarnessError
from harness.metrics import score
from harness.scoring import label_token_ids, make_scorer
from harness.trainer import Trainer, TrainSettings, count
from methods import register
from methods.adapters import Adapters
from methods.base import Method, MethodConfig, setting


@dataclass
class GradientConfig(MethodConfig):
    """Settings every gradient method shares (see harness.trainer); subclasses change the defaults."""

    lr: float = setting(1e-5, "AdamW learning rate")
    steps: int = setting(1000, "optimiser steps")
    batch_size: int = setting(8, "training examples per step")
    eval_every: int = setting(100, "dev check (and checkpoint) period, in steps (the best dev check's weights are kept)")
    eval_batch_size: int = setting(32, "eval examples per forward")
    warmup_ratio: float = setting(0.0, "linear warm-up, as a fraction of the steps")
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norm gains)")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")

    # the paper's 1,000 steps take 25-70 minutes a run on Gemma-3-270M on a 2-core CPU (1.3 s a step for
    # LoRA/adapters/BitFit/P-tuning v2, 3.2 s for prompt tuning, 4.2 s for model tuning, measured on sst2)
    # quick: a step of 8 examples costs ~3-6 s on a 2-core CPU (agnews, float32); six methods on seven tasks
    profiles = {"quick": {"steps": 100, "eval_every": 25}}

    def settings(self) -> TrainSettings:
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})


def _no_decay(name: str) -> bool:
    """Biases and normalisation gains get no weight decay (the usual BERT/RoBERTa fine-tuning recipe)."""
    return name.endswith("bias") or "norm" in name.lower()


class GradientMethod(Method):
    group = "gradient-based"
    as_a_service = False
    deployment_efficient = True  # one shared backbone, a small per-task delta

    @classmethod
    def check_config(cls, config) -> None:
        cls.require_positive(config, "steps", "batch_size", "eval_every", "eval_batch_size")
        if config.lr <= 0 or config.weight_decay < 0 or config.max_grad_norm <= 0 or not 0 <= config.warmup_ratio < 1:
            raise HarnessError(f"{cls.name}: lr and max_grad_norm must be positive, weight_decay not negative and "
                               f"warmup_ratio in [0, 1); got {config}")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.check_config(config)
        self._undo: list = []  # closures that put the backbone back, run last-in first-out by close()
        self._params: dict[str, nn.Parameter] = {}
        self._extra: list[nn.Module] = []  # trainable modules outside the model (adapters, peft prompt encoders)
        self.soft = None  # harness.scoring.SoftInputs for prompt/prefix methods
        self.trained = ""  # what the method trains, in words, for the trace
        self._trace = None
        self._trainer = None
        self._fitted = False
        self._tunable = 0

    # --- what each method defines -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Make the method's parameters trainable on the (frozen) model; register undo steps; return them by name."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        if self.ctx.backbone is None:
            raise HarnessError(f"method '{self.name}' trains the model and needs ctx.backbone")
        return self.ctx.backbone.model

    def prepare(self) -> None:
        """Freeze the backbone and attach the method's trainable parameters (fit calls this; tests call it first
        to measure the starting point)."""
        if self._params:
            return
        model = self.model
        self._guard(model)
        torch.manual_seed(self.ctx.seed)
        self._params = self.attach(model)
        self._tunable = count(self._params)
        backbone = self.ctx.backbone
        self._scorer = make_scorer(backbone)
        self._label_ids = label_token_ids(backbone.tokenizer, self.ctx.prompt.label_words)
        card = self.ctx.card
        self._trainer = Trainer(
            self.config.settings(),
            self._params,
            forward=self._forward,
            set_training=self._set_training,
            metric=lambda gold, pred: score(card, gold, pred)["score"],
            seed=self.ctx.seed,
            decay_filter=lambda name: not _no_decay(name),
            progress=self.ctx.progress,
            checkpoint=self.ctx.checkpoint,
        )

    def fit(self, train, dev):
        self.prepare()
        render = self.ctx.prompt.render_all
        self._trace = self._trainer.fit(
            render(train), [e["label"] for e in train], render(dev), [e["label"] for e in dev]
        )
        self._fitted = True

    def loss(self, examples) -> float:
        """Mean cross-entropy on these examples in eval mode (no dropout), with the current parameters."""
        return self._trainer.evaluate(self.ctx.prompt.render_all(examples), np.array([e["label"] for e in examples]))[1]

    def predict(self, examples) -> np.ndarray:
        if not self._fitted:
            raise HarnessError(f"method '{self.name}' must be fitted before it predicts")
        logits = self._trainer.predict_logits(self.ctx.prompt.render_all(examples))
        return logits.argmax(dim=1).numpy() if len(examples) else np.zeros(0, dtype=int)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._fitted = False  # the backbone is back to its own weights: nothing left to predict with

    def tunable_parameters(self) -> int:
        return self._tunable

    def trace(self) -> dict | None:
        if self._trace is None:
            return None
        return {"trained": self.trained, "tunable_parameters": self._tunable, **self._trace}

    def _forward(self, texts: list[str]) -> torch.Tensor:
        dtype = self.ctx.dtype
        with torch.autocast(self._scorer.device.type, dtype=DTYPES[dtype], enabled=dtype != "float32"):
            return self._scorer.forward_label_logits(self._scorer.encode(texts), self._label_ids, soft=self.soft)

    def _set_training(self, flag: bool) -> None:
        self.model.train(flag)
        for module in self._extra:
            module.train(flag)

    def _guard(self, model: nn.Module) -> None:
        """Freeze the model; on close, restore its requires_grad flags and each module's train/eval mode."""
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        modes = [(module, module.training) for module in model.modules()]

        def restore():
            for module, mode in modes:
                module.training = mode
            for name, p in model.named_parameters():
                p.requires_grad_(flags.get(name, False))

        self._undo.append(restore)
        model.requires_grad_(False)

    def _train_in_place(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """Train these existing weights; a CPU copy restores them on close."""
        saved = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}

        def restore():
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name].to(p.device))

        self._undo.append(restore)
        for p in params.values():
            p.requires_grad_(True)
        return params

    def _peft(self, model: nn.Module, peft_config):
        """Wrap the model with peft's plain PeftModel (no task type: it patches no generation hooks of the model)."""
        from peft import PeftModel

        try:
            wrapped = PeftModel(model, peft_config)
        except ValueError as exc:
            raise HarnessError(f"{self.name}: peft cannot adapt a '{model.config.model_type}' model: {exc}") from exc
        return wrapped


# --- model tuning -------------------------------------------------------------------------------------------------


@dataclass
class ModelTuningConfig(GradientConfig):
    lr: float = 1e-5
    weight_decay: float = 0.01


@register
class ModelTuning(GradientMethod):
    """Full fine-tuning of every parameter (prompt-based, as LM-BFF). A copy of the weights on the CPU restores
    the shared backbone afterwards; deployment needs a full model per task, hence not deployment-efficient."""

    name = "model-tuning"
    rank = 20
    config_class = ModelTuningConfig
    deployment_efficient = False

    def attach(self, model):
        self.trained = "all parameters"
        return self._train_in_place(dict(model.named_parameters()))


# --- adapters -----------------------------------------------------------------------------------------------------


@dataclass
class AdapterConfig(GradientConfig):
    lr: float = 3e-4
    weight_decay: float = 0.01
    bottleneck: int = setting(24, "the adapters' bottleneck width")
    init_std: float = setting(1e-2, "std of the adapters' initial weights (near-identity start)")


@register
class Adapter(GradientMethod):
    """Houlsby et al. (2019) bottleneck adapters after each attention and feed-forward output (methods/adapters.py)."""

    name = "adapter"
    rank = 21
    config_class = AdapterConfig

    def attach(self, model):
        adapters = Adapters(model, self.config.bottleneck, self.config.init_std)
        self._undo.append(adapters.remove)
        self._extra.append(adapters)
        self.trained = f"{len(adapters.sites)} bottleneck adapters (m={self.config.bottleneck})"
        return {f"adapters.{k}": p for k, p in adapters.named_parameters()}


# --- BitFit -------------------------------------------------------------------------------------------------------


@dataclass
class BitFitConfig(GradientConfig):
    lr: float = 1e-3
    # a model without biases (Gemma, SmolLM2/Llama, T5): "norms" trains every normalisation layer's gain vector
    # instead (the closest per-channel analogue) and says so in the trace; "error" refuses
    no_bias: str = setting("norms", "for a model without biases: norms (train the norm gains instead) | error")


def norm_gains(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight (gain) of every normalisation module: LayerNorm, RMSNorm, T5LayerNorm, Gemma3RMSNorm..."""
    names = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    return {n: p for n, p in model.named_parameters() if n in names}  # named_parameters lists a shared tensor once


@register
class BitFit(GradientMethod):
    """Ben Zaken et al. (2022): train only the bias terms (all of them, including layer-norm biases and the LM
    head's output bias where the family has one; BART's final_logits_bias is a buffer, not a parameter)."""

    name = "bitfit"
    rank = 22
    config_class = BitFitConfig

    def attach(self, model):
        biases = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
        if biases:
            self.trained = "bias terms"
            return self._train_in_place(biases)
        kind = model.config.model_type
        if self.config.no_bias != "norms":
            raise HarnessError(
                f"bitfit: the '{kind}' model has no bias terms to train; set no_bias='norms' to train its "
                "normalisation gains instead"
            )
        gains = norm_gains(model)
        if not gains:
            raise HarnessError(f"bitfit: the '{kind}' model has neither bias terms nor normalisation gains")
        self.trained = f"normalisation gains ({kind} has no bias terms)"
        return self._train_in_place(gains)


# --- LoRA ---------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig(GradientConfig):
    lr: float = 4e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA scaling alpha")
    dropout: float = setting(0.0, "LoRA dropout")
    target_modules: list[str] | None = setting(None, "modules to adapt (comma-separated); none: peft's default (query and value projections)")


@register
class Lora(GradientMethod):
    """Hu et al. (2021): rank-r updates B·A (scaled by alpha/r) beside the frozen query and value projections."""

    name = "lora"
    rank = 23
    config_class = LoraConfig

    def attach(self, model):
        from peft import LoraConfig as PeftLora

        c = self.config
        wrapped = self._peft(
            model,
            PeftLora(
                r=c.r,
                lora_alpha=c.alpha,
                lora_dropout=c.dropout,
                target_modules=list(c.target_modules) if c.target_modules else None,
                fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
                bias="none",
            ),
        )
        self._undo.append(wrapped.unload)  # swaps every LoRA layer back for its original module
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in params})
        self.trained = f"LoRA r={c.r}, alpha={c.alpha} on {', '.join(targets)}"
        return params


# --- prompt tuning ------------------------------------------------------------------------------------------------


class _PeftPrompt:
    """SoftInputs backed by a peft prompt-learning model: virtual input vectors or per-layer prefixes."""

    def __init__(self, wrapped, length: int, kind: str):
        self.wrapped, self.length, self.kind = wrapped, length, kind

    def input_prompt(self, n):
        return self.wrapped.get_prompt(n) if self.kind == "input" else None

    def kv_prefix(self, n):
        return (self.wrapped.get_prompt(n), self.length) if self.kind == "prefix" else None


@dataclass
class PromptTuningConfig(GradientConfig):
    lr: float = 3e-2
    num_virtual_tokens: int = setting(50, "soft prompt tokens")


@register
class PromptTuning(GradientMethod):
    """Lester et al. (2021): trainable input vectors before the text, initialised from sampled vocabulary embeddings.
    For encoder-decoder models the vectors go before the encoder input only (as Lester et al. did with T5)."""

    name = "prompt-tuning"
    rank = 24
    config_class = PromptTuningConfig

    def attach(self, model):
        from peft import PromptTuningConfig as PeftPromptTuning
        from peft import PromptTuningInit

        n = self.config.num_virtual_tokens
        wrapped = self._peft(
            model,
            PeftPromptTuning(
                num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, num_transformer_submodules=1
            ),
        )
        self.soft = _PeftPrompt(wrapped, n, "input")
        self._extra.append(wrapped.prompt_encoder)
        self.trained = f"{n} input vectors"
        return {f"prompt_encoder.{k}": p for k, p in wrapped.prompt_encoder.named_parameters()}


# --- P-tuning v2 --------------------------------------------------------------------------------------------------


@dataclass
class PTuningV2Config(GradientConfig):
    lr: float = 5e-3
    num_virtual_tokens: int = setting(24, "prefix tokens per layer")


def _decoder_layers(config) -> int:
    for key in ("num_decoder_layers", "decoder_layers"):
        if getattr(config, key, None):
            return getattr(config, key)
    return config.num_hidden_layers


@register
class PTuningV2(GradientMethod):
    """Liu et al. (2022), deep prompt tuning: trainable key/value prefixes at every layer (peft prefix tuning,
    no reparameterisation). clm and mlm: every layer of the model. Encoder-decoder: peft puts the prefix in every
    decoder layer's self-attention (the encoder gets none)."""

    name = "p-tuning-v2"
    rank = 25
    config_class = PTuningV2Config

    def attach(self, model):
        from peft import PrefixTuningConfig

        n = self.config.num_virtual_tokens
        extra = {}
        seq2seq = self.ctx.backbone.family == "seq2seq"
        if seq2seq:
            extra["num_layers"] = _decoder_layers(model.config)
            if model.config.model_type in ("t5", "mt5"):  # its attention width is heads × d_kv, not d_model
                extra["token_dim"] = model.config.num_heads * model.config.d_kv
                extra["num_attention_heads"] = model.config.num_heads
        wrapped = self._peft(
            model,
            PrefixTuningConfig(
                num_virtual_tokens=n, prefix_projection=False, num_transformer_submodules=2 if seq2seq else 1, **extra
            ),
        )
        self.soft = _PeftPrompt(wrapped, n, "prefix")
        self._extra.append(wrapped.prompt_encoder)
        where = "every decoder layer" if seq2seq else "every layer"
        self.trained = f"{n} key/value prefix vectors at {where}"
        return {f"prompt_encoder.{k}": p for k, p in wrapped.prompt_encoder.named_parameters()}
