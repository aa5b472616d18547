"""BBT and BBTv2: the optimiser, the projection, the prompt injection, budgets, batching and bytes."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import load_task_data, make_split
from harness.errors import HarnessError
from harness.prompting import ProjectionSpec, PromptSpec, clipped_std, projection_matrix, projection_std
from harness.prompts import PromptFormat
from harness.scoring import PromptBatch, label_token_ids, make_scorer, mask_string, transformer_layers
from harness.service import ModelService
from harness.tasks import get_card
from methods import get_method
from methods.base import RunContext
from methods.bbt import BBTConfig, cross_entropy, hinge
from tests.conftest import tiny_backbone
from tests.resume_driver import split

FAMILY_KINDS = ["gpt2", "gemma3", "roberta", "bert", "t5", "bart"]


class SyntheticService:
    """A black box with the service's interface whose label logits are a hidden linear function of z:
    the label-1 logit of example i is w_i . z. Labels come from a hidden z*, so a perfect fit exists."""

    def __init__(self, n=32, dim=20, seed=0):
        rng = np.random.RandomState(seed)
        self.w = rng.randn(n, dim)
        self.labels = (self.w @ rng.randn(dim) > 0).astype(int)
        self.calls = 0

    def prompted_label_logits(self, texts, label_words, sent, sequential=False):
        self.calls += len(sent)
        z = sent[:, 0, :]
        ones = (z @ self.w.T)[:, : len(texts)]
        return np.stack([np.zeros_like(ones), ones], axis=-1).astype(np.float32)


def test_cma_es_minimises_a_synthetic_black_box():
    from harness.tasks import TaskCard, Template

    service = SyntheticService()
    card = TaskCard("toy", ("x",), ("a", "b"), "accuracy", {"clm": Template("{x}", (" a", " b"))})
    config = get_method("bbt").config_class(intrinsic_dim=20, budget=600, popsize=20, sigma=1.0)
    method = get_method("bbt")(config, RunContext(card, PromptFormat(card, "clm", ""), seed=1, service=service))
    method.spec = PromptSpec(1, 1, "cat", "z", ProjectionSpec(20, 1, (1.0,)))
    method.label_words, method.train_texts, method.train_labels = [" a", " b"], ["t"] * 32, service.labels
    es = method._strategy(0)
    first = None
    while method.calls < config.budget:
        z = np.asarray(es.ask())
        losses, _ = method.evaluate(z[:, None, :])
        es.tell(list(z), losses)
        first = first if first is not None else min(losses)
    assert service.calls == 600
    final = cross_entropy(service.prompted_label_logits(["t"] * 32, None, np.asarray(es.result.xfavorite)[None, None])[0], service.labels)
    assert final < 0.25 * first  # the black box's loss falls by more than 4x from the first generation's best


def test_losses():
    logits = np.array([[2.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 1])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(np.exp(3) / (np.exp(3) + 1))])
    assert cross_entropy(logits, labels) == pytest.approx(expected)
    assert hinge(logits, labels, margin=2.0) == 0.0  # both margins are met
    torch_hinge = torch.nn.MultiMarginLoss(margin=2.0)(torch.tensor([[0.5, 0.0], [0.0, 1.0]]), torch.tensor(labels))
    assert hinge(np.array([[0.5, 0.0], [0.0, 1.0]]), labels, 2.0) == pytest.approx(float(torch_hinge))


def test_projection_std_formula_and_draws():
    assert projection_std(sigma_hat=0.5, dim=500, sigma=1.0, alpha=1.0) == pytest.approx(0.5 / np.sqrt(500))
    assert projection_std(0.5, 500, sigma=0.2, alpha=0.4) == pytest.approx(0.4 * 0.5 / (np.sqrt(500) * 0.2))
    std = projection_std(0.8, 500, 1.0)
    for dist in ("normal", "uniform"):
        spec = ProjectionSpec(500, seed=3, stds=(std,), dist=dist)
        a = projection_matrix(spec, 0, 4000)
        assert float(a.std()) == pytest.approx(std, rel=0.02)
        assert torch.equal(a, projection_matrix(spec, 0, 4000))  # either side rebuilds the same matrix
        prompt = torch.randn(64, 500) @ a  # z ~ N(0, sigma^2 = 1): prompt entries at the embedding scale
        assert float(prompt.std()) == pytest.approx(0.8, rel=0.05)


def test_clipped_std_ignores_outliers():
    values = torch.randn(20000)
    assert clipped_std(values) == pytest.approx(1.0, rel=0.03)
    values[:20] = 1e4
    assert float(values.std()) > 20 and clipped_std(values) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3", "roberta", "bert"])  # encoder-decoders: the decoder never sees it
def test_add_mode_with_zero_prompt_equals_the_placeholder_tokens_as_text(kind):
    backbone = tiny_backbone(kind)
    scorer = make_scorer(backbone)
    mask = mask_string(backbone.tokenizer, backbone.family)
    texts = [f"the movie was good . it was {mask} .", f"bad . {mask}"]
    ids = label_token_ids(backbone.tokenizer, [" good", " bad"])
    placeholder_ids = torch.arange(10, 14)
    table = backbone.model.get_input_embeddings()
    batch = PromptBatch(torch.zeros(1, 1, 4, table.weight.shape[1]), table(placeholder_ids))
    prompted = scorer.label_logits(texts, ids, batch)
    # the same placeholders written into the token ids, right after <s>/<bos> (or at the start)
    enc = scorer.encode(texts)
    at = scorer.insert_at
    n = len(texts)
    enc.input_ids = torch.cat([enc.input_ids[:, :at], placeholder_ids.expand(n, 4), enc.input_ids[:, at:]], 1)
    enc.attention_mask = torch.cat([enc.attention_mask[:, :at], torch.ones(n, 4, dtype=torch.long), enc.attention_mask[:, at:]], 1)
    enc.read_at = scorer._shift(enc.read_at, 4)
    with torch.no_grad():
        literal = scorer.forward_label_logits(enc, ids)
    torch.testing.assert_close(prompted, literal, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["roberta", "bert"])
@pytest.mark.parametrize("mode", ["add", "cat"])
def test_masked_lm_slot0_is_added_to_the_embeddings_output(kind, mode):
    """As the reference's RoBERTa and BERT: slot 0 is added to the embeddings module's output (after its LayerNorm
    and dropout) at the prompt positions right after <s>/[CLS], which hold the placeholder tokens ("add"); in "cat"
    mode the vectors replace that output. Compared with the model's own full forward (its real LM head, bias
    included) over the placeholder tokens as text, the prompt added by a hook on the embeddings module."""
    backbone = tiny_backbone(kind)
    model, scorer = backbone.model, make_scorer(backbone)
    torch.manual_seed(1)
    with torch.no_grad():  # weights of std 0.2, not 0.02: the prompt then moves the logits well beyond the tolerance
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.2)
    mask = mask_string(backbone.tokenizer, backbone.family)
    texts = [f"the movie was good . it was {mask} .", f"bad . {mask}"]
    ids = label_token_ids(backbone.tokenizer, [" good", " bad"])
    table = model.get_input_embeddings()
    placeholder_ids = torch.arange(10, 14)
    vectors = torch.randn(2, 1, 4, table.weight.shape[1], generator=torch.Generator().manual_seed(0))
    got = scorer.label_logits(texts, ids, PromptBatch(vectors, table(placeholder_ids) if mode == "add" else None))

    enc = scorer.encode(texts)
    n, rows = len(texts), torch.arange(len(texts))
    assert scorer.insert_at == 1
    input_ids = torch.cat([enc.input_ids[:, :1], placeholder_ids.expand(n, 4), enc.input_ids[:, 1:]], 1)
    attention = torch.cat([enc.attention_mask[:, :1], torch.ones(n, 4, dtype=torch.long), enc.attention_mask[:, 1:]], 1)
    want = []
    for candidate in vectors:
        def add_prompt(module, args, output, prompt=candidate[0].expand(n, -1, -1)):
            span = output[:, 1:5] + prompt if mode == "add" else prompt
            return torch.cat([output[:, :1], span, output[:, 5:]], 1)

        handle = model.base_model.embeddings.register_forward_hook(add_prompt)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        handle.remove()
        want.append(logits[rows, enc.read_at + 4][:, ids])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_deep_prompts_enter_every_layer_and_batching_agrees(kind):
    backbone = tiny_backbone(kind)
    service = ModelService(backbone, max_tokens=200)  # forces several forwards for the batched generation
    layers = service.num_layers
    assert layers == 2
    spec = PromptSpec(3, layers, "add", "z", ProjectionSpec(8, 0, tuple([0.5] * layers)))
    service.configure_prompt(spec)
    texts = [f"the movie was good . {service.mask}", f"bad film {service.mask} ."]
    z = np.random.RandomState(0).randn(5, layers, 8).astype(np.float32)
    batched = service.prompted_label_logits(texts, [" good", " bad"], z)
    sequential = service.prompted_label_logits(texts, [" good", " bad"], z, sequential=True)
    assert batched.shape == (5, 2, 2)
    np.testing.assert_allclose(batched, sequential, rtol=1e-4, atol=1e-5)
    # the deep slot matters: changing only layer 1's z changes the logits
    moved = z.copy()
    moved[:, 1] += 3.0
    assert not np.allclose(service.prompted_label_logits(texts, [" good", " bad"], moved), batched, atol=1e-4)


@pytest.mark.parametrize("task, n, labels", [("sst2", 32, 2), ("agnews", 64, 4)])
@pytest.mark.parametrize("send", ["z", "prompt"])
def test_bbt_bytes_per_query(task, n, labels, send, shared_data):
    card = get_card(task)
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, 8)
    backbone = tiny_backbone("gpt2")
    service = ModelService(backbone)
    config = get_method("bbt").config_class(budget=20, popsize=10, intrinsic_dim=50, n_tokens=5, send=send, eval_every=10)
    method = get_method("bbt")(config, RunContext(card, PromptFormat(card, "clm", ""), 42, service=service))
    with service.phase("train"):
        method.fit(split.train, split.dev)
    train = service.meter.summary()["train"]
    assert train["queries"] == 20 == method.calls
    assert train["download_per_query_bytes"] == n * labels * 4  # sst2: 256 B, agnews: 1 KB
    texts = PromptFormat(card, "clm", "").render_all(split.train)
    sent = 50 * 4 if send == "z" else 5 * service.hidden_size * 4  # z: d x 4 B; prompt: n_tokens x hidden x 4 B
    words = sum(len(w.encode()) for w in card.template_for("clm").label_words)
    assert train["upload_per_query_bytes"] == sum(len(t.encode()) for t in texts) + words + sent


@pytest.mark.parametrize("send", ["z", "prompt"])
def test_setup_draws_every_projection_on_the_side_that_sends_it(send, shared_data):
    """A is drawn inside the timed setup (`setup_s`), by whichever side holds it, for every layer of BBTv2."""
    card = get_card("sst2")
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, 8)
    service = ModelService(tiny_backbone("gemma3"))
    config = get_method("bbtv2").config_class(budget=20, popsize=10, intrinsic_dim=20, n_tokens=4, send=send)
    method = get_method("bbtv2")(config, RunContext(card, PromptFormat(card, "clm", ""), 42, service=service))
    method._setup(split.train, split.dev)
    holder, other = (service._projections, method._matrices) if send == "z" else (method._matrices, service._projections)
    assert sorted(holder) == list(range(service.num_layers)) and not other
    assert method.setup_s > 0


def test_bbtv2_spends_rounds_times_popsize_times_layers(shared_data):
    card = get_card("sst2")
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, 8)
    service = ModelService(tiny_backbone("gemma3"))
    config = get_method("bbtv2").config_class(budget=130, popsize=10, intrinsic_dim=20, n_tokens=4, eval_every=50)
    method = get_method("bbtv2")(config, RunContext(card, PromptFormat(card, "clm", ""), 42, service=service))
    with service.phase("train"):
        method.fit(split.train, split.dev)
    rounds = 130 // (10 * 2)
    assert method.calls == rounds * 10 * 2 == service.meter.summary()["train"]["queries"] == 120
    assert method.tunable_parameters() == 2 * 20
    trace = method.trace()
    assert [d["calls"] for d in trace["dev"]] == [50, 100, 120]  # every 50 calls, and at the end
    assert len(trace["train"]) == rounds * 2
    losses = [t["best_loss"] for t in trace["train"]]
    assert losses == sorted(losses, reverse=True)  # the best-so-far never gets worse


def test_budget_below_one_generation_or_round_is_an_error(shared_data):
    card = get_card("sst2")
    service = ModelService(tiny_backbone("gpt2"))
    ctx = RunContext(card, PromptFormat(card, "clm", ""), 42, service=service)
    with pytest.raises(HarnessError, match="below one generation"):
        get_method("bbt")(get_method("bbt").config_class(budget=10, popsize=20), ctx)
    split = make_split(card, load_task_data(card, str(shared_data)), 16, 42, 8)
    method = get_method("bbtv2")(get_method("bbtv2").config_class(budget=30, popsize=20, intrinsic_dim=10), ctx)
    with pytest.raises(HarnessError, match="cannot give one round over 2 layers"):
        method.fit(split.train, split.dev)
    with pytest.raises(HarnessError, match="loss must be one of"):
        get_method("bbt")(get_method("bbt").config_class(loss="mse"), ctx)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
@pytest.mark.parametrize("mode", ["add", "cat"])
def test_causal_shared_prefix_path_equals_the_full_forward(kind, mode):
    backbone = tiny_backbone(kind)
    scorer = make_scorer(backbone)
    hidden = backbone.model.get_input_embeddings().weight.shape[1]
    layers = len(transformer_layers(backbone.model))
    vectors = torch.randn(3, layers, 4, hidden, generator=torch.Generator().manual_seed(1))
    table = backbone.model.get_input_embeddings()
    batch = PromptBatch(vectors, table(torch.arange(10, 14)) if mode == "add" else None)
    texts = ["the movie was good . it was", "bad film", "this is a review of the movie and it is about a film ."]
    ids = label_token_ids(backbone.tokenizer, [" good", " bad"])
    fast = scorer.label_logits(texts, ids, batch)
    scorer.share_prefix = False
    full = scorer.label_logits(texts, ids, batch)
    assert fast.shape == (9, 2)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)


def _linear_rows(layer: torch.nn.Module) -> tuple[list, list]:
    """Hooks counting the rows every linear map inside `layer` processes (what the layer really computes)."""
    rows = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: rows.append(out.shape[:-1].numel()))
        for m in layer.modules()
        if not list(m.children()) and getattr(m, "weight", None) is not None and m.weight.dim() == 2  # Linear, Conv1D
    ]
    return rows, handles


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_bucketing_and_layer_reuse_give_the_plain_path_s_logits(kind):
    """The fast path (length buckets, layers below the varied slot run once) equals one candidate per forward
    over one padded batch; and with reuse, the layer below the varied slot runs for one candidate only."""
    backbone = tiny_backbone(kind)
    fast = ModelService(backbone)
    plain = ModelService(backbone, bucketing=False, layer_reuse=False)
    spec = PromptSpec(3, 2, "add", "z", ProjectionSpec(8, 0, (0.5, 0.5)))
    for service in (fast, plain):
        service.configure_prompt(spec)
    mask = fast.mask
    texts = [f"good {mask}", f"the movie was good and the film was good . {mask}", f"bad film {mask} .",
             f"this is a long review of a movie and it is about a film that was bad . {mask}"]
    assert len(fast._encoded_buckets(texts)[0]) > 1  # the lengths differ enough to split
    z = np.random.RandomState(0).randn(5, 2, 8).astype(np.float32)
    z[:, 0] = z[0, 0]  # BBTv2's shape of generation: slot 0 frozen, slot 1 varied
    words = [" good", " bad"]
    layer0 = transformer_layers(backbone.model)[0]
    rows, handles = _linear_rows(layer0)
    got = fast.prompted_label_logits(texts, words, z)
    reused_rows = sum(rows)
    rows.clear()
    want = plain.prompted_label_logits(texts, words, z, sequential=True)
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert reused_rows * 4 < sum(rows)  # layer 0 ran for one candidate of five, not for all
    # candidates that differ in slot 0 share nothing: still the same logits
    z2 = np.random.RandomState(1).randn(5, 2, 8).astype(np.float32)
    np.testing.assert_allclose(
        fast.prompted_label_logits(texts, words, z2), plain.prompted_label_logits(texts, words, z2, sequential=True),
        rtol=1e-4, atol=1e-5,
    )


def test_length_buckets_partition_and_minimise_padding():
    from itertools import combinations

    from harness.service import length_buckets

    lengths = [12, 3, 40, 4, 11, 39, 5, 13]
    groups = length_buckets(lengths, most=3, overhead=0.0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    ordered = sorted(lengths)
    best = min(  # brute force over every split of the sorted lengths into at most 3 runs
        sum((j - i) * ordered[j - 1] for i, j in zip((0, *cuts), (*cuts, len(ordered))))
        for k in range(3) for cuts in combinations(range(1, len(ordered)), k)
    )
    assert padded == best == 3 * 5 + 3 * 13 + 2 * 40
    assert length_buckets([7] * 10) == [list(range(10))]  # nothing to gain: one forward
    assert len(length_buckets([1, 2, 3, 100], overhead=10.0)) == 1  # a forward's cost outweighs the padding saved


@pytest.mark.parametrize("method_name, kill_at", [("bbt", 60), ("bbtv2", 160)])
def test_a_killed_run_resumes_in_a_new_process_to_the_uninterrupted_result(method_name, kill_at, tmp_path):
    """A process SIGKILLed right after a dev check's checkpoint; a new one resumes from the file and must end where
    a run never interrupted ends: trace, kept solution, predictions and query counts (tests/resume_driver.py)."""
    # the same thread settings in every process (float32 sums depend on them); one thread keeps a busy CPU quick
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def driver(*args):
        command = [sys.executable, "-m", "tests.resume_driver", method_name, str(tmp_path), *args]
        return subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, timeout=600)

    killed = driver(str(kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    saved = pickle.loads((tmp_path / "run.pkl").read_bytes())["state"]
    assert saved["calls"] == kill_at and len(saved["journal"]) == kill_at // 10
    # the journal, not the strategies (their 300 x 300 matrices alone would be over 2 MB)
    assert "es" not in saved and "strategies" not in saved and (tmp_path / "run.pkl").stat().st_size < 100_000
    # a hard place to stop: the next generation of a strategy starts with pycma's lazy eigendecomposition of its
    # covariance and, for BBTv2, the round is half done
    method = _driver_method(method_name)
    state = method._replay(method._fresh(), saved["journal"])
    es = state["es"] if method_name == "bbt" else state["strategies"][0]
    assert es.sm.count_tell >= es.sm.last_update + es.sm.lazy_update_gap and es.sm.last_update == 0
    if method_name == "bbtv2":
        assert state["step"] % 3 != 0
    done = driver()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    outcome = pickle.loads((tmp_path / "out.pkl").read_bytes())
    resumed, whole = outcome["resumed"], outcome["whole"]
    assert resumed["resumed_at"] == [kill_at] and whole["resumed_at"] == []
    assert resumed["trace"] == whole["trace"]
    np.testing.assert_array_equal(resumed["best_z"], whole["best_z"])
    np.testing.assert_array_equal(resumed["predictions"], whole["predictions"])
    assert resumed["queries"] == whole["queries"]  # each call counted once over both attempts


def _driver_method(method_name: str, checkpoint=None):
    """The resume driver's method and setting, set up far enough to rebuild its strategies (no model needed)."""
    from tests.resume_driver import SETTINGS

    overrides, layers = SETTINGS[method_name]
    card, cls = get_card("sst2"), get_method(method_name)
    config = cls.config_class(popsize=10, intrinsic_dim=300, n_tokens=2, **overrides)
    method = cls(config, RunContext(card, PromptFormat(card, "clm", ""), 42, checkpoint=checkpoint))
    method.slots = 1 if method_name == "bbt" else layers
    return method


