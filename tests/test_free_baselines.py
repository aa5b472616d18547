"""In-context learning, the features query and the feature probes (Feature-MLP, Feature-BiLSTM).

Demonstrations: rendering per family, the character budget, the test input kept whole, seeded choice.
Features: shapes and bytes per query for every family, pooling against the token states, padding and chunking.
Probes: they learn separable problems built from real backbone features, and every method runs end to end.
"""

from dataclasses import replace

import numpy as np
import pytest

import harness.runner as runner
from harness.errors import HarnessError
from harness.features import TokenFeatures
from harness.profiles import get_profile
from harness.prompts import PromptFormat
from harness.scoring import mask_string
from harness.service import ModelService, text_bytes
from harness.store import ResultsStore
from harness.tasks import get_card, load_cards
from methods import get_method
from methods.base import RunContext
from methods.icl import ICLConfig, build_demonstrations, cut_text, render_demonstration
from harness.synthetic import SPECIALS, vocabulary
from tests.conftest import tiny_backbone

WORDS = [w for w in vocabulary() if w not in SPECIALS]

FAMILIES = ["roberta", "bert", "gpt2", "gemma3", "t5", "bart"]


def prompt_for(task: str, kind: str) -> PromptFormat:
    backbone = tiny_backbone(kind)
    return PromptFormat(get_card(task), backbone.family, mask_string(backbone.tokenizer, backbone.family))


def synthetic_train(card, per_class: int = 16, seed: int = 0) -> list[dict]:
    """Examples of varied length (5 to 400 characters) for every field, labels balanced."""
    rng = np.random.RandomState(seed)
    rows = []
    for label in range(card.num_labels):
        for i in range(per_class):
            row = {"label": label}
            for field in card.fields:
                words = rng.choice(WORDS, size=rng.randint(1, 80))
                row[field] = f"c{label}-{i} " + " ".join(words)
            rows.append(row)
    return rows


# --- in-context learning: demonstrations


def test_demonstrations_render_with_the_answer_in_place():
    example = {"sentence": "a fine film", "label": 1}
    clm = prompt_for("sst2", "gpt2")
    assert render_demonstration(clm, example, 100) == "a fine film . The sentiment is positive"
    for kind in ("roberta", "t5"):  # the mask slot (<mask> or <extra_id_0>) holds the label word instead
        mlm = prompt_for("sst2", kind)
        assert render_demonstration(mlm, example, 100) == "a fine film . It was great ."
    pair = prompt_for("rte", "roberta")
    text = render_demonstration(pair, {"sentence1": "one two three", "sentence2": "four five", "label": 0}, 8)
    assert text == "one two ? Yes , four"  # each field cut at a word boundary, the answer kept


def test_cut_text_keeps_whole_words():
    assert cut_text("short", 10) == "short"
    assert cut_text("the movie was great", 12) == "the movie"
    assert cut_text("unbroken", 4) == "unbr"


@pytest.mark.parametrize("task, kind", [("sst2", "gpt2"), ("agnews", "roberta"), ("dbpedia", "t5"), ("rte", "gpt2")])
@pytest.mark.parametrize("budget", [600, 1500, 4000])
def test_demonstrations_fit_the_budget_in_balanced_rounds(task, kind, budget):
    prompt = prompt_for(task, kind)
    card = prompt.card
    demos = build_demonstrations(prompt, synthetic_train(card), ICLConfig(max_demo_chars=budget), seed=13)
    assert 0 < len(demos.prefix) <= budget
    counts = demos.per_class(card.num_labels)
    assert min(counts) == max(counts) >= 1  # whole rounds only: every class equally often
    for example in demos.examples:
        assert all(len(cut_text(example[f], demos.field_chars)) <= demos.field_chars for f in card.fields)
    # the block is exactly the rendered demonstrations, each followed by the separator
    rendered = [render_demonstration(prompt, e, demos.field_chars) + "\n" for e in demos.examples]
    assert demos.prefix == "".join(rendered)
    if budget == 4000 and task == "sst2":
        assert len(demos.examples) > 2  # a larger budget buys more rounds


