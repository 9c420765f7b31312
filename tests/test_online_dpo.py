"""online_dpo.py: pairs come from the current policy and are checked before the first step, the
judge's pick is the chosen answer, an ended answer beats an unended one, skipped pairs never enter
the loss, and on a bandit online DPO lands on the KL-regularised optimum pi_ref * exp(r / beta)."""
import copy

import pytest
import torch

import tokenizer as tok
from dpo import DPOConfig, dpo_loss, dpo_step
from helpers import tiny_gpt
from online_dpo import judged_pairs, label_pairs, reward_model_judge, train_online_dpo
from reference import freeze, response_mask, token_logprobs
from sft import lr_at
from test_dpo import R, REF_LOGP, enc  # noqa: F401 (enc: the fixture)


PROMPTS = ["the film", "i", "the plot", "the music was", "the cast", "i loved"]


def online_cfg(**changes):
    return DPOConfig(**{**dict(steps=2, batch_size=6, lr=1e-2, warmup=1, sft_coef=0.0,
                               max_new_tokens=8, log_every=1, eval_every=1000), **changes})


def recording(judge, calls):
    """The judge, its arguments and verdicts appended to `calls`."""
    def wrapped(texts_a, texts_b, tokens_a, tokens_b, prompt_len):
        pref = judge(texts_a, texts_b, tokens_a, tokens_b, prompt_len)
        calls.append(dict(texts_a=texts_a, texts_b=texts_b, tokens_a=tokens_a, tokens_b=tokens_b,
                          P=prompt_len, pref=torch.as_tensor(pref)))
        return pref
    return wrapped


def a_wins(texts_a, texts_b, *_):
    return [True] * len(texts_a)


def test_online_pairs_come_from_the_current_policy(enc):
    """Same seed, same start; with lr 0 the policy never changes, with lr > 0 it does after step
    0: the first pairs are equal, the second differ. (Pairs drawn from the reference, or all
    drawn before training, would be equal in both runs.)"""
    seen = {}
    for lr in (0.0, 1e-2):
        policy, calls = tiny_gpt(enc, eos_bias=5.0), []
        _, hist = train_online_dpo(policy, freeze(policy), enc, PROMPTS, recording(a_wins, calls),
                                   online_cfg(lr=lr), log=lambda r: None)
        seen[lr] = [torch.cat([c["tokens_a"], c["tokens_b"]]) for c in calls]
        assert hist["n_pairs"] > 0 and hist["judge_calls"] == 2 * 2 * 6
    assert torch.equal(seen[0.0][0], seen[1e-2][0])
    assert not torch.equal(seen[0.0][1], seen[1e-2][1])
    with pytest.raises(RuntimeError, match="policy vs ref"):  # step 0 checks KL 0
        train_online_dpo(policy, tiny_gpt(enc, seed=1, eos_bias=5.0), enc, PROMPTS, a_wins, online_cfg(),
                         log=lambda r: None)


def test_online_dpo_checks_sampled_against_recomputed_logprobs(enc):
    """Before the first step online DPO's sampler must record the log-probs that a forward pass
    recomputes (one distribution for sampling and training): a sampler 1e-2 off stops the run."""
    policy = tiny_gpt(enc, eos_bias=5.0)
    ref = freeze(policy)
    generate = policy.generate
    policy.generate = lambda *a, **k: (lambda t, lp: (t, lp + 1e-2))(*generate(*a, **k))
    with pytest.raises(RuntimeError, match="recorded while sampling"):
        train_online_dpo(policy, ref, enc, PROMPTS, a_wins, online_cfg(), log=lambda r: None)
    policy.generate = generate  # the honest sampler passes
    train_online_dpo(policy, ref, enc, PROMPTS, a_wins, online_cfg(), log=lambda r: None)


