"""model.py: shapes, left padding, attention both ways, KV-cache generation against
recomputation, the scalar head, and checkpoints (atomic, one clear error when bad)."""
import os

import pytest
import torch

from model import GPT, GPTConfig, ScalarModel, attention, load_checkpoint, save_checkpoint
from reference import token_logprobs

EOS, PAD = 61, 62  # PAD is the last real id; 63 is vocabulary padding


def small_model(seed=0, block_size=32, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_out=PAD, **kw)
    return GPT(cfg).eval()


def test_shapes_and_param_count():
    m = small_model()
    x = torch.randint(0, 60, (3, 10))
    assert m(x).shape == (3, 10, PAD)  # PAD and beyond can never be output
    assert m.trunk(x).shape == (3, 10, 32)
    # 12 * L * C^2 weights in blocks + biases + LayerNorms + tied embedding (positions left out)
    C, L, V = 32, 2, 64
    per_block = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C
    assert m.num_params() == L * per_block + V * C + 2 * C


def test_causal():
    m = small_model()
    x = torch.randint(0, 60, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 60, (2, 4))
    assert torch.allclose(m(x)[:, :8], m(y)[:, :8], atol=1e-6)


def test_left_padding_does_not_change_real_rows():
    """A prompt left-padded in a batch gives the same logits as the same prompt alone."""
    m = small_model()
    short = torch.randint(0, 60, (1, 5))
    padded = torch.cat([torch.full((1, 3), PAD), short], dim=1)
    alone = m(short)
    in_batch = m(padded, padded != PAD)[:, 3:]
    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_attention_written_out_equals_the_fused_kernel():
    """The formula written out (CPU default) and PyTorch's fused kernel agree, causal and with a
    padding mask, and a model gives the same logits either way."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    torch.testing.assert_close(attention(q, k, v, fused=False), attention(q, k, v, fused=True),
                               atol=1e-5, rtol=1e-5)
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False
    mask[0, :, torch.arange(7), torch.arange(7)] = True  # every query sees at least itself
    torch.testing.assert_close(attention(q, k, v, mask, fused=False), attention(q, k, v, mask, fused=True),
                               atol=1e-5, rtol=1e-5)
    # the written-out path really is causal: the last key changes only the last query
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 5.0, 5.0
    changed = (attention(q, k, v, fused=False) - attention(q, k2, v2, fused=False)).abs().amax((0, 1, 3))
    assert (changed[:-1] == 0).all() and changed[-1] > 0
    x = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    a, b = small_model(fused_attention=False), small_model(fused_attention=True)
    torch.testing.assert_close(a(x, x != PAD), b(x, x != PAD), atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_matches_recomputation():
    """Tokens and log-probs from cached generation equal a fresh full forward pass."""
    m = small_model(1)
    prompts = torch.tensor([[PAD, PAD, 5, 6, 7], [1, 2, 3, 4, 5], [PAD, 9, 10, 11, 12]])
    torch.manual_seed(0)
    tokens, logp = m.generate(prompts, 20, EOS, PAD, temperature=0.7)
    N = logp.shape[1]
    assert tokens.shape == (3, 5 + N)
    recomputed = token_logprobs(m, tokens, PAD, temperature=0.7)[:, 4:]
    resp = tokens[:, 5:]
    alive = torch.ones_like(resp, dtype=torch.bool)
    for i in range(3):  # positions up to and including the first EOS
        hits = (resp[i] == EOS).nonzero()
        if len(hits):
            alive[i, hits[0, 0] + 1:] = False
    assert alive.sum() > 10
    assert torch.allclose(logp[alive], recomputed[alive], atol=1e-5)
    assert (logp[~alive] == 0).all() and (resp[~alive] == PAD).all()


def test_generation_stops_at_eos_and_pads():
    m = small_model(2)
    torch.manual_seed(3)
    prompts = torch.randint(0, 60, (64, 3))
    tokens, logp = m.generate(prompts, 25, EOS, PAD)
    assert logp.shape == (64, tokens.shape[1] - 3)
    n_ended = 0
    for row, lp in zip(tokens[:, 3:].tolist(), logp.tolist()):
        if EOS in row:
            n_ended += 1
            after = row.index(EOS) + 1
            assert all(t == PAD for t in row[after:]) and all(x == 0 for x in lp[after:])
        assert PAD not in row[:row.index(EOS) if EOS in row else len(row)]
    assert n_ended > 0  # with 64 rows x 25 steps over 62 tokens, some rows must end
    assert (tokens[:, 3:] <= PAD).all()


def test_generation_stops_early_once_every_row_ended():
    """EOS is checked every 8 steps: once all rows have ended, at most 7 all-PAD columns follow."""
    m = small_model(4)
    with torch.no_grad():  # make EOS by far the likeliest token: every row ends at once
        m.wte.weight[EOS] = 0
        m.wte.weight[EOS, 0] = 100.0
        m.ln_f.weight.zero_()
        m.ln_f.bias.zero_()
        m.ln_f.bias[0] = 1.0
    tokens, logp = m.generate(torch.randint(0, 60, (5, 3)), 28, EOS, PAD)
    assert (tokens[:, 3] == EOS).all()
    assert 1 <= logp.shape[1] <= 8 and (tokens[:, 4:] == PAD).all()


def test_generator_makes_sampling_reproducible():
    m = small_model(5)
    prompt = torch.randint(0, 60, (8, 3))
    a = m.generate(prompt, 12, EOS, PAD, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global stream does not matter
    b = m.generate(prompt, 12, EOS, PAD, generator=torch.Generator().manual_seed(7))
    c = m.generate(prompt, 12, EOS, PAD, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sampler_draws_from_the_model_distribution():
    """generate()'s inverse-CDF sampler: first-token frequencies over many rows match
    softmax(logits / T) within 5 standard errors."""
    m = small_model(3, block_size=4)  # the KV cache holds a whole block per row: keep it small
    prompt = torch.tensor([[1, 2, 3]]).expand(20000, 3)
    probs = torch.softmax(m(prompt[:1])[0, -1] / 1.5, -1)
    torch.manual_seed(0)
    tokens, _ = m.generate(prompt, 1, EOS, PAD, temperature=1.5)
    freq = torch.bincount(tokens[:, 3], minlength=probs.numel()).float() / len(tokens)
    stderr = (probs * (1 - probs) / len(tokens)).sqrt()
    assert freq.numel() == probs.numel()  # never an id >= n_out
    assert ((freq - probs).abs() <= 5 * stderr + 1e-4).all()


def test_scalar_model_reads_the_trunk_and_applies_gain_and_bias():
    gpt = small_model(6)
    sm = ScalarModel(gpt, head_std=0.5).eval()
    x = torch.tensor([[PAD, 3, 4, 5], [6, 7, 8, 9]])
    with torch.no_grad():
        raw = sm(x, x != PAD)
        assert raw.shape == (2, 4) and raw.dtype == torch.float32
        sm.gain.fill_(2.0)
        sm.bias.fill_(-1.0)
        torch.testing.assert_close(sm(x, x != PAD), 2 * raw - 1)
        expected = sm.head(gpt.trunk(x, x != PAD)).squeeze(-1) * 2 - 1
        torch.testing.assert_close(sm(x, x != PAD), expected)
    assert sm.gpt is not gpt  # a copy: training the head's trunk leaves the GPT alone
    assert torch.equal(ScalarModel(gpt).head.weight, torch.zeros(1, 32))  # head_std 0: all zeros


def test_output_heads_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the trunk runs in bf16, but the logits and the
    scalar scores are an fp32 matmul of its final hidden states: a bf16
    head would round them (a logit in [8, 16) to a multiple of 1/16), and
    sampled and recomputed log-probs would disagree."""
    gpt = small_model(9)
    sm = ScalarModel(gpt, head_std=0.5).eval()
    x = torch.randint(0, 60, (3, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, h = gpt(x), gpt.trunk(x)
        scores, h_sm = sm(x), sm.gpt.trunk(x)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    with torch.no_grad():
        h_fp32 = gpt.trunk(x)
        expected = h.float() @ gpt.wte.weight[:PAD].T
        expected_scores = h_sm.float() @ sm.head.weight[0] + sm.head.bias
    assert not torch.allclose(h, h_fp32, atol=1e-4)  # the trunk did run in bf16
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_gpt_and_scalar_model(tmp_path):
    gpt = small_model(7)
    path = os.path.join(tmp_path, "m.pt")
    save_checkpoint(path, gpt, {"val_loss": 1.5})
    loaded, meta = load_checkpoint(path)
    x = torch.randint(0, 60, (2, 9))
    assert type(loaded) is GPT and not loaded.training and meta == {"val_loss": 1.5}
    assert loaded.cfg == gpt.cfg and torch.equal(loaded(x), gpt(x))
    sm = ScalarModel(gpt, head_std=0.5).eval()
    sm.gain.fill_(2.5)
    sm.bias.fill_(-0.3)
    save_checkpoint(path, sm)
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is ScalarModel and meta == {} and loaded.gain.item() == 2.5
    with torch.no_grad():
        assert torch.equal(loaded(x), sm(x))
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary files left


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint intact and loadable."""
    model = small_model(8)
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
    _, meta = load_checkpoint(path)
    assert meta["version"] == 1
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no half-written leftovers


def test_corrupt_or_missing_checkpoint_is_one_clear_error(tmp_path):
    path = os.path.join(tmp_path, "bad.pt")
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="missing.pt"):
        load_checkpoint(os.path.join(tmp_path, "missing.pt"))
