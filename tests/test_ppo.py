"""ppo.py: GAE and the clipped losses by hand, PPO's fixed point on a bandit, a short
run that learns, and the sanity checks that must fire when something is wrong."""
import math

import pytest
import torch

import helpers
import kl
import ppo
import tokenizer as tok
from reference import freeze


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


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
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
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: the return is the reward still to come
        r = torch.where(mask.bool(), rewards, 0.0)
        to_go = r.flip(1).cumsum(1).flip(1) * mask
        assert torch.allclose(ret, to_go, atol=1e-5)


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


def test_bandit_converges_to_the_kl_regularised_optimum():
    """One-token answers from 8 arms, reward r, per-token k1 KL reward with coefficient beta.
    The maximiser of E[r] - beta KL(pi || pi_ref) is pi* = pi_ref exp(r / beta) / Z; PPO (the
    real `optimise`, whitened advantages, clipping) must get there from pi = pi_ref."""
    torch.manual_seed(0)
    V, beta, B = 8, 0.25, 512
    ref_logits = torch.randn(V)
    r = torch.rand(V) * 2 - 1
    target = torch.log_softmax(ref_logits + r / beta, 0)
    theta = ref_logits.clone().requires_grad_(True)  # tabular policy, starts at pi_ref
    cfg = ppo.PPOConfig(ppo_epochs=2, minibatch_size=256)
    opt = torch.optim.Adam([theta], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < 30 else 0.2)  # settle
    mask = torch.ones(B, 1)
    for _ in range(60):
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(theta, 0), B, replacement=True)
            logp = torch.log_softmax(theta, 0)[arms][:, None]
            ref_logp = torch.log_softmax(ref_logits, 0)[arms][:, None]
        rewards = kl.kl_penalized_rewards(r[arms], logp, ref_logp, mask, beta, "k1")
        adv, _ = ppo.gae(rewards, torch.zeros(B, 1), mask, 1.0, 0.95)  # no critic: A = reward
        batch = dict(logp=logp, advantages=ppo.whiten(adv, mask), mask=mask)
        ppo.optimise(batch, lambda idx: (torch.log_softmax(theta, 0)[arms[idx]][:, None], None), opt, cfg)
        sched.step()
    logpi = torch.log_softmax(theta.detach(), 0)
    kl_to_target = (logpi.exp() * (logpi - target)).sum().item()
    kl_start = (torch.log_softmax(ref_logits, 0).exp() * (torch.log_softmax(ref_logits, 0) - target)).sum().item()
    assert kl_start > 0.5  # the test is not trivially passed from the start
    assert kl_to_target <= 0.01, kl_to_target


def test_ratio_check_fires():
    theta = torch.zeros(4, requires_grad=True)
    arms = torch.tensor([0, 1, 2, 3])
    logp = torch.log_softmax(theta, 0)[arms][:, None].detach()
    mask = torch.ones(4, 1)
    batch = dict(logp=logp + 1e-3, advantages=torch.randn(4, 1), mask=mask)  # not pi's own log-probs
    forward = lambda idx: (torch.log_softmax(theta, 0)[arms[idx]][:, None], None)
    with pytest.raises(RuntimeError, match="ratio"):
        ppo.optimise(batch, forward, torch.optim.Adam([theta]), ppo.PPOConfig(minibatch_size=4))
    batch["logp"] = logp
    ppo.optimise(batch, forward, torch.optim.Adam([theta]), ppo.PPOConfig(minibatch_size=4))


# ----------------------------------------------------------------------------- end to end

TEXTS = ["the film was good.", "i loved the plot!", "the acting was bad.", "it was a mess.",
         "we enjoyed the music.", "the cast was superb."] * 20
PROMPTS = ["the film", "i loved", "the acting", "it was", "we", "the cast was"]


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def tiny_gpt(enc, seed=0):
    return helpers.tiny_gpt(enc, seed, block_size=16, n_layer=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_short_ppo_run_raises_a_trivial_reward(enc, dtype):
    """Reward = share of response tokens equal to one chosen token: PPO must raise it, in
    fp32 and under bf16 autocast (whose sanity checks, ratio 1 and KL 0, must pass too)."""
    target = tok.encode(enc, " good")[0]

    def score_fn(tokens, P):
        resp = tokens[:, P:]
        real = (resp != tok.pad_id(enc)).float()
        return ((resp == target).float() * real).sum(1) / real.sum(1)

    policy = tiny_gpt(enc)
    ref = freeze(policy)
    cfg = ppo.PPOConfig(updates=25, rollouts=64, minibatch_size=32, lr=3e-3, critic_lr=3e-3,
                        kl_controller="fixed", init_beta=0.01, missing_eos_penalty=None,
                        max_new_tokens=8, eval_every=100)
    records = []
    _, history = ppo.train_ppo(policy, ref, score_fn, enc, PROMPTS * 20, cfg, dtype=dtype, log=records.append)
    assert len(history) == 25 and records == history
    first = sum(h["proxy_reward"] for h in history[:3]) / 3
    last = sum(h["proxy_reward"] for h in history[-3:]) / 3
    assert first < 0.05 and last > 0.3, (first, last)
    assert abs(history[0]["kl_exact"]) < 1e-6 and history[-1]["kl_exact"] > 0.1
    for key in ("gold_reward", "kl", "kl_max", "beta", "entropy", "clipfrac", "approx_kl", "value_loss",
                "policy_loss", "explained_variance", "length", "valid_rate", "distinct_2", "eos_rate", "eta_s"):
        assert math.isfinite(history[-1][key]), key


def test_sanity_checks_fire(enc):
    score_fn = lambda tokens, P: torch.zeros(tokens.shape[0])
    cfg = ppo.PPOConfig(updates=1, rollouts=8, minibatch_size=8, max_new_tokens=6, missing_eos_penalty=None)
    # a reference that is not a frozen copy of the policy: KL is not 0 at update 0
    policy = tiny_gpt(enc)
    with pytest.raises(RuntimeError, match="update 0"):
        ppo.train_ppo(policy, freeze(tiny_gpt(enc, seed=1)), score_fn, enc, PROMPTS, cfg, log=lambda r: None)
    # a sampler whose recorded log-probs are not the policy's
    policy = tiny_gpt(enc)
    ref = freeze(policy)
    generate = policy.generate
    policy.generate = lambda *a, **k: (lambda t, lp: (t, lp + 1e-2))(*generate(*a, **k))
    with pytest.raises(RuntimeError, match="recorded while sampling"):
        ppo.train_ppo(policy, ref, score_fn, enc, PROMPTS, cfg, log=lambda r: None)
