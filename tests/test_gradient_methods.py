"""The gradient baselines on small random models of every family: one table-driven matrix (loss goes down, only
the intended parameters change, the tunable count is what the method should have, the backbone is put back),
the soft-input scoring paths against plain forwards, and every method end to end through the runner."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import harness.runner as runner
from harness.checkpoint import Checkpoint
from harness.errors import HarnessError
from harness.profiles import get_profile
from harness.prompts import PromptFormat
from harness.scoring import Encoded, PromptBatch, label_token_ids, make_scorer, mask_string
from harness.store import ResultsStore
from harness.tasks import load_cards
from methods import get_method, registry
from methods.base import RunContext
from tests.conftest import tiny_backbone

KINDS = ["gpt2", "gemma3", "roberta", "bert", "t5", "bart"]
METHODS = ["model-tuning", "adapter", "bitfit", "lora", "prompt-tuning", "p-tuning-v2"]
CARD = load_cards()["sst2"]
POS = ["the movie was great", "a good film", "great movie", "it is good", "this film is great", "good good"]
NEG = ["the movie was bad", "a terrible film", "bad movie", "it is terrible", "this film is bad", "bad bad"]
TRAIN = [{"sentence": s, "label": 1} for s in POS[:4]] + [{"sentence": s, "label": 0} for s in NEG[:4]]
DEV = [{"sentence": s, "label": 1} for s in POS[4:]] + [{"sentence": s, "label": 0} for s in NEG[4:]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone(kind: str):
    """A tiny random model whose weights are N(0, 0.2): at the usual 0.02 the label logits hardly depend on the
    input, so a few steps could not show learning."""
    bb = tiny_backbone(kind)
    torch.manual_seed(1)
    for p in bb.model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return bb


def context(bb, seed: int = 13) -> RunContext:
    prompt = PromptFormat(CARD, bb.family, mask_string(bb.tokenizer, bb.family))
    return RunContext(CARD, prompt, seed, backbone=bb)


# --- the expected number of tunable parameters, from each config (not from the method's own code) -----------------


def dims(c) -> dict:
    """Width h, layers (encoder L, decoder D), FFN width f, heads, head width, key/value width, vocabulary V."""
    t = c.model_type
    if t == "gpt2":
        return dict(h=c.n_embd, L=c.n_layer, D=0, f=c.n_inner or 4 * c.n_embd, q=c.n_embd, kv=c.n_embd, V=c.vocab_size)
    if t == "gemma3_text":
        return dict(h=c.hidden_size, L=c.num_hidden_layers, D=0, f=c.intermediate_size, hd=c.head_dim,
                    q=c.num_attention_heads * c.head_dim, kv=c.num_key_value_heads * c.head_dim, V=c.vocab_size)
    if t in ("bert", "roberta"):
        return dict(h=c.hidden_size, L=c.num_hidden_layers, D=0, f=c.intermediate_size, q=c.hidden_size,
                    kv=c.hidden_size, V=c.vocab_size)
    if t == "t5":
        return dict(h=c.d_model, L=c.num_layers, D=c.num_decoder_layers, f=c.d_ff, q=c.num_heads * c.d_kv,
                    kv=c.num_heads * c.d_kv, V=c.vocab_size)
    if t == "bart":
        return dict(h=c.d_model, L=c.encoder_layers, D=c.decoder_layers, f=c.encoder_ffn_dim, q=c.d_model,
                    kv=c.d_model, V=c.vocab_size)
    raise ValueError(t)


def expected_count(method: str, bb, config) -> int:
    t = bb.model.config.model_type
    d = dims(bb.model.config)
    h, L, D, f = d["h"], d["L"], d["D"], d["f"]
    if method == "model-tuning":
        return sum(p.numel() for p in bb.model.parameters())  # shared (tied) tensors once
    if method == "prompt-tuning":
        return config.num_virtual_tokens * h
    if method == "p-tuning-v2":  # K and V vectors at every layer (the decoder's, for seq2seq)
        return config.num_virtual_tokens * (D or L) * 2 * d["kv"]
    if method == "lora":  # r·(in + out) per targeted projection: query and value (GPT-2: the fused q,k,v)
        r = config.r
        if t == "gpt2":
            return L * r * (h + 3 * h)
        per_block = r * (h + d["q"]) + r * (h + d["kv"])
        return (L + 2 * D if D else L) * per_block  # seq2seq: encoder self, decoder self and cross attention
    if method == "adapter":  # after each attention output and FFN output (+ the decoder's cross-attention)
        m = config.bottleneck
        sites = 2 * L + 3 * D
        return sites * (2 * h * m + m + h)
    if method == "bitfit":
        if t in ("bert", "roberta"):  # embeddings LN; q,k,v,o, FFN in/out, 2 LNs per layer; MLM head dense, LN, decoder
            return h + L * (7 * h + f) + 2 * h + d["V"]
        if t == "gpt2":  # ln_1, c_attn (3h), c_proj, ln_2, c_fc (f), mlp c_proj per layer; ln_f
            return L * (7 * h + f) + h
        if t == "bart":  # embedding LNs; encoder layer 7h + f; decoder layer 12h + f (cross-attention and its LN)
            return 2 * h + L * (7 * h + f) + D * (12 * h + f)
        if t == "gemma3_text":  # no biases: 4 RMSNorms per layer + q/k norms (head width) + the final norm
            return L * (4 * h + 2 * d["hd"]) + h
        if t == "t5":  # no biases: 2 norms per encoder layer, 3 per decoder layer, 2 final norms
            return (2 * L + 3 * D + 2) * h
    raise ValueError((method, t))


def intended(method: str, name: str, model_type: str) -> bool:
    """Which of the backbone's own parameters a method may change."""
    if method == "model-tuning":
        return True
    if method == "bitfit":
        if model_type in ("gemma3_text", "t5"):
            return "norm" in name and name.endswith("weight")
        return name.endswith("bias")
    return False  # adapters, LoRA, prompts and prefixes leave every base weight as it was


