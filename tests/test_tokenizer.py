"""Tests for tokenizer.py: exact round trips, special tokens, save/load, determinism, compression,
and the batch helpers (left_pad, encode_batch, decode_responses)."""

import collections
import json
import os
import random
import re
import sys

import pytest
import regex
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tokenizer as tk

# Strings a byte-level BPE must give back exactly, whatever it was trained on.
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a  b   c\n\n\tend \n",
    "trailing spaces   ",
    "it's we've they're i'll he'd I'M",
    "héllo wörld, ça va? naïve café",
    "日本語のテキストと中文",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining accents a\u0308",
    "\u200b zero width \ufeff bom \u2028 line sep",
    "numbers 3.14159 1e-9 0x1F 1,000,000",
    "<|endoftext|>",
    "before<|endoftext|>after <|pad|> <|endoftext",
    "".join(chr(i) for i in range(256)),  # every latin-1 char, controls included
]


def _random_unicode(rng: random.Random, n: int) -> str:
    """n random code points from the whole range, skipping surrogates (not valid in UTF-8)."""
    chars = []
    while len(chars) < n:
        c = rng.randrange(0x110000)
        if not 0xD800 <= c <= 0xDFFF:
            chars.append(chr(c))
    return "".join(chars)


def _generated_reviews(n: int, seed: int = 0) -> list[str]:
    """Stand-in for the world's corpus: lowercase words, '.'/'!' on the last word."""
    rng = random.Random(seed)
    words = ("the plot was not very good bad i loved hated cast acting film movie story "
             "ending music a really quite boring great terrible and but it this is").split()
    texts = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + rng.choice(".!")
                     for _ in range(rng.randint(1, 4))]
        texts.append(" ".join(sentences))
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    try:
        import world
        texts = list(world.build_datasets(world.WorldConfig())["pretrain"])
    except ImportError:
        texts = _generated_reviews(3000)
    return texts[:5000]  # plenty to learn 254 merges, keeps the tests fast


@pytest.fixture(scope="module")
def enc(corpus):
    return tk.train_tokenizer(corpus, vocab_size=512)


def test_round_trip_on_corpus(enc, corpus):
    for text in corpus[:2000]:
        assert enc.decode(tk.encode(enc, text)) == text


def test_round_trip_on_arbitrary_strings(enc):
    rng = random.Random(0)
    strings = ODD_STRINGS + [_random_unicode(rng, rng.randint(1, 50)) for _ in range(300)]
    for s in strings:
        ids = tk.encode(enc, s)
        assert enc.decode(ids) == s, repr(s)
        assert all(0 <= i < tk.eos_id(enc) for i in ids)  # no special id from plain text


def test_round_trip_with_a_tokenizer_trained_on_almost_nothing():
    # Only a couple of merges learned: everything else falls back to single bytes.
    small = tk.train_tokenizer(["abab"], vocab_size=512)
    for s in ODD_STRINGS:
        assert small.decode(tk.encode(small, s)) == s


def test_special_tokens_are_the_last_two_distinct_ids(enc):
    eos, pad = tk.eos_id(enc), tk.pad_id(enc)
    assert eos != pad
    assert {eos, pad} == {enc.n_vocab - 2, enc.n_vocab - 1}
    assert (eos, pad) == (enc.encode_single_token(tk.EOS), enc.encode_single_token(tk.PAD))
    assert enc.decode([eos]) == tk.EOS


def test_literal_special_strings_in_text_stay_plain_text(enc):
    text = "i loved it.<|endoftext|> then <|pad|> more"
    ids = tk.encode(enc, text)
    assert tk.eos_id(enc) not in ids and tk.pad_id(enc) not in ids
    assert enc.decode(ids) == text
    # the reason encode() exists: tiktoken's default refuses such text outright
    with pytest.raises(ValueError):
        enc.encode(text)


def test_vocab_size_is_respected(enc):
    # random letter strings have far more distinct pairs than 512 ids can hold
    rng = random.Random(3)
    rich = ["".join(rng.choice("abcdefghij ") for _ in range(200)) for _ in range(200)]
    for vocab_size in (258, 300, 512):
        e = tk.train_tokenizer(rich, vocab_size=vocab_size)
        assert e.n_vocab == vocab_size
        assert tk.pad_id(e) == vocab_size - 1
    assert enc.n_vocab <= 512  # the corpus may run out of pairs first
    with pytest.raises(ValueError):
        tk.train_tokenizer(rich, vocab_size=257)


