"""grpo.py: group and leave-one-out advantages and the three aggregations by hand, the loss's
gradient against its derivation, where each place of the KL lands on a bandit, and a short run."""
import math

import pytest
import torch
import torch.nn.functional as F

import grpo
import kl
import rollout
import tokenizer as tok
from helpers import TabularPolicy, tiny_gpt
from kl import k1, k3
from reference import freeze, token_logprobs
from test_kl import grads_on_categorical, reward_batch


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3, the second all equal
    none = grpo.group_advantages(scores, 3, "none")
    assert torch.allclose(none, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    group = grpo.group_advantages(scores, 3, "group")  # std of (1, 2, 3) with Bessel: 1
    assert torch.allclose(group, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1.0 + 1e-4))
    assert not group.isnan().any()  # a group of equal scores: 0, not 0 / 0
    batch = grpo.group_advantages(scores, 3, "batch")
    assert torch.allclose(batch, none / (scores.std() + 1e-4))
    assert scores.std().item() == pytest.approx(math.sqrt(((scores - scores.mean()) ** 2).sum().item() / 5))
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(scores, 3, "rank")


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0, 4.0, 0.0])  # groups of 4
    adv = grpo.rloo_advantages(scores, 4)
    by_hand = [1 - (2 + 6 + 4) / 3, 2 - (1 + 6 + 4) / 3, 6 - (1 + 2 + 4) / 3, 4 - (1 + 2 + 6) / 3,
               4 - 8 / 3, 4 - 8 / 3, 4 - 8 / 3, 0 - 4.0]
    assert torch.allclose(adv, torch.tensor(by_hand))
    assert torch.allclose(adv, grpo.group_advantages(scores, 4, "none") * 4 / 3)  # G/(G-1) x centred
    assert torch.equal(grpo.rloo_advantages(torch.full((6,), 3.0), 3), torch.zeros(6))


def crafted_batch():
    """Two answers: one of 3 response tokens, one of 1 (then padding with garbage log-probs)."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    logp = torch.tensor([[9.0, -1.0, -2.0, -0.5], [9.0, -1.5, 7.0, float("nan")]])
    old_logp = torch.tensor([[0.0, -1.5, -1.5, -0.5], [0.0, -1.4, 0.0, 0.0]])
    ref_logp = torch.tensor([[0.0, -1.2, -2.0, -0.7], [0.0, -1.0, 0.0, 0.0]])
    return logp, old_logp, ref_logp, torch.tensor([2.0, -1.0]), mask


def per_token_by_hand(logp, old_logp, ref_logp, adv, clip_eps, beta):
    rho = math.exp(logp - old_logp)
    surrogate = min(rho * adv, min(max(rho, 1 - clip_eps), 1 + clip_eps) * adv)
    r = math.exp(ref_logp - logp)
    return -surrogate + beta * (r - 1 - math.log(r))


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_each_aggregation_by_hand(beta):
    logp, old_logp, ref_logp, adv, mask = crafted_batch()
    terms = [[per_token_by_hand(logp[i, t].item(), old_logp[i, t].item(), ref_logp[i, t].item(), adv[i].item(),
                                0.2, beta) for t in range(4) if mask[i, t]] for i in range(2)]
    # rho of the first answer's tokens: e^0.5 (> 1.2 with A > 0: clipped), e^-0.5, 1
    expected = {"sequence": (sum(terms[0]) / 3 + sum(terms[1]) / 1) / 2,
                "token": (sum(terms[0]) + sum(terms[1])) / 4,
                "constant": (sum(terms[0]) + sum(terms[1])) / (2 * 4)}
    for aggregation, value in expected.items():
        loss = grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, 0.2, beta, aggregation, max_new_tokens=4)
        assert loss.item() == pytest.approx(value, rel=1e-5), aggregation
    adv_tokens = adv[:, None].expand(2, 4)  # (N, T) advantages: the same loss
    assert grpo.grpo_loss(logp, old_logp, ref_logp, adv_tokens, mask, 0.2, beta).item() == \
        pytest.approx(expected["sequence"], rel=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, aggregation="mean")


def test_gradient_equals_the_hand_derived_one():
    """d l_t / d logp_t = -rho A where the clip does not bind, 0 where it binds in A's favour,
    plus beta (1 - pi_ref / pi) from k3; "sequence" divides by the answer's length and N."""
    _, old_logp, ref_logp, adv, mask = crafted_batch()
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -1.5, 0.0, 0.0]], requires_grad=True)
    beta, eps = 0.3, 0.2
    grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, eps, beta, "sequence").backward()
    expected = torch.zeros(2, 4)
    lengths = mask.sum(1)
    for i in range(2):
        for t in range(4):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t].item() - old_logp[i, t].item())
            a = adv[i].item()
            binds = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
            d_surrogate = 0.0 if binds else -rho * a
            d_k3 = beta * (1 - math.exp(ref_logp[i, t].item() - logp[i, t].item()))
            expected[i, t] = (d_surrogate + d_k3) / lengths[i] / 2
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert expected[0, 1] == pytest.approx(beta * (1 - math.exp(-0.2)) / 6)  # the clip binds there: k3 only
    assert expected[0, 2] != pytest.approx(beta * (1 - math.exp(0.0)) / 6)  # rho < 0.8, A > 0: no clip