# --- the matrix -----------------------------------------------------------------------------------------------------

TEST_LR = {"model-tuning": 1e-2, "adapter": 3e-2, "bitfit": 2e-2, "lora": 3e-2, "prompt-tuning": 1e-1, "p-tuning-v2": 1e-1}
STEPS = 20


def state(model) -> dict:
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "grad_flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": sorted(model.__dict__),
    }


def assert_same_state(model, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["grad_flags"] == before["grad_flags"]
    assert after["attributes"] == before["attributes"]
    assert after["weights"].keys() == before["weights"].keys()
    changed = [k for k, v in before["weights"].items() if not torch.equal(v, after["weights"][k])]
    assert changed == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_method_matrix(method, kind):
    bb = backbone(kind)
    model_type = bb.model.config.model_type
    before = state(bb.model)
    own = [(n, p, p.detach().clone()) for n, p in bb.model.named_parameters()]  # by object: peft renames modules
    cls = get_method(method)
    config = cls.config_class(lr=TEST_LR[method], steps=STEPS, eval_every=STEPS, batch_size=8)
    m = cls(config, context(bb))
    try:
        m.prepare()
        start = m.loss(TRAIN)
        trainable_own = {n for n, p, _ in own if p.requires_grad}
        method_params = {n: p.detach().clone() for n, p in m._params.items()}
        m.fit(TRAIN, DEV)
        end = m.loss(TRAIN)
        changed_own = {n for n, p, v in own if not torch.equal(p.detach(), v)}
        changed_method = {n for n, p in m._params.items() if not torch.equal(p.detach(), method_params[n])}
        preds = m.predict(DEV)
    finally:
        m.close()

    # the training loss goes down (measured in eval mode, before and after)
    assert end < 0.99 * start, (start, end)
    # the tunable-parameter count is what the method should have
    assert m.tunable_parameters() == expected_count(method, bb, config)
    # only the intended parameters were trainable and changed
    assert all(intended(method, n, model_type) for n in trainable_own), sorted(trainable_own)[:5]
    assert all(intended(method, n, model_type) for n in changed_own), sorted(changed_own)[:5]
    if method in ("model-tuning", "bitfit"):
        assert trainable_own == {n for n, *_ in own if intended(method, n, model_type)}
        assert changed_own
    else:
        assert trainable_own == set() and changed_own == set()
    assert changed_method, "the method's own parameters did not move"
    if method == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in m._params)
    # predictions are label ids; the trace says what was trained; the backbone is exactly as it was
    assert preds.shape == (len(DEV),) and set(preds) <= {0, 1}
    assert m.trace()["trained"] and m.trace()["best_step"] == STEPS
    assert_same_state(bb.model, before)
    for p_name, p, value in own:
        assert torch.equal(p.detach(), value), p_name


