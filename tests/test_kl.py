"""Tests for kl.py: estimator moments in closed form, exact KL, reward shaping and
masking, controllers by hand, and which gradient each use of an estimator gives."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kl import (AdaptiveKLController, FixedKLController, LinearKLSchedule, full_kl, k1,  # noqa: E402
                k2, k3, kl_penalized_rewards, make_controller, sequence_kl, token_kl)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# estimators against closed forms

def gaussian_moments(mu):
    """pi = N(0, 1) (the policy, sampled), pi_ref = N(mu, 1). With x ~ N(0, 1):
    log r = log pi_ref(x) - log pi(x) = mu x - mu^2/2 ~ N(m, s2), m = -mu^2/2, s2 = mu^2.
    KL(pi || pi_ref) = mu^2/2.
    k1 = -log r:    mean -m = mu^2/2,           var s2 = mu^2
    k2 = (log r)^2/2: mean (s2 + m^2)/2 = mu^2/2 + mu^4/8,
                    var Var[L^2]/4 = (2 s2^2 + 4 m^2 s2)/4 = (2 mu^4 + mu^6)/4
    k3 = e^L - 1 - L: E[e^L] = e^{m + s2/2} = 1 so mean mu^2/2;
                    Var[e^L] = e^{2m + 2 s2} - 1 = e^{mu^2} - 1, Cov(e^L, L) = s2 (Stein),
                    var = e^{mu^2} - 1 + mu^2 - 2 mu^2 = e^{mu^2} - 1 - mu^2."""
    kl = mu**2 / 2
    return {"k1": (kl, mu**2),
            "k2": (kl + mu**4 / 8, (2 * mu**4 + mu**6) / 4),
            "k3": (kl, math.exp(mu**2) - 1 - mu**2)}


@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_gaussian_means_and_variances_match_closed_form(mu):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = torch.randn(n, generator=g)
    logp = Normal(0.0, 1.0).log_prob(x)
    ref_logp = Normal(mu, 1.0).log_prob(x)
    for name, f in (("k1", k1), ("k2", k2), ("k3", k3)):
        mean, var = gaussian_moments(mu)[name]
        est = f(logp, ref_logp).double()
        dev2 = (est - est.mean()) ** 2
        se_mean = math.sqrt(var / n)
        se_var = dev2.std().item() / math.sqrt(n)  # standard error of the sample variance
        assert abs(est.mean().item() - mean) < 5 * se_mean, name
        assert abs(dev2.mean().item() - var) < 5 * se_var, name
    # k2's bias mu^4/8 is real, not noise: many standard errors away from the KL.
    est = k2(logp, ref_logp).double()
    assert est.mean().item() - mu**2 / 2 > 10 * est.std().item() / math.sqrt(n)
    # near pi_ref, k3 is the low-variance unbiased choice
    assert k3(logp, ref_logp).var() < k1(logp, ref_logp).var()


def test_categorical_exact_expectations():
    g = torch.Generator().manual_seed(1)
    logits, ref_logits = torch.randn(7, generator=g), torch.randn(7, generator=g)
    logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    p = logp.exp()
    kl = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits)).item()
    assert (p * k1(logp, ref_logp)).sum().item() == pytest.approx(kl, abs=1e-6)
    assert (p * k3(logp, ref_logp)).sum().item() == pytest.approx(kl, abs=1e-6)
    assert (p * k2(logp, ref_logp)).sum().item() != pytest.approx(kl, abs=1e-3)


def test_signs_extremes_and_dtypes():
    # k1 of one sample is negative when the reference likes the token more
    assert k1(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == -1.0
    big = [-1e30, -1e4, -100.0, -20.5, -20.0, -3.0, -1.0, -1e-3, -1e-7, 0.0]
    a, b = torch.meshgrid(torch.tensor(big), torch.tensor(big), indexing="ij")
    for logp, ref in ((a, b), (b, a)):
        v = k3(logp, ref)
        assert torch.isfinite(v).all() and (v >= 0).all()
        assert (k2(logp, ref) >= 0).all()
    # tiny log-ratios must not round below zero
    ref = torch.linspace(-30, 0, 101)[:, None].expand(101, 200)
    eps = torch.logspace(-12, 0, 100)
    logp = ref + torch.cat([eps, -eps])[None, :]
    assert (k3(logp, ref) >= 0).all()
    # infinite log-probs: clamped, finite, still >= 0
    v = k3(torch.tensor([-math.inf, 0.0]), torch.tensor([0.0, -math.inf]))
    assert torch.isfinite(v).all() and (v >= 0).all()
    # bf16 in, fp32 out, same values as fp32 in
    lp, rl = torch.tensor([-1.5, -0.25]), torch.tensor([-0.5, -2.0])
    for f in (k1, k2, k3):
        out = f(lp.bfloat16(), rl.bfloat16())
        assert out.dtype == torch.float32 and torch.allclose(out, f(lp, rl))


def test_k3_clamp_value():
    # log r = 25 is clamped to 20
    clamped = k3(torch.tensor([-25.0]), torch.tensor([0.0])).item()
    assert clamped == pytest.approx(math.expm1(20) - 20, rel=1e-6)


# ---------------------------------------------------------------------------
# exact KL

def test_full_kl_matches_torch_both_directions():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 5, 11, generator=g)
    ref_logits = 3 * torch.randn(2, 5, 11, generator=g)
    pi, ref = Categorical(logits=logits), Categorical(logits=ref_logits)
    assert full_kl(logits, ref_logits).shape == (2, 5)
    torch.testing.assert_close(full_kl(logits, ref_logits), kl_divergence(pi, ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_kl(logits, ref_logits, reverse=False), kl_divergence(ref, pi),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(full_kl(logits, logits), torch.zeros(2, 5))
    assert full_kl(logits.bfloat16(), ref_logits.bfloat16()).dtype == torch.float32
    # a token the policy cannot emit contributes 0, not nan
    masked = logits.clone()
    masked[..., 0] = -math.inf
    kl = full_kl(masked, ref_logits)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, kl_divergence(Categorical(logits=masked), ref), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# KL-shaped rewards

def reward_batch():
    """3 rows, T = 8 next-token positions, left prompts and right padding.
    Outside the mask, log-probs and logits are garbage (nan, inf)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    logits, ref_logits = torch.randn(3, 8, 6, generator=g), torch.randn(3, 8, 6, generator=g)
    tokens = torch.randint(0, 6, (3, 8), generator=g)
    logp = F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    ref_logp = F.log_softmax(ref_logits, -1).gather(-1, tokens[..., None])[..., 0]
    out = mask == 0
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30])
    logp[out] = garbage[torch.arange(int(out.sum())) % 4]
    ref_logp[out] = -math.inf
    logits[out] = math.nan
    ref_logits[out] = math.inf
    scores = torch.tensor([1.5, -2.0, 0.25])
    return scores, logp, ref_logp, mask, logits, ref_logits


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
def test_kl_penalized_rewards_layout(estimator):
    scores, logp, ref_logp, mask, logits, ref_logits = reward_batch()
    beta = 0.1
    r = kl_penalized_rewards(scores, logp, ref_logp, mask, beta, estimator, logits, ref_logits)
    assert r.shape == (3, 8) and torch.isfinite(r).all()
    assert torch.equal(r[mask == 0], torch.zeros(int((mask == 0).sum())))  # exactly nothing
    last = [7, 4, 4]
    for b in range(3):
        for t in range(8):
            if mask[b, t] == 0:
                continue
            lp, rl = logp[b, t].item(), ref_logp[b, t].item()
            log_r = rl - lp
            if estimator == "full":
                pi, ref = Categorical(logits=logits[b, t]), Categorical(logits=ref_logits[b, t])
                est = kl_divergence(pi, ref).item()
            else:
                est = {"k1": -log_r, "k2": log_r**2 / 2, "k3": math.expm1(log_r) - log_r}[estimator]
            expected = -beta * est + (scores[b].item() if t == last[b] else 0.0)
            assert r[b, t].item() == pytest.approx(expected, abs=1e-5), (b, t)
    # the per-sequence sum is score - beta * sequence KL
    seq = sequence_kl(logp, ref_logp, mask, estimator, logits, ref_logits)
    torch.testing.assert_close(r.sum(1), scores - beta * seq)