def forward_kl_optimum(ref_probs, r, beta):
    """argmax_pi E_pi[r] - beta KL(pi_ref || pi): stationarity gives r_i + beta pi_ref_i / pi_i = lam,
    so pi_i = beta pi_ref_i / (lam - r_i) with lam > max r such that they sum to 1 (bisection)."""
    lo, hi = r.max().item() + 1e-9, r.max().item() + beta * 10
    for _ in range(200):
        lam = (lo + hi) / 2
        total = (beta * ref_probs / (lam - r)).sum().item()
        lo, hi = (lam, hi) if total > 1 else (lo, lam)
    return beta * ref_probs / (lam - r)


def run_bandit(kl_in, beta, ref_logits, r, updates=400, groups=64, group_size=8):
    """The real grpo.optimise on a one-token bandit (TabularPolicy) with leave-one-out advantages,
    the KL in the reward (k1) or in the loss (k3); returns pi averaged over the last quarter."""
    torch.manual_seed(0)
    policy, pad, V = TabularPolicy(ref_logits), len(r), len(r)
    cfg = grpo.GRPOConfig(epochs=1, minibatch_size=groups * group_size, clip_eps=0.2, aggregation="sequence",
                          advantage="rloo", kl_in=kl_in, group_size=group_size)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < updates // 2 else 0.2)
    ref_logp_all, mean_probs = torch.log_softmax(ref_logits, 0), torch.zeros(V)
    for update in range(updates):
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(policy.theta, 0), groups * group_size, replacement=True)
            tokens = torch.stack([torch.zeros_like(arms), arms], 1)
            logp = torch.log_softmax(policy.theta, 0)[arms][:, None]
        ref_logp, mask = ref_logp_all[arms][:, None], torch.ones(len(arms), 1)
        advantages = grpo.advantages(r[arms], logp, ref_logp, mask, beta, cfg)  # the loop's own
        batch = dict(tokens=tokens, logp=logp, ref_logp=ref_logp, mask=mask, advantages=advantages)
        grpo.optimise(policy, batch, opt, cfg, beta if kl_in == "loss" else 0.0, 1, pad, "cpu", "fp32",
                      1e-5 if update == 0 else None)
        sched.step()
        if update >= updates * 3 // 4:
            mean_probs += torch.softmax(policy.theta.detach(), 0) / (updates - updates * 3 // 4)
    return mean_probs


def test_bandit_kl_in_reward_lands_on_pi_star_and_in_loss_on_the_other_optimum():
    """k1 in the reward: the optimum of E[r] - beta KL(pi || pi_ref), pi* = pi_ref exp(r / beta) / Z.
    k3 in the loss: its gradient is that of KL(pi_ref || pi), so it lands on the maximiser of
    E[r] - beta KL(pi_ref || pi) instead (kl.py's table). Leave-one-out advantages keep the reward's
    gradient unbiased and unscaled, so only the KL's place differs between the two runs."""
    ref_logits, r, beta = torch.tensor([0.0, 0.7, 1.1, 1.4]), torch.tensor([1.0, 0.5, 0.0, -0.5]), 0.5
    ref_probs = torch.softmax(ref_logits, 0)
    pi_star = torch.softmax(ref_logits + r / beta, 0)
    pi_forward = forward_kl_optimum(ref_probs, r, beta)
    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()
    assert pi_forward.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert tv(pi_star, pi_forward) > 0.1 and tv(pi_star, ref_probs) > 0.3  # three distinct answers
    in_reward, in_loss = run_bandit("reward", beta, ref_logits, r), run_bandit("loss", beta, ref_logits, r)
    assert tv(in_reward, pi_star) < 1e-3, (in_reward, pi_star)  # there every answer scores beta log Z: A = 0
    assert tv(in_loss, pi_forward) < 0.01, (in_loss, pi_forward)
    assert tv(in_loss, pi_star) > 0.08


PROMPTS = ["the film", "i loved", "the acting", "it was", "we", "the cast was"]
TEXTS = ["the film was good. i loved it.", "the acting was bad. we left.", "it was fine. the cast was good."] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


@pytest.mark.parametrize("variant", sorted(grpo.VARIANTS))
def test_short_run_raises_a_trivial_reward(enc, variant):
    """Reward = share of response tokens equal to one token: each variant must raise it, with KL
    0 and ratio 1 before the first step (train_grpo's checks) and the same record keys as PPO's."""
    target, pad = tok.encode(enc, " good")[0], tok.pad_id(enc)

    def score_fn(tokens, P):
        resp = tokens[:, P:]
        real = (resp != pad).float()
        return ((resp == target).float() * real).sum(1) / real.sum(1).clamp(min=1)
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    base = dict(updates=20, rollouts=48, group_size=8, minibatch_size=24, lr=1e-2, kl_controller="fixed",
                beta=0.01, no_eos_score=None, max_new_tokens=8, eval_every=100)
    cfg = grpo.GRPOConfig(**{**base, **grpo.VARIANTS[variant]})
    records = []
    _, history = grpo.train_grpo(policy, freeze(policy), score_fn, enc, PROMPTS * 20, cfg, log=records.append)
    assert len(history) == 20 and records == history
    first = sum(h["proxy_reward"] for h in history[:3]) / 3
    last = sum(h["proxy_reward"] for h in history[-3:]) / 3
    assert first < 0.05 and last > 0.3, (first, last)
    assert abs(history[0]["kl_exact"]) < 1e-6 and history[-1]["kl_exact"] > 0.1
    for key in ("gold_reward", "kl", "kl_max", "beta", "entropy", "clipfrac", "approx_kl", "policy_loss",
                "length", "valid_rate", "distinct_2", "eos_rate", "eta_s", "tied_groups", "tied_after",
                "resampled", "clip_low", "clip_high"):
        assert math.isfinite(history[-1][key]), key


def test_groups_are_one_prompt_answered_group_size_times(enc, monkeypatch):
    seen = []
    sample = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: seen.append(a[3]) or sample(*a, **k))
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    cfg = grpo.GRPOConfig(updates=2, rollouts=12, group_size=4, minibatch_size=12, max_new_tokens=4)
    grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.zeros(t.shape[0]), enc, PROMPTS, cfg,
                    log=lambda r: None)
    for prompts in seen:
        groups = [prompts[i:i + 4] for i in range(0, 12, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.train_grpo(policy, freeze(policy), None, enc, PROMPTS, grpo.GRPOConfig(rollouts=10, group_size=4))


def test_kl_check_fires_at_update_zero(enc):
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    cfg = grpo.GRPOConfig(updates=1, rollouts=8, group_size=4, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="update 0"):
        grpo.train_grpo(policy, freeze(tiny_gpt(enc, 1, block_size=16, n_layer=1)),
                        lambda t, P: torch.zeros(t.shape[0]), enc, PROMPTS, cfg, log=lambda r: None)


def test_constant_aggregation_divides_by_the_budget_so_padding_changes_nothing():
    """Dr. GRPO's normaliser is N x the run's response budget: extra padding columns (a wider
    batch, a longer prompt elsewhere) leave the loss and its gradient as they were."""
    logp, old_logp, ref_logp, adv, mask = crafted_batch()
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -1.5, 0.0, 0.0]], requires_grad=True)
    loss = grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, 0.2, 0.3, "constant", max_new_tokens=10)
    wide = lambda x, fill: torch.cat([x, torch.full((2, 3), fill)], 1)
    wide_logp = wide(logp.detach(), 7.0).requires_grad_(True)
    padded = grpo.grpo_loss(wide_logp, wide(old_logp, 0.0), wide(ref_logp, 0.0), adv, wide(mask, 0.0),
                            0.2, 0.3, "constant", max_new_tokens=10)
    assert padded.item() == loss.item()
    terms = [per_token_by_hand(logp[i, t].item(), old_logp[i, t].item(), ref_logp[i, t].item(),
                               adv[i].item(), 0.2, 0.3) for i in range(2) for t in range(4) if mask[i, t]]
    assert loss.item() == pytest.approx(sum(terms) / (2 * 10), rel=1e-5)
    loss.backward(), padded.backward()
    assert torch.equal(wide_logp.grad[:, :4], logp.grad) and not wide_logp.grad[:, 4:].any()
    with pytest.raises(ValueError, match="budget"):
        grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, aggregation="constant")


