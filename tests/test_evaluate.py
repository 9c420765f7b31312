"""evaluate.py: the evaluation's exact KL is KL(pi || pi_ref), the direction the RLHF objective
penalises, not KL(pi_ref || pi), both for one batch and in evaluate_policy's figures."""
import pytest
import torch

import evaluate
import tokenizer as tok
from helpers import tiny_gpt
from reference import response_mask

TEXTS = ["the film was good.", "i loved the plot!", "the acting was bad.", "it was a mess."] * 20
PROMPTS = ["the film", "i loved", "the acting", "it was"] * 4


def kl_by_hand(p_model, q_model, tokens, P, pad):
    """sum over each answer's positions of sum_v p(v) (log p(v) - log q(v)), written out."""
    real = tokens != pad
    log_p = torch.log_softmax(p_model(tokens, real).float(), -1)[:, :-1]
    log_q = torch.log_softmax(q_model(tokens, real).float(), -1)[:, :-1]
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_position * response_mask(tokens, P, pad)).sum(1)


@torch.no_grad()
def test_exact_kl_is_kl_of_the_policy_from_the_reference():
    enc = tok.train_tokenizer(TEXTS, 300)
    pad, eos = tok.pad_id(enc), tok.eos_id(enc)
    policy, ref = tiny_gpt(enc, seed=0), tiny_gpt(enc, seed=1, eos_bias=4.0)  # far apart, lopsided
    prompt = tok.left_pad([tok.encode(enc, p) for p in PROMPTS], pad)
    P = prompt.shape[1]
    gen = torch.Generator().manual_seed(1234)
    tokens, _ = policy.generate(prompt, 8, eos, pad, generator=gen)
    forward = kl_by_hand(policy, ref, tokens, P, pad)    # KL(pi || pi_ref)
    backward = kl_by_hand(ref, policy, tokens, P, pad)   # KL(pi_ref || pi)
    assert (forward - backward).abs().max() > 0.05       # the two directions differ here
    got = evaluate.exact_sequence_kl(policy, ref, tokens, P, pad)
    torch.testing.assert_close(got, forward, atol=1e-5, rtol=1e-5)
    # evaluate_policy's kl: the same direction, on the answers it samples (seed 1234, one batch)
    metrics, _ = evaluate.evaluate_policy(policy, enc, PROMPTS, 8, "cpu", ref=ref, seed=1234)
    assert metrics["kl"] == pytest.approx(forward.mean().item(), rel=1e-5)
    assert metrics["kl_max"] == pytest.approx(forward.max().item(), rel=1e-5)
    assert metrics["kl"] != pytest.approx(backward.mean().item(), rel=1e-2)


def test_heldout_nll_is_the_mean_nll_of_each_review_and_its_eos():
    """heldout_nll by hand: every review encoded alone with its EOS, -log pi of each token after the first,
    summed over all reviews and divided by their number of tokens (a mean per token, not per review),
    whatever the batch size; evaluate_policy reports it when given reviews."""
    enc = tok.train_tokenizer(TEXTS, 300)
    model = tiny_gpt(enc, 0)
    texts = TEXTS[:4] + ["it was a mess. i loved the plot!"]
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.encode(enc, text) + [tok.eos_id(enc)]])
        logp = torch.log_softmax(model(ids).float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])
        total, count = total - logp.sum().item(), count + ids.shape[1] - 1
    for batch_size in (2, 256):
        assert evaluate.heldout_nll(model, enc, texts, "cpu", batch_size=batch_size) == pytest.approx(total / count)
    metrics, _ = evaluate.evaluate_policy(model, enc, PROMPTS[:4], 4, "cpu", heldout=texts)
    assert metrics["heldout_nll"] == pytest.approx(total / count)


def test_verifiable_is_one_only_for_a_valid_review_that_reads_well():
    assert evaluate.verifiable("the film was good.") == 1.0
    assert evaluate.verifiable("the film was bad.") == 0.0  # valid, gold < 0
    assert evaluate.verifiable("the film was good") == 0.0  # not a sentence: invalid
    assert evaluate.verifiable("the film was good.", gold_fn=lambda t: 0.0) == 0.0  # gold must be > 0


def test_exclaims_counts_the_answer_not_the_prompt():
    bangs = evaluate.exclaims(["it was great!", "the film"], ["it was great! the film was good!!", "the film is ok."])
    assert bangs.tolist() == [2.0, 0.0]