def test_rewards_need_a_response_token_and_known_estimator():
    scores, logp, ref_logp, mask, logits, ref_logits = reward_batch()
    mask[2] = 0
    with pytest.raises(ValueError):
        kl_penalized_rewards(scores, logp, ref_logp, mask, 0.1)
    with pytest.raises(ValueError):
        token_kl(logp, ref_logp, "k4")
    with pytest.raises(ValueError):
        token_kl(logp, ref_logp, "full")


def test_sequence_kl_sums_over_mask():
    scores, logp, ref_logp, mask, logits, ref_logits = reward_batch()
    seq = sequence_kl(logp, ref_logp, mask, "k1")
    for b in range(3):
        m = mask[b] == 1
        assert seq[b].item() == pytest.approx((logp[b, m] - ref_logp[b, m]).sum().item(), abs=1e-6)


# ---------------------------------------------------------------------------
# controllers

def test_fixed_controller():
    c = FixedKLController(0.05)
    for kl in (0.0, 100.0):
        c.update(kl, 64)
    assert c.value == 0.05


def test_adaptive_controller_by_hand():
    c = AdaptiveKLController(init_kl_coef=1.0, target=10.0, horizon=100)
    expected = [
        (11.0, 1.0 * (1 + 0.1 * 0.1)),        # e = 0.1, inside the clip
        (20.0, 1.01 * (1 + 0.2 * 0.1)),       # e = 1.0 clipped to +0.2
        (0.0, 1.0302 * (1 - 0.2 * 0.1)),      # e = -1.0 clipped to -0.2
        (9.0, 1.009596 * (1 - 0.1 * 0.1)),    # e = -0.1
    ]
    for kl, beta in expected:
        c.update(kl, n_steps=10)
        assert c.value == pytest.approx(beta, rel=1e-12)
    assert c.value == pytest.approx(0.99950004, rel=1e-12)


