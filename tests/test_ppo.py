"""ppo.py: GAE and the clipped losses by hand, PPO's fixed point on a bandit, a short
run that learns, and the sanity checks that must fire when something is wrong."""
import math

import pytest
import torch

import helpers
from helpers import TabularPolicy
import kl
import ppo
import rollout
import tokenizer as tok
from model import ScalarModel
from reference import freeze, token_logprobs


def gae_by_hand(rewards, values, mask, gamma, lam):
    """Row by row in plain Python, straight from the definition."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        span = [t for t in range(T) if mask[b][t]]
        for i, t in enumerate(span):
            total = 0.0
            for k, u in enumerate(span[i:]):  # sum_k (gamma lam)^k delta_{t+k}
                v_next = values[b][span[i + k + 1]] if i + k + 1 < len(span) else 0.0
                delta = rewards[b][u] + gamma * v_next - values[b][u]
                total += (gamma * lam) ** k * delta
            adv[b][t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.9, 1.0), (0.5, 1.0)])
def test_gae_matches_hand_loop(gamma, lam):
    torch.manual_seed(0)
    B, T = 4, 9
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.zeros(B, T)
    for b, (start, end) in enumerate([(2, 9), (3, 5), (0, 1), (4, 8)]):  # prompt, response, padding
        mask[b, start:end] = 1
    rewards[mask == 0] = 1e6  # garbage outside the mask must not leak in
    values[mask == 0] = float("nan")
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    expected = torch.tensor(gae_by_hand(rewards.tolist(), values.nan_to_num().tolist(), mask.tolist(), gamma, lam))
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.equal(adv[mask == 0], torch.zeros_like(adv[mask == 0]))
    assert torch.allclose(ret, torch.where(mask.bool(), adv + values, 0.0), atol=1e-6)
    if lam == 1.0:  # Monte Carlo: the return is the discounted reward still to come, whatever V is
        r = torch.where(mask.bool(), rewards, 0.0)
        to_go = torch.zeros(B, T)
        running = torch.zeros(B)
        for t in reversed(range(T)):  # G_t = r_t + gamma G_{t+1} along each row's response
            running = torch.where(mask[:, t].bool(), r[:, t] + gamma * running, running)
            to_go[:, t] = running * mask[:, t]
        assert torch.allclose(ret, to_go, atol=1e-5)
        # by hand for the row with response columns 3, 4: G_3 = r_3 + gamma r_4, G_4 = r_4
        assert ret[1, 3].item() == pytest.approx((rewards[1, 3] + gamma * rewards[1, 4]).item(), abs=1e-5)
        assert ret[1, 4].item() == pytest.approx(rewards[1, 4].item(), abs=1e-5)


def test_whiten():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 6) * 5 + 2, torch.ones(3, 6)
    mask[:, :2] = 0
    w = ppo.whiten(x, mask)
    assert abs(w[mask.bool()].mean().item()) < 1e-6
    assert abs(w[mask.bool()].pow(2).mean().item() - 1) < 1e-4
    assert torch.equal(w[:, :2], torch.zeros(3, 2))


def test_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 9.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])  # the last entry is masked garbage
    old = torch.zeros(1, 5)
    logp = ratio.log().requires_grad_(True)
    loss, stats = ppo.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # min(r A, clip(r) A): 1.2 (clipped), 0.5 (pessimistic, unclipped), -1.1, -0.8 (clipped)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1 - 0.8) / 4, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(3 / 4)
    r = ratio[0, :4]
    assert stats["approx_kl"] == pytest.approx(((r - 1) - r.log()).mean().item(), abs=1e-6)
    loss.backward()
    # d loss / d logp = -A r / n where the unclipped term is the min, 0 where clipped or masked
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]]), atol=1e-6)


def test_value_loss_by_hand():
    values = torch.tensor([[0.5, -0.1, 0.3, 7.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, stats = ppo.value_loss(values, old, returns, mask, clip=0.2)
    # clipped values 0.2, -0.1, 0.2; max squared errors 0.64, 1.21, 1.69
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 1.69) / 3, abs=1e-6)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)


class ConstantCritic(torch.nn.Module):
    """V(state) = one parameter, at every position."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, pad_mask=None):
        return self.v.expand(tokens.shape).float()