def test_flags_and_registration():
    gradient = [name for name, cls in registry().items() if cls.group == "gradient-based"]
    assert gradient == METHODS  # the papers' row order
    for name in gradient:  # the quick profile's budget comes with each method's config
        assert get_method(name).config_class.for_profile("quick", "sst2") == {"steps": 100, "eval_every": 25}
    for name in gradient:
        cls = get_method(name)
        assert cls.as_a_service is False
        assert cls.deployment_efficient is (name != "model-tuning")


# --- the shared trainer keeps the best dev state ---------------------------------------------------------------------


def test_best_dev_state_is_restored_before_predicting():
    bb = backbone("gemma3")
    cls = get_method("lora")
    # a large learning rate on a tiny model: dev accuracy moves around; the kept state must be the best one seen
    m = cls(cls.config_class(lr=0.3, steps=12, eval_every=2, batch_size=4), context(bb))
    try:
        m.fit(TRAIN, DEV)
        trace = m.trace()
        best = max(trace["dev"], key=lambda e: (e["dev_score"], -e["dev_loss"]))
        assert trace["best_step"] == best["step"] and [e["step"] for e in trace["dev"]] == [2, 4, 6, 8, 10, 12]
        from harness.metrics import score

        now = score(CARD, [e["label"] for e in DEV], m.predict(DEV))["score"]
        assert now == pytest.approx(best["dev_score"])
        assert m.loss(DEV) == pytest.approx(best["dev_loss"], abs=1e-5)
    finally:
        m.close()


# --- a run that dies resumes from its last dev check to the uninterrupted result ----------------------------------


class _Killed(Exception):
    pass


class _DiesAfterSaving(Checkpoint):
    """Saves, then dies at step `kill_at`: what survives an attempt is the file."""

    def __init__(self, path, kill_at):
        super().__init__(path)
        self.kill_at = kill_at

    def save(self, state):
        super().save(state)
        if state["step"] == self.kill_at:
            raise _Killed


def _attempt(method: str, kind: str, checkpoint: Checkpoint) -> dict:
    """A fresh backbone, a method fitted with this checkpoint: its trace, dev logits and trained tensors."""
    bb = backbone(kind)
    cls = get_method(method)
    config = cls.config_class(lr=TEST_LR[method], steps=7, eval_every=2, batch_size=3)
    m = cls(config, replace(context(bb), checkpoint=checkpoint))
    try:
        m.prepare()
        forward, batches = m._trainer.forward, []
        m._trainer.forward = lambda texts: (batches.append(texts) if bb.model.training else None) or forward(texts)
        m.fit(TRAIN, DEV)
        trace = {k: v for k, v in m.trace().items() if k != "train_s"}
        logits = m._trainer.predict_logits(m.ctx.prompt.render_all(DEV))
        return {"trace": trace, "logits": logits, "params": {n: p.detach().clone() for n, p in m._params.items()},
                "batches": batches}
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["gemma3", "roberta"])  # RoBERTa's dropout draws from torch's random state
@pytest.mark.parametrize("method", METHODS)
def test_a_killed_training_run_resumes_to_the_uninterrupted_result(method, kind, tmp_path):
    """Killed right after the step-4 dev check (of 7 steps, batches of 3 from 8 examples: the next epoch's order
    is drawn after the kill); the resumed attempt on a fresh backbone must end bit for bit where an uninterrupted
    run ends: trace, best dev state, dev logits."""
    path = tmp_path / "run.pkl"
    with pytest.raises(_Killed):
        _attempt(method, kind, _DiesAfterSaving(path, kill_at=4))
    resumed_from = Checkpoint(path)
    resumed = _attempt(method, kind, resumed_from)
    whole = _attempt(method, kind, Checkpoint(tmp_path / "whole.pkl"))
    assert resumed_from.resumed_at == [4]
    assert len(resumed["batches"]) == 3 and resumed["batches"] == whole["batches"][4:]  # steps 5 to 7 only, alike
    assert resumed["trace"] == whole["trace"] and len(whole["trace"]["train_loss"]) == 7
    assert torch.equal(resumed["logits"], whole["logits"])
    assert all(torch.equal(resumed["params"][n], p) for n, p in whole["params"].items())