def test_demonstrations_are_seeded():
    prompt = prompt_for("agnews", "gpt2")
    train = synthetic_train(prompt.card)
    config = ICLConfig(max_demo_chars=2000)
    first = build_demonstrations(prompt, train, config, seed=13)
    assert build_demonstrations(prompt, train, config, seed=13).prefix == first.prefix
    assert build_demonstrations(prompt, train, config, seed=42).prefix != first.prefix
    # the order is shuffled after the balanced choice: the class nearest the test input varies with the seed
    last = {build_demonstrations(prompt, train, config, seed=s).examples[-1]["label"] for s in range(12)}
    assert len(last) > 1


def test_the_test_input_is_never_cut():
    backbone = tiny_backbone("gpt2")
    service = ModelService(backbone)
    card = get_card("sst2")
    prompt = PromptFormat(card, service.family, service.mask)
    method = get_method("icl")(ICLConfig(max_demo_chars=300), RunContext(card, prompt, 42, service=service))
    method.fit(synthetic_train(card), [])
    long_input = {"sentence": " ".join(["great"] * 150), "label": 1}  # 899 characters, three times the budget
    (text,) = method.texts([long_input])
    assert text.startswith(method.demos.prefix) and len(method.demos.prefix) <= 300
    assert text.endswith(prompt.render(long_input)) and len(text) == len(method.demos.prefix) + len(prompt.render(long_input))


def test_icl_configuration_errors_are_clear():
    prompt = prompt_for("dbpedia", "gpt2")
    with pytest.raises(HarnessError, match="cannot hold one demonstration per class"):
        build_demonstrations(prompt, synthetic_train(prompt.card), ICLConfig(max_demo_chars=200), seed=1)
    with pytest.raises(HarnessError, match="must be positive"):
        get_method("icl")(ICLConfig(max_demo_chars=0), RunContext(prompt.card, prompt, 1))


# --- the features query


TEXTS = ["the movie was great .", "bad film .", "this is a good review of the movie and it was great , not bad ."]


@pytest.mark.parametrize("kind", FAMILIES)
def test_pooled_and_token_features_shapes_and_bytes(kind):
    backbone = tiny_backbone(kind)
    hidden = backbone.model.config.hidden_size if kind not in ("t5", "bart") else backbone.model.config.d_model
    service = ModelService(backbone)
    pooled = service.features(TEXTS, "pooled")
    tokens = service.features(TEXTS, "tokens")
    lengths = [len(backbone.tokenizer(t).input_ids) for t in TEXTS]
    assert pooled.shape == (3, hidden) and pooled.dtype == np.float32
    assert isinstance(tokens, TokenFeatures) and tokens.values.dtype == np.float32 and tokens.lengths.dtype == np.int32
    assert tokens.values.shape == (3, max(lengths), hidden) and tokens.lengths.tolist() == lengths
    for i, n in enumerate(lengths):  # zero past each length, real states before it
        assert not tokens.values[i, n:].any() and np.abs(tokens.values[i, :n]).sum(axis=1).min() > 0
    count = service.meter.phases["train"]
    assert count.queries == 2 and count.upload_bytes == 2 * text_bytes(TEXTS)
    # the papers' accounting: N x hidden x 4 B, and N x max_len x hidden x 4 B plus the int32 lengths
    assert count.download_bytes == 3 * hidden * 4 + (3 * max(lengths) * hidden * 4 + 3 * 4)
    # each family's pooling reads the documented state of the same forward
    expect = {
        "mlm": tokens.values[:, 0],
        "clm": tokens.values[np.arange(3), tokens.lengths - 1],
        "seq2seq": tokens.values.sum(axis=1) / tokens.lengths[:, None],
    }[backbone.family]
    np.testing.assert_allclose(pooled, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "roberta", "t5"])
