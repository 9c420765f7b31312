"""reference.py: the frozen reference never changes, and its log-probs are the sampler's."""
import torch
import torch.nn.functional as F

import ppo
from model import GPT, GPTConfig, ScalarModel
from reference import freeze, response_mask, token_logprobs, trainable

EOS, PAD = 61, 62


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_out=PAD))


def test_freeze_is_a_frozen_copy_that_never_changes():
    policy = small_model()
    ref = freeze(policy)
    assert ref is not policy and not ref.training and all(not p.requires_grad for p in ref.parameters())
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


def test_reference_unchanged_by_a_ppo_step_on_the_policy():
    """The real PPO update (ppo.optimise, policy and critic) moves the policy, never the reference
    frozen from it, even when the policy is a `trainable` copy of the same model."""
    sft = small_model(3).eval()
    ref, policy = freeze(sft), trainable(sft)
    ref_of_policy = freeze(policy)  # frozen from the very model that trains
    critic = trainable(ScalarModel(sft))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.manual_seed(0)
    prompt = torch.tensor([[PAD, 3, 4], [5, 6, 7], [8, 9, 10], [PAD, PAD, 11]])
    tokens, _ = policy.generate(prompt, 10, EOS, PAD)
    mask = response_mask(tokens, 3, PAD)
    with torch.no_grad():
        logp = token_logprobs(policy, tokens, PAD)
        values = critic(tokens, tokens != PAD)[:, :-1]
    batch = dict(tokens=tokens, logp=logp, values=values, mask=mask,
                 advantages=torch.randn(mask.shape) * mask, returns=torch.randn(mask.shape) * mask)
    opt = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=1e-2)
    cfg = ppo.PPOConfig(epochs=2, minibatch_size=2)
    ppo.optimise(policy, critic, batch, opt, cfg, PAD, "cpu", "fp32")
    assert any(not torch.equal(p, sft.state_dict()[k]) for k, p in policy.state_dict().items())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(ref_of_policy.state_dict()[k], before[k]), k
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training


def test_trainable_is_a_deep_copy_that_trains():
    ref = freeze(small_model(4))
    policy = trainable(ref)
    assert all(p.requires_grad for p in policy.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(policy.parameters(), ref.parameters()))


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
        assert m.sum() > 5
        assert torch.allclose(logp[m], gen_logp[m], atol=1e-5)
        assert torch.equal(logp[m], ref_logp[m])


def test_token_logprobs_by_hand_and_logits():
    """log softmax(logits / T) at each next token; return_logits gives those scaled logits."""
    model = small_model(2)
    tokens = torch.randint(0, 60, (3, 9))
    with torch.no_grad():
        logits = model(tokens)[:, :-1] / 0.7
        expected = F.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        logp, got_logits = token_logprobs(model, tokens, temperature=0.7, return_logits=True)
    assert logp.shape == (3, 8) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    # a PAD target (beyond the outputs) gives a finite, meaningless value, not an error
    tokens[0, -1] = PAD
    with torch.no_grad():
        assert torch.isfinite(token_logprobs(model, tokens, PAD)).all()


def test_left_padded_batch_equals_each_row_alone():
    """token_logprobs of a left-padded batch (pad_id given): each row's log-probs over its real
    tokens equal those of the row alone, unpadded."""
    model = small_model(5).eval()
    torch.manual_seed(1)
    rows = [torch.randint(0, 60, (n,)) for n in (9, 4, 7, 1 + 1)]
    T = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.full((T - len(r),), PAD), r]) for r in rows])
    with torch.no_grad():
        together = token_logprobs(model, batch, PAD)
        for i, r in enumerate(rows):
            alone = token_logprobs(model, r[None])[0]
            torch.testing.assert_close(together[i, T - len(r):], alone, atol=1e-5, rtol=1e-5)
        # without pad_id the padding is attended to and positions shift: the rows differ
        unmasked = token_logprobs(model, batch)
    assert (unmasked[1, T - 4:] - together[1, T - 4:]).abs().max() > 1e-3


def test_response_mask():
    tokens = torch.tensor([[PAD, 1, 2, 3, EOS, PAD], [1, 1, 2, 3, 4, 5]])
    mask = response_mask(tokens, 3, PAD)
    # targets are tokens[:, 1:]; response targets are columns 3.. of tokens, minus padding
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
