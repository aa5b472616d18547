"""`harness bench`: BBT's per-call cost, the reference code's way against this project's default path.

Both loops run in one process on the same backbone, task, candidates and budget:
- reference-style: the model's ordinary forward in float32, full-vocabulary logits, one candidate per forward,
  the whole sequence (prompt + example) for every example — as the BBT reference code scores a call;
- default: the service's prompted query — label-word rows of the head only, a whole generation per forward
  (chunked to memory), a causal LM's prompt keys/values computed once per candidate, bf16 on a GPU.
It prints calls per second for both, their ratio, and the compute floor: the FLOPs the work needs
(2 x non-embedding parameters x tokens that must pass through the body) over the matrix-multiply rate measured
on this device, and the fraction of that floor each path reaches. Random weights of a named architecture time
exactly like trained ones, so the benchmark runs where trained weights cannot travel. With `--compile MODE` it
also times the default path with the backbone's layers under torch.compile, side by side with the eager one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.backbones import DTYPES, Backbone, default_device, load_backbone, resolve_dtype
from harness.errors import HarnessError, unknown_name
from harness.meters import device_description
from harness.prompting import ProjectionSpec, PromptSpec, placeholder_ids, project
from harness.prompts import PromptFormat
from harness.scoring import PromptBatch, label_token_ids
from harness.server import ModelServer
from harness.service import ModelService


def _architectures() -> dict:
    """Configs of the papers' and embedded backbones, for random-weight timing (no download)."""
    import transformers as tf

    return {
        "roberta-large": ("mlm", lambda: tf.RobertaConfig(
            vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
        "bert-large-uncased": ("mlm", lambda: tf.BertConfig(
            vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
        "gpt2": ("clm", lambda: tf.GPT2Config()),
        "gemma3-270m": ("clm", lambda: tf.Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
            head_dim=256, intermediate_size=2048, max_position_embeddings=32768, query_pre_attn_scalar=256,
            sliding_window=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)),
        "t5-large": ("seq2seq", lambda: tf.T5Config(
            vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, decoder_start_token_id=0)),
    }


def random_backbone(arch: str, device: str, dtype: torch.dtype) -> Backbone:
    """Random weights of a real architecture with a word-level tokenizer built here (timing only)."""
    import transformers as tf

    from harness.synthetic import synthetic_tokenizer

    from harness.synthetic import TINY_KINDS, tiny_backbone

    if arch.startswith("tiny-") and arch[5:] in TINY_KINDS:  # the tests' tiny models (a served test backbone)
        return tiny_backbone(arch[5:])
    archs = _architectures()
    if arch not in archs:
        raise unknown_name("architecture", arch, [*archs, *(f"tiny-{k}" for k in TINY_KINDS)])
    family, make = archs[arch]
    auto = {"clm": tf.AutoModelForCausalLM, "mlm": tf.AutoModelForMaskedLM, "seq2seq": tf.AutoModelForSeq2SeqLM}
    model = auto[family].from_config(make(), dtype=dtype).to(device).eval()
    tokenizer = synthetic_tokenizer(mask=family != "seq2seq", bos=family != "seq2seq")
    identity = {"source": "random", "architecture": arch, "parameters": sum(p.numel() for p in model.parameters())}
    return Backbone(name=f"random-{arch}", family=family, model=model, tokenizer=tokenizer, identity=identity)


def non_embedding_parameters(model) -> int:
    skip = {id(p) for p in model.get_input_embeddings().parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        skip |= {id(p) for p in out.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def matmul_rate(device: str, dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s this device reaches on a square matrix multiply: the denominator of the compute floor."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    _sync(device)
    return 2 * size**3 * runs / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_call(scorer, enc, label_ids, prompt: PromptBatch) -> torch.Tensor:
    """One candidate, the reference code's way: full sequence, full-vocabulary logits, float32."""
    model = scorer.model
    n, width = enc.input_ids.shape[0], prompt.n_tokens
    embeds, mask, _ = scorer.prompted_inputs(enc, prompt)  # P = 1: the tiled batch is the batch
    rows = torch.arange(n, device=embeds.device)
    with scorer.deep_prompts(prompt, n):
        if scorer.family == "seq2seq":
            logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=scorer._decoder_inputs(enc)).logits
            return logits[rows, enc.read_at][:, label_ids]
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits  # [n, length, vocab]
    return logits[rows, enc.read_at + width][:, label_ids]


@dataclass
class BenchResult:
    path: str
    calls: int
    seconds: float
    floor_seconds: float
    setup_seconds: float = 0.0  # one-off work inside `seconds` (a fit's statistics query and projection; compiling)
    parts: dict | None = None  # an end-to-end fit's seconds by where they went (see time_bbt_run)

    @property
    def calls_per_second(self) -> float:
        return self.calls / (self.seconds - self.setup_seconds)

    def seconds_for(self, calls: int) -> float:
        """Wall time for `calls` calls: the one-off setup once, then the measured per-call rate."""
        return self.setup_seconds + calls / self.calls_per_second

    @property
    def floor_fraction(self) -> float:
        """The floor over the time the calls took (one-off setup aside)."""
        return self.floor_seconds / (self.seconds - self.setup_seconds)


def run_bench(
    backbone: Backbone, texts: list[str], label_words: list[str], calls: int, reference_calls: int,
    popsize: int = 20, n_tokens: int = 50, dim: int = 500, device: str = "cpu", compile: str | None = None,
) -> tuple[list[BenchResult], dict]:
    server = ModelServer(backbone)  # the server's own interface: its scorer, beside the client's queries
    service = ModelService(server)
    spec = PromptSpec(n_tokens, 1, "add", "z", ProjectionSpec(dim, 0, (0.01,)))
    service.configure_prompt(spec)
    scorer, model = server.scorer, backbone.model
    label_ids = label_token_ids(backbone.tokenizer, label_words)
    enc = scorer.encode(texts)
    n, length = enc.input_ids.shape
    rng = np.random.RandomState(0)
    z = rng.randn(max(calls, reference_calls), 1, dim).astype(np.float32)
    rate = matmul_rate(device, next(model.parameters()).dtype)
    params = non_embedding_parameters(model)
    real = int(enc.attention_mask.sum())
    full_tokens = real + n * n_tokens  # every example with its own copy of the prompt
    shared = scorer.family == "clm" and getattr(scorer, "share_prefix", False)
    needed = real - n * scorer.insert_at + n_tokens + scorer.insert_at if shared else full_tokens

    def floor(k: int, tokens: int) -> float:
        return 2 * params * tokens * k / rate

    # reference-style: float32 copy of the model, one candidate per forward
    ref_model = model if next(model.parameters()).dtype == torch.float32 else _float_copy(model)
    ref_scorer = type(scorer)(ref_model, backbone.tokenizer, scorer.max_length)
    table = ref_model.get_input_embeddings()
    placeholders = table(torch.tensor(placeholder_ids(spec, table.weight.shape[0]), device=device))
    ref_enc = ref_scorer.encode(texts)
    matrices: dict = {}
    with torch.inference_mode():
        vectors = project(spec, z[:1], service.hidden_size, matrices).to(device)
        reference_call(ref_scorer, ref_enc, label_ids, PromptBatch(vectors, placeholders))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for i in range(reference_calls):
            vectors = project(spec, z[i : i + 1], service.hidden_size, matrices).to(device)
            reference_call(ref_scorer, ref_enc, label_ids, PromptBatch(vectors, placeholders))
        _sync(device)
        reference = BenchResult("reference-style", reference_calls, time.perf_counter() - start, floor(reference_calls, full_tokens))
        _, seconds = _time_generations(service, texts, label_words, z[:calls], popsize, device)  # warm-up untimed
        default = BenchResult("default", calls, seconds, floor(calls, needed))
        results = [reference, default]
        if compile:  # the same work, so the same floor; the first generation, which compiles, is one-off setup
            compiled = ModelService(backbone, compile=compile)
            compiled.configure_prompt(spec)
            warm, seconds = _time_generations(compiled, texts, label_words, z[:calls], popsize, device)
            results.append(BenchResult(f"default + torch.compile ({compile})", calls, warm + seconds, default.floor_seconds, warm))
    facts = {
        "device": device_description(),
        "backbone": backbone.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "examples_per_call": n,
        "padded_length": length,
        "prompt_tokens": n_tokens,
        "non_embedding_parameters": params,
        "matmul_tflops": rate / 1e12,
        "tokens_per_call_full": full_tokens,
        "tokens_per_call_needed": needed,
    }
    return results, facts


def _time_generations(service, texts, label_words, z, popsize, device) -> tuple[float, float]:
    """Seconds for a first, warm-up generation and then for all of z, a generation per request."""
    start = time.perf_counter()
    service.prompted_label_logits(texts, label_words, z[:popsize])
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(z), popsize):
        service.prompted_label_logits(texts, label_words, z[i : i + popsize])
    _sync(device)
    return warm, time.perf_counter() - start


def time_bbt_run(
    backbone: Backbone, card, prompt: PromptFormat, split, calls: int, seed: int, default: BenchResult, device: str,
    compile: str | None = None,
) -> BenchResult:
    """A whole BBT run's training on the default path, end to end: CMA-ES on the user side, the one-off setup
    (statistics query, projection drawn; timed apart so a short run extrapolates honestly), `calls` API calls and
    a dev check every 100 calls (the floor counts the train calls only). Its `parts` split the time: the server's
    forwards for the training calls and for the dev checks (its own clock), the setup, and the rest, which is
    the user side (CMA-ES's ask and tell, the losses, bookkeeping)."""
    from methods import get_method
    from methods.base import RunContext

    cls = get_method("bbt")
    service = ModelService(backbone, compile=compile)
    method = cls(cls.config_class(budget=calls), RunContext(card, prompt, seed, service=service))
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        method.fit(split.train, split.dev)
    _sync(device)
    seconds = time.perf_counter() - start
    floor = default.floor_seconds / default.calls * method.calls
    served = {phase: service.meter.phases[phase].seconds for phase in ("train", "dev")}
    parts = {**served, "setup": method.setup_s, "user": seconds - method.setup_s - sum(served.values())}
    path = "default" + (f" + torch.compile ({compile})" if compile else "")
    return BenchResult(f"{path}, end to end (BBT fit)", method.calls, seconds, floor, method.setup_s, parts)


def time_bbtv2_reuse(
    backbone: Backbone, texts: list[str], label_words: list[str], popsize: int = 20, n_tokens: int = 50,
    dim: int = 500, probes: int = 3, device: str = "cpu",
) -> dict:
    """BBTv2's seconds per API call with and without layer reuse. A BBTv2 generation varies one layer's
    prompt; one generation is timed for each of `probes` layers spread evenly over the stack (a round visits
    every layer once, and the cost falls linearly with the layer's depth, so their mean is a round's mean)."""
    layers = ModelService(backbone).num_layers
    slots = sorted({int(round(x)) for x in np.linspace(0, layers - 1, probes)})
    rng = np.random.RandomState(0)
    base = rng.randn(layers, dim).astype(np.float32)
    generations = {}
    for slot in slots:
        z = np.repeat(base[None], popsize, axis=0)
        z[:, slot] = rng.randn(popsize, dim)
        generations[slot] = z
    timings = {}
    for reuse in (False, True):
        service = ModelService(backbone, layer_reuse=reuse)
        service.configure_prompt(PromptSpec(n_tokens, layers, "add", "z", ProjectionSpec(dim, 0, (0.01,) * layers)))
        with torch.inference_mode():
            service.prompted_label_logits(texts, label_words, generations[slots[-1]][:2])  # warm-up
            per_call = []
            for slot in slots:
                _sync(device)
                start = time.perf_counter()
                service.prompted_label_logits(texts, label_words, generations[slot])
                _sync(device)
                per_call.append((time.perf_counter() - start) / popsize)
        timings["with" if reuse else "without"] = per_call
    return {"layers": layers, "slots": slots, **timings}


def _float_copy(model):
    import copy

    return copy.deepcopy(model).float()


def render(results: list[BenchResult], facts: dict, command: str, bbtv2: dict | None = None) -> str:
    reference = results[0]
    lines = [
        "# BBT per-call cost: reference-style loop vs the default path",
        "",
        f"Generated by `{command}`; device: **{facts['device']}**.",
        "",
        f"- backbone: {facts['backbone']} ({facts['dtype']} on the default path; the reference-style loop runs float32)",
        f"- one API call: {facts['examples_per_call']} examples (padded to {facts['padded_length']} tokens) + a "
        f"{facts['prompt_tokens']}-token prompt",
        f"- compute floor: 2 × {facts['non_embedding_parameters']:,} non-embedding parameters × tokens, at the measured "
        f"matrix-multiply rate {facts['matmul_tflops']:.2f} TFLOP/s; tokens per call: {facts['tokens_per_call_full']:,} "
        f"for the full sequences, {facts['tokens_per_call_needed']:,} for the work the default path must do",
        "",
        "| path | calls | seconds (one-off setup) | calls/s | s per 8,000 calls | floor for its work (s) | fraction of floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.path} | {r.calls} | {r.seconds:.2f} ({r.setup_seconds:.2f}) | {r.calls_per_second:.3f} | "
            f"{r.seconds_for(8000):.0f} | {r.floor_seconds:.2f} | {100 * r.floor_fraction:.1f}% |"
        )
    for r in results[1:]:
        if r.parts is None:  # the paths timed call by call (a fit's rows are about the whole run)
            lines += ["", f"Speed-up of the {r.path} path per API call: **{r.calls_per_second / reference.calls_per_second:.2f}×**."]
    for r in results:
        if r.parts:
            p, ms = r.parts, 1000 / r.calls
            floor = r.floor_seconds / r.calls * 8000
            lines += ["", f"**{r.path}**: 8,000 calls would take {r.seconds_for(8000):.1f} s, {r.seconds_for(8000) / floor:.2f}× "
                      f"the compute floor for them ({floor:.1f} s). Where its time went ({r.calls} calls): the service's "
                      "forwards for the training calls "
                      f"{p['train']:.2f} s ({p['train'] * ms:.2f} ms a call), for the dev checks {p['dev']:.2f} s; the "
                      f"one-off setup {p['setup']:.2f} s; the user side (CMA-ES ask and tell, losses, bookkeeping) "
                      f"{p['user']:.2f} s ({p['user'] * ms:.2f} ms a call)."]
    if bbtv2:
        without, with_ = np.mean(bbtv2["without"]), np.mean(bbtv2["with"])
        lines += [
            "",
            "## BBTv2: per-call cost with and without layer reuse",
            "",
            f"Deep prompts at all {bbtv2['layers']} layers; one generation varies one layer's prompt, so the layers "
            "below it are computed once and reused by the whole generation. Same device, same run.",
            "",
            "| layer varied | s per call without reuse | s per call with reuse | speed-up |",
            "|---|---|---|---|",
        ]
        for slot, a, b in zip(bbtv2["slots"], bbtv2["without"], bbtv2["with"]):
            lines.append(f"| {slot} | {a:.3f} | {b:.3f} | {a / b:.2f}× |")
        lines += [f"| mean (≈ a round) | {without:.3f} | {with_:.3f} | **{without / with_:.2f}×** |"]
    return "\n".join(lines) + "\n"


def bench_command(args) -> str:
    from harness.data import load_task_data, make_split
    from harness.tasks import get_card

    device = args.device or default_device()
    dtype = DTYPES[resolve_dtype("auto", device)]
    if args.random:
        backbone = random_backbone(args.backbone, device, dtype)
    else:
        backbone = load_backbone(args.backbone, device=device, dtype=dtype)
    card = get_card(args.task)
    split = make_split(card, load_task_data(card, args.data_dir), 16, args.seed, None)
    from harness.scoring import mask_string

    prompt = PromptFormat(card, backbone.family, mask_string(backbone.tokenizer, backbone.family))
    if args.calls % 20:
        raise HarnessError("--calls must be a multiple of the popsize (20)")
    texts = prompt.render_all(split.train)
    results, facts = run_bench(
        backbone, texts, prompt.label_words, args.calls, args.reference_calls, device=device, compile=args.compile
    )
    if args.end_to_end:
        for mode in (None, args.compile) if args.compile else (None,):
            results.append(time_bbt_run(backbone, card, prompt, split, args.calls, args.seed, results[1], device, mode))
    bbtv2 = time_bbtv2_reuse(backbone, texts, prompt.label_words, device=device) if args.bbtv2 else None
    text = render(results, facts, "harness " + " ".join(args.argv), bbtv2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text