def bandit_batch(policy, critic, ref_logits, r, beta, B, pad_id, gen=None):
    """One PPO rollout of the bandit: B pulls, their k1-shaped rewards, GAE, whitened advantages."""
    with torch.no_grad():
        arms = torch.multinomial(torch.softmax(policy.theta, 0), B, replacement=True, generator=gen)
        tokens = torch.stack([torch.zeros_like(arms), arms], 1)  # [prompt token 0, arm]
        logp = token_logprobs(policy, tokens, pad_id)
        ref_logp = torch.log_softmax(ref_logits, 0)[arms][:, None]
        values = critic(tokens)[:, :-1].clone()  # not a view of the parameter
    mask = torch.ones(B, 1)
    rewards = kl.kl_penalized_rewards(r[arms], logp, ref_logp, mask, beta, "k1")
    adv, returns = ppo.gae(rewards, values, mask, 1.0, 0.95)
    return dict(tokens=tokens, logp=logp, values=values, returns=returns, mask=mask,
                advantages=ppo.whiten(adv, mask))


def adam(policy, critic, lr=1e-3):
    """One optimiser, two param groups (policy, critic): optimise clips each on its own."""
    return torch.optim.Adam([{"params": list(policy.parameters())}, {"params": list(critic.parameters())}], lr=lr)


def test_bandit_converges_to_the_kl_regularised_optimum():
    """One-token answers from 8 arms, reward r, per-token k1 KL reward with coefficient beta.
    The maximiser of E[r] - beta KL(pi || pi_ref) is pi* = pi_ref exp(r / beta) / Z; PPO (the
    real `optimise`: clipped surrogate, value loss, whitened advantages, per-group gradient
    clipping) must get there from pi = pi_ref."""
    torch.manual_seed(0)
    V, beta, B, pad = 8, 0.25, 512, 8  # PAD lies beyond the 8 outputs
    ref_logits = torch.randn(V)
    r = torch.rand(V) * 2 - 1
    target = torch.log_softmax(ref_logits + r / beta, 0)
    policy, critic = TabularPolicy(ref_logits), ConstantCritic()  # starts at pi_ref
    cfg = ppo.PPOConfig(epochs=2, minibatch_size=256)
    opt = adam(policy, critic, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < 30 else 0.2)  # settle
    for update in range(60):
        batch = bandit_batch(policy, critic, ref_logits, r, beta, B, pad)
        stats = ppo.optimise(policy, critic, batch, opt, cfg, pad, "cpu", "fp32",
                             rollout.tolerance("cpu", "fp32")["ratio"] if update == 0 else None)
        sched.step()
    assert stats["epochs_done"] == 2
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac"):
        assert torch.isfinite(torch.as_tensor(stats[key])), key
    logpi = torch.log_softmax(policy.theta.detach(), 0)
    kl_to_target = (logpi.exp() * (logpi - target)).sum().item()
    ref_logpi = torch.log_softmax(ref_logits, 0)
    kl_start = (ref_logpi.exp() * (ref_logpi - target)).sum().item()
    assert kl_start > 0.5  # the test is not trivially passed from the start
    assert kl_to_target <= 0.01, kl_to_target
    # the critic learned the value of the state: E_pi[r - beta * k1] (whitening aside)
    expected_value = (logpi.exp() * (r - beta * (logpi - ref_logpi))).sum().item()
    assert critic.v.item() == pytest.approx(expected_value, abs=0.02)


def test_ratio_check_fires():
    """At update 0 the ratio must be 1: log-probs that are not the policy's own are refused."""
    policy, critic, pad = TabularPolicy(torch.zeros(4)), ConstantCritic(), 4
    batch = bandit_batch(policy, critic, torch.zeros(4), torch.zeros(4), 0.1, 4, pad)
    batch["advantages"] = torch.randn(4, 1)
    cfg = ppo.PPOConfig(minibatch_size=4)
    tol = rollout.tolerance("cpu", "fp32")["ratio"]
    opt = lambda: adam(policy, critic)
    good = batch["logp"]
    batch["logp"] = good + 1e-3  # not pi's own log-probs
    with pytest.raises(RuntimeError, match="ratio"):
        ppo.optimise(policy, critic, batch, opt(), cfg, pad, "cpu", "fp32", tol)
    ppo.optimise(policy, critic, batch, opt(), cfg, pad, "cpu", "fp32", None)  # no check: no error
    policy.theta.data.zero_()
    batch["logp"] = good
    ppo.optimise(policy, critic, batch, opt(), cfg, pad, "cpu", "fp32", tol)


