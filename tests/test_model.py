"""model.py: shapes, left padding, and KV-cache generation against recomputation."""
import torch

from model import GPT, GPTConfig
from reference import gather_logprobs

EOS, PAD = 61, 62  # PAD is the last real id; 63 is vocabulary padding


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_out=PAD)).eval()


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


def test_kv_cache_generation_matches_recomputation():
    """Tokens and log-probs from cached generation equal a fresh full forward pass."""
    m = small_model(1)
    prompts = torch.tensor([[PAD, PAD, 5, 6, 7], [1, 2, 3, 4, 5], [PAD, 9, 10, 11, 12]])
    torch.manual_seed(0)
    tokens, logp = m.generate(prompts, 20, EOS, PAD, temperature=0.7)
    N = logp.shape[1]
    assert tokens.shape == (3, 5 + N)
    pad_mask = tokens != PAD
    pad_mask[:, 5:] = True  # response pads after EOS are harmless: they come after
    recomputed = gather_logprobs(m(tokens, pad_mask)[:, :-1], tokens[:, 1:], temperature=0.7)[:, 4:]
    resp = tokens[:, 5:]
    alive = torch.ones_like(resp, dtype=torch.bool)
    for i in range(3):  # positions up to and including the first EOS
        hits = (resp[i] == EOS).nonzero()
        if len(hits):
            alive[i, hits[0, 0] + 1:] = False
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
    assert n_ended > 0
    assert (tokens[:, 3:] <= PAD).all()  # with 64 rows x 25 steps over 64 tokens, some rows must end


def test_sampler_draws_from_the_model_distribution():
    """generate()'s inverse-CDF sampler: first-token frequencies over many rows match
    softmax(logits / T) within 5 standard errors, and top_k never yields a token outside
    the k most likely."""
    m = small_model(3)
    prompt = torch.tensor([[1, 2, 3]]).expand(20000, 3)
    probs = torch.softmax(m(prompt[:1])[0, -1] / 1.5, -1)
    torch.manual_seed(0)
    tokens, _ = m.generate(prompt, 1, EOS, PAD, temperature=1.5)
    freq = torch.bincount(tokens[:, 3], minlength=probs.numel()).float() / len(tokens)
    stderr = (probs * (1 - probs) / len(tokens)).sqrt()
    assert ((freq - probs).abs() <= 5 * stderr + 1e-4).all()
    top5 = set(torch.topk(probs, 5).indices.tolist())
    tokens, _ = m.generate(prompt[:2000], 1, EOS, PAD, temperature=1.5, top_k=5)
    assert set(tokens[:, 3].tolist()) <= top5