def test_padding_and_chunking_do_not_change_features(kind):
    backbone = tiny_backbone(kind)
    chunked = ModelService(backbone, max_batch=1).features(TEXTS, "tokens")  # three forwards, one query
    whole = ModelService(backbone).features(TEXTS, "tokens")
    np.testing.assert_allclose(chunked.values, whole.values, rtol=1e-4, atol=1e-5)
    alone = ModelService(backbone).features(TEXTS[1:2], "tokens")
    n = int(alone.lengths[0])
    np.testing.assert_allclose(whole.values[1, :n], alone.values[0, :n], rtol=1e-4, atol=1e-5)


def test_unknown_feature_kind_is_an_error():
    with pytest.raises(HarnessError, match="unknown feature kind 'cls'"):
        ModelService(tiny_backbone("gpt2")).features(TEXTS, "cls")


# --- the probes learn from real backbone features


def word_problem(per_class: int, seed: int) -> list[dict]:
    """Two classes of texts drawn from disjoint word sets: separable for any model that tells words apart."""
    rng = np.random.RandomState(seed)
    sets = [["great", "good", "film", "movie", "this"], ["bad", "terrible", "about", "that", "of"]]
    return [
        {"sentence": " ".join(rng.choice(sets[label], size=rng.randint(3, 9))), "label": label}
        for _ in range(per_class)
        for label in (0, 1)
    ]


def probe(name: str, backbone, **config):
    service = ModelService(backbone)
    card = get_card("sst2")
    prompt = PromptFormat(card, service.family, service.mask)
    cls = get_method(name)
    return cls(cls.config_class(**config), RunContext(card, prompt, 13, service=service))


def accuracy(method, examples) -> float:
    return float(np.mean(method.predict(examples) == np.array([e["label"] for e in examples])))


@pytest.mark.parametrize("name, kind, config", [
    ("feature-mlp", "roberta", {"hidden_size": 64, "epochs": 60}),  # first-token pooling (weak in a tiny random model)
    ("feature-mlp", "t5", {"hidden_size": 64, "epochs": 30}),  # encoder-mean pooling
    ("feature-bilstm", "gpt2", {"hidden_size": 32, "epochs": 30}),  # token states
])
def test_probes_learn_a_separable_problem_from_tiny_model_features(name, kind, config):
    method = probe(name, tiny_backbone(kind), **config)
    method.fit(word_problem(16, 0), word_problem(16, 1))
    # 0.95 on the RoBERTa case here, one example from a bar at 0.95: 0.9 keeps room for another CPU, far above the
    # 0.5 a probe that learned nothing gets
    assert accuracy(method, word_problem(50, 2)) >= 0.9
    assert method.trace()["epochs"][method.best_epoch - 1]["dev_score"] >= 95
    # user side: parameters, gradients and AdamW's two moments, the kept state, and the cached features
    params = sum(p.numel() for p in method.model.parameters())
    assert method.tunable_parameters() == params
    assert method.user_tensor_bytes() >= 5 * params * 4 + sum(f.nbytes for f in method.cached)


def test_probe_with_shuffled_labels_does_not_learn():
    """The control: the same features with labels that carry no signal give chance on fresh texts."""
    method = probe("feature-mlp", tiny_backbone("roberta"), hidden_size=64, epochs=30)
    rng = np.random.RandomState(0)
    noise = [{**e, "label": int(rng.randint(2))} for e in word_problem(16, 0)]
    method.fit(noise, [{**e, "label": int(rng.randint(2))} for e in word_problem(16, 1)])
    assert accuracy(method, word_problem(50, 2)) < 0.8


SENTIMENT = {
    1: ["wonderful", "delightful", "brilliant", "superb", "charming", "excellent", "moving", "beautiful"],
    0: ["awful", "boring", "dreadful", "terrible", "dull", "painful", "horrible", "tedious"],
}