def spy(monkeypatch, module, name, seen):
    """Wrap module.name so that each call's (args, result) lands in `seen`."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append((args, result))
        return result
    monkeypatch.setattr(module, name, wrapped)


def test_the_loop_pays_the_kl_in_the_score_and_scores_unended_answers_as_told(enc, monkeypatch):
    """train_grpo's own lines, kl_in "reward": an answer's advantage is its score (no_eos_score if it
    did not end) minus beta times its k1 KL summed over its tokens, centred in its group. A sign, a
    scale or the no-EOS rule slipping in the loop changes the advantages optimise receives."""
    samples, optimised = [], []
    spy(monkeypatch, rollout, "sample", samples)
    spy(monkeypatch, grpo, "optimise", optimised)
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1, eos_bias=2.0)  # some answers end, some not
    beta = 2.0
    cfg = grpo.GRPOConfig(updates=2, rollouts=16, group_size=4, minibatch_size=16, lr=3e-2, advantage="none",
                          aggregation="token", kl_in="reward", kl_controller="fixed", beta=beta,
                          no_eos_score=-7.0, max_new_tokens=4)
    grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.full((t.shape[0],), 0.5), enc, PROMPTS * 4,
                    cfg, log=lambda r: None)
    ro, batch = samples[1][1], optimised[1][0][1]  # update 1: the policy has moved, KL > 0
    scores = torch.where(ro["ended"], 0.5, -7.0)
    seq_kl = kl.sequence_kl(ro["logp"], ro["ref_logp"], ro["mask"], "k1")
    assert 0 < ro["ended"].sum() < len(scores) and (seq_kl - seq_kl.mean()).abs().max() > 1e-3
    shaped = (scores - beta * seq_kl).view(-1, 4)
    expected = (shaped - shaped.mean(1, keepdim=True)).flatten()
    assert torch.allclose(batch["advantages"], expected, atol=1e-6)


def test_the_loop_checks_the_first_ratio(enc, monkeypatch):
    """At update 0 train_grpo hands optimise the ratio check: old log-probs that are not the policy's
    own (here 1e-3 off, past the sampler's check, which has already passed) stop the run."""
    sample = rollout.sample

    def off(*args, **kwargs):
        ro = sample(*args, **kwargs)
        return {**ro, "logp": ro["logp"] + 1e-3}
    monkeypatch.setattr(rollout, "sample", off)
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    cfg = grpo.GRPOConfig(updates=1, rollouts=8, group_size=4, minibatch_size=8, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="the ratio"):
        grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.zeros(t.shape[0]), enc, PROMPTS, cfg,
                        log=lambda r: None)