def test_chosen_is_the_judges_pick(enc):
    """With the reward model as judge, every kept chosen answer scores higher than its rejected one;
    with the opposite judge, the same pairs come back swapped."""
    from model import ScalarModel
    from reward import score
    policy, pad = tiny_gpt(enc, eos_bias=5.0), tok.pad_id(enc)
    rm = ScalarModel(tiny_gpt(enc, seed=3), head_std=1.0).eval()
    judge, batches, calls = reward_model_judge(rm, pad), [], []
    for sign in (1, -1):
        flipped = lambda *args: sign * judge(*args)
        torch.manual_seed(0)
        batches.append(judged_pairs(policy, policy, recording(flipped, calls), enc, PROMPTS, 8, check=True))
    first, second = batches
    n = len(first["tokens"]) // 2
    assert n >= 3 and first["n_tie"] + first["n_unended"] + n == len(PROMPTS)
    with torch.no_grad():
        r = score(rm, first["tokens"], pad)
    assert (r[:n] > r[n:]).all()  # chosen rows first, then their rejected rows
    assert torch.equal(second["tokens"], torch.cat([first["tokens"][n:], first["tokens"][:n]]))
    # the judge saw prompt + answer texts, rows i and B + i answering prompt i
    texts = zip(calls[0]["texts_a"], calls[0]["texts_b"], PROMPTS)
    assert all(a.startswith(p) and b.startswith(p) for a, b, p in texts)


def test_label_pairs_keeps_the_judged_ended_distinct_pairs():
    pref = [1.0, -1.0, 0.0, 0.5, -2.0]          # a, b, tie, a (but identical), b
    same = torch.tensor([False, False, False, True, False])
    ended = torch.tensor([True] * 10)
    pairs, n_tie, n_unended = label_pairs(pref, same, ended)
    assert pairs.tolist() == [[0, 5], [6, 1], [9, 4]] and (n_tie, n_unended) == (2, 0)


def test_an_ended_answer_beats_an_unended_one_whatever_the_judge_says():
    """leash's rule (TRL's missing_eos_penalty in spirit): an unended answer loses to an ended
    one even when the judge prefers it or ties; two unended answers are skipped."""
    pref = [2.0, -2.0, 0.0, 1.0, 1.0]
    same = torch.tensor([False] * 5)
    #              a: ended  unended ended    unended  ended
    ended = torch.tensor([True, False, True, False, True] +
                         [False, True, False, False, True])  # b
    pairs, n_tie, n_unended = label_pairs(pref, same, ended)
    # pair 0: only a ended -> a; pair 1: only b ended -> b; pair 2: the judge ties, but
    # only a ended -> a; pair 3: both unended -> skipped; pair 4: both ended, the judge: a
    assert pairs.tolist() == [[0, 5], [6, 1], [2, 7], [4, 9]]
    assert (n_tie, n_unended) == (0, 1)
    flipped, _, _ = label_pairs([-5.0, 5.0, 0.0, 1.0, 1.0], same, ended)
    assert flipped.tolist() == [[0, 5], [6, 1], [2, 7], [4, 9]]  # the judge cannot overrule it
    pairs, _, _ = label_pairs([True, False], torch.tensor([False, False]), torch.ones(4, dtype=torch.bool))
    assert pairs.tolist() == [[0, 2], [3, 1]]  # bools: True a wins, False b wins