def test_training_stops_early_when_pairs_run_out():
    # "abab" -> (a,b) gives "ab", then (ab,ab) gives "abab", then no pair is left:
    # 256 bytes + 2 merges + 2 specials.
    e = tk.train_tokenizer(["abab"], vocab_size=512)
    assert e.n_vocab == 260
    assert tk.encode(e, "abab") == [257]
    assert tk.encode(e, "ab") == [256]


def test_merges_most_frequent_first_and_break_ties_by_bytes():
    # pre-tokens: "ab" x1, " ab" x2, " cd" x2. Pair counts: (a,b)=3, then four
    # pairs tie at 2; ties go to the smallest (left bytes, right bytes).
    e = tk.train_tokenizer(["ab ab ab cd cd"], vocab_size=256 + 4 + 2)
    learned = sorted((r, b) for b, r in e._mergeable_ranks.items() if r >= 256)
    assert learned == [(256, b"ab"), (257, b" ab"), (258, b" c"), (259, b" cd")]


def test_training_is_deterministic_and_ignores_text_order(corpus):
    texts = corpus[:500]
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    a = tk.train_tokenizer(texts, vocab_size=400)
    b = tk.train_tokenizer(texts, vocab_size=400)
    c = tk.train_tokenizer(shuffled, vocab_size=400)
    assert a._mergeable_ranks == b._mergeable_ranks == c._mergeable_ranks


def test_merges_compress_the_corpus(enc, corpus):
    texts = corpus[:2000]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tk.encode(enc, t)) for t in texts)
    assert n_bytes / n_tokens > 2.0
    # the most frequent pre-tokens (" the", " was", ".") become single tokens
    counts = collections.Counter(w for t in texts for w in regex.findall(tk.PAT_STR, t))
    for word, _ in counts.most_common(20):
        assert len(tk.encode(enc, word)) == 1, word


def test_padded_vocab_size(enc):
    padded = tk.padded_vocab_size(enc)
    assert padded % 64 == 0 and enc.n_vocab <= padded < enc.n_vocab + 64
    assert tk.padded_vocab_size(enc, multiple=1) == enc.n_vocab
    small = tk.train_tokenizer(["abab"])  # n_vocab 260
    assert tk.padded_vocab_size(small) == 320
    assert tk.padded_vocab_size(small, multiple=100) == 300


def test_save_load_gives_the_same_encoding(enc, corpus, tmp_path):
    path = tmp_path / "tok.json"
    tk.save_tokenizer(enc, str(path))
    assert os.listdir(tmp_path) == ["tok.json"]  # no temporary file left behind
    loaded = tk.load_tokenizer(str(path))
    assert loaded.n_vocab == enc.n_vocab
    assert loaded._mergeable_ranks == enc._mergeable_ranks
    assert (tk.eos_id(loaded), tk.pad_id(loaded)) == (tk.eos_id(enc), tk.pad_id(enc))
    rng = random.Random(2)
    strings = corpus[:500] + ODD_STRINGS + [_random_unicode(rng, 30) for _ in range(100)]
    for s in strings:
        assert tk.encode(loaded, s) == tk.encode(enc, s)
    # saving over an existing file replaces it
    tk.save_tokenizer(tk.train_tokenizer(["abab"]), str(path))
    assert tk.load_tokenizer(str(path)).n_vocab == 260


@pytest.mark.parametrize("content", [
    None,                                   # missing file
    "",                                     # empty
    "not json at all {",                    # garbage
    '{"format": "leash-bpe-1"}',            # keys missing
    "[1, 2, 3]",                            # wrong shape
    "truncated",                            # replaced below by half a real file
    "bad base64",                           # replaced below
])
def test_missing_or_corrupt_file_raises_value_error_naming_it(content, enc, tmp_path):
    path = tmp_path / "tok.json"
    if content in ("truncated", "bad base64"):
        tk.save_tokenizer(enc, str(path))
        text = path.read_text()
        if content == "truncated":
            text = text[: len(text) // 2]
        else:
            data = json.loads(text)
            data["mergeable_ranks"][300] = "@@not base64@@"
            text = json.dumps(data)
        path.write_text(text)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        tk.load_tokenizer(str(path))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- batch helpers

def test_left_pad():
    out = tk.left_pad([[1, 2, 3], [4], []], 9)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]