def test_a_journal_that_does_not_replay_to_its_checkpoint_is_refused(tmp_path):
    """A checkpoint whose losses were altered (or whose method changed its update) must not resume silently."""
    from harness.checkpoint import Checkpoint

    journal = np.random.RandomState(0).rand(4, 10).tolist()
    saved = {"journal": journal, "best_loss": min(map(min, journal)), "best_logits": np.zeros((8, 2)), "calls": 40,
             "trace": {"train": [], "dev": [], "stopped": []}, "best_dev": (50.0, 0.7), "best_z": np.zeros((1, 300))}
    Checkpoint(tmp_path / "ok.pkl").save(saved)
    method = _driver_method("bbt", Checkpoint(tmp_path / "ok.pkl"))
    assert len(method._resume(method._fresh())["journal"]) == 4
    Checkpoint(tmp_path / "bad.pkl").save({**saved, "best_loss": saved["best_loss"] - 0.1})
    method = _driver_method("bbt", Checkpoint(tmp_path / "bad.pkl"))
    with pytest.raises(HarnessError, match="does not replay"):
        method._resume(method._fresh())


def test_an_older_checkpoint_is_not_resumed(tmp_path):
    """A checkpoint from before strategies owned their random streams would resume onto numpy's global one."""
    from harness.checkpoint import Checkpoint

    path = tmp_path / "run.pkl"
    old = {"state": {"calls": 20}, "numpy_random": np.random.get_state(), "meter": None, "elapsed_s": 1.0, "resumed_at": []}
    path.write_bytes(pickle.dumps(old))
    checkpoint = Checkpoint(path)
    assert checkpoint.load() is None and checkpoint.resumed_at == [] and checkpoint.earlier_s == 0


