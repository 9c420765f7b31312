"""sft.py: the SFT mask (prompt tokens carry no loss, EOS does) and a short run that learns."""
import os

import pytest
import torch

import tokenizer as tok
from model import GPT, GPTConfig
from sft import (TrainConfig, encode_pairs, encode_stream, load_checkpoint, masked_nll,
                 save_checkpoint, stream_batch, train_lm)

TEXTS = ["the film was good.", "i loved the cast!", "the plot was not very good.",
         "the music was bad but the acting was great."] * 20


def test_sft_mask_covers_completion_and_eos_only():
    enc = tok.train_tokenizer(TEXTS, 300)
    pairs = [("the film", " was good."), ("i loved", " the cast!")]
    tokens, mask, dropped = encode_pairs(enc, pairs, 32)
    assert dropped == 0
    for row, m, (p, c) in zip(tokens.tolist(), mask.tolist(), pairs):
        n_p, n_c = len(tok.encode(enc, p)), len(tok.encode(enc, c))
        targets = row[1:]
        loss_targets = [t for t, w in zip(targets, m) if w == 1]
        assert loss_targets == tok.encode(enc, c) + [tok.eos_id(enc)]
        assert sum(m) == n_c + 1
        assert all(w == 0 for w in m[:n_p - 1])


def test_prompt_positions_get_no_gradient():
    enc = tok.train_tokenizer(TEXTS, 300)
    tokens, mask, _ = encode_pairs(enc, [("the plot was", " not very good.")], 32)
    logits = torch.randn(1, tokens.shape[1], tok.padded_vocab_size(enc), requires_grad=True)
    masked_nll(lambda t: logits, tokens, mask).backward()
    per_position = logits.grad[0, :-1].abs().sum(-1)
    assert torch.all(per_position[mask[0] == 0] == 0)
    assert torch.all(per_position[mask[0] == 1] > 0)


def test_too_long_pairs_are_dropped_not_truncated():
    enc = tok.train_tokenizer(TEXTS, 300)
    tokens, mask, dropped = encode_pairs(enc, [("the film", " was good."), ("the", " film was" * 30)], 16)
    assert dropped == 1 and tokens.shape[0] == 1


def test_short_pretraining_run_lowers_loss(tmp_path):
    torch.manual_seed(0)
    enc = tok.train_tokenizer(TEXTS, 300)
    stream = encode_stream(enc, TEXTS)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.padded_vocab_size(enc), n_layer=1, n_head=2,
                          n_embd=32, n_out=tok.pad_id(enc)))
    gen = torch.Generator().manual_seed(0)
    batch = lambda: stream_batch(stream, 16, 16, gen)
    with torch.no_grad():
        before = sum(masked_nll(model, *batch()).item() for _ in range(4)) / 4
    logs = []
    after = train_lm(model, batch, batch, TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5,
                                                       eval_every=59, log_every=30), log=logs.append)
    assert after < before - 1.0, (before, after)
    assert logs[-1]["step"] == 59 and "tok_per_s" in logs[-1]
    # checkpoint round trip (atomic write, weights_only load)
    tok.save_tokenizer(enc, os.path.join(tmp_path, "tokenizer.json"))
    save_checkpoint(os.path.join(tmp_path, "m.pt"), model, {"val_loss": after})
    loaded, enc2 = load_checkpoint(os.path.join(tmp_path, "m.pt"))
    x = stream[:16][None]
    assert torch.equal(loaded(x), model(x)) and enc2.n_vocab == enc.n_vocab
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint intact and loadable."""
    torch.manual_seed(0)
    enc = tok.train_tokenizer(TEXTS, 300)
    tok.save_tokenizer(enc, os.path.join(tmp_path, "tokenizer.json"))
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.padded_vocab_size(enc), n_layer=1, n_head=2, n_embd=32))
    path = os.path.join(tmp_path, "m.pt")
    save_checkpoint(path, model, {"version": 1})
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"half": torch.zeros(3)}, f)  # something lands on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, {"version": 2})
    monkeypatch.setattr(torch, "save", real_save)
    loaded, _ = load_checkpoint(path)
    assert torch.load(path, weights_only=True)["meta"]["version"] == 1
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "tokenizer.json"]  # no half-written leftovers


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = os.path.join(tmp_path, "bad.pt")
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(path)