def test_kl_loss_estimators_by_hand():
    """grpo_loss's kl_estimator: k2 and k3+ share k2's gradient, beta (logp - ref_logp), while k3+
    keeps k3's value; k3_ratio is k3 times rho = pi / pi_old with rho differentiated (TRL's
    use_bias_correction_kl), d/dlogp = rho (k3 + 1 - pi_ref / pi). One answer, one token, A = 0."""
    logp0, old, ref, beta = -1.0, -1.3, -1.6, 0.5
    mask, adv = torch.ones(1, 1), torch.zeros(1)
    r = math.exp(ref - logp0)                       # pi_ref / pi
    k3_value = r - 1 - math.log(r)
    rho = math.exp(logp0 - old)
    expected = {"k3": (beta * k3_value, beta * (1 - r)),
                "k2": (beta * 0.5 * (ref - logp0) ** 2, beta * (logp0 - ref)),
                "k3+": (beta * k3_value, beta * (logp0 - ref)),
                "k3_ratio": (beta * rho * k3_value, beta * rho * (k3_value + 1 - r))}
    for estimator, (value, gradient) in expected.items():
        logp = torch.tensor([[logp0]], requires_grad=True)
        loss = grpo.grpo_loss(logp, torch.tensor([[old]]), torch.tensor([[ref]]), adv, mask, 0.2, beta,
                              "token", kl_estimator=estimator)
        loss.backward()
        assert loss.item() == pytest.approx(value, rel=1e-5), estimator
        assert logp.grad.item() == pytest.approx(gradient, rel=1e-5), estimator
    with pytest.raises(ValueError, match="estimator"):
        grpo.grpo_loss(logp, torch.tensor([[old]]), torch.tensor([[ref]]), adv, mask, 0.2, beta,
                       kl_estimator="k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3+", "k3_ratio"])
