"""dpo.py: the losses by hand, DPO's population optimum on a bandit is pi_ref * exp(r / beta),
a large beta keeps the policy at the reference, the chosen reward can fall while the margin
grows, and the data / training plumbing (one forward for both sides, precomputed reference)."""
import copy
import math
from dataclasses import replace

import pytest
import torch

import tokenizer as tok
from dpo import (DPOConfig, dpo_loss, dpo_step, encode_pairs, flatten_pairs, implicit_accuracy, pair_logps,
                 sequence_logps, train_dpo)
from helpers import tiny_gpt
from kl import full_kl
from reference import freeze, response_mask, token_logprobs
from sft import lr_at

LOG2 = math.log(2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------------- the losses by hand

def test_sigmoid_loss_and_rewards_by_hand():
    # chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1: h = 2, beta h = 1
    losses, rc, rr = dpo_loss(t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5)
    assert torch.allclose(losses, t(math.log1p(math.exp(-1)), LOG2), atol=1e-6)  # -log sigmoid(1); h=0 -> log 2
    assert torch.allclose(rc, t(0.5, 0.0)) and torch.allclose(rr, t(-0.5, 0.0))


def test_label_smoothing_by_hand_and_its_finite_optimum():
    eps = 0.1
    losses, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=eps)
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1), and log(1 + e) = 1 + log(1 + e^-1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)) + eps, abs=1e-6)
    # conservative DPO stops pushing at beta h = log((1 - eps) / eps): zero gradient there
    beta = 0.5
    h = torch.tensor([math.log((1 - eps) / eps) / beta], requires_grad=True)
    loss, _, _ = dpo_loss(h, t(0.0), t(0.0), t(0.0), beta, label_smoothing=eps)
    loss.sum().backward()
    assert abs(h.grad.item()) < 1e-6
    # ...while plain DPO still pushes there
    h.grad = None
    dpo_loss(h, t(0.0), t(0.0), t(0.0), beta)[0].sum().backward()
    assert h.grad.item() < -0.01


def test_ipo_loss_by_hand():
    # h = 2: (2 - 1/(2*0.5))^2 = 1; (2 - 1/(2*0.25))^2 = 0 (the margin is at its target)
    for beta, expected in ((0.5, 1.0), (0.25, 0.0), (1.0, 2.25)):
        losses, rc, rr = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta, loss_type="ipo")
        assert losses.item() == pytest.approx(expected, abs=1e-6)
        assert rc.item() == pytest.approx(beta) and rr.item() == pytest.approx(-beta)


def test_ipo_per_token_averages_the_log_ratios():
    """With lengths, IPO's margin is in nats per token: chosen log-ratio 4 over 4 tokens, rejected
    -2 over 2 tokens gives h = 1 - (-1) = 2; summed, h = 6 and the same beta asks for more."""
    args = t(-1.0), t(-4.0), t(-5.0), t(-2.0)
    per_token, rc, rr = dpo_loss(*args, 0.5, "ipo", chosen_lengths=t(4.0), rejected_lengths=t(2.0))
    assert per_token.item() == pytest.approx((2 - 1) ** 2, abs=1e-6)
    assert rc.item() == pytest.approx(0.5 * 4) and rr.item() == pytest.approx(0.5 * -2)  # rewards: whole answers
    summed, _, _ = dpo_loss(*args, 0.5, "ipo")
    assert summed.item() == pytest.approx((6 - 1) ** 2, abs=1e-6)


def test_bad_arguments_raise():
    x = t(0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, 0.1, loss_type="hinge-ish")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(x, x, x, x, 0.1, chosen_lengths=t(1.0), rejected_lengths=t(1.0))


def test_rewards_are_detached_and_loss_is_fp32():
    pc = torch.tensor([-3.0], dtype=torch.bfloat16, requires_grad=True)
    losses, rc, rr = dpo_loss(pc, t(-4.0), t(-3.5), t(-3.5), 0.1)
    assert losses.dtype == torch.float32 and losses.requires_grad
    assert not rc.requires_grad and not rr.requires_grad


# ----------------------------------------------------------------------------- the bandit

R = t(1.0, 0.5, 0.0, -0.3, -1.0, 2.0)                 # the known reward of 6 responses
REF_LOGP = torch.log_softmax(t(0.5, 1.0, 0.0, -0.5, 0.3, -1.0), 0)


def population_dpo_policy(beta, loss_type="sigmoid"):
    """Minimise the expected DPO loss over all pairs (y1, y2) ~ pi_ref x pi_ref, y1 labelled
    chosen with the Bradley-Terry probability sigmoid(r1 - r2), over a tabular policy."""
    K = len(R)
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    i, j = i.flatten(), j.flatten()
    weight = (REF_LOGP[i] + REF_LOGP[j]).exp() * torch.sigmoid(R[i] - R[j])  # P(y1=i, y2=j, i wins)
    logits = REF_LOGP.clone().requires_grad_(True)  # start at the reference
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=100, tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(logits, 0)
        losses, _, _ = dpo_loss(logp[i], logp[j], REF_LOGP[i], REF_LOGP[j], beta, loss_type)
        loss = (weight * losses).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(logits.detach(), 0)


def kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum().item()


@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
def test_population_dpo_recovers_the_kl_regularised_optimum(beta):
    """pi* = pi_ref * exp(r / beta) / Z (Rafailov et al. 2023, eq. 4) is where the
    population DPO loss is smallest: beta * log(pi / pi_ref) is then r plus a constant."""
    target = torch.log_softmax(REF_LOGP + R / beta, 0)
    logp = population_dpo_policy(beta)
    assert kl(target, logp) <= 1e-6
    implicit = beta * (logp - REF_LOGP)
    assert torch.allclose(implicit - implicit.mean(), R - R.mean(), atol=1e-3)
    assert kl(target, REF_LOGP) > 1e-3  # and it really moved away from the reference


def test_large_beta_keeps_the_population_optimum_at_the_reference():
    kls = {beta: kl(population_dpo_policy(beta), REF_LOGP) for beta in (0.25, 1000.0)}
    assert kls[1000.0] < 1e-5 < 0.1 < kls[0.25]


def test_chosen_reward_falls_while_the_margin_grows():
    """Three responses whose logits share one weight w: logit = w * n, n = number of "!"
    (chosen a: 1, rejected b: 2, never compared c: 0). DPO lowers w; probability leaves
    both compared responses for c, the rejected one faster, so the chosen implicit
    reward goes negative while the margin and the accuracy rise."""
    n_exclaim = t(1.0, 2.0, 0.0)
    w = torch.zeros(1, requires_grad=True)  # w = 0: the reference is uniform
    ref_logp = torch.log_softmax(w.detach() * n_exclaim, 0)
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(20):
        logp = torch.log_softmax(w * n_exclaim, 0)
        losses, rc, rr = dpo_loss(logp[:1], logp[1:2], ref_logp[:1], ref_logp[1:2], beta=1.0)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    assert losses.item() < 0.5 * LOG2          # training succeeded...
    assert (rc - rr).item() > 1.0              # ...the margin grew...
    assert rc.item() < -0.2                    # ...yet the chosen response lost probability
    assert logp[2].exp().item() > 0.8          # (it went to the response nobody rated)


# ----------------------------------------------------------------------------- data and training

TEXTS = ["the film was good.", "the film was bad.", "i loved the cast!", "i hated the cast.",
         "the plot was not very good.", "the music was great but the acting was weak."] * 10
PAIRS = [{"prompt": "the film", "chosen": " was good.", "rejected": " was bad.", "id": 0},
         {"prompt": "i", "chosen": " loved the cast!", "rejected": " hated the cast."},
         {"prompt": "the plot", "chosen": " was great.", "rejected": " was not very good."},
         {"prompt": "the music was", "chosen": " great.", "rejected": " weak but the acting was bad."}]


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def test_pairs_encode_prompt_completion_eos_and_mask_the_completion(enc):
    tokens, mask, dropped = encode_pairs(enc, PAIRS, 32)
    assert dropped == 0 and tokens.shape[:2] == (4, 2) and mask.shape == (4, 2, tokens.shape[2] - 1)
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    for i, pair in enumerate(PAIRS):
        p = tok.encode(enc, pair["prompt"])
        for j, key in enumerate(("chosen", "rejected")):
            c = tok.encode(enc, pair[key]) + [eos]
            row = tokens[i, j].tolist()
            assert row[:len(p) + len(c)] == p + c and set(row[len(p) + len(c):]) <= {pad}
            assert [x for x, m in zip(row[1:], mask[i, j].tolist()) if m] == c
    long = {"prompt": "the film", "chosen": " was good." * 20, "rejected": " was bad."}
    assert encode_pairs(enc, PAIRS + [long], 32)[2] == 1


def test_one_forward_for_both_sides_matches_separate_forwards(enc):
    model = tiny_gpt(enc)
    tokens, mask, _ = encode_pairs(enc, PAIRS, 32)
    flat_tokens, flat_mask = flatten_pairs(tokens, mask)
    both = sequence_logps(model, flat_tokens, flat_mask)
    for j in (0, 1):  # chosen rows first, then rejected rows
        alone = sequence_logps(model, tokens[:, j], mask[:, j])
        assert torch.allclose(both[4 * j:4 * j + 4], alone, atol=1e-5)
    ref = pair_logps(model, tokens, mask, batch_size=3)  # batches that split a pair
    assert ref.shape == (4, 2) and torch.allclose(ref, both.view(2, 4).T, atol=1e-5)
    # flatten_pairs cuts the padding columns after the batch's last response token
    assert flat_tokens.shape[1] == int(mask.sum((0, 1)).nonzero().max()) + 2 <= tokens.shape[2]


