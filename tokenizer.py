"""
A byte-level BPE tokenizer, trained on our own corpus, run by tiktoken.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare
Words with Subword Units"), in the byte-level form of GPT-2 (Radford et al.
2019), builds a vocabulary from the bottom up:

  1. Text is UTF-8 bytes, so the 256 single bytes are tokens 0..255. Any
     string at all can be encoded; there is no "unknown" token.
  2. A regex cuts text into pre-tokens (" good", ".", " 42", "\n"), so a merge
     never crosses a word boundary and " good" is learned once, not once per
     neighbour.
  3. Over and over, the most frequent adjacent pair of tokens, counted over the
     unique pre-tokens weighted by how often each occurs, becomes a new token
     with the next id.

A token's id is its "rank": the order in which it was learned. That is all
tiktoken needs at run time. To encode a pre-token it keeps merging the adjacent
pair whose concatenation has the lowest rank until no adjacent pair is a token.
So training is a short Python loop here and encoding is tiktoken's fast Rust.

Two special tokens take the last two ids. EOS "<|endoftext|>" ends a document,
and the model learns to emit it to stop. PAD "<|pad|>" fills batches to one
length. They are different ids so that "is this padding?" is a question about
the id alone: a real EOS is a training target, padding never is.
"""

import base64
import collections
import json
import os
import sys
import time

import regex
import tiktoken

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)

# GPT-2's pre-tokenizer: English contractions, an optional space glued to the
# front of a run of letters / digits / other symbols, then whitespace. The
# `\s+(?!\S)` branch leaves the last space of a run to the next word, so
# "a  b" is "a", " ", " b" and " b" stays the same token as in "a b".
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# training