def test_a_checkpoint_keeps_where_each_stretch_of_its_run_computed(tmp_path, caplog):
    from harness.checkpoint import Checkpoint

    path = tmp_path / "run.pkl"
    Checkpoint(path, where="A").save({"calls": 20})
    same = Checkpoint(path, where="A")
    same.load()
    assert same.ran_on == [[0, "A"]] and "computes on" not in caplog.text
    moved = Checkpoint(path, where="B")
    moved.load()
    assert moved.ran_on == [[0, "A"], [20, "B"]]
    assert "the run so far computed on A; from 20 on it computes on B" in caplog.text
    moved.save({"calls": 40})
    back = Checkpoint(path, where="A")
    back.load()
    assert back.ran_on == [[0, "A"], [20, "B"], [40, "A"]] and back.resumed_at == [20, 40]
    earlier = pickle.loads(path.read_bytes())  # a checkpoint saved before they kept it: not recorded, not assumed
    del earlier["ran_on"]
    path.write_bytes(pickle.dumps(earlier))
    unknown = Checkpoint(path, where="A")
    unknown.load()
    assert unknown.ran_on == [[0, None], [40, "A"]]


def _search(config, service=None, progress=None):
    """BBT or BBTv2 (as the config's class says) on sst2 with the clm template, seed 42."""
    from harness.progress import RunProgress

    card = get_card("sst2")
    ctx = RunContext(card, PromptFormat(card, "clm", ""), 42, service=service, progress=progress or RunProgress())
    return get_method("bbt" if type(config) is BBTConfig else "bbtv2")(config, ctx)