def test_each_kl_loss_estimator_runs_in_the_loop(enc, estimator):
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    cfg = grpo.GRPOConfig(updates=2, rollouts=8, group_size=4, minibatch_size=4, max_new_tokens=4,
                          lr=1e-2, no_eos_score=None, kl_loss_estimator=estimator)
    _, history = grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.rand(t.shape[0]), enc,
                                 PROMPTS, cfg, log=lambda r: None)
    assert math.isfinite(history[-1]["policy_loss"]) and history[-1]["kl_exact"] > 0


# ----------------------------------------------------------------------------- the KL term alone

def kl_term(logp, ref_logp, mask, estimator="k3"):
    """grpo_loss's KL term alone: advantages 0, ratio 1, beta 1, the mean over response tokens."""
    zeros = torch.zeros(logp.shape[0])
    return grpo.grpo_loss(logp, logp.detach(), ref_logp, zeros, mask, beta=1.0, aggregation="token",
                          kl_estimator=estimator)


def test_kl_term_gradient_is_forward_kl_by_sampling():
    theta, ref_logits, ref_logp, logp, expect, grad, exact = grads_on_categorical()
    n = 50_000
    x = torch.multinomial(logp().exp().detach(), n, replacement=True,
                          generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, n)
    g = grad(lambda: kl_term(logp()[x][None], ref_logp[x][None], mask))
    # per-sample gradient (1 - pi_ref/pi)(onehot(x) - pi), for standard errors
    p = logp().exp().detach()
    per = (1 - (ref_logp - logp().detach()).exp()[x])[:, None] * (F.one_hot(x, 5) - p)
    se = per.std(0) / math.sqrt(n)
    assert ((g - exact["forward"]).abs() < 5 * se).all()
    assert ((g - exact["reverse"]).abs() > 10 * se).any()


