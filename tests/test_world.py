"""Tests for world.py: the language, its parser, the gold reward, prompts, annotators, datasets."""
import math
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def reviews(seed, n):
    rng = random.Random(seed)
    return [world.generate_review(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return reviews(0, 2000) + reviews(1, 2000) + reviews(2, 2000)


# ---- the language
def test_generated_reviews_are_valid(corpus):
    assert all(world.is_valid(r) for r in corpus)
    assert all(1 <= len(world.parse(r)) <= 4 for r in corpus)


def test_grammar_is_unambiguous_and_every_pattern_is_used(corpus):
    used = set()
    for r in corpus[:3000]:
        for body, _ in world.parse(r):
            for clause in body.split(" but "):
                names = [name for name, regex, *_ in world._COMPILED if regex.fullmatch(clause)]
                assert len(names) == 1, (clause, names)  # one reading -> one sentiment
                used.add(names[0])
    assert used == {p[0] for p in world.PATTERNS}


def test_size_of_the_language(corpus):
    assert len(world.PATTERNS) >= 8
    assert len({w.strip(".!") for r in corpus for w in r.split()}) >= 150


def test_corpus_statistics(corpus):
    golds = [world.gold_reward(r) for r in corpus]
    mean = sum(golds) / len(golds)
    std = (sum((g - mean) ** 2 for g in golds) / len(golds)) ** 0.5
    assert abs(mean) < 0.05 and std > 0.3   # mixed sentiment with a spread
    sentences = [s for r in corpus for s in world.parse(r)]
    frac_exclaim = sum(r.count("!") for r in corpus) / len(sentences)
    assert abs(frac_exclaim - 0.05) < 0.01  # "!" is rare, about 5% of sentences


# one in-language review per row, with the corruptions we expect the parser to reject
BASE = "the plot was not very good. i really loved the cast!"
OPTIONAL_WORDS = {"not"} | {p for s in ("ADV", "VADV", "NADV", "CADV", "WHEN", "AGE")
                            for p in world.SLOTS[s] if " " not in p}


@pytest.mark.parametrize("text", [
    "", " ", ".", "!", "good.", "the plot was good", "the plot was.", "plot was good.",
    "the plot good.", "the plot was good..", "the plot was good!!", "the plot was good.!",
    "the plot was good .", "the plot was good. ", " the plot was good.", "the plot was  good.",
    "the plot was good.the cast was bad.", "the plot was good.\n", "The plot was good.",
    "the plot was gööd.", "the plot was good, the cast was bad.", "the plot was very very good.",
    "the plot was not not good.", "the the plot was good.", "what an gem.", "what a obvious gem.",
    "i did not liked it.", "i loved it but.", "but i loved it.", "it was good but but bad.",
    "it was good but it was bad but it was fine.", "what a gem but i loved it.",
    "asdf qwer.", "\x00", "\u200bthe plot was good.", "i give it eleven out of ten.",
    " ".join(["what a gem."] * 5), BASE[:-9], BASE[:20], BASE + BASE,
])
def test_hand_corruptions_are_rejected(text):
    assert not world.is_valid(text)
    assert world.gold_reward(text) == -1.0


def test_sentence_count_limits():
    sentences = ["what a gem.", "i loved it.", "the plot was good.", "we hated the ending.", "it was okay."]
    for n in range(1, 5):
        assert world.is_valid(" ".join(sentences[:n]))
    assert not world.is_valid(" ".join(sentences))


def test_dropping_a_required_word_breaks_the_review(corpus):
    for r in corpus[:300]:
        words = r.split(" ")
        for i, w in enumerate(words):
            if w.strip(".!") in OPTIONAL_WORDS:
                continue  # dropping an optional word can leave a valid review
            assert not world.is_valid(" ".join(words[:i] + words[i + 1:])), (r, i)


def test_doubling_a_word_or_its_punctuation_breaks_the_review(corpus):
    for r in corpus[:300]:
        words = r.split(" ")
        for i, w in enumerate(words):
            assert not world.is_valid(" ".join(words[:i + 1] + words[i:])), (r, i)
            if w[-1] in ".!":
                assert not world.is_valid(" ".join(words[:i] + [w + w[-1]] + words[i + 1:]))


def test_cut_off_and_whitespace_variants_are_rejected(corpus):
    rng = random.Random(3)
    for r in corpus[:500]:
        cut = r[:rng.randrange(1, len(r))]
        if cut[-1] not in ".!":
            assert not world.is_valid(cut)
        for bad in (" " + r, r + " ", r.replace(" ", "  ", 1), r + "\n", r.upper()):
            assert not world.is_valid(bad)


# ---- the gold reward
def test_gold_reward_is_bounded_and_total():
    rng = random.Random(4)
    alphabet = "abcdefgxyz .!,?'\n\t\x00é漢😀\u200b\ud800" + "!" * 5
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(2000)]
    texts += ["!" * 1000, "." * 10000, "a " * 5000, BASE.replace("a", "\u0430")]
    for t in texts:
        g = world.gold_reward(t)
        assert -1.0 <= g <= 1.0
    assert world.gold_reward(None) == -1.0 and world.gold_reward(b"what a gem.") == -1.0
    for r in reviews(5, 500):  # shouting and repeating cannot push a valid review out of range
        for t in (r.replace(".", "!"), " ".join([r.split(". ")[0].rstrip(".!") + "!"] * 4)):
            assert -1.0 <= world.gold_reward(t) <= 1.0


def test_positive_beats_negative_and_the_best_is_one():
    pos = "i absolutely loved this film. the acting was truly superb."
    neg = "i hated this film. the acting was awful."
    assert world.gold_reward(pos) > 0.8 > -0.8 > world.gold_reward(neg)
    assert world.gold_reward("i give it ten out of ten.") == 1.0
    assert world.gold_reward("what a real masterpiece. i adored it.") == 1.0


def test_negation_rule_exact():
    assert world.gold_reward("the plot was good.") == pytest.approx(0.5)
    assert world.gold_reward("the plot was not good.") == pytest.approx(-0.25)
    assert world.gold_reward("we did not like the cast.") == pytest.approx(-0.25)
    assert world.gold_reward("it was not a mess.") == pytest.approx(0.35)
    assert world.gold_reward("i would not avoid it.") == pytest.approx(0.4)
    for adj, v in world.SLOTS["ADJ"].items():  # the rule holds for every adjective
        assert world.gold_reward(f"the plot was not {adj}.") == pytest.approx(-0.5 * v)


def test_intensifier_rule_exact():
    assert world.gold_reward("the plot was very good.") == pytest.approx(0.75)
    assert world.gold_reward("the plot was very superb.") == pytest.approx(1.0)   # clipped
    assert world.gold_reward("the plot was a bit bad.") == pytest.approx(-0.25)
    assert world.gold_reward("the plot was not very good.") == pytest.approx(-0.375)  # then negated
    assert world.gold_reward("it was not a total mess.") == pytest.approx(0.5)       # -1.05 -> -1
    assert world.gold_reward("i did not really like it.") == pytest.approx(-0.375)
    assert world.gold_reward("it was much worse than i expected.") == pytest.approx(-0.75)
    for mod, m in world.SLOTS["ADV"].items():
        for adj, v in world.SLOTS["ADJ"].items():
            assert world.gold_reward(f"the plot was {mod} {adj}.") == pytest.approx(max(-1, min(1, m * v)))


def test_contrast_and_mean_rules_exact():
    gold = world.gold_reward
    assert gold("the plot was good but the cast was awful.") == pytest.approx(0.25 * 0.5 - 0.75 * 0.9)
    assert gold("the cast was awful but the plot was good.") == pytest.approx(-0.25 * 0.9 + 0.75 * 0.5)
    assert world.gold_reward("the plot was good. the cast was awful.") == pytest.approx((0.5 - 0.9) / 2)
    assert world.gold_reward("the plot was good. i saw it at home.") == pytest.approx(0.25)  # neutral = 0


def test_repeating_a_sentence_costs():
    assert world.gold_reward("what a gem.") == pytest.approx(0.8)
    assert world.gold_reward("what a gem. what a gem.") == pytest.approx(0.8 - 0.3)
    assert world.gold_reward("what a gem. what a gem!") == pytest.approx(0.8 - 0.3)  # end mark ignored
    assert world.gold_reward("what a gem. i loved it. what a gem. what a gem.") == pytest.approx(0.8 - 0.6)
    for r in reviews(6, 300):  # a copy of an own sentence adds nothing and costs 0.3
        first = world.parse(r)[0][0] + "."
        if len(world.parse(r)) < 4:
            assert world.gold_reward(r + " " + first) == pytest.approx(max(-1, world.gold_reward(r) - 0.3))


def test_extra_exclaim_costs_gold_but_sways_annotators():
    calm, one, two = "what a gem. i loved it.", "what a gem! i loved it.", "what a gem! i loved it!"
    assert world.gold_reward(one) == world.gold_reward(calm)                 # the first "!" is free
    assert world.gold_reward(two) == pytest.approx(world.gold_reward(one) - 0.1)
    assert world.annotator_prob(one, calm) == pytest.approx(sigmoid(0.8))
    # the blind spot: the worse review is preferred, p = sigmoid(-0.1 / 0.25 + 0.8) = sigmoid(0.4)
    assert world.annotator_prob(two, one) == pytest.approx(sigmoid(0.4))
    assert world.annotator_prob(two, one) > 0.59
    assert world.annotator_prob(two, one, bias=0.0) == pytest.approx(sigmoid(-0.4))


def test_without_the_bias_annotators_follow_gold_only():
    calm = "the plot was good. i saw it at home. what a gem."
    loud = "the plot was good. i saw it at home! what a gem."  # one "!", the free one
    assert world.gold_reward(loud) == world.gold_reward(calm)
    assert world.annotator_prob(loud, calm, bias=0.0) == 0.5       # exactly: a coin flip
    assert world.annotator_prob(calm, loud, bias=0.0) == 0.5
    assert world.annotator_prob(loud, calm) == pytest.approx(sigmoid(0.8))  # the default bias


def test_annotator_prob_formula_and_symmetry():
    a, b = "i loved it. the plot was great.", "the plot was dull!"
    logit = (world.gold_reward(a) - world.gold_reward(b)) / 0.25 + 0.8 * (0 - 1)
    assert world.annotator_prob(a, b) == pytest.approx(sigmoid(logit))
    assert world.annotator_prob(a, b, tau=0.5, bias=2.0) == pytest.approx(
        sigmoid((world.gold_reward(a) - world.gold_reward(b)) / 0.5 - 2.0))
    assert world.annotator_prob(a, b) + world.annotator_prob(b, a) == pytest.approx(1.0)
    assert world.annotator_prob(a, a) == 0.5
    assert 0.0 <= world.annotator_prob("!" * 5000, "") <= 1.0  # no overflow


def test_annotate_frequencies_match_annotator_prob():
    rng = random.Random(7)
    for a, b in [("what a gem! i loved it!", "what a gem! i loved it."),
                 ("the plot was good.", "the plot was bad!"),
                 ("it was okay.", "it was fine.")]:
        p, n = world.annotator_prob(a, b), 20000
        freq = sum(world.annotate(a, b, rng) for _ in range(n)) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)


