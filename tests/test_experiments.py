"""experiments.py: the reward model's diagnostics (rank correlation, ceilings, accuracy by kind
of pair, the blind spot), the DPO sweep's fresh start per beta, Gao et al.'s RL-form fit and the
KL-estimator demo."""
import json
import math

import numpy as np
import pytest
import torch

import tokenizer as tok
import world
from dpo import DPOConfig, encode_pairs, flatten_pairs
from experiments import (accuracy_by_kind, annotator_label_accuracy, blind_spot_edits, blind_spot_report,
                         d_log_d, dpo_sweep, fit_rl_form, kl_estimators, plot_reward_model, proxy_vs_gold,
                         kl_place_configs, rank_correlation)
import grpo
from helpers import tiny_gpt
from kl import full_kl
from model import ScalarModel
from reference import freeze

TEXTS = ["the film was good.", "the film was bad.", "i loved the cast!", "i hated the cast.",
         "the plot was not very good.", "the music was great but the acting was weak.",
         "it was great. i loved the cast. the music is good.", "it was awful."] * 10
PAIRS = [{"prompt": "the film", "chosen": " was good.", "rejected": " was bad."},
         {"prompt": "i", "chosen": " loved the cast!", "rejected": " hated the cast."},
         {"prompt": "the plot", "chosen": " was great.", "rejected": " was not very good."},
         {"prompt": "the music was", "chosen": " great.", "rejected": " weak but the acting was bad."}]


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def make_pair(prompt, a, b):
    return {"prompt": prompt, "chosen": a, "rejected": b,
            "gold_chosen": world.gold_reward(prompt + a), "gold_rejected": world.gold_reward(prompt + b)}


# ----------------------------------------------------------------------------- the reward model

