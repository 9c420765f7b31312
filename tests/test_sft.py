"""sft.py: the SFT mask (prompt tokens carry no loss, EOS does), the learning-rate schedule, and
short runs that learn."""
import pytest
import torch

import tokenizer as tok
from helpers import tiny_gpt
from model import GPT, GPTConfig
from sft import TrainConfig, encode_stream, finetune, lr_at, masked_nll, stream_batch, train_lm

TEXTS = ["the film was good.", "i loved the cast!", "the plot was not very good.",
         "the music was bad but the acting was great."] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train_tokenizer(TEXTS, 300)


def sft_batch(enc, pairs, block_size=32):
    return tok.encode_batch(enc, [p for p, _ in pairs], [c for _, c in pairs], block_size)


def test_sft_mask_covers_completion_and_eos_only(enc):
    pairs = [("the film", " was good."), ("i loved", " the cast!")]
    tokens, mask, keep = sft_batch(enc, pairs)
    assert keep == [0, 1]
    for row, m, (p, c) in zip(tokens.tolist(), mask.tolist(), pairs):
        n_p, n_c = len(tok.encode(enc, p)), len(tok.encode(enc, c))
        targets = row[1:]
        loss_targets = [t for t, w in zip(targets, m) if w == 1]
        assert loss_targets == tok.encode(enc, c) + [tok.eos_id(enc)]
        assert sum(m) == n_c + 1
        assert all(w == 0 for w in m[:n_p - 1])


def test_prompt_positions_get_no_gradient(enc):
    tokens, mask, _ = sft_batch(enc, [("the plot was", " not very good.")])
    logits = torch.randn(1, tokens.shape[1], tok.padded_vocab_size(enc), requires_grad=True)
    masked_nll(lambda t, pad_mask=None: logits, tokens, mask).backward()
    per_position = logits.grad[0, :-1].abs().sum(-1)
    assert torch.all(per_position[mask[0] == 0] == 0)
    assert torch.all(per_position[mask[0] == 1] > 0)


def test_masked_nll_is_the_mean_over_masked_targets(enc):
    model = tiny_gpt(enc)
    tokens, mask, _ = sft_batch(enc, [("the film", " was good."), ("the plot was", " not very good.")])
    with torch.no_grad():
        targets = torch.where(mask.bool(), tokens[:, 1:], 0)  # PAD lies beyond the outputs
        logp = torch.log_softmax(model(tokens)[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
        expected = -(logp * mask).sum() / mask.sum()
        assert masked_nll(model, tokens, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_too_long_pairs_are_dropped_not_truncated(enc):
    tokens, mask, keep = sft_batch(enc, [("the film", " was good."), ("the", " film was" * 30)], 16)
    assert keep == [0] and tokens.shape[0] == 1


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then it only decays
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1) == lr_at(500, 100, 1.0, 10)


def test_short_pretraining_run_lowers_loss(enc):
    torch.manual_seed(0)
    stream = encode_stream(enc, TEXTS)
    assert (stream == tok.eos_id(enc)).sum() == len(TEXTS)  # every text ends with EOS
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
    assert [r["step"] for r in logs] == [0, 30, 59] and logs[-1]["eta_s"] == 0
    for key in ("stage", "loss", "val_loss", "lr", "ms_per_step", "tok_per_s"):
        assert key in logs[-1], key
    assert not model.training  # handed back in eval mode


def test_finetune_learns_to_answer_and_stop(enc):
    """A few SFT steps on one (prompt, completion) pair make the completion + EOS likely."""
    model = tiny_gpt(enc, block_size=16, n_layer=1)
    pairs = [("the film", " was good.")] * 40
    tokens, mask, _ = sft_batch(enc, pairs[:1], 16)
    with torch.no_grad():
        before = masked_nll(model, tokens, mask).item()
    logs = []
    val = finetune(model, enc, pairs, TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup=5, eval_every=39,
                                                  eval_batches=1, log_every=39), "cpu", "fp32", logs.append, 0)
    with torch.no_grad():
        after = masked_nll(model, tokens, mask).item()
    assert after < 0.1 < before and val == pytest.approx(after, abs=1e-3)
    assert logs[0]["stage"] == "sft"