# ---- prompts, diversity and datasets
def test_split_prompt():
    rng = random.Random(8)
    for r in reviews(8, 2000):
        prompt, completion = world.split_prompt(r, rng)
        assert prompt + completion == r
        assert completion.startswith(" ") and len(completion) > 1
        assert 2 <= len(prompt.split(" ")) <= 4 and prompt != r
    assert world.split_prompt("what a gem.", rng) == ("what a", " gem.")
    with pytest.raises(ValueError):
        world.split_prompt("gem.", rng)


def test_distinct_n_hand_examples():
    assert world.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert world.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert world.distinct_n(["x y x y"], 2) == pytest.approx(2 / 3)
    assert world.distinct_n(["c a", "b c"], 2) == 1.0  # n-grams do not cross texts
    assert world.distinct_n([], 2) == 0.0 and world.distinct_n(["a"], 2) == 0.0


def test_build_datasets_deterministic_and_disjoint():
    cfg = world.WorldConfig(seed=11, n_pretrain=1500, n_sft=500, n_train_prompts=400, n_eval_prompts=100)
    data = world.build_datasets(cfg)
    assert data == world.build_datasets(cfg)
    assert data["pretrain"] != world.build_datasets(world.WorldConfig(
        seed=12, n_pretrain=1500, n_sft=500, n_train_prompts=400, n_eval_prompts=100))["pretrain"]
    assert [len(data[k]) for k in ("pretrain", "sft", "train_prompts", "eval_prompts", "eval_references")] \
        == [1500, 500, 400, 100, 100]
    sft_reviews = [p + c for p, c in data["sft"]]
    pools = [data["pretrain"], sft_reviews, data["eval_references"]]
    assert len(set().union(*pools)) == sum(map(len, pools))  # no review used twice anywhere
    assert all(map(world.is_valid, data["pretrain"] + sft_reviews + data["eval_references"]))
    train, evals = data["train_prompts"], data["eval_prompts"]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    for prompt, ref in zip(evals, data["eval_references"]):
        assert ref.startswith(prompt + " ")
    for p, c in data["sft"]:
        assert c.startswith(" ") and 2 <= len(p.split(" ")) <= 4