def test_approx_kl_stop_ends_the_epochs_early():
    policy, critic, pad = TabularPolicy(torch.zeros(4)), ConstantCritic(), 4
    torch.manual_seed(0)
    batch = bandit_batch(policy, critic, torch.zeros(4), torch.tensor([1.0, -1, 0, 0]), 0.1, 64, pad)
    opt = adam(policy, critic, lr=0.5)
    stats = ppo.optimise(policy, critic, batch, opt, ppo.PPOConfig(epochs=10, minibatch_size=16,
                                                                   approx_kl_stop=1e-6), pad, "cpu", "fp32")
    assert stats["epochs_done"] < 10


# ----------------------------------------------------------------------------- end to end

TEXTS = ["the film was good.", "i loved the plot!", "the acting was bad.", "it was a mess.",
         "we enjoyed the music.", "the cast was superb."] * 20
PROMPTS = ["the film", "i loved", "the acting", "it was", "we", "the cast was"]


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def tiny_gpt(enc, seed=0):
    return helpers.tiny_gpt(enc, seed, block_size=16, n_layer=1)


def trivial_score(enc, target):
    """Reward = share of response tokens equal to `target`."""
    def score_fn(tokens, P):
        resp = tokens[:, P:]
        real = (resp != tok.pad_id(enc)).float()
        return ((resp == target).float() * real).sum(1) / real.sum(1).clamp(min=1)
    return score_fn


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_short_ppo_run_raises_a_trivial_reward(enc, dtype):
    """Reward = share of response tokens equal to one chosen token: PPO must raise it, in
    fp32 and under bf16 autocast (whose sanity checks, ratio 1 and KL 0, must pass too)."""
    score_fn = trivial_score(enc, tok.encode(enc, " good")[0])
    policy = tiny_gpt(enc)
    ref = freeze(policy)
    cfg = ppo.PPOConfig(updates=25, rollouts=64, minibatch_size=32, lr=3e-3, critic_lr=3e-3,
                        kl_controller="fixed", beta=0.01, no_eos_score=None, max_new_tokens=8, eval_every=100)
    records = []
    _, history = ppo.train_ppo(policy, ref, score_fn, ScalarModel(policy), enc, PROMPTS * 20, cfg, dtype=dtype,
                               log=records.append)
    assert len(history) == 25 and records == history
    first = sum(h["proxy_reward"] for h in history[:3]) / 3
    last = sum(h["proxy_reward"] for h in history[-3:]) / 3
    assert first < 0.05 and last > 0.3, (first, last)
    assert abs(history[0]["kl_exact"]) < 1e-6 and history[-1]["kl_exact"] > 0.1
    assert all(h["beta"] == 0.01 for h in history)  # fixed
    for key in ("gold_reward", "kl", "kl_max", "beta", "entropy", "clipfrac", "approx_kl", "value_loss",
                "policy_loss", "explained_variance", "length", "valid_rate", "distinct_2", "eos_rate", "eta_s"):
        assert math.isfinite(history[-1][key]), key


