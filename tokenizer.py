r"""Byte-level BPE trained on our corpus, run by tiktoken; text <-> padded id batches.

Byte-pair encoding (Sennrich et al. 2016), byte-level as in GPT-2 (Radford et al. 2019):
1. Text is UTF-8 bytes, so the 256 single bytes are tokens 0..255: any string encodes.
2. A regex cuts text into pre-tokens (" good", ".", " 42", "\n"): no merge
   crosses a word boundary, so " good" is learned once, not once per neighbour.
3. Repeatedly, the most frequent adjacent pair (over unique pre-tokens,
   weighted by count) is the next id.
Ids are ranks: tiktoken encodes a pre-token by merging its lowest-rank adjacent
pair until none is a token.

EOS "<|endoftext|>" ends a document (the model learns to emit it to stop), PAD
"<|pad|>" fills batches: the last two ids, two so that padding is told by the
id alone. A real EOS is a training target, padding never is.
"""
import base64
import collections
import json
import os

import regex
import tiktoken
import torch

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)

# GPT-2's pre-tokenizer: contractions, an optional space glued to a run of
# letters / digits / other symbols, then whitespace. `\s+(?!\S)` leaves a run's
# last space to the next word: "a  b" is "a", " ", " b".
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> tiktoken.Encoding:
    """Learn BPE from `texts`: 256 bytes + merges + 2 specials = vocab_size, fewer if
    pairs run out (enc.n_vocab). Ties: smallest (left, right) bytes; only counts matter."""
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ValueError(f"vocab_size must be at least {n_min}, got {vocab_size}")
    counts = collections.Counter(w for t in texts for w in regex.findall(PAT_STR, t))
    words = [list(w.encode("utf-8")) for w in counts]  # the unique pre-tokens
    freqs = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes of that token
    rank_of = {b: i for i, b in enumerate(vocab)}

    pair_counts = collections.Counter()  # pair -> its weighted count
    words_with = collections.defaultdict(set)  # pair -> words holding it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            words_with[pair].add(i)

    while len(vocab) < vocab_size - len(SPECIAL_TOKENS) and pair_counts:
        top = max(pair_counts.values())
        ties = (p for p, c in pair_counts.items() if c == top)
        best = min(ties, key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merged = vocab[best[0]] + vocab[best[1]]
        # bytes -> rank in tiktoken: a pair spelling known bytes reuses the id
        new_id = rank_of.setdefault(merged, len(vocab))
        if new_id == len(vocab):
            vocab.append(merged)
        # Recount only the words holding the pair (a stale one recounts
        # unchanged). Each step merges, so the loop ends even with no new id.
        for i in words_with.pop(best):
            word, freq = words[i], freqs[i]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            words[i] = out = _merge(word, best, new_id)
            for pair in zip(out, out[1:]):
                pair_counts[pair] += freq
                words_with[pair].add(i)
    return _make_encoding(vocab, PAT_STR)


def _merge(word, pair, new_id):
    """`word` (ids) with each `pair` in it, left to right, -> new_id."""
    out, j = [], 0
    while j < len(word):
        hit = j + 1 < len(word) and word[j] == pair[0] and word[j + 1] == pair[1]
        out.append(new_id if hit else word[j])
        j += 2 if hit else 1
    return out


def _make_encoding(vocab: list[bytes], pat_str: str) -> tiktoken.Encoding:
    """Ranks 0..N-1 for `vocab`, then EOS = N, PAD = N + 1."""
    n = len(vocab) + len(SPECIAL_TOKENS)
    ranks = {b: i for i, b in enumerate(vocab)}
    specials = {tok: len(vocab) + j for j, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(f"leash-bpe-{n}", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens=specials, explicit_n_vocab=n)


def eos_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token  # tiktoken's name for the id of "<|endoftext|>"


def pad_id(enc: tiktoken.Encoding) -> int:
    return enc.encode_single_token(PAD)


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Ids of ordinary text, never EOS/PAD: a literal "<|endoftext|>" stays
    plain bytes, so user text can neither crash encoding (tiktoken's `encode`
    raises on it) nor end a document. Find the real EOS by id."""
    return enc.encode_ordinary(text)


def padded_vocab_size(enc: tiktoken.Encoding, multiple: int = 64) -> int:
    """n_vocab rounded up to `multiple` (faster matmuls); extra ids learn p ~ 0."""
    return -(-enc.n_vocab // multiple) * multiple


def left_pad(seqs, pad_id):
    """Id lists -> (B, P) LongTensor padded on the left with pad_id; P: the longest."""
    P = max(len(s) for s in seqs)
    rows = [[pad_id] * (P - len(s)) + list(s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def encode_batch(enc, prompts, completions, block_size):
    """Rows encode(prompt) + encode(completion) + [EOS] (encoded apart, as
    sampled), right-padded with PAD -> (tokens (N, T) long, mask (N, T-1) fp32,
    keep); mask is 1 where the target tokens[:, 1:] is a completion token or
    the EOS. Rows over block_size are dropped, not cut; keep: kept indices."""
    eos, pad = eos_id(enc), pad_id(enc)
    rows = []  # (input index, ids, first completion target: j is token j+1)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p = encode(enc, prompt)
        ids = p + encode(enc, completion) + [eos]
        if len(ids) <= block_size:
            rows.append((i, ids, max(len(p) - 1, 0)))  # empty prompt: every target
    if not rows:
        raise ValueError(f"no example fits in block_size={block_size}")
    T = max(len(ids) for _, ids, _ in rows)
    padded = [ids + [pad] * (T - len(ids)) for _, ids, _ in rows]
    tokens = torch.tensor(padded, dtype=torch.long)
    mask = torch.tensor([[start <= j < len(ids) - 1 for j in range(T - 1)]
                         for _, ids, start in rows]).float()
    return tokens, mask, [i for i, _, _ in rows]


def decode_responses(enc, tokens, prompt_len):
    """tokens (B, P+N) -> (texts, ended): each row's text from column
    prompt_len to its first EOS or PAD (excluded), and if it has an EOS."""
    eos, pad = eos_id(enc), pad_id(enc)
    rows = tokens[:, prompt_len:].cpu().tolist()
    stops = [next((j for j, t in enumerate(r) if t in (eos, pad)), len(r)) for r in rows]
    return [enc.decode(r[:s]) for r, s in zip(rows, stops)], [eos in r for r in rows]


def save_tokenizer(enc: tiktoken.Encoding, path: str) -> None:
    """Write `enc` to `path` as JSON (base64 ranks), atomically (never half a file)."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    data = {"format": "leash-bpe-1", "name": enc.name, "pat_str": enc._pat_str,
            "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b, _ in ranks],
            "special_tokens": enc._special_tokens}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def load_tokenizer(path: str) -> tiktoken.Encoding:
    """A file written by save_tokenizer; ValueError naming `path` if missing or bad."""
    try:
        with open(path) as f:
            data = json.load(f)
        vocab = [base64.b64decode(s, validate=True) for s in data["mergeable_ranks"]]
        singles = [bytes([i]) for i in range(256)]
        if vocab[:256] != singles or len(set(vocab)) != len(vocab):
            raise ValueError("the 256 single bytes must come first, in order; no token twice")
        return _make_encoding(vocab, data["pat_str"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load tokenizer from {path}: {e!r}") from None