def test_kl_term_masking():
    scores, logp, ref_logp, mask, logits, ref_logits = reward_batch()
    logp = logp.clone().requires_grad_()
    loss = kl_term(logp, ref_logp, mask)
    m = mask == 1
    expected = k3(logp[m], ref_logp[m]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(g).all() and torch.equal(g[~m], torch.zeros(int((~m).sum())))
    assert (g[m] != 0).all()
    assert kl_term(logp, ref_logp, torch.zeros_like(mask)).item() == 0.0
    # the estimator knob
    assert kl_term(logp, ref_logp, mask, "k1").item() == pytest.approx(k1(logp[m], ref_logp[m]).mean().item(),
                                                                        rel=1e-6)


def test_kl_term_gives_no_gradient_to_the_reference():
    """The reference is fixed: even a ref_logp that requires grad (computed without no_grad, or
    a trainable reference) gets no gradient from grpo_loss's KL term; logp gets all of it."""
    scores, logp, ref_logp, mask, logits, ref_logits = reward_batch()
    m = mask == 1
    logp = torch.where(m, logp, 0.0).requires_grad_()
    ref_logp = torch.where(m, ref_logp, 0.0).requires_grad_()
    for estimator in ("k1", "k2", "k3"):
        logp.grad = ref_logp.grad = None
        kl_term(logp, ref_logp, mask, estimator).backward()
        assert ref_logp.grad is None or torch.equal(ref_logp.grad, torch.zeros_like(ref_logp)), estimator
        assert logp.grad is not None and (logp.grad[m] != 0).all(), estimator
    # the gradient logp gets is the one of the estimator with the reference held constant
    logp.grad = None
    kl_term(logp, ref_logp, mask).backward()
    lr = (ref_logp - logp).detach()[m]
    torch.testing.assert_close(logp.grad[m], (1 - lr.exp()) / m.sum(), atol=1e-6, rtol=1e-5)


def trl_batch():
    """crafted_batch with the first answer's log-ratios 0.5, -0.5, 0.3: their mean is not their sum."""
    logp, old_logp, ref_logp, adv, mask = crafted_batch()
    old_logp[0, 3] = -0.8
    return logp, old_logp, ref_logp, adv, mask


def trl_loss_by_hand(loss_type, level, eps_high, beta=0.04, eps=0.2, budget=4):
    """TRL GRPOTrainer._compute_loss on crafted_batch, written out in plain Python: coef_1 =
    exp(log-ratio) per token, or per answer exp(mean log-ratio over its tokens) (GSPO); coef_2 =
    clamp(coef_1, 1 - eps, 1 + eps_high); l = -min(coef_1 A, coef_2 A) + beta * k3; then grpo
    (mean per answer, then over answers), bnpo / dapo with one minibatch (mean over tokens),
    dr_grpo (sum / (N * max_completion_length))."""
    logp, old_logp, ref_logp, adv, mask = (x.tolist() for x in trl_batch())
    losses, counts = [], []
    for i in range(2):
        tokens = [t for t in range(4) if mask[i][t]]
        log_ratios = [logp[i][t] - old_logp[i][t] for t in tokens]
        per_answer = []
        for t, lr in zip(tokens, log_ratios):
            coef_1 = math.exp(sum(log_ratios) / len(tokens) if level == "sequence" else lr)
            coef_2 = min(max(coef_1, 1 - eps), 1 + eps_high)
            d = ref_logp[i][t] - logp[i][t]
            per_answer.append(-min(coef_1 * adv[i], coef_2 * adv[i]) + beta * (math.exp(d) - d - 1))
        losses.append(per_answer)
        counts.append(len(tokens))
    if loss_type == "grpo":
        return sum(sum(l) / n for l, n in zip(losses, counts)) / 2
    if loss_type in ("bnpo", "dapo"):
        return sum(map(sum, losses)) / sum(counts)
    return sum(map(sum, losses)) / (2 * budget)  # dr_grpo


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "sequence"), ("bnpo", "token"),
                                                    ("dapo", "token"), ("dr_grpo", "constant")])
def test_grpo_loss_equals_trls_compute_loss(loss_type, aggregation, level, eps_high):
    """Each of TRL's loss types at both importance-sampling levels, with and without epsilon_high
    (plain k3, use_bias_correction_kl off), against grpo_loss's aggregation, ratio_level and
    clip_eps_high on the same inputs. The crafted batch has a ratio of e^0.5 with A > 0, so the
    upper clip binds and clip-higher moves the value."""
    logp, old_logp, ref_logp, adv, mask = trl_batch()
    loss = grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, 0.2, 0.04, aggregation,
                          clip_eps_high=eps_high, ratio_level=level, max_new_tokens=4)
    expected = trl_loss_by_hand(loss_type, level, 0.2 if eps_high is None else eps_high)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    if level == "token" and eps_high is not None:  # clip-higher does change the loss here
        assert expected != pytest.approx(trl_loss_by_hand(loss_type, level, 0.2), rel=1e-3)
    with pytest.raises(ValueError, match="ratio_level"):
        grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, ratio_level="answer")


# ----------------------------------------------------------------------------- DAPO's loop options

def tie_prone_score(enc):
    """1 for answers whose first token is even, for prompts starting "the"; 0 for every other prompt's
    answers: those groups always tie."""
    def score_fn(tokens, P):
        first = tokens[:, P]
        starts_the = torch.tensor([tok.encode(enc, "the")[0] in row.tolist() for row in tokens[:, :P]])
        return ((first % 2 == 0) & starts_the).float()
    return score_fn