def test_skipped_pairs_do_not_enter_the_loss(enc):
    """The step on a judged batch with ties and unended answers has the loss and gradient of DPO
    on the kept pairs alone, computed here from the judge's inputs; a batch of ties takes no step."""
    policy, ref, pad = tiny_gpt(enc, eos_bias=4.5), tiny_gpt(enc, seed=1, eos_bias=4.5), tok.pad_id(enc)
    calls, cfg = [], online_cfg(beta=0.5, sft_coef=0.3, max_grad_norm=1e9)
    every_third_ties = lambda texts_a, *_: torch.tensor([0.0 if i % 3 == 0 else (-1.0) ** i
                                                         for i in range(len(texts_a))])
    torch.manual_seed(1)
    batch = judged_pairs(policy, ref, recording(every_third_ties, calls), enc, PROMPTS * 2, 4)
    c = calls[0]
    tokens, B = torch.cat([c["tokens_a"], c["tokens_b"]]), len(c["pref"])
    ended = (tokens[:, c["P"]:] == tok.eos_id(enc)).any(1)
    # an ended answer beats an unended one; two ended ones go by the judge (ties skipped)
    one_ended = [bool(ended[i] ^ ended[B + i]) for i in range(B)]
    a_wins = [bool(ended[i]) if one_ended[i] else c["pref"][i] > 0 for i in range(B)]
    keep = [i for i in range(B) if one_ended[i] or (c["pref"][i] != 0 and ended[i] and ended[B + i]
                                                    and not torch.equal(tokens[i], tokens[B + i]))]
    assert len(keep) >= 5 and batch["n_tie"] >= 2 and batch["n_unended"] >= 1 and any(one_ended)
    chosen = [i if a_wins[i] else B + i for i in keep]
    rejected = [B + i if a_wins[i] else i for i in keep]
    # the expected loss, from scratch on the kept rows
    expected_model = copy.deepcopy(policy)
    mask = response_mask(tokens, c["P"], pad)
    logp = lambda m: (token_logprobs(m, tokens, pad) * mask).sum(1)
    lp, ref_lp = logp(expected_model), logp(ref).detach()
    losses, _, _ = dpo_loss(lp[chosen], lp[rejected], ref_lp[chosen], ref_lp[rejected], cfg.beta)
    expected = losses.mean() + cfg.sft_coef * -lp[chosen].sum() / mask[chosen].sum()
    expected.backward()
    # the real step (SGD, lr 1: the weights move by minus the gradient)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    before = copy.deepcopy(policy.state_dict())
    stats = dpo_step(policy, opt, batch["tokens"], batch["mask"], batch["ref_logps"], cfg, pad_id=pad)
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-5)
    for name, p in expected_model.named_parameters():
        assert torch.allclose(before[name] - policy.state_dict()[name], p.grad, atol=1e-5), name
    # a judge that sees only ties (and every answer ends): no pair, no step, the weights as they were
    policy = tiny_gpt(enc, eos_bias=50.0)
    before, records = copy.deepcopy(policy.state_dict()), []
    _, hist = train_online_dpo(policy, freeze(policy), enc, PROMPTS, lambda t, *_: torch.zeros(len(t)),
                               online_cfg(), log=records.append)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert hist["n_pairs"] == 0 and hist["steps_skipped"] == 2 and hist["skipped_share"] == 1.0
    assert hist["n_tie"] + hist["n_unended"] == hist["n_skipped"] == 12 and hist["implicit_accuracy"] is None
    assert "loss" not in records[0] and records[0]["stage"] == "dpo_online"


class Tabular(torch.nn.Module):
    """A bandit as a language model: the logits at every position are one parameter (V,); a row
    [0, arm] is one pull, its one response target the arm."""

    def __init__(self, logits):
        super().__init__()
        self.theta = torch.nn.Parameter(logits.clone())

    def forward(self, tokens, pad_mask=None):
        return self.theta.expand(*tokens.shape, -1)


def test_online_dpo_on_a_bandit_lands_on_the_kl_regularised_optimum():
    """Each step samples 2B arms from the current policy, an exact Bradley-Terry judge labels each
    pair (a wins with probability sigmoid(r_a - r_b)), label_pairs drops ties (the same arm twice)
    and dpo_step takes one step. The fixed point is pi* = pi_ref exp(r / beta) / Z whatever the
    sampling distribution (at pi*, beta h = r_a - r_b on every pair: the expected loss's gradient
    is 0). Tolerance: over 5 seeds the final total variation to pi* was 0.001-0.005 (gradient
    noise of 2048 pairs at the last lr); 0.02 is 4x that and 13x below TV(pi_ref, pi*) = 0.27."""
    beta, B, steps, lr = 1.0, 2048, 300, 0.05
    target = torch.softmax(REF_LOGP + R / beta, 0)
    policy, gen = Tabular(REF_LOGP), torch.Generator().manual_seed(0)
    opt, cfg = torch.optim.Adam(policy.parameters(), lr=lr), DPOConfig(beta=beta, sft_coef=0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 10)
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(policy.theta, 0), 2 * B, replacement=True, generator=gen)
        a, b = arms[:B], arms[B:]
        pref = torch.rand(B, generator=gen) < torch.sigmoid(R[a] - R[b])
        pairs, n_tie, _ = label_pairs(pref, a == b, torch.ones(2 * B, dtype=torch.bool))
        rows = arms[torch.cat([pairs[:, 0], pairs[:, 1]])]
        dpo_step(policy, opt, torch.stack([torch.zeros_like(rows), rows], 1), torch.ones(len(rows), 1),
                 REF_LOGP[rows], cfg)
    pi = torch.softmax(policy.theta.detach(), 0)
    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()
    assert tv(pi, target) < 0.02 and tv(REF_LOGP.exp(), target) > 0.25 and tv(pi, REF_LOGP.exp()) > 0.2
    assert 0 < n_tie < B  # the same arm twice happens, and is skipped