def sentiment_sentences(adjectives: dict, nouns: list[str]) -> list[dict]:
    return [
        {"sentence": f"The {noun} was {adj}.", "label": label}
        for label, words in adjectives.items()
        for adj in words
        for noun in nouns
    ]


@pytest.mark.embedded
@pytest.mark.parametrize("name, config", [
    ("feature-mlp", {"hidden_size": 128, "epochs": 40}),
    ("feature-bilstm", {"hidden_size": 32, "epochs": 15}),
])
def test_probes_learn_sentiment_from_gemma_features(gemma, name, config):
    """Clearly positive vs negative sentences; eval adjectives are never seen in training."""
    train = sentiment_sentences({c: w[:4] for c, w in SENTIMENT.items()}, ["film", "movie"])
    dev = sentiment_sentences({c: w[4:6] for c, w in SENTIMENT.items()}, ["film"])
    held_out = sentiment_sentences({c: w[6:] for c, w in SENTIMENT.items()}, ["film", "story", "show", "book"])
    method = probe(name, gemma, **config)
    method.fit(train, dev)
    assert accuracy(method, held_out) >= 0.85


# --- end to end through the runner


def tiny_grid(tmp_path, shared_data, monkeypatch, kind, methods):
    monkeypatch.setattr(runner, "load_backbone", lambda name, dtype="float32": tiny_backbone(kind))
    profile = replace(
        get_profile("quick"),
        eval_cap=64,
        method_overrides={
            "icl": {"max_demo_chars": 300},  # the tiny models take 256 tokens
            "feature-mlp": {"hidden_size": 32, "epochs": 5},
            "feature-bilstm": {"hidden_size": 16, "epochs": 2},
        },
    )
    specs = runner.expand(methods, ["sst2"], [42], f"tiny-{kind}", profile)
    store = ResultsStore(tmp_path)
    summary = runner.run_grid(specs, load_cards(), profile, store, str(shared_data))
    assert summary.failed == [] and len(summary.ran) == len(methods)
    records = {r.method: r for r in store.records()}
    for record in records.values():
        assert record.status == "ok" and 0 <= record.score <= 100
        assert record.as_a_service and record.deployment_efficient and record.group == "gradient-free"
        assert record.queries["eval"]["queries"] == 2  # 64 eval rows in queries of 32
    return records


def test_each_method_runs_end_to_end(tmp_path, shared_data, monkeypatch):
    records = tiny_grid(tmp_path, shared_data, monkeypatch, "gpt2", ["icl", "feature-mlp", "feature-bilstm"])
    hidden = 32
    icl = records["icl"]
    assert "train" not in icl.queries and icl.tunable_parameters == 0 and icl.trace["demonstrations"] >= 2
    mlp = records["feature-mlp"].queries["train"]
    assert mlp["queries"] == 2 and mlp["download_per_query_bytes"] == 32 * hidden * 4  # sst2: 32 train, 32 dev
    assert records["feature-mlp"].tunable_parameters == (hidden * 32 + 32) + (32 * 2 + 2)
    bilstm = records["feature-bilstm"].queries["train"]
    # each query: N x max_len x hidden x 4 B + N x 4 B of lengths, max_len that query's longest text
    assert bilstm["queries"] == 2 and (bilstm["download_bytes"] - 2 * 32 * 4) % (32 * hidden * 4) == 0
    assert records["feature-bilstm"].meters["user_tensor_mb"] > 0


def test_icl_runs_end_to_end_on_a_masked_lm(tmp_path, shared_data, monkeypatch):
    # filled-in demonstrations hold no mask, so the scorer finds exactly one: the test input's
    records = tiny_grid(tmp_path, shared_data, monkeypatch, "roberta", ["icl"])
    assert records["icl"].trace["per_class"][0] == records["icl"].trace["per_class"][1] >= 1