def test_encode_batch_rows_and_mask(enc):
    prompts = ["Review: i loved it", "Review:", "a"]
    completions = [" the plot was great.", " bad film!", " the acting was not very good at all."]
    tokens, mask, keep = tk.encode_batch(enc, prompts, completions, block_size=100)
    eos, pad = tk.eos_id(enc), tk.pad_id(enc)
    rows = [tk.encode(enc, p) + tk.encode(enc, c) + [eos] for p, c in zip(prompts, completions)]
    T = max(map(len, rows))
    assert keep == [0, 1, 2]
    assert tokens.dtype == torch.long and tokens.shape == (3, T)
    assert mask.dtype == torch.float32 and mask.shape == (3, T - 1)
    for n, (p, c, r) in enumerate(zip(prompts, completions, rows)):
        assert tokens[n].tolist() == r + [pad] * (T - len(r))
        # target j is token j+1: the mask is on exactly the completion tokens and the EOS
        p_len = len(tk.encode(enc, p))
        assert mask[n].nonzero().flatten().tolist() == list(range(p_len - 1, len(r) - 1))
        assert tokens[n, 1:][mask[n].bool()].tolist() == tk.encode(enc, c) + [eos]


def test_encode_batch_drops_rows_that_do_not_fit(enc):
    prompts = ["Review:", "Review:", "Review:"]
    completions = [" good.", " very " * 50, " bad."]
    lens = [len(tk.encode(enc, p + c)) + 1 for p, c in zip(prompts, completions)]
    block_size = max(lens[0], lens[2])  # a row of exactly block_size fits
    tokens, mask, keep = tk.encode_batch(enc, prompts, completions, block_size)
    assert keep == [0, 2]
    assert tokens.shape == (2, block_size) and mask.shape == (2, block_size - 1)
    for n, i in enumerate(keep):  # kept rows, in input order, not truncated
        r = tk.encode(enc, prompts[i]) + tk.encode(enc, completions[i]) + [tk.eos_id(enc)]
        assert tokens[n, :len(r)].tolist() == r
    with pytest.raises(ValueError, match="block_size=3"):
        tk.encode_batch(enc, prompts, completions, block_size=3)


def test_encode_batch_with_an_empty_prompt(enc):
    tokens, mask, keep = tk.encode_batch(enc, ["", "Review:"], ["i loved it.", " bad."], 100)
    c = tk.encode(enc, "i loved it.")
    assert keep == [0, 1]
    assert tokens[0, :len(c) + 1].tolist() == c + [tk.eos_id(enc)]
    # every target of the row is a completion token or the EOS (the first token is never a target)
    assert mask[0].tolist() == [1.0] * len(c) + [0.0] * (mask.shape[1] - len(c))


def test_encode_batch_encodes_prompt_and_completion_separately(enc):
    prompt, completion = "Review: i loved th", "e film."
    joint = tk.encode(enc, prompt + completion)
    apart = tk.encode(enc, prompt) + tk.encode(enc, completion)
    assert joint != apart  # the case that matters: " the" is one token when encoded together
    tokens, mask, _ = tk.encode_batch(enc, [prompt], [completion], 100)
    assert tokens[0].tolist() == apart + [tk.eos_id(enc)]
    assert tokens[0, 1:][mask[0].bool()].tolist() == tk.encode(enc, completion) + [tk.eos_id(enc)]


def test_decode_responses_stops_at_eos_or_pad(enc):
    eos, pad = tk.eos_id(enc), tk.pad_id(enc)
    a, b = tk.encode(enc, " i loved it."), tk.encode(enc, " bad")
    prompt = tk.left_pad([tk.encode(enc, "Review:"), tk.encode(enc, "a")], pad)
    P, N = prompt.shape[1], len(a) + 3
    resp = [a + [eos] + [pad] * 2,        # ended, then padding
            b + [pad] * (N - len(b)),     # cut by PAD without EOS
            (a * 2)[:N]]                  # ran out of tokens
    rows = [prompt[i % 2].tolist() + r for i, r in enumerate(resp)]
    rows[2][0] = eos  # an EOS inside the prompt columns does not count
    texts, ended = tk.decode_responses(enc, torch.tensor(rows), P)
    assert texts == [" i loved it.", " bad", enc.decode((a * 2)[:N])]
    assert ended == [True, False, False]
