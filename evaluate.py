"""
How every stage (SFT, PPO, DPO) is judged, by one function so the numbers compare: one answer to each fixed
held-out prompt, sampled at temperature 1, no top-k / top-p (the policy as it is), scored against the truth.

  gold_reward   what a reader thinks (world.gold_reward), mean over the answers
  proxy_reward  what the reward model thinks (if a score_fn is given)
  valid_rate    share of answers that are sentences of the language (world.is_valid)
  distinct_2    distinct word bigrams / all bigrams over the answers (diversity)
  kl, kl_max    mean and max over answers of the exact KL(pi || pi_ref) per answer (if a ref is given)
  eos_rate      share of answers that ended with EOS within the length budget
  length_words  mean words per full text (prompt + answer)
`rollout_metrics` gives the same figures (and entropy) for an RL update's own sampled batch.
"""
import torch

import dist
import tokenizer as tok
import world
from kl import full_kl, sequence_kl
from model import autocast
from reference import response_mask, token_logprobs


@torch.no_grad()
def exact_sequence_kl(policy, ref, tokens, prompt_len, pad_id):
    """(B,) exact KL(pi || pi_ref) of each answer in tokens (B, T): `full_kl` summed over its response."""
    _, logits = token_logprobs(policy, tokens, pad_id, return_logits=True)
    _, ref_logits = token_logprobs(ref, tokens, pad_id, return_logits=True)
    return (full_kl(logits, ref_logits) * response_mask(tokens, prompt_len, pad_id)).sum(1)


@torch.no_grad()
def evaluate_policy(model, enc, prompts, max_new_tokens, device, dtype="fp32", ref=None, score_fn=None,
                    seed=1234, gold_fn=world.gold_reward, valid_fn=world.is_valid, batch_size=256):
    """(metrics dict, full texts) of `model` answering `prompts` (module docstring). score_fn(tokens (B, T),
    prompt_len) -> (B,) proxy rewards, e.g. reward.score. Sampling draws from its own seeded generator, so an
    evaluation never shifts the training's random stream. valid_fn None: validity is not measured.
    Data-parallel, every rank runs the whole of it, the same on each (same weights, seed, prompts): simpler
    than sharding and gathering, the figures do not depend on N, and it is small next to training."""
    pad, eos = tok.pad_id(enc), tok.eos_id(enc)
    gen = torch.Generator(device).manual_seed(seed)
    texts, ended, kls, proxy = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        prompt = tok.left_pad([tok.encode(enc, p) for p in batch], pad).to(device)
        with autocast(device, dtype, sampling=True):
            tokens, _ = model.generate(prompt, max_new_tokens, eos, pad, generator=gen)
        P = prompt.shape[1]
        answers, done = tok.decode_responses(enc, tokens, P)
        texts += [p + a for p, a in zip(batch, answers)]
        ended += done
        if ref is not None:
            kls.append(exact_sequence_kl(model, ref, tokens, P, pad).cpu())
        if score_fn is not None:
            proxy.append(score_fn(tokens, P).float().cpu())
    out = {"gold_reward": sum(map(gold_fn, texts)) / len(texts),
           "valid_rate": sum(map(valid_fn, texts)) / len(texts) if valid_fn else None,
           "distinct_2": world.distinct_n(texts, 2), "eos_rate": sum(ended) / len(ended),
           "length_words": sum(len(t.split()) for t in texts) / len(texts)}
    if kls:
        out["kl"], out["kl_max"] = torch.cat(kls).mean().item(), torch.cat(kls).max().item()
    if proxy:
        out["proxy_reward"] = torch.cat(proxy).mean().item()
    return out, texts


def gold_scores(enc, tokens, prompt_len, gold_fn=world.gold_reward):
    """(B,) the world's exact reward of each answer in tokens (B, T), left-padded prompts of prompt_len
    columns: a reward model that is never wrong (train.py --reward gold: a verifiable reward)."""
    pad, (answers, _) = tok.pad_id(enc), tok.decode_responses(enc, tokens, prompt_len)
    prompts = [enc.decode([t for t in row if t != pad]) for row in tokens[:, :prompt_len].tolist()]
    return torch.tensor([gold_fn(p + a) for p, a in zip(prompts, answers)], device=tokens.device)


@torch.no_grad()
def rollout_metrics(ro, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """The figures of an RL rollout batch `ro` (ppo.rollout's dict: logp, ref_logp, logits, ref_logits, mask,
    scores, ended, texts): kl is the k1 estimate per answer, kl_exact / kl_max the exact KL(pi || pi_ref) per
    answer (full_kl summed over its tokens), entropy per response token, length in tokens. Data-parallel,
    the figures of every rank's answers: ranks hold as many answers each, so a mean is the ranks' means'
    mean (entropy, per token, weighted by the ranks' token counts); distinct_2 over all their texts."""
    mask, texts = ro["mask"], ro["texts"]
    kl_exact = (full_kl(ro["logits"], ro["ref_logits"]) * mask).sum(1)
    logp_all = torch.log_softmax(ro["logits"], -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    share = lambda fn: sum(map(fn, texts)) / len(texts) if fn else float("nan")
    means = {"proxy_reward": ro["scores"].mean(), "gold_reward": share(gold_fn),
             "kl": sequence_kl(ro["logp"], ro["ref_logp"], mask).mean(), "kl_exact": kl_exact.mean(),
             "entropy": torch.where(mask.bool(), entropy, 0.0).sum() / mask.sum()  # this rank's term
                        * dist.rank_weight(mask.sum()),
             "length": mask.sum(1).mean(), "valid_rate": share(valid_fn),
             "eos_rate": ro["ended"].float().mean()}
    values = dist.all_mean(torch.tensor([float(v) for v in means.values()], dtype=torch.float64,
                                        device=mask.device)).tolist()  # one all-reduce; float64: exact
    return {**dict(zip(means, values)), "kl_max": dist.all_max(kl_exact.max()).item(),
            "distinct_2": world.distinct_n(sum(dist.gather(texts), []), 2)}