def test_each_cma_es_strategy_draws_from_its_own_stream():
    """Not from numpy's global generator: a strategy's draws do not depend on which strategies were built after it,
    on what else draws from numpy, or on the order the strategies are asked in."""
    config = get_method("bbtv2").config_class(intrinsic_dim=20, popsize=10)
    alone = np.asarray(_search(config)._strategy(0).ask())
    method = _search(config)
    first, second = method._strategy(0), method._strategy(1)
    np.random.seed(7)
    np.random.randn(5)  # someone else moves numpy's global generator on
    other = np.asarray(second.ask())
    np.testing.assert_array_equal(np.asarray(first.ask()), alone)
    assert not np.allclose(other, alone)  # each slot its own seed
    before = np.random.get_state()[1].copy()
    method._strategy(2)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # building a strategy leaves numpy's alone


def test_bbtv2_starts_cma_es_with_the_reference_step_and_bbt_keeps_its_own():
    """The reference's BBTv2 command uses sigma 0.2 and alpha 0.2: the projection std alpha / sigma is BBT's, the
    initial step 5x smaller."""
    from harness.profiles import get_profile
    from harness.runner import expand

    bbt, bbtv2 = BBTConfig(), get_method("bbtv2").config_class()
    assert (bbt.sigma, bbt.alpha, bbtv2.sigma, bbtv2.alpha) == (1.0, 1.0, 0.2, 0.2)
    assert projection_std(0.5, 500, bbtv2.sigma, bbtv2.alpha) == projection_std(0.5, 500, bbt.sigma, bbt.alpha)
    assert _search(bbtv2)._strategy(0).sigma == 0.2 and _search(bbt)._strategy(0).sigma == 1.0
    specs = expand(["bbt", "bbtv2"], ["sst2"], [42], "gemma3-270m", get_profile("paper"))
    assert [(s.config["sigma"], s.config["alpha"]) for s in specs] == [(1.0, 1.0), (0.2, 0.2)]