def test_train_dpo_learns_its_pairs_and_reports(enc):
    policy = tiny_gpt(enc)
    records, calls = [], []
    cfg = DPOConfig(beta=0.5, sft_coef=0.0, epochs=30, batch_size=4, lr=3e-3, warmup=2, eval_every=20, log_every=5)
    _, hist = train_dpo(policy, None, enc, PAIRS, cfg, log=records.append,
                        eval_fn=lambda m: calls.append(1) or {"gold_reward": 0.5}, val_pairs=PAIRS)
    first, last = records[0], records[-1]
    # at step 0 the policy is the reference: every log-ratio is 0, the loss is log 2
    assert first["loss"] == pytest.approx(LOG2, abs=1e-5) and abs(first["margin"]) < 1e-5
    assert last["loss"] < 0.2 and last["margin"] > 2.0 and last["accuracy"] == 1.0
    assert hist["implicit_accuracy"] == 1.0 and len(calls) == 2  # step 19 and the last step
    assert last["eval_gold_reward"] == 0.5 and hist["eval"] == {"gold_reward": 0.5}
    assert "gold_reward" not in last and "val_accuracy" in last and "val_accuracy" not in first
    for key in ("stage", "step", "loss", "chosen_reward", "rejected_reward", "margin", "accuracy",
                "pairs_per_s", "eta_s"):
        assert key in first
    assert first["stage"] == "dpo" and last["step"] == 29


def exact_kl_on_pairs(policy, ref, enc):
    tokens, mask, _ = encode_pairs(enc, PAIRS, 32)
    t_, m_ = flatten_pairs(tokens, mask)
    with torch.no_grad():
        return (full_kl(policy(t_)[:, :-1], ref(t_)[:, :-1]) * m_).sum(1).mean().item()


def test_large_beta_keeps_a_trained_gpt_near_the_reference(enc):
    """Same data, steps and lr; only beta differs. With a huge beta the loss saturates as
    soon as the policy has moved a little, so it stops; a small beta keeps pushing."""
    kls = {}
    for beta in (0.1, 1000.0):
        policy = tiny_gpt(enc)
        ref = freeze(policy)
        cfg = DPOConfig(beta=beta, sft_coef=0.0, epochs=40, batch_size=4, lr=3e-3, warmup=2, eval_every=1000)
        train_dpo(policy, ref, enc, PAIRS, cfg, log=lambda r: None)
        kls[beta] = exact_kl_on_pairs(policy, ref, enc)
    assert kls[1000.0] < 0.1 * kls[0.1]


def test_max_steps_trains_on_a_random_subset_only(enc):
    cfg = DPOConfig(sft_coef=0.0, epochs=1, steps=1, batch_size=2, eval_every=1000)
    _, hist = train_dpo(tiny_gpt(enc), None, enc, PAIRS, cfg, log=lambda r: None)
    assert hist["n_pairs"] == 2 and hist["epochs"] == 0.5 and len(hist["records"]) == 1


def test_sft_coef_adds_the_chosen_nll_per_token(enc):
    from sft import masked_nll
    model = tiny_gpt(enc)
    tokens, mask, _ = encode_pairs(enc, PAIRS, 32)
    with torch.no_grad():
        nll = masked_nll(model, tokens[:, 0], mask[:, 0]).item()  # SFT's loss on the chosen side
    records = []
    cfg = DPOConfig(sft_coef=0.5, steps=1, batch_size=4, eval_every=1000)
    train_dpo(model, None, enc, PAIRS, cfg, log=records.append)
    assert records[0]["chosen_nll"] == pytest.approx(nll, abs=1e-5)
    assert records[0]["loss"] == pytest.approx(LOG2 + 0.5 * nll, abs=1e-5)


def test_implicit_accuracy_counts_pairs_the_policy_ranks_right(enc):
    ref = tiny_gpt(enc)
    tokens, mask, _ = encode_pairs(enc, PAIRS, 32)
    ref_logps = pair_logps(ref, tokens, mask)
    # at the reference every log-ratio is 0: no pair is ranked right (ties do not count)
    assert implicit_accuracy(ref, tokens, mask, ref_logps) == 0.0
    # against shifted reference log-probs the ranking is known: chosen ratio +1 or -1
    shift = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.0, 0.0]])
    assert implicit_accuracy(ref, tokens, mask, ref_logps + shift) == pytest.approx(0.5)


def test_sources_policy_keeps_the_policys_own_pairs(enc):
    world_pairs = [dict(p, source="world") for p in PAIRS]
    cfg = DPOConfig(sft_coef=0.0, steps=1000, epochs=1, batch_size=2, eval_every=1000)
    _, hist = train_dpo(tiny_gpt(enc), None, enc, PAIRS[:2] + world_pairs, cfg, log=lambda r: None)
    assert hist["n_pairs"] == 2  # the two without a source count as the policy's
    _, hist = train_dpo(tiny_gpt(enc), None, enc, PAIRS[:2] + world_pairs, replace(cfg, sources="all"),
                        log=lambda r: None)
    assert hist["n_pairs"] == 6
    with pytest.raises(ValueError, match="sources"):
        train_dpo(tiny_gpt(enc), None, enc, PAIRS, replace(cfg, sources="mine"), log=lambda r: None)
