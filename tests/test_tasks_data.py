"""Task cards, loading through `datasets`, and the BBT protocol's 16-shot splits."""

import json

import pytest

from harness.data import eval_rows, few_shot, load_task_data, make_split
from harness.errors import HarnessError
from harness.tasks import get_card, load_cards

TASKS = ["sst2", "yelpp", "agnews", "dbpedia", "mrpc", "rte", "snli"]


def test_all_seven_cards_load_with_a_template_per_family():
    cards = load_cards()
    assert set(TASKS) <= set(cards)
    for card in cards.values():
        for family in ("clm", "mlm", "seq2seq"):
            template = card.template_for(family)
            assert len(template.label_words) == card.num_labels
    assert cards["mrpc"].metric == "f1"


@pytest.mark.parametrize("task", TASKS)
def test_local_load_and_split_sizes(task, shared_data):
    card = get_card(task)
    data = load_task_data(card, str(shared_data))
    assert data.source.startswith("local:")
    split = make_split(card, data, k=16, seed=13, eval_cap=None)
    assert len(split.train) == len(split.dev) == 16 * card.num_labels
    for part in (split.train, split.dev):
        assert sorted(e["label"] for e in part) == sorted(list(range(card.num_labels)) * 16)
    assert not {json.dumps(e, sort_keys=True) for e in split.train} & {json.dumps(e, sort_keys=True) for e in split.dev}
    if "train_pool.jsonl" in card.local["train"]:
        assert "train_is_pool" in data.caveats


def test_same_seed_same_bytes_other_seed_other_split(shared_data):
    card = get_card("sst2")
    data = load_task_data(card, str(shared_data))
    first, again, other = (make_split(card, data, 16, seed, None) for seed in (42, 42, 13))
    assert json.dumps(first.train + first.dev).encode() == json.dumps(again.train + again.dev).encode()
    assert first.split_hash == again.split_hash
    assert other.split_hash != first.split_hash and other.train != first.train
    assert first.eval_hash == other.eval_hash  # the eval rows never depend on the split seed


def test_bbt_protocol_walks_the_shuffled_order():
    card = get_card("sst2")
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(200)]
    import numpy as np

    order = np.random.RandomState(7).permutation(200)
    walked = [rows[i] for i in order]
    train, dev = few_shot(card, rows, k=4, seed=7)
    expect_train = [r for r in walked if r["label"] == 0][:4] + [r for r in walked if r["label"] == 1][:4]
    assert sorted(map(str, train)) == sorted(map(str, expect_train))
    expect_dev = [r for r in walked if r["label"] == 0][4:8] + [r for r in walked if r["label"] == 1][4:8]
    assert sorted(map(str, dev)) == sorted(map(str, expect_dev))


def test_too_few_examples_is_an_error():
    card = get_card("sst2")
    rows = [{"sentence": "x", "label": 0}] * 40 + [{"sentence": "y", "label": 1}] * 5
    with pytest.raises(HarnessError, match="fewer than 32 training examples for class\\(es\\) \\['positive'\\]"):
        few_shot(card, rows, k=16, seed=1)


def test_eval_cap_is_stratified_and_fixed(shared_data):
    card = get_card("agnews")
    data = load_task_data(card, str(shared_data))
    ids = eval_rows(card, data.eval, cap=400)
    capped = [data.eval[i] for i in ids]
    assert len(capped) == 400 and ids == sorted(set(ids))  # row indices into the eval split, each once, in order
    assert [sum(r["label"] == c for r in capped) for c in range(4)] == [100] * 4
    assert ids == eval_rows(card, data.eval, cap=400)


def test_dbpedia_local_eval_is_capped_per_class_and_marked(shared_data):
    card = get_card("dbpedia")
    data = load_task_data(card, str(shared_data))
    split = make_split(card, data, 16, 42, None)
    counts = [sum(r["label"] == c for r in split.eval) for c in range(14)]
    assert max(counts) == 30 and split.eval_size < split.eval_full_size
    assert "eval_subset" in data.caveats


def test_yelp_literal_newlines_are_replaced(shared_data):
    card = get_card("yelpp")
    data = load_task_data(card, str(shared_data))
    assert not any("\\n" in r["text"] for r in data.train + data.eval)


def test_missing_data_dir_says_what_to_do(tmp_path):
    with pytest.raises(HarnessError, match="sst2/train.jsonl.*not found under the data dir"):
        load_task_data(get_card("sst2"), str(tmp_path))


def test_malformed_data_is_a_clear_error(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text('{"text": "no sentence field", "label": 0}\n')
    (tmp_path / "sst2" / "validation.jsonl").write_text('{"sentence": "ok", "label": 1}\n')
    with pytest.raises(HarnessError, match="lacks the field 'sentence'"):
        load_task_data(get_card("sst2"), str(tmp_path))
    (tmp_path / "sst2" / "train.jsonl").write_text('{"sentence": "bad label", "label": 7}\n')
    with pytest.raises(HarnessError, match="label 7 is outside 0..1"):
        load_task_data(get_card("sst2"), str(tmp_path))
    (tmp_path / "sst2" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(HarnessError, match="could not read"):
        load_task_data(get_card("sst2"), str(tmp_path))


def test_new_task_needs_only_a_card(tmp_path, shared_data):
    card_dir = tmp_path / "cards"
    card_dir.mkdir()
    (card_dir / "sst2_review.yaml").write_text(
        "name: sst2-review\nlocal: {train: sst2/train.jsonl, eval: sst2/validation.jsonl}\nfields: [sentence]\n"
        "labels: [negative, positive]\nmetric: accuracy\n"
        "templates:\n  clm: {template: \"Review: {sentence}\\nSentiment:\", label_words: [\" negative\", \" positive\"]}\n"
    )
    card = get_card("sst2-review", [str(card_dir)])
    data = load_task_data(card, str(shared_data))
    assert len(make_split(card, data, 16, 42, 50).eval) == 50


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\nfields: [a]\nlabels: [p, q]\nmetric: bleu\ntemplates: {}\n", "metric 'bleu' is not one of"),
        ("name: x\nfields: [a]\nlabels: [p, q]\nmetric: accuracy\ntemplates:\n  clm: {template: '{a}', label_words: [' p']}\n",
         "1 label words for 2 labels"),
        ("name: x\nfields: [a]\nlabels: [p]\nmetric: accuracy\ntemplates:\n  mlm: {template: '{a}', label_words: [' p']}\n",
         "needs a \\{mask\\} slot"),
        ("name: x\nfields: [a]\nlabels: [p]\nmetric: accuracy\ntemplates:\n  rnn: {template: '{a}', label_words: [' p']}\n",
         "family 'rnn' is not one of"),
        ("name: x\nlabels: [p]\n", "lacks fields, metric, templates"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_malformed_card_is_a_clear_error(tmp_path, body, message):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(HarnessError, match=message):
        load_cards([str(tmp_path)])