@pytest.mark.parametrize("cap", [64, 0])
def test_dynamic_sampling_leaves_no_tied_group_when_the_cap_allows(enc, monkeypatch, cap):
    """train_grpo with dynamic_sampling: the batch optimise receives keeps its size, and with room in the
    cap has no group whose scores all tie (so no group of all-zero advantages); with cap 0 the batch is the
    first draw, ties and all, and the record counts them."""
    optimised = []
    spy(monkeypatch, grpo, "optimise", optimised)
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
    cfg = grpo.GRPOConfig(updates=3, rollouts=24, group_size=4, minibatch_size=12, max_new_tokens=4,
                          no_eos_score=None, dynamic_sampling=True, max_resampled=cap)
    _, history = grpo.train_grpo(policy, freeze(policy), tie_prone_score(enc), enc, PROMPTS * 4, cfg,
                                 log=lambda r: None)
    for (args, _), rec in zip(optimised, history):
        adv = args[1]["advantages"].view(-1, 4)
        assert adv.shape[0] == 6
        zero_groups = (adv.abs().amax(1) == 0).float().mean().item()
        assert rec["tied_groups"] > 0
        if cap:
            assert zero_groups == 0 and rec["tied_after"] == 0 and rec["resampled"] > 0
        else:
            assert zero_groups == pytest.approx(rec["tied_after"]) and rec["tied_after"] == rec["tied_groups"]
            assert rec["resampled"] == 0


def test_mask_unended_takes_unended_answers_out_of_the_loss_only(enc, monkeypatch):
    """mask_unended: the loss mask optimise receives is 0 on every unended answer's row, the same as the
    sampled mask elsewhere; the advantages still use the unended answers' scores."""
    samples, optimised = [], []
    spy(monkeypatch, rollout, "sample", samples)
    spy(monkeypatch, grpo, "optimise", optimised)
    policy = tiny_gpt(enc, 0, block_size=16, n_layer=1, eos_bias=2.0)
    cfg = grpo.GRPOConfig(updates=1, rollouts=16, group_size=4, minibatch_size=16, max_new_tokens=4,
                          no_eos_score=-7.0, mask_unended=True, advantage="none", kl_controller="fixed", beta=0.0)
    grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.full((t.shape[0],), 0.5), enc, PROMPTS * 4, cfg,
                    log=lambda r: None)
    ro, batch = samples[0][1], optimised[0][0][1]
    ended = ro["ended"]
    assert 0 < ended.sum() < len(ended)
    assert torch.equal(batch["mask"], ro["mask"] * ended[:, None])
    scores = torch.where(ended, 0.5, -7.0).view(-1, 4)
    assert torch.allclose(batch["advantages"], (scores - scores.mean(1, keepdim=True)).flatten())


def test_ptx_mixes_the_pretraining_loss_into_every_step(enc):
    """ptx_coef: with every advantage 0 and no KL the clipped objective has no gradient, so the policy moves
    only through ptx_coef * ptx_loss: the NLL of the pretraining text falls, and not at all without it
    (Adam's step of a zero gradient is zero; no weight decay on this path)."""
    text = tok.left_pad([tok.encode(enc, TEXTS[0])], tok.pad_id(enc))
    nll = lambda m: -token_logprobs(m, text).mean()
    after = {}
    for coef in (0.0, 1.0):
        policy = tiny_gpt(enc, 0, block_size=16, n_layer=1)
        before = nll(policy).item()
        cfg = grpo.GRPOConfig(updates=2, rollouts=8, group_size=4, minibatch_size=8, max_new_tokens=4,
                              kl_controller="fixed", beta=0.0, ptx_coef=coef, lr=1e-2)
        _, history = grpo.train_grpo(policy, freeze(policy), lambda t, P: torch.zeros(t.shape[0]), enc,
                                     PROMPTS, cfg, log=lambda r: None, ptx_loss=nll)
        after[coef] = nll(policy).item() - before
        assert ("ptx_loss" in history[-1]) == bool(coef)
    assert after[0.0] == pytest.approx(0.0, abs=1e-6) and after[1.0] < -0.1, after
