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
from report import plot_reward_model
from reward import (RewardConfig, ScalarModel, accuracy_by_kind, annotator_label_accuracy,
                    blind_spot_edits, splice, blind_spot_report, bt_loss, encode_pairs_for_rm, gold_label_accuracy,
                    last_token_index, load_scalar_model, make_preferences, normalize,
                    proxy_reward_fn, proxy_vs_gold, rank_correlation,
                    save_scalar_model, score, split_pairs, train_reward_model)

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
    assert last_token_index(tokens, pad).tolist() == [len(a) - 1, len(b) - 1]  # the EOS positions
    with torch.no_grad():
        s = score(rm, tokens, pad)
        alone = [rm(torch.tensor([row]))[0, -1] for row in (a, b)]  # each text, no padding at all
        more_pad = score(rm, torch.cat([tokens, torch.full((2, 5), pad)], 1), pad)
    assert torch.allclose(s, torch.stack(alone), atol=1e-5)
    assert torch.allclose(s, more_pad, atol=1e-6)
    # a left-padded prompt (positions shifted by the mask) scores like the unpadded text
    left = torch.tensor([[pad, pad] + a])
    with torch.no_grad():
        assert score(rm, left, pad).item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_proxy_reward_fn_scores_texts_in_any_order(enc):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    reward_fn = proxy_reward_fn(rm, enc, "cpu", batch_size=2)
    texts = ["it was great.", "the film was good. i loved the cast!", "it was awful.", "i loved the cast!"]
    together = reward_fn(texts)
    one_by_one = [reward_fn([t])[0] for t in texts]
    assert together == pytest.approx(one_by_one, abs=1e-5)
    assert reward_fn([]) == []


# ---------------------------------------------------------------- normalisation

def test_normalize_gives_mean_0_std_1_on_its_texts(enc):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    texts = list(dict.fromkeys(TEXTS))
    raw_mean, raw_std = normalize(rm, enc, texts, "cpu")
    r = torch.tensor(proxy_reward_fn(rm, enc, "cpu")(texts))
    assert r.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert r.std().item() == pytest.approx(1.0, abs=1e-5)
    assert raw_std > 0
    normalize(rm, enc, texts, "cpu")  # normalising twice changes nothing: it starts from raw scores
    assert torch.tensor(proxy_reward_fn(rm, enc, "cpu")(texts)).std().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- preference data

def test_gold_label_accuracy_on_hand_pairs():
    best, worst = " it ten out of ten.", " it one out of ten."  # gold 1.0 and -1.0
    pairs = [make_pair("i give", best, worst),      # gold agrees: 1
             make_pair("i give", worst, best),      # gold disagrees: 0
             make_pair("i give", best, best + "")]  # a tie: 1/2
    assert gold_label_accuracy(pairs) == pytest.approx(0.5)
    assert gold_label_accuracy(pairs[:1]) == 1.0
    # the annotators' own ceiling also counts their taste for "!": at equal gold, more "!" wins
    loud = [make_pair("it was", " great!", " great."), make_pair("it was", " great.", " great!"),
            make_pair("it was", " great.", " great.")]
    assert loud[0]["gold_chosen"] == loud[0]["gold_rejected"]
    assert gold_label_accuracy(loud) == pytest.approx(0.5)
    assert annotator_label_accuracy(loud) == pytest.approx(0.5)  # 1 + 0 + 1/2
    assert annotator_label_accuracy(loud[:1]) == 1.0


def test_accuracy_by_kind_splits_pairs_by_validity(monkeypatch):
    best, good, broken = " it ten out of ten.", " it seven out of ten.", " it ten ten."
    assert world.is_valid("i give" + good) and not world.is_valid("i give" + broken)
    pairs = [make_pair("i give", best, good), make_pair("i give", good, best),        # both valid
             make_pair("i give", best, broken), make_pair("i give", broken, good),    # one invalid
             make_pair("i give", broken, broken + " ten.")]                           # both invalid: left out
    # a "reward model" that scores every text by its gold reward gets exactly the ceiling per kind
    def scored_by(f):
        monkeypatch.setattr("reward.proxy_reward_fn", lambda rm, enc, device: lambda texts: list(map(f, texts)))
    scored_by(world.gold_reward)
    kinds = accuracy_by_kind(None, None, "cpu", pairs)
    assert {k: v["n"] for k, v in kinds.items()} == {"both valid": 2, "one invalid": 2}
    assert kinds["both valid"] == {"n": 2, "accuracy": 0.5, "gold_label_accuracy": 0.5}
    assert kinds["one invalid"] == {"n": 2, "accuracy": 0.5, "gold_label_accuracy": 0.5}
    # and one that ranks by the negated gold is wrong wherever gold is right
    scored_by(lambda t: -world.gold_reward(t))
    assert accuracy_by_kind(None, None, "cpu", pairs[:3])["both valid"]["accuracy"] == 0.5
    assert accuracy_by_kind(None, None, "cpu", pairs[2:3])["one invalid"]["accuracy"] == 0.0


def test_split_pairs_keeps_each_prompt_on_one_side():
    pairs = [make_pair(f"p{i}", " a.", " b.") for i in range(10) for _ in range(3)]
    train, val = split_pairs(pairs, 0.2)
    assert len(val) == 6 and len(train) == 24
    assert {p["prompt"] for p in val} == {"p0", "p1"}
    assert not {p["prompt"] for p in val} & {p["prompt"] for p in train}


