"""rollout.py: the rule for unended answers (no_eos_score, DAPO's soft over-long penalty) by hand, and
joining rollouts of different prompt and answer widths (dynamic sampling's batches) without moving a
single log-prob: the joined rows recompute to the log-probs they were sampled with."""
import pytest
import torch

import rollout
import tokenizer as tok
from helpers import tiny_gpt
from reference import freeze, response_mask, token_logprobs

TEXTS = ["the film was good. i loved it.", "the acting was bad. we left.", "it was fine. the cast was good."] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def fake_rollout(lengths, ended):
    """Answers of the given lengths in tokens (the mask's row sums) after a 2-token prompt."""
    width = max(lengths) + 2
    mask = torch.tensor([[0.0] + [1.0] * n + [0.0] * (width - 1 - n) for n in lengths])
    return dict(tokens=torch.zeros(len(lengths), width + 1, dtype=torch.long), prompt_len=2, mask=mask,
                ended=torch.tensor(ended))


@pytest.mark.parametrize("no_eos_score", [None, -2.0])
def test_the_unended_answer_rule_by_hand(no_eos_score):
    """budget 20, overlong_share 0.25: cache 5 tokens; an answer of L > 15 tokens loses (L - 15) / 5, 1 at the
    budget (the unended one, which also scores no_eos_score instead of its judged score when one is set)."""
    ro = fake_rollout([3, 15, 16, 18, 20], [True, True, True, True, False])
    raw = torch.tensor([0.5, 0.1, -0.3, 0.7, 0.9])
    cfg = rollout.RLConfig(no_eos_score=no_eos_score, overlong_share=0.25)
    scores = rollout.score(ro, lambda tokens, P: raw, cfg, 20, "cpu", "fp32")
    last = 0.9 if no_eos_score is None else no_eos_score
    expected = torch.tensor([0.5, 0.1, -0.3 - 1 / 5, 0.7 - 3 / 5, last - 1.0])
    assert torch.allclose(scores, expected)
    assert torch.equal(ro["scores"], raw)  # the judged score is kept as it was
    plain = rollout.score(ro, lambda tokens, P: raw, rollout.RLConfig(no_eos_score=None), 20, "cpu", "fp32")
    assert torch.equal(plain, raw)  # the defaults change nothing but no_eos_score


def test_join_keeps_every_log_prob_and_take_keeps_rows_together(enc):
    """Two rollouts with different prompt widths and answer lengths, joined: every tensor keeps its rows'
    values under the mask, the tokens recompute to the same log-probs (left padding moves no position),
    and the mask is the response mask of the joined tokens; take() picks rows of every key alike."""
    policy, pad = tiny_gpt(enc, 0, block_size=24, n_layer=1), tok.pad_id(enc)
    ref = freeze(policy)
    torch.manual_seed(0)
    a = rollout.sample(policy, ref, enc, ["it", "we"], 6, 1.0, "cpu", "fp32")
    b = rollout.sample(policy, ref, enc, ["the cast was good. the film", "the acting"], 9, 1.0, "cpu", "fp32")
    assert a["prompt_len"] != b["prompt_len"] and a["tokens"].shape[1] != b["tokens"].shape[1]
    ro = rollout.join([a, b], pad)
    assert ro["texts"] == a["texts"] + b["texts"] and ro["prompt_len"] == b["prompt_len"]
    assert torch.equal(ro["mask"], response_mask(ro["tokens"], ro["prompt_len"], pad))
    logp = token_logprobs(policy, ro["tokens"], pad)
    m = ro["mask"].bool()
    assert torch.allclose(logp[m], ro["logp"][m], atol=1e-5)
    assert torch.allclose(torch.cat([a["logp"][a["mask"].bool()], b["logp"][b["mask"].bool()]]), ro["logp"][m])
    assert ro["logits"].shape[:2] == ro["mask"].shape and torch.equal(ro["ended"], torch.cat([a["ended"], b["ended"]]))
    rows = torch.tensor([3, 0])
    picked = rollout.take(ro, rows)
    assert picked["texts"] == [ro["texts"][3], ro["texts"][0]]
    assert torch.equal(picked["tokens"], ro["tokens"][rows]) and torch.equal(picked["logits"], ro["logits"][rows])