def test_a_checkpoint_of_other_tensors_is_not_resumed(tmp_path):
    """A checkpoint whose trainable tensors are not this run's (another peft's names) starts the run afresh."""
    path = tmp_path / "run.pkl"
    with pytest.raises(_Killed):
        _attempt("bitfit", "gemma3", _DiesAfterSaving(path, kill_at=2))
    checkpoint = Checkpoint(path)
    lora = _attempt("lora", "gemma3", checkpoint)
    assert lora["trace"] == _attempt("lora", "gemma3", Checkpoint(tmp_path / "whole.pkl"))["trace"]


# --- the soft-input scoring paths equal a plain forward over the concatenated tokens --------------------------------


def _reference(bb, ids, mask, read_at, label_ids):
    """Label logits of the model's own forward over the concatenated ids (clm: next token; mlm: at the mask)."""
    scorer = make_scorer(bb)
    return scorer.forward_label_logits(Encoded(ids, mask, read_at), label_ids)


class _Fixed:
    def __init__(self, prompt=None, prefix=None):
        self.prompt, self.prefix = prompt, prefix

    def input_prompt(self, n):
        return None if self.prompt is None else self.prompt.expand(n, -1, -1)

    def kv_prefix(self, n):
        return None if self.prefix is None else (copy.deepcopy(self.prefix[0]), self.prefix[1])