def test_encode_pairs_stores_each_text_once_and_ends_it_with_eos(enc):
    pairs = [make_pair("it was", " great.", " awful."), make_pair("it was", " great.", " good.")]
    tokens, chosen, rejected = encode_pairs_for_rm(enc, pairs, 32)
    assert tokens.shape[0] == 3 and chosen.tolist() == [0, 0] and rejected.tolist() == [1, 2]
    row = tokens[0, :int(last_token_index(tokens[:1], tok.pad_id(enc))) + 1].tolist()
    assert row == tok.encode(enc, "it was great.") + [tok.eos_id(enc)]


def test_splice_joins_a_head_to_another_reviews_tail():
    rng = random.Random(0)
    a, b = "the plot was great. i loved it.".split(" "), "what a mess. we hated the film.".split(" ")
    ways = {" ".join(a[:cut] + b[j:]) for cut in range(3, len(a)) for j in range(1, len(b))}
    seen = {splice(" ".join(a), " ".join(b), rng) for _ in range(300)}
    assert seen <= ways and len(seen) > len(ways) // 2  # the first 3+ words of a, then b's tail


def test_make_preferences_is_deterministic_and_well_formed(enc):
    policy = tiny_gpt(enc, block_size=24)
    prompts = ["it was", "the film", "i loved"]
    cfg = RewardConfig(n_prompts=2, samples_per_prompt=3, world_groups=0, sample_batch=4)
    pairs = make_preferences(policy, enc, prompts, cfg, "cpu", seed=1)
    assert pairs == make_preferences(policy, enc, prompts, cfg, "cpu", seed=1)
    assert pairs != make_preferences(policy, enc, prompts, cfg, "cpu", seed=2)
    assert 1 <= len(pairs) <= 2 * 3  # up to 3 choose 2 per prompt; identical twins are dropped
    with_world = make_preferences(policy, enc, prompts, replace(cfg, world_groups=2, world_slips=0.0), "cpu", seed=1)
    assert with_world[:len(pairs)] == pairs and len(with_world) >= len(pairs) + 2
    for p in with_world[len(pairs):]:
        assert p["source"] == "world" and world.is_valid(p["prompt"] + p["chosen"])
        assert len(p["prompt"].split()) == 2 and p["chosen"].startswith(" ")
    slipped = make_preferences(policy, enc, prompts, replace(cfg, world_groups=20, world_slips=1.0), "cpu", seed=1)
    texts = [p["prompt"] + p[side] for p in slipped[len(pairs):] for side in ("chosen", "rejected")]
    assert sum(not world.is_valid(t) for t in texts) > 0.6 * len(texts)  # a slip is usually invalid...
    for p in slipped[len(pairs):]:  # ...and is labelled by its gold reward like any text
        assert p["gold_chosen"] == world.gold_reward(p["prompt"] + p["chosen"])
    for p in pairs:
        assert p["source"] == "policy"
        assert p["prompt"] in prompts[:2] and p["chosen"] != p["rejected"]
        assert p["gold_chosen"] == world.gold_reward(p["prompt"] + p["chosen"])
        assert p["gold_rejected"] == world.gold_reward(p["prompt"] + p["rejected"])


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
    r = proxy_reward_fn(rm, enc, "cpu")(["it was great.", "it was awful."])
    assert r[0] > r[1]


# ---------------------------------------------------------------- checkpoints and analysis

def test_save_load_round_trip_and_corrupt_file(enc, tmp_path):
    rm = ScalarModel(tiny_gpt(enc), head_std=0.5).eval()
    rm.gain.fill_(2.5)
    rm.bias.fill_(-0.3)
    path = tmp_path / "rm.pt"
    save_scalar_model(str(path), rm)
    loaded = load_scalar_model(str(path), "cpu")
    x = torch.tensor([tok.encode(enc, "it was great.") + [tok.eos_id(enc)]])
    with torch.no_grad():
        assert torch.equal(loaded(x), rm(x))
    assert loaded.gain.item() == 2.5 and not loaded.training
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_scalar_model(str(bad), "cpu")
    with pytest.raises(ValueError, match="missing.pt"):
        load_scalar_model(str(tmp_path / "missing.pt"), "cpu")


def test_rank_correlation_on_hand_values():
    assert rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6*2/60
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert rank_correlation([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


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
    rm = ScalarModel(tiny_gpt(enc, block_size=64), head_std=0.5).eval()
    bases = ["it was great. i loved the cast. the music is good.", "it was awful.",  # too short
             "the film was good. i loved the cast! it was great."]                     # has a "!"
    rows = blind_spot_report(rm, enc, "cpu", bases)
    assert [r["n"] for r in rows] == [1] * 6 and rows[0]["edit"] == "original"
    assert rows[0]["d_proxy"] == 0 and rows[3]["d_gold"] == pytest.approx(-0.2)
    texts = ["it was great.", "it was awful.", "it was graet.", "i loved the cast!"]
    pg = proxy_vs_gold(rm, enc, "cpu", texts)
    assert pg["valid"] == [True, True, False, True] and pg["gold"][2] == -1.0
    path = tmp_path / "rm.png"
    plot_reward_model(pg, rows, str(path))
    assert path.stat().st_size > 10_000
