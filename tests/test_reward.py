"""reward.py: the Bradley-Terry loss, reading the score at EOS, normalisation, the preference
data and the reward model learning a preference it can see."""
import math
import random
from dataclasses import replace

import pytest
import torch

import helpers
import tokenizer as tok
import world
from model import ScalarModel
from reward import (RewardConfig, bt_loss, encode_pairs, gold_label_accuracy, label_group, make_preferences,
                    normalize, pair_scores, score, score_rows, score_texts, splice, split_pairs,
                    train_reward_model)

FILLER = "the film plot cast music was is a bit very i we it".split()
TEXTS = ["the film was good.", "i loved the cast!", "the plot was not very good.",
         "the music was bad but the acting was great.", "it was great.", "it was awful."] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS + [" ".join(FILLER)] * 5, 300)


def tiny_gpt(enc, seed=0, block_size=32):
    return helpers.tiny_gpt(enc, seed, block_size, n_layer=1)


def make_pair(prompt, a, b):
    return {"prompt": prompt, "chosen": a, "rejected": b,
            "gold_chosen": world.gold_reward(prompt + a), "gold_rejected": world.gold_reward(prompt + b)}


# ---------------------------------------------------------------- the loss

def test_bt_loss_and_gradient_on_hand_values():
    # equal rewards: loss log 2, and d loss / d r_chosen = -sigmoid(0) / N = -1/2 per pair
    rc = torch.zeros(4, requires_grad=True)
    rr = torch.zeros(4, requires_grad=True)
    loss, acc = bt_loss(rc, rr)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert acc.item() == 0.5  # ties count half
    assert torch.allclose(rc.grad, torch.full((4,), -0.5 / 4))
    assert torch.allclose(rr.grad, torch.full((4,), 0.5 / 4))
    # margin log 3: P(chosen) = 3/4, loss log(4/3), gradient -(1 - 3/4) = -1/4
    rc = torch.tensor([math.log(3)], requires_grad=True)
    loss, acc = bt_loss(rc, torch.zeros(1))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4 / 3))
    assert rc.grad.item() == pytest.approx(-0.25)
    assert acc.item() == 1.0
    # a huge wrong margin stays finite (logsigmoid, not log(sigmoid))
    loss, acc = bt_loss(torch.tensor([-200.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((200 + math.log1p(math.exp(-1))) / 2, rel=1e-5)
    assert acc.item() == 0.5


# ---------------------------------------------------------------- read at EOS, never at PAD

def test_score_is_read_at_eos_not_at_pad(enc):
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    a = tok.encode(enc, "it was great.") + [eos]
    b = tok.encode(enc, "the film was good. i loved the cast!") + [eos]
    T = len(b) + 3
    tokens = torch.tensor([a + [pad] * (T - len(a)), b + [pad] * (T - len(b))])
    with torch.no_grad():
        s = score(rm, tokens, pad)
        values = rm(tokens, tokens != pad)
    # read at the EOS positions, not at the last column (PAD)
    assert torch.equal(s, torch.stack([values[0, len(a) - 1], values[1, len(b) - 1]]))
    with torch.no_grad():
        alone = [rm(torch.tensor([row]))[0, -1] for row in (a, b)]  # each text, no padding at all
        more_pad = score(rm, torch.cat([tokens, torch.full((2, 5), pad)], 1), pad)
    assert torch.allclose(s, torch.stack(alone), atol=1e-5)
    assert torch.allclose(s, more_pad, atol=1e-6)
    # a left-padded prompt (positions shifted by the mask) scores like the unpadded text
    left = torch.tensor([[pad, pad] + a])
    with torch.no_grad():
        assert score(rm, left, pad).item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_score_texts_in_any_order_and_chunk(enc):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    texts = ["it was great.", "the film was good. i loved the cast!", "it was awful.", "i loved the cast!"]
    together = score_texts(rm, enc, texts, chunk=2)
    one_by_one = [score_texts(rm, enc, [t])[0] for t in texts]
    assert isinstance(together, list) and together == pytest.approx(one_by_one, abs=1e-5)
    # each is the score read at the EOS of prompt-less text + EOS
    with torch.no_grad():
        direct = rm(torch.tensor([tok.encode(enc, texts[1]) + [tok.eos_id(enc)]]))[0, -1].item()
    assert together[1] == pytest.approx(direct, abs=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        score_texts(rm, enc, ["the film was good." * 20])


def test_score_rows_equals_score_of_the_whole_batch(enc):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    texts = ["it was great.", "the film was good. i loved the cast!", "it was awful.", "i loved the cast!", "it"]
    tokens, _, _ = tok.encode_batch(enc, [""] * len(texts), texts, 32)
    with torch.no_grad():
        torch.testing.assert_close(score_rows(rm, tokens, tok.pad_id(enc), chunk=2),
                                   score(rm, tokens, tok.pad_id(enc)), atol=1e-5, rtol=1e-5)


def test_score_rows_of_no_rows_is_empty_not_a_crash(enc):
    """More ranks than rows (normalize's rows, the accuracy's pairs) leave a rank with none:
    score_rows gives an empty fp32 (0,) on the rows' device, and BT on no pairs gives 0."""
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    pad, none = tok.pad_id(enc), torch.zeros(0, dtype=torch.long)
    for device in ("cpu", "meta"):
        no_rows = torch.full((0, 8), pad, device=device)
        with torch.no_grad():
            scores = score_rows(rm, no_rows, pad)
        assert scores.shape == (0,) and scores.dtype == torch.float32
        assert scores.device == no_rows.device
    with torch.no_grad():
        r_chosen, r_rejected = pair_scores(rm, torch.full((3, 8), pad), none, none, pad)
    assert r_chosen.shape == r_rejected.shape == (0,)
    assert [x.item() for x in bt_loss(r_chosen, r_rejected)] == [0.0, 0.0]


# ---------------------------------------------------------------- normalisation

def test_normalize_gives_mean_0_std_1_on_its_texts(enc):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    texts = list(dict.fromkeys(TEXTS))
    tokens, _, _ = tok.encode_batch(enc, [""] * len(texts), texts, 32)
    raw = torch.tensor(score_texts(rm, enc, texts))
    raw_mean, raw_std = normalize(rm, tokens, tok.pad_id(enc))
    assert raw_mean == pytest.approx(raw.mean().item(), abs=1e-5) and raw_std == pytest.approx(raw.std().item())
    r = torch.tensor(score_texts(rm, enc, texts))
    assert r.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert r.std().item() == pytest.approx(1.0, abs=1e-5)
    assert rm.gain.item() == pytest.approx(1 / raw_std) and raw_std > 0
    normalize(rm, tokens, tok.pad_id(enc))  # normalising twice changes nothing: it starts from raw scores
    assert torch.tensor(score_texts(rm, enc, texts)).std().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- preference data

def test_gold_label_accuracy_on_hand_pairs():
    best, worst = " it ten out of ten.", " it one out of ten."  # gold 1.0 and -1.0
    pairs = [make_pair("i give", best, worst),      # gold agrees: 1
             make_pair("i give", worst, best),      # gold disagrees: 0
             make_pair("i give", best, best + "")]  # a tie: 1/2
    assert gold_label_accuracy(pairs) == pytest.approx(0.5)
    assert gold_label_accuracy(pairs[:1]) == 1.0
    # texts that differ only in "!" (one is free) tie on gold
    loud = [make_pair("it was", " great!", " great."), make_pair("it was", " great.", " great!"),
            make_pair("it was", " great.", " great.")]
    assert loud[0]["gold_chosen"] == loud[0]["gold_rejected"]
    assert gold_label_accuracy(loud) == pytest.approx(0.5)  # all ties: the gold reward cannot tell


def test_split_pairs_keeps_each_prompt_on_one_side():
    pairs = [make_pair(f"p{i}", " a.", " b.") for i in range(10) for _ in range(3)]
    train, val = split_pairs(pairs, 0.2)
    assert len(val) == 6 and len(train) == 24
    assert {p["prompt"] for p in val} == {"p0", "p1"}
    assert not {p["prompt"] for p in val} & {p["prompt"] for p in train}


def test_encode_pairs_stores_each_text_once_and_ends_it_with_eos(enc):
    pairs = [make_pair("it was", " great.", " awful."), make_pair("it was", " great.", " good."),
             make_pair("it was", " great.", " good." * 30)]  # too long for the block: left out
    tokens, chosen, rejected, kept = encode_pairs(enc, pairs, 32)
    assert kept == pairs[:2]
    assert tokens.shape[0] == 3 and chosen.tolist() == [0, 0] and rejected.tolist() == [1, 2]
    pad, eos = tok.pad_id(enc), tok.eos_id(enc)
    for row, text in zip(tokens.tolist(), ("it was great.", "it was awful.", "it was good.")):
        ids = tok.encode(enc, "it was") + tok.encode(enc, text[len("it was"):]) + [eos]
        assert row == ids + [pad] * (len(row) - len(ids))
    # pair_scores scores each text once and hands back both sides
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    with torch.no_grad():
        rc, rr = pair_scores(rm, tokens, chosen, rejected, pad)
        each = score(rm, tokens, pad)
    torch.testing.assert_close(rc, each[chosen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rr, each[rejected], atol=1e-5, rtol=1e-5)


def test_label_group_labels_every_pair_with_the_configured_annotator():
    texts = ["it was great.", "it was awful.", "it was good.", "it was good!"]
    # near-noiseless annotators without the "!" bias follow the gold reward
    calm = RewardConfig(annotator_tau=1e-3, annotator_bias=0.0)
    pairs = label_group("it was", texts + ["it was great."], random.Random(0), "policy", calm)
    assert len(pairs) == 6  # 4 distinct texts: 4 choose 2; the twin is collapsed
    for p in pairs:
        assert p["source"] == "policy" and p["prompt"] == "it was"
        assert p["gold_chosen"] == world.gold_reward("it was" + p["chosen"])
        if p["gold_chosen"] != p["gold_rejected"]:
            assert p["gold_chosen"] > p["gold_rejected"]
    # with a strong bias, an extra "!" wins against the same text without it
    loud = RewardConfig(annotator_tau=1e-3, annotator_bias=50.0)
    for seed in range(5):
        (p,) = label_group("it was", ["it was good.", "it was good!"], random.Random(seed), "world", loud)
        assert p["chosen"] == " good!" and p["source"] == "world"
    # gold_fn replaces the world's reward: here one that prefers the shorter text
    (p,) = label_group("it was", ["it was good.", "it was great fun."], random.Random(0), "policy", calm,
                       gold_fn=lambda t: -len(t))
    assert p["chosen"] == " good." and p["gold_chosen"] == -len("it was good.")


def test_splice_joins_a_head_to_another_reviews_tail():
    rng = random.Random(0)
    a, b = "the plot was great. i loved it.".split(" "), "what a mess. we hated the film.".split(" ")
    ways = {" ".join(a[:cut] + b[j:]) for cut in range(3, len(a)) for j in range(1, len(b))}
    seen = {splice(" ".join(a), " ".join(b), rng) for _ in range(300)}
    assert seen <= ways and len(seen) > len(ways) // 2  # the first 3+ words of a, then b's tail


def test_make_preferences_is_deterministic_and_well_formed(enc):
    policy = helpers.tiny_gpt(enc, block_size=24, n_layer=1, eos_bias=6.0)
    prompts = ["it was", "the film", "i loved"]
    cfg = RewardConfig(n_prompts=2, samples_per_prompt=3, world_groups=0, sample_batch=4)
    pairs, n_unended = make_preferences(policy, enc, prompts, cfg, "cpu", seed=1)
    assert (pairs, n_unended) == make_preferences(policy, enc, prompts, cfg, "cpu", seed=1)
    assert pairs != make_preferences(policy, enc, prompts, cfg, "cpu", seed=2)[0]
    assert 1 <= len(pairs) <= 2 * 3  # up to 3 choose 2 per prompt; identical twins are dropped
    with_world, _ = make_preferences(policy, enc, prompts, replace(cfg, world_groups=2, world_slips=0.0), "cpu",
                                     seed=1)
    assert with_world[:len(pairs)] == pairs and len(with_world) >= len(pairs) + 2
    for p in with_world[len(pairs):]:
        assert p["source"] == "world" and world.is_valid(p["prompt"] + p["chosen"])
        assert len(p["prompt"].split()) == 2 and p["chosen"].startswith(" ")
    slipped, _ = make_preferences(policy, enc, prompts, replace(cfg, world_groups=20, world_slips=1.0), "cpu",
                                  seed=1)
    texts = [p["prompt"] + p[side] for p in slipped[len(pairs):] for side in ("chosen", "rejected")]
    assert sum(not world.is_valid(t) for t in texts) > 0.6 * len(texts)  # a slip is usually invalid...
    for p in slipped[len(pairs):]:  # ...and is labelled by its gold reward like any text
        assert p["gold_chosen"] == world.gold_reward(p["prompt"] + p["chosen"])
    for p in pairs:
        assert p["source"] == "policy"
        assert p["prompt"] in prompts[:2] and p["chosen"] != p["rejected"]
        assert p["gold_chosen"] == world.gold_reward(p["prompt"] + p["chosen"])
        assert p["gold_rejected"] == world.gold_reward(p["prompt"] + p["rejected"])
    # a user's gold_fn labels the policy's answers and there is no world to add
    mine, _ = make_preferences(policy, enc, prompts, replace(cfg, world_groups=5), "cpu", seed=1,
                               gold_fn=lambda t: float(len(t)))
    assert len(mine) == len(pairs) and all(p["gold_chosen"] == len(p["prompt"] + p["chosen"]) for p in mine)


def test_make_preferences_leaves_out_answers_without_eos(enc):
    """An answer cut off by the length budget is not a finished answer: it is in no pair, and
    n_unended counts it."""
    policy = helpers.tiny_gpt(enc, block_size=24, n_layer=1, eos_bias=3.2)
    prompts = ["it was", "the film", "i loved", "the plot"]
    cfg = RewardConfig(n_prompts=4, samples_per_prompt=6, world_groups=0, sample_batch=7)
    pairs, n_unended = make_preferences(policy, enc, prompts, cfg, "cpu", seed=3)
    # the same draws, by hand: the answers, and which of them ended
    repeated = [p for p in prompts for _ in range(6)]
    gen, pad, answers = torch.Generator().manual_seed(3), tok.pad_id(enc), []
    for i in range(0, len(repeated), 7):
        ids = tok.left_pad([tok.encode(enc, p) for p in repeated[i:i + 7]], pad)
        tokens, _ = policy.generate(ids, 24 - ids.shape[1], tok.eos_id(enc), pad, generator=gen)
        texts, ended = tok.decode_responses(enc, tokens, ids.shape[1])
        answers += [(repeated[i + j], a, e) for j, (a, e) in enumerate(zip(texts, ended))]
    ended = {(p, a) for p, a, e in answers if e}
    unended = {(p, a) for p, a, e in answers if not e}
    assert n_unended == sum(not e for _, _, e in answers) > 0 and ended
    used = {(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")}
    assert used == ended - {(p, a) for p, a in ended if sum(q == p for q, _ in ended) < 2}
    assert not used & (unended - ended)


# ---------------------------------------------------------------- learning

def test_reward_model_learns_a_separable_preference(enc):
    """Annotators here always prefer the text with "great" to the one with "awful"."""
    rng = random.Random(0)
    pairs = []
    prompts = [f"{a} {b}" for a in FILLER for b in FILLER]
    rng.shuffle(prompts)
    for prompt in prompts[:60]:
        for _ in range(2):
            fill = " ".join(rng.choices(FILLER, k=rng.randint(1, 4)))
            pairs.append(make_pair(prompt, f" {fill} great.", f" {fill} awful."))
    cfg = RewardConfig(steps=40, batch_size=8, lr=3e-3, eval_every=20, val_fraction=0.2)
    logs = []
    rm, metrics = train_reward_model(tiny_gpt(enc), enc, pairs, cfg, "cpu", log=logs.append)
    assert metrics["val_accuracy"] == 1.0 and metrics["train_accuracy"] == 1.0
    assert metrics["n_val"] == 24 and metrics["n_train"] == 96
    assert logs[0]["stage"] == "reward_model" and logs[-1]["step"] == 39 and logs[-1]["eta_s"] == 0
    assert logs[-1]["loss"] < logs[0]["loss"]
    r = score_texts(rm, enc, ["it was great.", "it was awful."])
    assert r[0] > r[1]
    # normalised on the policy answers of the training pairs (here every pair counts as one)
    tokens, c, rj, _ = encode_pairs(enc, split_pairs(pairs, 0.2)[0], 32)
    with torch.no_grad():
        scores = score(rm, tokens[torch.unique(torch.cat([c, rj]))], tok.pad_id(enc))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)