@pytest.mark.parametrize("init", [0.01, 5.0])
def test_adaptive_controller_settles_on_target(init):
    # toy system: the policy's per-sequence KL falls as beta rises, KL = c / beta
    c, target = 2.0, 6.0
    ctl = AdaptiveKLController(init, target, horizon=10_000)
    for _ in range(3000):
        ctl.update(c / ctl.value, n_steps=256)
    assert abs(c / ctl.value - target) < 0.05 * target


def test_adaptive_controller_unit_bug():
    # Feed the per-TOKEN mean instead of the per-sequence sum: the controller then
    # holds the per-token KL at the target and sequences drift length times further.
    c, target, length = 2.0, 6.0, 32
    ctl = AdaptiveKLController(0.1, target, horizon=10_000)
    for _ in range(3000):
        seq_kl = c / ctl.value
        ctl.update(seq_kl / length, n_steps=256)
    assert c / ctl.value == pytest.approx(length * target, rel=0.05)


def test_linear_schedule_exact():
    s = LinearKLSchedule(0.5, 1.5, 4)
    values = [s.value]
    for kl in (1.0, 1e9, -3.0, 0.0, 7.0):  # the KL is ignored
        s.update(kl, 64)
        values.append(s.value)
    assert values == [0.5, 0.75, 1.0, 1.25, 1.5, 1.5]
    assert LinearKLSchedule(0.5, 1.5, 0).value == 1.5


def test_make_controller_builds_each_kind():
    c = make_controller("adaptive", 0.3, kl_target=6.0, horizon=100)
    assert isinstance(c, AdaptiveKLController) and (c.value, c.target, c.horizon) == (0.3, 6.0, 100)
    c = make_controller("fixed", 0.2, kl_target=6.0, horizon=100)
    assert isinstance(c, FixedKLController) and c.value == 0.2
    c = make_controller("schedule", 0.1, beta_end=0.5, n_updates=4)
    assert isinstance(c, LinearKLSchedule) and c.value == 0.1
    for _ in range(4):
        c.update(0.0, 64)
    assert c.value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pid"):
        make_controller("pid", 0.1)


# ---------------------------------------------------------------------------
# gradients: which KL does each use of an estimator actually minimise?

def grads_on_categorical(seed=4, vocab=5):
    g = torch.Generator().manual_seed(seed)
    theta = (2 * torch.randn(vocab, generator=g)).requires_grad_()
    ref_logits = 2 * torch.randn(vocab, generator=g)
    ref_logp = F.log_softmax(ref_logits, -1)

    def grad(f):
        (out,) = torch.autograd.grad(f(), theta)
        return out

    def logp():
        return F.log_softmax(theta, -1)

    def expect(values):  # exact E_{x ~ pi}[...] with the sampling not differentiated
        return (logp().exp().detach() * values).sum()

    exact = {
        "reverse": grad(lambda: full_kl(theta[None, None], ref_logits[None, None]).sum()),
        "forward": grad(lambda: full_kl(theta[None, None], ref_logits[None, None], reverse=False).sum()),
    }
    return theta, ref_logits, ref_logp, logp, expect, grad, exact


def test_gradient_of_each_use():
    theta, ref_logits, ref_logp, logp, expect, grad, exact = grads_on_categorical()
    assert (exact["reverse"] - exact["forward"]).abs().max() > 0.2  # the directions differ here
    tol = dict(atol=1e-5, rtol=1e-5)

    def reinforce(est):  # E_pi[stopgrad(estimate) * grad log pi]
        return grad(lambda: expect(est(logp(), ref_logp).detach() * logp()))

    torch.testing.assert_close(reinforce(k1), exact["reverse"], **tol)
    torch.testing.assert_close(reinforce(k3), exact["reverse"] - exact["forward"], **tol)
    full = full_kl(theta[None, None], ref_logits[None, None])[0, 0].detach()
    torch.testing.assert_close(reinforce(lambda lp, rl: full.expand_as(lp)), torch.zeros(5), **tol)

    def in_loss(est):  # E_pi[grad estimate]
        return grad(lambda: expect(est(logp(), ref_logp)))

    torch.testing.assert_close(in_loss(k1), torch.zeros(5), **tol)
    torch.testing.assert_close(in_loss(k2), exact["reverse"], **tol)
    torch.testing.assert_close(in_loss(k3), exact["forward"], **tol)  # the GRPO pitfall

