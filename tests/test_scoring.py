"""The three scoring paths, on small random models, against each model's own full-vocabulary forward."""

import pytest
import torch

from harness.errors import HarnessError
from harness.scoring import label_token_ids, make_scorer, mask_string
from tests.conftest import tiny_backbone

TEXTS = ["the movie was great . it was {mask} .", "bad film . it was {mask} .", "this is a {mask} review of the movie ."]
LABELS = [" bad", " great", " good"]


def reference_logits(backbone, texts, label_ids):
    """What the model's ordinary forward gives at the position each family reads."""
    model, tok = backbone.model, backbone.tokenizer
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True)
    rows = torch.arange(len(texts))
    mask_id = tok.convert_tokens_to_ids(mask_string(tok, backbone.family) or "<unk>")
    with torch.no_grad():
        if backbone.family == "clm":
            logits = model(**batch).logits
            return logits[rows, batch.attention_mask.sum(1) - 1][:, label_ids]
        if backbone.family == "mlm":
            logits = model(**batch).logits
            return logits[rows, (batch.input_ids == mask_id).int().argmax(1)][:, label_ids]
        if getattr(tok, "mask_token", None) is None:  # T5: decoder position 1 after <start> <extra_id_0>
            start = model.config.decoder_start_token_id
            decoder = torch.tensor([[start, mask_id]]).expand(len(texts), 2)
            return model(**batch, decoder_input_ids=decoder).logits[:, 1, label_ids]
        # BART: the full teacher-forced reconstruction, read at the mask
        decoder = torch.cat([torch.full((len(texts), 1), model.config.decoder_start_token_id), batch.input_ids[:, :-1]], 1)
        logits = model(**batch, decoder_input_ids=decoder).logits
        return logits[rows, (batch.input_ids == mask_id).int().argmax(1)][:, label_ids]


@pytest.mark.parametrize("kind", ["roberta", "bert", "gpt2", "gemma3", "t5", "bart"])
def test_scoring_path_matches_full_forward(kind):
    backbone = tiny_backbone(kind)
    scorer = make_scorer(backbone)
    texts = [t.replace("{mask}", mask_string(backbone.tokenizer, backbone.family)) for t in TEXTS]
    ids = label_token_ids(backbone.tokenizer, LABELS)
    # the output layer never runs whole: only its label rows are applied (no full-vocabulary logits)
    head_runs = []
    handle = backbone.model.get_output_embeddings().register_forward_hook(lambda *args: head_runs.append(1))
    got = scorer.label_logits(texts, ids)
    handle.remove()
    assert not head_runs
    want = reference_logits(backbone, texts, ids)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a batch of one gives the same logits as the padded batch: padding does not leak into the score
    torch.testing.assert_close(scorer.label_logits(texts[1:2], ids), got[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["roberta", "bart"])
def test_missing_or_double_mask_is_an_error(kind):
    backbone = tiny_backbone(kind)
    scorer = make_scorer(backbone)
    mask = mask_string(backbone.tokenizer, backbone.family)
    with pytest.raises(HarnessError, match="exactly one mask"):
        scorer.label_logits(["no mask here ."], [5])
    with pytest.raises(HarnessError, match="exactly one mask"):
        scorer.label_logits([f"{mask} and {mask}"], [5])


def test_over_long_input_is_an_error():
    backbone = tiny_backbone("gpt2")
    with pytest.raises(HarnessError, match="over the backbone's limit"):
        make_scorer(backbone).label_logits(["the movie " * 600], [5])


@pytest.mark.parametrize("kind", ["roberta", "bart", "gpt2"])
def test_label_ids_are_first_subtokens_and_distinct(kind):
    tokenizer = tiny_backbone(kind).tokenizer
    # byte-level BPE: " great" (after a space, as the label word follows the mask's or prompt's space) is its own
    # token, not "great"
    space, bare = tokenizer.convert_tokens_to_ids(["\u0120great", "great"])
    assert label_token_ids(tokenizer, [" great"]) == [space] and space != bare
    # "great movie" starts with the same sub-token as "great": the first sub-token is the label id
    assert label_token_ids(tokenizer, ["great movie"]) == label_token_ids(tokenizer, ["great"]) == [bare]
    with pytest.raises(HarnessError, match="share a first sub-token"):
        label_token_ids(tokenizer, ["great", "great movie"])


@pytest.mark.parametrize("kind, window", [("gpt2", None), ("gemma3", None), ("gemma3", 24)])
def test_texts_sharing_an_opening_run_it_once_and_score_as_the_full_forward(kind, window):
    # ICL: the same demonstrations open every text; the opening's keys and values are computed once (a batch of 1)
    backbone = tiny_backbone(kind)
    if window:  # a sliding-window model whose texts pass the window: the cache would keep only its end
        backbone.model.config.sliding_window = window
    scorer = make_scorer(backbone)
    demos = "the movie was great . it was good .\nbad film , dull and long . it was bad .\n" * 3
    texts = [demos + t.replace(" {mask}", "") for t in TEXTS] + [demos + "ok"]
    ids = label_token_ids(backbone.tokenizer, LABELS)
    batches = []
    handle = backbone.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    got = scorer.label_logits(texts, ids)
    common = len(backbone.tokenizer(demos).input_ids) - 1  # the last demonstration token may merge with what follows
    if window:
        assert batches == [(4, batches[0][1])]  # the plain forward
    else:
        assert batches[0][0] == 1 and batches[0][1] >= common >= scorer.min_shared and batches[1][0] == 4
    # texts without a long common opening (the manual prompt's: the input comes first) take the plain forward
    batches.clear()
    scorer.label_logits([t + demos for t in TEXTS], ids)
    handle.remove()
    assert [b[0] for b in batches] == [3]
    torch.testing.assert_close(got, reference_logits(backbone, texts, ids), rtol=1e-4, atol=1e-5)
    # one text is the opening of the other: it still runs its last token on top of the shared part
    pair = [demos + "bad film .", demos + "bad film . it was"]
    torch.testing.assert_close(scorer.label_logits(pair, ids), reference_logits(backbone, pair, ids), rtol=1e-4, atol=1e-5)
