"""
How every policy is judged, by one function so the numbers compare: one
answer to each fixed held-out prompt, sampled at temperature 1 with no
top-k / top-p, scored against the truth.

  gold_reward   what a reader thinks (world.gold_reward), mean
  proxy_reward  what the reward model thinks (given a score_fn)
  valid_rate    share of answers that are sentences of the language
  distinct_2    distinct word bigrams / all bigrams (diversity)
  kl, kl_max    mean and max over answers of the exact KL(pi || pi_ref)
                of the whole answer (given a ref)
  eos_rate      share of answers that ended with EOS within the budget
  length_words  mean words per full text (prompt + answer)
  exclaim_share share of answers with a "!" (the reward model's blind
                spot, world.EXCLAIM_BIAS); exclaims: "!" per answer
  heldout_nll   mean NLL per token (nats) of held-out reviews, never
                trained on: what RL cost pretraining (the alignment tax)

`rollout_metrics`: the same, and the entropy, for an RL update's batch.
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
    """(B,) exact KL(pi || pi_ref) of each answer in tokens (B, T): the
    per-position `full_kl` (pi first) summed over the answer's tokens."""
    _, logits = token_logprobs(policy, tokens, pad_id, return_logits=True)
    _, ref_logits = token_logprobs(ref, tokens, pad_id, return_logits=True)
    mask = response_mask(tokens, prompt_len, pad_id)
    return (full_kl(logits, ref_logits) * mask).sum(1)


@torch.no_grad()
def answer(model, enc, prompts, budget, device, dtype, temperature=1.0, generator=None):
    """One answer per prompt -> tokens (B, P+N) (left-padded prompt, answer, PAD
    after EOS), P, the sampled tokens' log-probs (B, N), texts, ended (B,)."""
    pad = tok.pad_id(enc)
    prompt = tok.left_pad([tok.encode(enc, p) for p in prompts], pad).to(device)
    with autocast(device, dtype, sampling=True):
        tokens, logp = model.generate(prompt, budget, tok.eos_id(enc), pad, temperature,
                                      generator)
    answers, ended = tok.decode_responses(enc, tokens, prompt.shape[1])
    texts = [p + a for p, a in zip(prompts, answers)]
    return tokens, prompt.shape[1], logp, texts, ended


@torch.no_grad()
def evaluate_policy(model, enc, prompts, max_new_tokens, device,
                    dtype="fp32", ref=None, score_fn=None, seed=1234,
                    gold_fn=world.gold_reward, valid_fn=world.is_valid,
                    batch_size=256, heldout=None):
    """(metrics, full texts) of `model` answering `prompts`; score_fn(tokens
    (B, T), prompt_len) -> (B,) proxy rewards; valid_fn None: no validity;
    heldout: reviews for heldout_nll.
    Its own seeded generator: training's random stream never shifts."""
    pad = tok.pad_id(enc)
    gen = torch.Generator(device).manual_seed(seed)
    texts, ended, kls, proxy = [], [], [], []

    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        tokens, P, _, batch_texts, done = answer(model, enc, batch, max_new_tokens,
                                                 device, dtype, generator=gen)
        texts += batch_texts
        ended += done
        if ref is not None:
            kls.append(exact_sequence_kl(model, ref, tokens, P, pad).cpu())
        if score_fn is not None:
            proxy.append(score_fn(tokens, P).float().cpu())

    n = len(texts)
    out = {"gold_reward": sum(map(gold_fn, texts)) / n,
           "valid_rate": sum(map(valid_fn, texts)) / n if valid_fn else None,
           "distinct_2": world.distinct_n(texts, 2),
           "eos_rate": sum(ended) / n,
           "length_words": sum(len(t.split()) for t in texts) / n}
    if kls:
        kls = torch.cat(kls)
        out["kl"], out["kl_max"] = kls.mean().item(), kls.max().item()
    if proxy:
        out["proxy_reward"] = torch.cat(proxy).mean().item()
    if valid_fn:  # the world's: the reward model's blind spot
        bangs = exclaims(prompts, texts)
        out["exclaim_share"] = (bangs > 0).float().mean().item()
        out["exclaims"] = bangs.mean().item()
    if heldout:
        out["heldout_nll"] = heldout_nll(model, enc, heldout, device, dtype)
    return out, texts