def test_adaptive_controller_gets_the_mean_per_sequence_exact_kl(enc, monkeypatch):
    """train_ppo hands AdaptiveKLController.update the mean exact KL PER SEQUENCE (summed over
    each answer's tokens, the controller's unit), the same figure as the record's kl_exact, and
    the number of episodes of the batch as n_steps."""
    calls, rollouts = [], []
    update = kl.AdaptiveKLController.update
    monkeypatch.setattr(kl.AdaptiveKLController, "update",
                        lambda self, current_kl, n_steps: calls.append((current_kl, n_steps))
                        or update(self, current_kl, n_steps))
    sample = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: rollouts.append(sample(*a, **k)) or rollouts[-1])
    policy = tiny_gpt(enc)
    cfg = ppo.PPOConfig(updates=3, rollouts=24, minibatch_size=12, lr=1e-2, kl_controller="adaptive",
                        beta=0.1, kl_target=0.5, kl_horizon=100, no_eos_score=None, max_new_tokens=8, eval_every=100)
    odd_share = lambda t, P: ((t[:, P:] % 2 == 1) & (t[:, P:] != tok.pad_id(enc))).float().mean(1)
    _, history = ppo.train_ppo(policy, freeze(policy), odd_share, ScalarModel(policy), enc, PROMPTS * 4, cfg,
                               log=lambda r: None)
    assert len(calls) == len(rollouts) == len(history) == 3
    for (current_kl, n_steps), ro, rec in zip(calls, rollouts, history):
        assert n_steps == cfg.rollouts
        assert current_kl == pytest.approx(rec["kl_exact"], rel=1e-6, abs=1e-9)
        per_token = kl.full_kl(ro["logits"], ro["ref_logits"]) * ro["mask"]
        per_sequence = per_token.sum(1).mean().item()
        assert current_kl == pytest.approx(per_sequence, rel=1e-5, abs=1e-9)
    # after the first update the policy has moved: the units differ by about the answer length
    current_kl, rec, ro = calls[-1][0], history[-1], rollouts[-1]
    token_mean = ((kl.full_kl(ro["logits"], ro["ref_logits"]) * ro["mask"]).sum() / ro["mask"].sum()).item()
    assert rec["length"] > 2 and token_mean > 1e-4
    assert current_kl == pytest.approx(token_mean * rec["length"], rel=1e-4)
    assert current_kl > 2 * token_mean
    # and beta moved the way that KL says: above the target raises it, below lowers it
    for (current_kl, _), before, after in zip(calls, history, history[1:]):
        assert (after["beta"] > before["beta"]) == (current_kl > cfg.kl_target)


def test_no_eos_score_replaces_the_score_of_unended_answers(enc, monkeypatch):
    """An answer cut off by the budget gets no_eos_score instead of the reward model's score
    (the record's proxy_reward is the score before that rule)."""
    seen = []
    penalized = kl.kl_penalized_rewards
    monkeypatch.setattr(kl, "kl_penalized_rewards",
                        lambda scores, *a, **k: seen.append(scores) or penalized(scores, *a, **k))
    sample = rollout.sample
    rollouts = []
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: rollouts.append(sample(*a, **k)) or rollouts[-1])
    policy = helpers.tiny_gpt(enc, block_size=16, n_layer=1, eos_bias=5.0)  # some answers end in 3 tokens
    cfg = ppo.PPOConfig(updates=1, rollouts=32, minibatch_size=32, no_eos_score=-7.0, max_new_tokens=3)
    _, history = ppo.train_ppo(policy, freeze(policy), lambda t, P: torch.full((t.shape[0],), 0.5),
                               ScalarModel(policy), enc, PROMPTS * 6, cfg, log=lambda r: None)
    ended = rollouts[0]["ended"]
    assert 0 < ended.sum() < len(ended)  # some answers ended, others were cut off
    assert torch.equal(seen[0], torch.where(ended, 0.5, -7.0))
    assert history[0]["proxy_reward"] == pytest.approx(0.5)


def test_sanity_checks_fire(enc):
    score_fn = lambda tokens, P: torch.zeros(tokens.shape[0])
    cfg = ppo.PPOConfig(updates=1, rollouts=8, minibatch_size=8, max_new_tokens=6, no_eos_score=None)
    # a reference that is not a frozen copy of the policy: KL is not 0 at update 0
    policy = tiny_gpt(enc)
    with pytest.raises(RuntimeError, match="update 0"):
        ppo.train_ppo(policy, freeze(tiny_gpt(enc, seed=1)), score_fn, ScalarModel(policy), enc, PROMPTS, cfg,
                      log=lambda r: None)
    # a sampler whose recorded log-probs are not the policy's
    policy = tiny_gpt(enc)
    ref = freeze(policy)
    generate = policy.generate
    policy.generate = lambda *a, **k: (lambda t, lp: (t, lp + 1e-2))(*generate(*a, **k))
    with pytest.raises(RuntimeError, match="recorded while sampling"):
        ppo.train_ppo(policy, ref, score_fn, ScalarModel(policy), enc, PROMPTS, cfg, log=lambda r: None)
    # and the honest policy passes both
    policy = tiny_gpt(enc)
    ppo.train_ppo(policy, freeze(policy), score_fn, ScalarModel(policy), enc, PROMPTS, cfg, log=lambda r: None)