@pytest.mark.parametrize("kind", KINDS)
def test_input_prompt_equals_tokens_after_the_leading_special_token(kind):
    """Prompt tuning's vectors go where BBT's prompt goes: after <bos>/<s>/[CLS] (first where there is none)."""
    bb = backbone(kind)
    scorer = make_scorer(bb)
    assert scorer.insert_at == (0 if kind in ("gpt2", "t5") else 1)  # GPT-2 and T5 add no leading token
    mask = mask_string(bb.tokenizer, bb.family)
    texts = [f"the movie was great . it was {mask} .", f"bad film . it was {mask} ."]
    ids = label_token_ids(bb.tokenizer, [" bad", " great"])
    enc = scorer.encode(texts)
    prefix_ids = torch.tensor([[7, 8, 9]])
    embedder = bb.model.get_encoder() if bb.family == "seq2seq" else bb.model
    soft = _Fixed(prompt=embedder.get_input_embeddings()(prefix_ids))
    at = scorer.insert_at
    with torch.no_grad():
        got = scorer.forward_label_logits(enc, ids, soft=soft)
        cat_ids = torch.cat([enc.input_ids[:, :at], prefix_ids.expand(2, 3), enc.input_ids[:, at:]], 1)
        ones = torch.ones(2, 3, dtype=enc.attention_mask.dtype)
        cat_mask = torch.cat([enc.attention_mask[:, :at], ones, enc.attention_mask[:, at:]], 1)
        if bb.family == "seq2seq":  # the prompt is the encoder's: the decoder's inputs and read positions stay
            decoded = bb.model(input_ids=cat_ids, attention_mask=cat_mask, decoder_input_ids=scorer._decoder_inputs(enc))
            want = decoded.logits[torch.arange(2), enc.read_at][:, ids]
        else:
            want = _reference(bb, cat_ids, cat_mask, enc.read_at + 3, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3", "t5", "bart"])
def test_prompt_tuning_and_bbt_place_their_prompt_alike(kind):
    """The same vectors as prompt tuning's soft prompt and as BBT's slot 0 ("cat" mode) give the same logits: both
    methods see one layout. (Masked LMs differ by design: BBT adds slot 0 after the embeddings' LayerNorm, as the
    reference does; prompt tuning's vectors are input embeddings.)"""
    bb = backbone(kind)
    scorer = make_scorer(bb)
    mask = mask_string(bb.tokenizer, bb.family)
    texts = [f"the movie was great . it was {mask} .", f"bad film . it was {mask} ."]
    ids = label_token_ids(bb.tokenizer, [" bad", " great"])
    vectors = torch.randn(1, 1, 3, bb.model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        soft = scorer.forward_label_logits(scorer.encode(texts), ids, soft=_Fixed(prompt=vectors[0]))
        bbt = scorer.label_logits(texts, ids, PromptBatch(vectors))
    torch.testing.assert_close(soft, bbt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
def test_key_value_prefix_equals_prepended_tokens(kind):
    """A causal LM's cache of real tokens is a prefix whose effect we know: the forward over the concatenation."""
    bb = backbone(kind)
    scorer = make_scorer(bb)
    texts = ["the movie was great . the sentiment is", "bad . the sentiment is"]
    ids = label_token_ids(bb.tokenizer, [" negative", " positive"])
    enc = scorer.encode(texts)
    prefix_ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        cache = bb.model.base_model(input_ids=prefix_ids.expand(2, 4), use_cache=True).cache
        got = scorer.forward_label_logits(enc, ids, soft=_Fixed(prefix=(cache, 4)))
        cat_ids = torch.cat([prefix_ids.expand(2, 4), enc.input_ids], 1)
        cat_mask = torch.cat([torch.ones(2, 4, dtype=enc.attention_mask.dtype), enc.attention_mask], 1)
        want = _reference(bb, cat_ids, cat_mask, enc.read_at + 4, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_and_prompt_do_not_leak_padding(kind):
    """With a trained-looking prefix or prompt, a batch of one scores like the same row in a padded batch."""
    bb = backbone(kind)
    for method in ("p-tuning-v2", "prompt-tuning"):
        cls = get_method(method)
        m = cls(cls.config_class(num_virtual_tokens=5), context(bb))
        try:
            m.prepare()
            with torch.no_grad():
                for p in m._params.values():
                    p.normal_(std=0.5)
            texts = m.ctx.prompt.render_all(TRAIN[:3])
            batch = m._trainer.predict_logits(texts)
            one = m._trainer.predict_logits(texts[1:2])
            torch.testing.assert_close(one, batch[1:2], rtol=1e-4, atol=1e-5)
        finally:
            m.close()


def test_prompt_longer_than_the_backbone_allows_is_an_error():
    bb = backbone("gpt2")
    cls = get_method("prompt-tuning")
    m = cls(cls.config_class(num_virtual_tokens=1100, steps=1, eval_every=1), context(bb))
    try:
        with pytest.raises(HarnessError, match="prompt/prefix"):
            m.fit(TRAIN, DEV)
    finally:
        m.close()
    assert not any(p.requires_grad is False for p in bb.model.parameters())  # flags restored after the failure


def test_bitfit_without_biases_can_refuse():
    bb = backbone("gemma3")
    cls = get_method("bitfit")
    m = cls(cls.config_class(no_bias="error"), context(bb))
    try:
        with pytest.raises(HarnessError, match="no bias terms"):
            m.prepare()
    finally:
        m.close()


# --- end to end through the runner, on one shared backbone ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_every_method_runs_through_the_grid_and_leaves_the_backbone_as_it_was(tmp_path, shared_data, monkeypatch, kind):
    shared = backbone(kind)
    before = state(shared.model)
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": shared)
    quick = get_profile("quick")
    profile = replace(quick, eval_cap=40, method_overrides={m: {"steps": 3, "eval_every": 2} for m in METHODS})
    specs = runner.expand(METHODS, ["sst2"], [13], f"tiny-{kind}", profile)
    store = ResultsStore(tmp_path)
    summary = runner.run_grid(specs, load_cards(), profile, store, str(shared_data))
    assert summary.failed == [] and len(summary.ran) == len(METHODS)
    records = {r.method: r for r in store.records()}
    for method in METHODS:
        r = records[method]
        assert r.status == "ok" and r.group == "gradient-based" and r.as_a_service is False
        assert r.deployment_efficient is (method != "model-tuning")
        assert r.tunable_parameters == expected_count(method, shared, get_method(method).config_class())
        assert r.split["eval_size"] == 40 and 0 <= r.score <= 100
        assert r.trace["best_step"] in (2, 3) and len(r.trace["train_loss"]) == 3
        assert r.meters["wall_s"] > 0 and r.meters["server_gpu_peak_mb"] is None  # CPU: labelled, not zero
        assert r.meters["cpu_rss_peak_mb"] > 0
        assert r.queries is None  # they own the model: no service traffic to count
    assert_same_state(shared.model, before)
    from harness.report import render

    report = render(store.records())
    assert "bitfit: " + ("bias terms" if kind == "gpt2" else "normalisation gains (t5 has no bias terms)") in report