@pytest.mark.parametrize("accept", ["xbest", "generation-best", "global-best"])
def test_bbtv2_layers_accept_their_candidate_after_every_generation(accept):
    """xbest (the reference, the default): layer j takes its strategy's best candidate so far after each of its
    generations, whether or not it beats the best loss of the whole search; generation-best: the generation's
    best; global-best: the generation's best only when it beats every loss seen."""
    train, dev, _ = split()
    # BBT's larger step: some generations then fall short of the best loss so far, and the rules part
    config = get_method("bbtv2").config_class(
        budget=160, popsize=10, intrinsic_dim=20, n_tokens=2, eval_every=10, sigma=1.0, alpha=1.0, accept=accept)
    method = _search(config, ModelService(tiny_backbone("gemma3")))
    generations, incumbents = [], []
    evaluate, dev_check = method.evaluate, method._dev_check

    def spy_evaluate(z):
        losses, logits = evaluate(z)
        generations.append((z.copy(), np.array(losses)))
        return losses, logits

    method.evaluate = spy_evaluate
    method._dev_check = lambda z: (incumbents.append(z.copy()), dev_check(z))  # after every generation
    method.fit(train, dev)
    assert len(incumbents) == len(generations) == 16
    expected, kept, best, rules_differ = np.zeros((2, 20)), {0: [], 1: []}, np.inf, False
    for (z, losses), incumbent in zip(generations, incumbents):
        slot = int(np.flatnonzero(np.ptp(z, axis=0).any(axis=1))[0])  # the layer this generation varied
        kept[slot] += [(loss, candidate) for loss, candidate in zip(losses, z[:, slot])]
        i = int(np.argmin(losses))
        by_rule = {
            "xbest": min(kept[slot], key=lambda pair: pair[0])[1],  # the first of the lowest, as pycma keeps it
            "generation-best": z[i, slot],
            "global-best": z[i, slot] if losses[i] < best else expected[slot],
        }
        rules_differ |= not np.array_equal(by_rule[accept], by_rule["global-best"])
        expected[slot], best = by_rule[accept], min(best, losses[i])
        np.testing.assert_array_equal(incumbent, expected)
    assert rules_differ or accept == "global-best"  # this run tells the rules apart


