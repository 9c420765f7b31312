"""reference.py: the frozen reference never changes, and its log-probs are the sampler's."""
import torch

from model import GPT, GPTConfig
from reference import freeze, precompute_logprobs, response_mask, token_logprobs

EOS, PAD = 61, 62


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_out=PAD))


def test_freeze_is_a_frozen_copy_that_never_changes():
    policy = small_model()
    ref = freeze(policy)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    x = torch.randint(0, 60, (4, 16))
    for _ in range(3):
        loss = policy(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(p, before[k]) for k, p in policy.state_dict().items())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical


def test_token_logprobs_equal_generation_logprobs():
    """The log-probs recorded while sampling equal those of one recomputing forward pass,
    at the sampling temperature; so the KL to a freshly frozen copy is exactly 0."""
    policy = small_model(1)
    ref = freeze(policy)
    prompt = torch.tensor([[PAD, 3, 4], [5, 6, 7]])
    for temperature in (1.0, 0.6):
        torch.manual_seed(0)
        tokens, gen_logp = policy.generate(prompt, 20, EOS, PAD, temperature)
        mask = response_mask(tokens, 3, PAD)
        logp = token_logprobs(policy, tokens, PAD, temperature)[:, 2:]
        ref_logp = token_logprobs(ref, tokens, PAD, temperature)[:, 2:]
        m = mask[:, 2:].bool()
        assert torch.allclose(logp[m], gen_logp[m], atol=1e-5)
        assert torch.equal(logp[m], ref_logp[m])


def test_response_mask():
    tokens = torch.tensor([[PAD, 1, 2, 3, EOS, PAD], [1, 1, 2, 3, 4, 5]])
    mask = response_mask(tokens, 3, PAD)
    # targets are tokens[:, 1:]; response targets are columns 3.. of tokens, minus padding
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_precomputed_logprobs_equal_live_ones():
    model = small_model(2)
    tokens = torch.randint(0, 60, (6, 12))
    tokens[:2, -3:] = PAD
    mask = response_mask(tokens, 4, PAD)
    table = precompute_logprobs(model, [(tokens[:3], mask[:3]), (tokens[3:], mask[3:])], PAD)
    with torch.no_grad():
        live = (token_logprobs(model, tokens, PAD) * mask).sum(1)
    assert table.shape == (6,) and torch.allclose(table, live, atol=1e-5)