@torch.no_grad()
def heldout_nll(model, enc, texts, device, dtype="fp32", batch_size=256):
    """Mean per-token NLL (nats) of texts + EOS under the model: for held-out
    reviews, how well it still models the pretraining distribution (InstructGPT's
    "alignment tax", Ouyang et al. 2022, sec. 4.2)."""
    block = model.cfg.block_size
    tokens, mask, _ = tok.encode_batch(enc, [""] * len(texts), texts, block)
    nll, count = 0.0, 0.0
    for i in range(0, len(tokens), batch_size):
        rows = tokens[i:i + batch_size].to(device)
        rows_mask = mask[i:i + batch_size].to(device)
        with autocast(device, dtype):
            logp = token_logprobs(model, rows)
        nll -= (logp * rows_mask).sum().item()
        count += rows_mask.sum().item()
    return nll / count


def verifiable(text, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """A 0/1 check from the world's exact judges (RL with verifiable
    rewards): 1.0 when the text is a valid review and its gold reward > 0."""
    return float(valid_fn(text) and gold_fn(text) > 0)


def exclaims(prompts, texts):
    """(B,) "!" in each answer (text minus prompt): the hack's signature."""
    answers = [t[len(p):] for p, t in zip(prompts, texts)]
    return torch.tensor([float(world.n_exclaim(a)) for a in answers])


def gold_scores(enc, tokens, prompt_len, gold_fn=world.gold_reward):
    """(B,) the world's exact reward of each answer in tokens (B, T): a
    reward model that is never wrong (train.py --reward gold)."""
    pad = tok.pad_id(enc)
    answers, _ = tok.decode_responses(enc, tokens, prompt_len)
    prompt_rows = tokens[:, :prompt_len].tolist()
    prompts = [enc.decode([t for t in row if t != pad]) for row in prompt_rows]
    gold = [gold_fn(p + a) for p, a in zip(prompts, answers)]
    return torch.tensor(gold, device=tokens.device)


@torch.no_grad()
def rollout_metrics(ro, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """The figures of an RL update's batch `ro` (rollout.sample's dict,
    with raw `scores`): kl, kl_k3 the k1, k3 estimates per answer, kl_exact / kl_max
    the exact KL(pi || pi_ref) per answer, entropy per response token,
    length in tokens."""
    mask, texts = ro["mask"], ro["texts"]
    kl_exact = (full_kl(ro["logits"], ro["ref_logits"]) * mask).sum(1)
    kl_k1 = sequence_kl(ro["logp"], ro["ref_logp"], mask)
    kl_k3 = sequence_kl(ro["logp"], ro["ref_logp"], mask, "k3")

    logp_all = torch.log_softmax(ro["logits"], -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)

    def rate(fn):  # the share of texts fn says yes to (nan: not judged)
        if fn is None:
            return float("nan")
        yes = [float(fn(t)) for t in texts]
        return dist.mean(torch.tensor(yes, device=mask.device))

    means = {"proxy_reward": dist.mean(ro["scores"]),
             "gold_reward": rate(gold_fn),
             "kl": dist.mean(kl_k1),
             "kl_k3": dist.mean(kl_k3),
             "kl_exact": dist.mean(kl_exact),
             "entropy": dist.masked_mean(entropy, mask),
             "length": dist.mean(mask.sum(1)),
             "valid_rate": rate(valid_fn),
             "eos_rate": dist.mean(ro["ended"])}
    if valid_fn is not None:  # the world's: the reward model's blind spot
        bangs = exclaims(ro["prompts"], texts)
        means["exclaim_share"] = dist.mean((bangs > 0).float())
        means["exclaims"] = dist.mean(bangs)
    figures = dist.mean_stats(means)

    figures["kl_max"] = dist.all_max(kl_exact.max()).item()
    every_text = sum(dist.gather(texts), [])
    figures["distinct_2"] = world.distinct_n(every_text, 2)
    return figures