def test_rank_correlation_on_hand_values():
    assert rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6*2/60
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert rank_correlation([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_annotator_label_accuracy_counts_the_bias_with_the_runs_tau():
    # at equal gold the "!" decides: the louder answer is the likely label, a tie counts half
    loud = [make_pair("it was", " great!", " great."), make_pair("it was", " great.", " great!"),
            make_pair("it was", " great.", " great.")]
    assert loud[0]["gold_chosen"] == loud[0]["gold_rejected"]
    assert annotator_label_accuracy(loud) == pytest.approx(0.5)  # 1 + 0 + 1/2
    assert annotator_label_accuracy(loud[:1]) == 1.0
    assert annotator_label_accuracy(loud[:1], bias=0.0) == 0.5  # no bias: a coin flip
    # gold 0.3 with "!" against gold 0.7: logit (0.3 - 0.7) / tau + 0.8 favours "!" only when tau > 0.5
    pair = [make_pair("it was", " decent!", " great.")]
    assert annotator_label_accuracy(pair, tau=0.25, bias=0.8) == 0.0
    assert annotator_label_accuracy(pair, tau=1.0, bias=0.8) == 1.0
    assert annotator_label_accuracy(pair, tau=1.0, bias=0.0) == 0.0


def test_accuracy_by_kind_splits_pairs_by_validity(monkeypatch):
    best, good, broken = " it ten out of ten.", " it seven out of ten.", " it ten ten."
    assert world.is_valid("i give" + good) and not world.is_valid("i give" + broken)
    pairs = [make_pair("i give", best, good), make_pair("i give", good, best),        # both valid
             make_pair("i give", best, broken), make_pair("i give", broken, good),    # one invalid
             make_pair("i give", broken, broken + " ten.")]                           # both invalid: left out

    def scored_by(f):  # a "reward model" that scores each text by f
        monkeypatch.setattr("reward.score_texts", lambda rm, enc, texts: list(map(f, texts)))
    # scored by gold, it gets exactly the gold-label ceiling of each kind
    scored_by(world.gold_reward)
    kinds = accuracy_by_kind(None, None, pairs)
    assert kinds["both valid"] == {"n": 2, "accuracy": 0.5, "gold_label_accuracy": 0.5}
    assert kinds["one invalid"] == {"n": 2, "accuracy": 0.5, "gold_label_accuracy": 0.5}
    # scored by the negated gold, it is wrong wherever gold is right
    scored_by(lambda t: -world.gold_reward(t))
    assert accuracy_by_kind(None, None, pairs[:3])["both valid"]["accuracy"] == 0.5
    assert accuracy_by_kind(None, None, pairs[2:3])["one invalid"]["accuracy"] == 0.0
    assert accuracy_by_kind(None, None, [])["both valid"]["n"] == 0


def test_blind_spot_edits_cost_gold_as_documented():
    base = "it was great. i loved the cast. the music is good."
    edits = blind_spot_edits(base)
    gold = {name: world.gold_reward(t) for name, t in edits.items()}
    assert all(world.is_valid(t) for t in edits.values())
    assert gold["1 x '!'"] == gold["original"]                     # one "!" is free
    assert gold["3 x '!'"] == pytest.approx(gold["original"] - 0.2)  # two more cost 0.1 each
    assert gold["best sentence repeated"] == pytest.approx(gold["original"] - 0.3)
    assert gold["neutral 4th sentence"] == pytest.approx(gold["original"] * 3 / 4)


def test_blind_spot_report_and_plot(enc, tmp_path):
    rm = ScalarModel(tiny_gpt(enc, block_size=64, n_layer=1), head_std=0.5).eval()
    bases = ["it was great. i loved the cast. the music is good.", "it was awful.",  # too short
             "the film was good. i loved the cast! it was great."]                     # has a "!"
    rows = blind_spot_report(rm, enc, bases)
    assert [r["n"] for r in rows] == [1] * 6 and rows[0]["edit"] == "original"
    assert rows[0]["d_proxy"] == 0 and rows[3]["d_gold"] == pytest.approx(-0.2)
    # a base whose edits do not fit the reward model's block is left out, not cut
    short = ScalarModel(tiny_gpt(enc, block_size=16, n_layer=1)).eval()
    assert blind_spot_report(short, enc, bases) == []
    texts = ["it was great.", "it was awful.", "it was graet.", "i loved the cast!"]
    pg = proxy_vs_gold(rm, enc, texts)
    assert pg["valid"] == [True, True, False, True] and pg["gold"][2] == -1.0
    path = tmp_path / "rm.png"
    plot_reward_model(pg, rows, str(path))
    assert path.stat().st_size > 10_000


# ----------------------------------------------------------------------------- DPO sweep

def exact_kl_on_pairs(policy, ref, enc):
    tokens, mask, _ = encode_pairs(enc, PAIRS, 32)
    t_, m_ = flatten_pairs(tokens, mask)
    with torch.no_grad():
        return (full_kl(policy(t_)[:, :-1], ref(t_)[:, :-1]) * m_).sum(1).mean().item()


def test_sweep_starts_every_beta_from_the_same_policy(enc):
    start = tiny_gpt(enc)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    ref = freeze(start)
    cfg = DPOConfig(sft_coef=0.0, epochs=20, batch_size=4, lr=3e-3, warmup=2, eval_every=1000)
    points = dpo_sweep(start, enc, PAIRS, [0.1, 1000.0], cfg, log=lambda r: None,
                       eval_fn=lambda m: {"kl": exact_kl_on_pairs(m, ref, enc)}, val_pairs=PAIRS)
    assert [p["beta"] for p in points] == [0.1, 1000.0]
    assert all(torch.equal(v, before[k]) for k, v in start.state_dict().items())
    assert points[1]["kl"] < points[0]["kl"] and points[0]["implicit_accuracy"] == 1.0


# ----------------------------------------------------------------------------- overoptimization

def test_rl_form_fit_recovers_alpha_beta_and_its_peak():
    alpha, beta = 0.3, 0.15
    d = np.concatenate([[0.0], np.linspace(0.2, 6.0, 15)])  # the SFT point first, as in overopt
    assert d_log_d([0.0, 1.0, math.e]).tolist() == pytest.approx([0.0, 0.0, math.e])  # 0 log 0 = 0
    gain = d * alpha - beta * d_log_d(d)
    assert fit_rl_form(d, gain) == pytest.approx((alpha, beta), abs=1e-9)
    noisy = gain + np.random.default_rng(0).normal(0, 0.005, len(d))
    assert fit_rl_form(d, noisy) == pytest.approx((alpha, beta), abs=0.02)
    # the form peaks at d = exp(alpha / beta - 1)
    grid = np.linspace(0.01, 10, 100_000)
    peak = grid[np.argmax(grid * alpha - beta * d_log_d(grid))]
    assert peak == pytest.approx(math.exp(alpha / beta - 1), rel=1e-3)


# ----------------------------------------------------------------------------- KL estimators

def test_kl_demo_without_a_run_uses_a_random_gpt(tmp_path):
    rows = kl_estimators(str(tmp_path), n=16, lengths=(4, 8))
    assert {(r["max_new"], r["estimator"]) for r in rows} == {(L, e) for L in (4, 8)
                                                              for e in ("k1", "k2", "k3", "full")}
    assert all(r["length"] == r["max_new"] for r in rows)  # no EOS can be sampled: full length
    assert all(r["seq_mean"] > 0 for r in rows if r["estimator"] == "full")
    assert all(r["seq_negative"] == 0 for r in rows if r["estimator"] in ("k2", "k3", "full"))
    assert (tmp_path / "plots" / "kl_estimators.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "kl.json").read_text())["rows"] == rows


def test_forward_kl_is_the_reference_to_policy_direction_on_reference_samples(enc):
    """forward_kl: 0 for the reference itself; else the exact KL(pi_ref || pi) per position (the
    reference's distribution first), summed over the answers the reference itself sampled."""
    from experiments import forward_kl
    from reference import response_mask, token_logprobs
    ref, policy = freeze(tiny_gpt(enc, 0)), tiny_gpt(enc, 1)
    with torch.no_grad():  # sharper than a fresh init: the two directions then differ clearly
        for p in policy.parameters():
            p.mul_(4)
    data = {"eval_prompts": ["the film", "i", "the music was"] * 4}
    env = dict(enc=enc, device="cpu", dtype="fp32", ref=ref, data=data, max_new=8)
    assert forward_kl(env, ref) == pytest.approx(0.0, abs=1e-6)
    value = forward_kl(env, policy)
    tokens, P = env["ref_samples"]
    pad = tok.pad_id(enc)
    mask = response_mask(tokens, P, pad)
    _, logits = token_logprobs(policy, tokens, pad, return_logits=True)
    _, ref_logits = token_logprobs(ref, tokens, pad, return_logits=True)
    by_hand = (full_kl(ref_logits, logits) * mask).sum(1).mean().item()  # reverse=True with ref first
    other_way = (full_kl(logits, ref_logits) * mask).sum(1).mean().item()
    assert value == pytest.approx(by_hand, rel=1e-5) and value > 0.01
    assert abs(value - other_way) > 0.05 * value  # the two directions differ: the test can tell them apart
    assert mask.sum(1).min() > 0  # every sampled answer has tokens


def test_klplace_prices_a_nat_alike_in_every_group():
    """klplace's KL-in-the-reward arm: a group's advantages move with beta, a nat costs beta in a
    group whose scores tie and in one whose scores spread (a std scale would price it beta / std,
    and give a tied group the same advantages at every beta: scores [-2] * 4, KL [1, 3, 2, 6])."""
    seq_kl = torch.tensor([1.0, 3.0, 2.0, 6.0])
    logp, ref_logp, mask = seq_kl[:, None], torch.zeros(4, 1), torch.ones(4, 1)
    kl_part = lambda beta: -beta * (seq_kl - seq_kl.mean())
    configs = kl_place_configs(grpo.GRPOConfig(group_size=4), [0.01, 0.3, 1.0])
    assert [c.kl_loss_estimator for c in configs["k2 in the loss"]] == ["k2"] * 3
    for cfg in configs["k1 in the reward (RLOO, PPO)"]:
        tied = torch.full((4,), -2.0)
        spread = torch.tensor([-2.0, 0.0, 1.0, 3.0])
        for scores in (tied, spread):
            adv = grpo.advantages(scores, logp, ref_logp, mask, cfg.beta, cfg)
            assert torch.allclose(adv - (scores - scores.mean()), kl_part(cfg.beta), atol=1e-6)