def train_tokenizer(texts: list[str], vocab_size: int = 512) -> tiktoken.Encoding:
    """Learn byte-level BPE merges from `texts`; return a tiktoken Encoding.

    vocab_size counts everything: 256 bytes + learned merges + 2 specials.
    If the text runs out of adjacent pairs first, training stops early and the
    Encoding is smaller (see enc.n_vocab). Ties between equally frequent pairs
    go to the pair whose (left bytes, right bytes) sorts first, so the result
    depends only on the pre-token counts, never on dict or text order.
    """
    n_tokens_wanted = vocab_size - len(SPECIAL_TOKENS)
    if n_tokens_wanted < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")

    # Count pre-tokens. Merges only ever happen inside one, so each unique
    # pre-token ("word") is worked on once and weighted by its count.
    pre_token_counts = collections.Counter()
    pattern = regex.compile(PAT_STR)
    for text in texts:
        pre_token_counts.update(pattern.findall(text))
    words = [list(w.encode("utf-8")) for w in pre_token_counts]  # token ids
    freqs = list(pre_token_counts.values())

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes of that token
    rank_of = {b: i for i, b in enumerate(vocab)}

    # pair_counts[(a, b)] = weighted number of times token a is followed by b.
    # words_with[(a, b)] = the words where it occurs (maybe stale: harmless,
    # a stale word is just recounted unchanged).
    pair_counts = collections.Counter()
    words_with = collections.defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            words_with[pair].add(i)

    while len(vocab) < n_tokens_wanted and pair_counts:
        top = max(pair_counts.values())
        best = min((p for p, c in pair_counts.items() if c == top),
                   key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merged = vocab[best[0]] + vocab[best[1]]
        # tiktoken maps bytes -> rank, so if two different pairs ever spell the
        # same bytes (rare, but not ruled out) the second one reuses the id.
        new_id = rank_of.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            rank_of[merged] = new_id

        # Only words containing the pair change: take their pairs out of the
        # counts, merge, put the new pairs back. Every step merges at least one
        # occurrence, so the loop ends even when no new id was added.
        for i in words_with.pop(best):
            word, freq = words[i], freqs[i]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            words[i] = word = _merge(word, best, new_id)
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
                words_with[pair].add(i)

    return _make_encoding(vocab, PAT_STR)


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `word`, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _make_encoding(vocab: list[bytes], pat_str: str) -> tiktoken.Encoding:
    """Build the tiktoken Encoding: ranks 0..N-1 for `vocab`, then EOS = N, PAD = N + 1."""
    n = len(vocab)
    return tiktoken.Encoding(
        name=f"leash-bpe-{n + len(SPECIAL_TOKENS)}",
        pat_str=pat_str,
        mergeable_ranks={b: i for i, b in enumerate(vocab)},
        special_tokens={tok: n + j for j, tok in enumerate(SPECIAL_TOKENS)},
        explicit_n_vocab=n + len(SPECIAL_TOKENS),
    )


# -----------------------------------------------------------------------------
# using it

def eos_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token  # tiktoken's name for the id of "<|endoftext|>"


def pad_id(enc: tiktoken.Encoding) -> int:
    return enc.encode_single_token(PAD)


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of ordinary text; never produces EOS or PAD.

    Special-token strings inside `text` are encoded as the plain characters
    they are: a review that literally says "<|endoftext|>" gets ordinary byte
    tokens, not the EOS id. Only code (sft.py, sampling) puts EOS/PAD into a
    sequence, by id, so user text can neither crash encoding (tiktoken's
    default `encode` raises on it) nor end a document early. The price:
    decode() shows EOS and the literal string the same way; compare ids, not
    decoded text, to find the real EOS.
    """
    return enc.encode_ordinary(text)


def padded_vocab_size(enc: tiktoken.Encoding, multiple: int = 64) -> int:
    """n_vocab rounded up to a multiple of `multiple`: the model's embedding rows.

    Matrix sizes that are multiples of 64 run faster; the extra rows are ids
    the tokenizer never emits, so the model just learns to give them ~0 probability.
    """
    return -(-enc.n_vocab // multiple) * multiple


# -----------------------------------------------------------------------------
# saving and loading: a small JSON file, ranks stored in order as base64 bytes

def save_tokenizer(enc: tiktoken.Encoding, path: str) -> None:
    """Write `enc` to `path` as JSON, atomically (a crash never leaves half a file)."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    data = {
        "format": "leash-bpe-1",
        "name": enc.name,
        "pat_str": enc._pat_str,
        "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b, _ in ranks],
        "special_tokens": enc._special_tokens,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def load_tokenizer(path: str) -> tiktoken.Encoding:
    """Read a file written by save_tokenizer; ValueError naming `path` if it is missing or bad."""
    try:
        with open(path) as f:
            data = json.load(f)
        vocab = [base64.b64decode(s, validate=True) for s in data["mergeable_ranks"]]
        n = len(vocab)
        expected_specials = {tok: n + j for j, tok in enumerate(SPECIAL_TOKENS)}
        if vocab[:256] != [bytes([i]) for i in range(256)]:
            raise ValueError("the first 256 tokens must be the single bytes in order")
        if len(set(vocab)) != n:
            raise ValueError("duplicate tokens")
        if data["special_tokens"] != expected_specials:
            raise ValueError(f"special tokens must be {expected_specials}")
        enc = _make_encoding(vocab, data["pat_str"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot load tokenizer from {path}: {reason}") from None
    return enc


# -----------------------------------------------------------------------------
# python tokenizer.py: train on the world's corpus and show what came out

def _corpus() -> tuple[list[str], str]:
    """The world's pretraining texts if world.py is there, else this folder's .py files."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "world.py")):
        sys.path.insert(0, here)
        import world
        return list(world.build_datasets(world.WorldConfig())["pretrain"]), "world.py pretrain"
    names = sorted(n for n in os.listdir(here) if n.endswith(".py"))
    return [open(os.path.join(here, n)).read() for n in names], "the .py files (no world.py yet)"


if __name__ == "__main__":
    texts, source = _corpus()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {source}, {len(texts)} texts, {n_bytes / 1e6:.2f} MB")

    t0 = time.time()
    enc = train_tokenizer(texts, vocab_size=512)
    seconds = time.time() - t0
    print(f"vocab: {enc.n_vocab} tokens (EOS={eos_id(enc)}, PAD={pad_id(enc)}), "
          f"padded to {padded_vocab_size(enc)} for the model; trained in {seconds:.2f} s")

    n_tokens = sum(len(encode(enc, t)) for t in texts)
    print(f"compression: {n_bytes / n_tokens:.2f} bytes/token, "
          f"{n_tokens / len(texts):.1f} tokens/text")

    for text in texts[:3]:
        ids = encode(enc, text[:120])
        print("\n" + repr(text[:120]))
        print(" | ".join(repr(enc.decode([i]))[1:-1] for i in ids), f"  ({len(ids)} tokens)")
