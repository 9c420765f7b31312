"""
How a policy is judged: answers to a fixed set of held-out prompts, sampled at
temperature 1 with no top-k / top-p (the policy as it really is), then scored
against the world's truth.

  gold_reward  what a reader thinks (world.gold_reward), mean over samples
  proxy_reward what the learned reward model thinks (if one is given)
  valid_rate   fraction of samples that are sentences of the language (world.is_valid)
  distinct_2   distinct word bigrams / all bigrams over the samples (diversity)
  kl           exact KL(pi || pi_ref) per sequence: the sum over response tokens of
               kl.full_kl, averaged over samples (if a reference is given)
  eos_rate     fraction of samples that ended with EOS within the length budget
Every stage (SFT, PPO, DPO) is measured by this one function, so the numbers compare.
"""
import torch

import tokenizer as tok
import world
from kl import full_kl
from reference import response_mask


def left_pad(seqs, pad_id):
    """List of id lists -> (B, P) LongTensor, padded on the left with pad_id."""
    P = max(len(s) for s in seqs)
    return torch.tensor([[pad_id] * (P - len(s)) + list(s) for s in seqs], dtype=torch.long)


def decode_responses(enc, tokens, prompt_len):
    """Response text of each row (up to, not including, EOS) and whether EOS was reached."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    texts, ended = [], []
    for row in tokens[:, prompt_len:].tolist():
        ids = []
        for t in row:
            if t == eos or t == pad:
                break
            ids.append(t)
        ended.append(eos in row)
        texts.append(enc.decode(ids))
    return texts, ended


@torch.no_grad()
def sample_batch(model, enc, prompts, max_new_tokens, device, temperature=1.0):
    """One completion per prompt, in one batch. Returns tokens (B, P+N), the padded
    prompt length P, the full texts (prompt + response) and whether each row hit EOS."""
    prompt = left_pad([tok.encode(enc, p) for p in prompts], tok.pad_id(enc)).to(device)
    tokens, _ = model.generate(prompt, max_new_tokens, tok.eos_id(enc), tok.pad_id(enc), temperature)
    resp, ended = decode_responses(enc, tokens.cpu(), prompt.shape[1])
    return tokens, prompt.shape[1], [p + r for p, r in zip(prompts, resp)], ended


@torch.no_grad()
def exact_sequence_kl(policy, ref, tokens, prompt_len, pad_id):
    """(B,) exact KL(pi || pi_ref) of each sampled sequence: sum over response positions
    of the full-vocabulary KL of the next-token distributions."""
    pad_mask = tokens != pad_id
    logits = policy(tokens, pad_mask)[:, :-1]
    ref_logits = ref(tokens, pad_mask)[:, :-1]
    mask = response_mask(tokens, prompt_len, pad_id)
    return (full_kl(logits, ref_logits) * mask).sum(1)


def evaluate_policy(model, enc, prompts, max_new_tokens, device, ref=None, reward_fn=None,
                    seed=1234, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """Metrics of `model` on `prompts` (see the module docstring) and the samples themselves.
    Sampling uses its own seeded RNG so that evaluation never shifts training's randomness.
    reward_fn(texts) -> list of proxy rewards. valid_fn may be None (validity not measured)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts, ended = [], []
        kls = []
        for i in range(0, len(prompts), 256):
            tokens, P, t, e = sample_batch(model, enc, prompts[i:i + 256], max_new_tokens, device)
            texts += t
            ended += e
            if ref is not None:
                kls.append(exact_sequence_kl(model, ref, tokens, P, tok.pad_id(enc)).cpu())
    gold = [gold_fn(t) for t in texts]
    out = {"gold_reward": sum(gold) / len(gold),
           "valid_rate": (sum(map(valid_fn, texts)) / len(texts)) if valid_fn else None,
           "distinct_2": world.distinct_n(texts, 2),
           "eos_rate": sum(ended) / len(ended),
           "length_words": sum(len(t.split()) for t in texts) / len(texts)}
    if ref is not None:
        kl_all = torch.cat(kls)
        out["kl"] = kl_all.mean().item()
        out["kl_max"] = kl_all.max().item()
    if reward_fn is not None:
        proxy = reward_fn(texts)
        out["proxy_reward"] = float(sum(proxy) / len(proxy))
    return out, texts