@pytest.mark.parametrize("method_name", ["bbt", "bbtv2"])
def test_pycma_stops_a_strategy_whose_fitness_is_flat(method_name):
    """The reference loops while pycma does not say stop. With alpha 0 the projection is zero: no z changes the
    prompt, every candidate scores the same loss, and pycma stops each strategy on its flat fitness (tolfun: the
    losses span less than 1e-11).
    BBTv2's other layers go on after one stops; the calls counted are those spent, and the last incumbent is still
    checked on dev."""
    import json

    from harness.progress import RunProgress

    train, dev, _ = split()
    cls = get_method(method_name)
    config = cls.config_class(budget=400, popsize=10, intrinsic_dim=20, n_tokens=2, eval_every=50, alpha=0.0)
    service, progress = ModelService(tiny_backbone("gemma3")), RunProgress()
    method = _search(config, service, progress)
    with service.phase("train"):
        method.fit(train, dev)
    trace = json.loads(json.dumps(method.trace()))  # it goes into the JSON record as it is
    stops = trace["stopped"]
    assert [s["slot"] for s in stops] == list(range(method.slots))
    assert all(s["reason"] == {"tolfun": 1e-11} for s in stops)
    assert method.calls == stops[-1]["calls"] < 400
    if method_name == "bbtv2":
        assert stops[1]["calls"] == stops[0]["calls"] + 10  # layer 1 ran one more generation after layer 0 stopped
    assert service.meter.summary()["train"]["queries"] == method.calls == progress.done == progress.size
    assert trace["dev"][-1]["calls"] == method.calls and trace["train"][-1]["calls"] == method.calls


def test_shared_slots_are_read_from_what_the_client_sent():
    from harness.service import shared_slots

    z = np.random.RandomState(0).randn(4, 3, 5).astype(np.float32)
    assert shared_slots(z) == 0
    z[:, 0] = z[0, 0]
    assert shared_slots(z) == 1
    z[:, 2] = z[0, 2]  # a later equal slot does not count: the layers below the varied slot 1 are all that is shared
    assert shared_slots(z) == 1
    assert shared_slots(z[:1]) == 0  # one candidate: nothing to share
