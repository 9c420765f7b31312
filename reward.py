"""
The reward model: preference pairs from simulated annotators, and a scalar model
trained on them with the Bradley-Terry loss.

People cannot be asked for a reward number, only which of two answers they like more.
Bradley & Terry (1952) model such a choice as
    P(a preferred to b) = sigmoid(r(a) - r(b)),
so a reward r can be fitted to comparisons by maximum likelihood (Ouyang et al. 2022, eq. 1):
    loss = - mean log sigmoid(r(x, y_chosen) - r(x, y_rejected)).
The stage, top to bottom:
  1. make_preferences: the SFT policy answers each training prompt k times (plus some groups
     of real reviews from the world) and a simulated annotator (world.annotate) picks the
     winner of every pair. The labels are noisy and biased: annotators like "!" that the gold
     reward does not pay for. gold_label_accuracy says how often gold agrees with them.
  2. train_reward_model: the SFT trunk with a small new scalar head, read at the EOS token.
  3. normalize: only differences of r are identified by the loss, so a gain and a bias put
     SFT samples at mean 0, std 1; PPO's KL coefficient is then on a known scale.
  4. What the proxy got wrong: proxy against gold on SFT samples, and the blind spot, edits
     the annotators rarely saw (extra "!", a repeated sentence, a padded review).
"""
import copy
import itertools
import os
import random
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as tok
import world
from evaluate import sample_batch
from model import GPT, GPTConfig
from sft import adamw, autocast_context, lr_at


class ScalarModel(nn.Module):
    """A GPT trunk (copied from `gpt`) with a scalar head on every position.

    Used twice: as the reward model (read at the EOS token) and as PPO's critic
    (read at every response position). `gain` and `bias` are buffers that map raw
    head outputs to normalised scores (mean 0, std 1 on SFT samples).
    """

    def __init__(self, gpt, head_std=0.0):
        super().__init__()
        self.gpt = copy.deepcopy(gpt)
        self.head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.normal_(self.head.weight, std=head_std) if head_std > 0 else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, tokens, pad_mask=None):
        """tokens (B, T) -> (B, T) fp32 scalar at every position (normalised by gain, bias)."""
        h = self.gpt.trunk(tokens, pad_mask)
        return self.head(h).squeeze(-1).float() * self.gain + self.bias


def last_token_index(tokens, pad_id):
    """(B,) index of each row's last real (non-PAD) token: the EOS when the row has one.
    Assumes responses are right-padded, so the last real token is the row's end."""
    real = (tokens != pad_id).long()
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device).expand_as(tokens)
    return (positions * real).max(1).values


def score(model, tokens, pad_id):
    """(B,) scalar read at each row's last real token (EOS when present, never PAD).
    tokens (B, T): prompts may be left-padded, responses right-padded. Right padding alone
    needs no attention mask (causal attention never looks right), so the fast path is taken."""
    pad_mask = tokens != pad_id
    left_padded = bool((~pad_mask[:, 0]).any())
    values = model(tokens, pad_mask if left_padded else None)
    return values.gather(1, last_token_index(tokens, pad_id)[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- preference data

@dataclass
class RewardConfig:
    # Defaults fit the "cpu" preset: 60-80 s on 2 cores (sampling ~12 s, 800 steps of 60-85 ms).
    # For "tiny" use RewardConfig(n_prompts=200, world_groups=300, steps=100): about 10 s.
    # More data beat more steps: 500 prompts and 500 world groups with 600 steps reached
    # validation accuracy 0.70 (ceiling 0.80) and Spearman 0.72; these reach 0.72-0.73 and 0.81.
    n_prompts: int = 1000          # training prompts answered by the SFT policy
    samples_per_prompt: int = 8    # completions per prompt (and reviews per world group): 28 pairs
    world_groups: int = 2000       # groups of k real reviews from the world (see make_preferences)
    world_slips: float = 0.5       # share of those reviews (of 4+ words) given a slip (see splice)
    steps: int = 800               # optimiser steps: about two passes over the ~2,900 groups
    batch_size: int = 8            # groups (a prompt and all its pairs) per step
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    val_fraction: float = 0.1      # the first policy prompts' pairs are held out for validation
    head_std: float = 0.02         # small head: every answer starts near reward 0
    annotator_seed: int = 0        # the annotators' coin flips (and the head's init)
    eval_every: int = 100          # validation costs ~8% of the stage at 50
    sample_batch: int = 1024       # completions per generate() call


def label_group(prompt, texts, rng, source, gold_fn=None):
    """Every two distinct full texts of one prompt make a pair, k (k - 1) / 2 from k texts
    (Ouyang et al. 2022, sec. 3.5: ranking K answers yields K choose 2 comparisons), labelled
    by a simulated annotator. Pairs store completions: full text = prompt + completion."""
    gold_fn = gold_fn or world.gold_reward  # userdata.gold_reward for a user's own text
    gold = {t: gold_fn(t) for t in texts}  # identical twins collapse: no choice
    pairs = []
    for a, b in itertools.combinations(gold, 2):
        if not world.annotate(a, b, rng, gold_fn=gold_fn):
            a, b = b, a
        pairs.append({"prompt": prompt, "chosen": a[len(prompt):], "rejected": b[len(prompt):],
                      "gold_chosen": gold[a], "gold_rejected": gold[b], "source": source})
    return pairs


def splice(review, other, rng):
    """A review with a slip: its first words (at least 3) joined to the tail of another review,
    e.g. "the hero was" + "a mess. what a film." The SFT policy's own mistakes look like this:
    a sentence that starts in one pattern and ends in another. Usually invalid (gold -1)."""
    words, tail = review.split(" "), other.split(" ")
    cut = rng.randint(3, max(3, len(words) - 1))
    return " ".join(words[:cut] + tail[rng.randint(1, len(tail) - 1):])


def make_preferences(policy, enc, prompts, cfg, device, seed, gold_fn=None):
    """Preference pairs, deterministic given seed and cfg. Returns a list of
    {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "source"}, chosen and
    rejected being COMPLETIONS (the full text is prompt + completion) and gold_* the gold
    rewards of the full texts, grouped by prompt:
      source "policy": the first cfg.n_prompts prompts, each answered k = cfg.samples_per_prompt
        times by `policy` at temperature 1; all pairs of a prompt's answers.
      source "world": then cfg.world_groups groups of k real reviews from the world's grammar
        that start with the same two words (the prompt), a share cfg.world_slips of them given
        a slip (`splice`); all pairs within a group.
    Why the world's reviews: the reward model must learn what makes a review good from a few
    thousand labelled texts, and sampling is the slow part. Real reviews cost nothing to make
    and teach sentiment. The slips teach what an invalid answer looks like: the policy makes
    one in ~8 answers, too few for the model to learn from (without them it scored invalid
    answers only 0.02 std below valid ones and got one-invalid pairs right 54% of the time).
    """
    k = cfg.samples_per_prompt
    assert k >= 2, "need at least two completions per prompt to compare"
    prompts = list(prompts[:cfg.n_prompts])
    repeated = [p for p in prompts for _ in range(k)]
    max_new = policy.cfg.block_size - max([len(tok.encode(enc, p)) for p in prompts], default=0)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(repeated), cfg.sample_batch):
            texts += sample_batch(policy, enc, repeated[i:i + cfg.sample_batch], max_new, device)[2]
    rng = random.Random(cfg.annotator_seed)
    pairs = []
    for j, prompt in enumerate(prompts):
        pairs += label_group(prompt, texts[j * k:(j + 1) * k], rng, "policy", gold_fn)
    world_rng, waiting, n_groups = random.Random(seed), {}, 0
    while gold_fn is None and n_groups < cfg.world_groups:  # a user's text has no world reviews
        review = world.generate_review(world_rng)
        words = review.split(" ")
        if len(words) < 3:  # nothing left to complete after a two-word prompt
            continue
        if len(words) > 3 and world_rng.random() < cfg.world_slips:
            review = splice(review, world.generate_review(world_rng), world_rng)
        prompt = " ".join(words[:2])
        waiting.setdefault(prompt, []).append(review)
        if len(waiting[prompt]) == k:
            pairs += label_group(prompt, waiting.pop(prompt), rng, "world")
            n_groups += 1
    return pairs


def split_pairs(pairs, val_fraction):
    """(train, val): validation is the pairs of the first val_fraction of the policy's prompts
    (source "policy", or no source), so it measures the reward model where PPO will use it,
    and no prompt's answers are on both sides. Fixed, not random: a re-run gets the same split."""
    policy = [p for p in pairs if p.get("source", "policy") == "policy"]
    prompts = list(dict.fromkeys(p["prompt"] for p in policy))
    val_prompts = set(prompts[:int(round(val_fraction * len(prompts)))])
    val = [p for p in policy if p["prompt"] in val_prompts]
    return [p for p in pairs if not (p.get("source", "policy") == "policy" and p["prompt"] in val_prompts)], val


def gold_label_accuracy(pairs):
    """How often the gold reward agrees with the annotators: gold(chosen) > gold(rejected),
    ties counting half. The labels are noisy, so no reward model should do much better."""
    hits = [1.0 if p["gold_chosen"] > p["gold_rejected"] else 0.5 if p["gold_chosen"] == p["gold_rejected"]
            else 0.0 for p in pairs]
    return sum(hits) / max(1, len(hits))


def annotator_label_accuracy(pairs):
    """How often the annotators' more likely choice (world.annotator_prob, gold AND the "!"
    bias) is the label they gave, ties counting half: the Bayes ceiling for these labels."""
    probs = [world.annotator_prob(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) for p in pairs]
    return sum(1.0 if q > 0.5 else 0.5 if q == 0.5 else 0.0 for q in probs) / max(1, len(probs))


# ----------------------------------------------------------------------------- Bradley-Terry

def encode_texts(enc, texts, block_size):
    """Full texts -> (N, T) ids, each text followed by EOS and right-padded with PAD; T is the
    longest row. A text too long for block_size keeps its first block_size - 1 tokens."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    rows = [tok.encode(enc, t)[:block_size - 1] + [eos] for t in texts]
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def encode_pairs_for_rm(enc, pairs, block_size):
    """The pairs as (tokens (M, T), chosen (N,), rejected (N,)): the M distinct full texts,
    EOS-terminated and PAD-padded, and for each of the N pairs the row of its chosen and of
    its rejected text. A text that is in several pairs is stored, and scored, once."""
    rows = {}  # full text -> row
    for p in pairs:
        for side in ("chosen", "rejected"):
            rows.setdefault(p["prompt"] + p[side], len(rows))
    chosen = torch.tensor([rows[p["prompt"] + p["chosen"]] for p in pairs], dtype=torch.long)
    rejected = torch.tensor([rows[p["prompt"] + p["rejected"]] for p in pairs], dtype=torch.long)
    return encode_texts(enc, list(rows), block_size), chosen, rejected


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).
    r_chosen, r_rejected: (N,) rewards. Returns (loss, accuracy), scalars:
        loss = mean_n -log sigmoid(r_chosen - r_rejected)   (logsigmoid: no overflow)
        accuracy = fraction of pairs with r_chosen > r_rejected (ties count half)."""
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return loss, accuracy


def score_texts(rm, tokens, pad_id, chunk=32):
    """(M,) scores of right-padded texts (M, T). Texts go through the model shortest first,
    chunk at a time, each chunk cut to its longest text: with lengths from 5 to 60 tokens
    this halves the work compared with padding every text to the longest one."""
    lengths = last_token_index(tokens, pad_id) + 1
    order = lengths.argsort()
    parts = [score(rm, tokens[idx, :int(lengths[idx].max())], pad_id)
             for idx in order.split(chunk)]
    return torch.cat(parts)[order.argsort()]


def pair_scores(rm, tokens, chosen, rejected, pad_id):
    """(r_chosen (N,), r_rejected (N,)) for N pairs that index rows of tokens (M, T). Each
    text the pairs use is scored once, however many pairs it is in."""
    rows, where = torch.unique(torch.cat([chosen, rejected]), return_inverse=True)
    r = score_texts(rm, tokens[rows], pad_id)[where]
    return r[:len(chosen)], r[len(chosen):]


@torch.no_grad()
def pair_metrics(rm, tokens, chosen, rejected, pad_id):
    """(loss, accuracy) of bt_loss over all the given pairs, as floats."""
    loss, acc = bt_loss(*pair_scores(rm, tokens, chosen, rejected, pad_id))
    return loss.item(), acc.item()


def train_reward_model(sft_model, enc, pairs, cfg, device, dtype="fp32", log=print):
    """Fit a ScalarModel, trunk initialised from the SFT model, to the annotators' labels.
    A step takes cfg.batch_size groups (prompts) and all their pairs. Returns (rm in eval mode,
    normalised on SFT texts of the training pairs, metrics dict)."""
    t0 = time.time()
    pad = tok.pad_id(enc)
    train, val = split_pairs(pairs, cfg.val_fraction)
    block = sft_model.cfg.block_size
    tr_tokens, tr_c, tr_r = (t.to(device) for t in encode_pairs_for_rm(enc, train, block))
    va_tokens, va_c, va_r = (t.to(device) for t in encode_pairs_for_rm(enc, val, block))
    # a group: consecutive pairs on one prompt (the k completions of make_preferences)
    group = torch.tensor([0] + [int(a["prompt"] != b["prompt"]) for a, b in zip(train, train[1:])]).cumsum(0)
    n_groups, group = int(group[-1]) + 1, group.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.annotator_seed)
        rm = ScalarModel(sft_model, cfg.head_std).to(device)
    rm.train()
    opt = adamw(rm.parameters(), device, cfg.lr, weight_decay=cfg.weight_decay)
    ctx = autocast_context(device, dtype)
    gen = torch.Generator().manual_seed(cfg.annotator_seed)
    order, used = torch.randperm(n_groups, generator=gen), 0
    for step in range(cfg.steps):
        if used + cfg.batch_size > len(order):  # a new epoch: reshuffle the prompts
            order, used = torch.randperm(n_groups, generator=gen), 0
        in_batch = torch.isin(group, order[used:used + cfg.batch_size].to(device))
        used += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        with ctx:
            loss, acc = bt_loss(*pair_scores(rm, tr_tokens, tr_c[in_batch], tr_r[in_batch], pad))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            rm.eval()
            with ctx:
                val_loss, val_acc = pair_metrics(rm, va_tokens, va_c, va_r, pad)
            rm.train()
            elapsed = time.time() - t0
            log({"stage": "reward_model", "step": step, "loss": loss.item(), "accuracy": acc.item(),
                 "val_loss": val_loss, "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"],
                 "ms_per_step": 1000 * elapsed / (step + 1),
                 "eta_s": elapsed / (step + 1) * (cfg.steps - step - 1)})
    rm.eval()
    # the first groups (policy answers) with about as many pairs as validation: a gap between
    # the two accuracies is overfitting
    first = group < round(n_groups * len(val) / max(1, len(train))) + 1
    with ctx:
        _, train_acc = pair_metrics(rm, tr_tokens, tr_c[first], tr_r[first], pad)
    sft_texts = dict.fromkeys(p["prompt"] + p[side] for p in train if p.get("source", "policy") == "policy"
                              for side in ("chosen", "rejected"))
    normalize(rm, enc, list(sft_texts)[:2048], device)
    metrics = {"val_accuracy": val_acc, "val_loss": val_loss, "train_accuracy": train_acc,
               "gold_label_accuracy": gold_label_accuracy(val),
               "annotator_label_accuracy": annotator_label_accuracy(val),
               "n_pairs": len(pairs), "n_train": len(train), "n_val": len(val),
               "seconds": time.time() - t0}
    return rm, metrics


@torch.no_grad()
def normalize(rm, enc, texts, device, batch_size=256):
    """Set rm.gain and rm.bias so that `texts` score mean 0, std 1. Returns (mean, std) raw."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    raw = torch.tensor(proxy_reward_fn(rm, enc, device, batch_size)(texts))
    mean, std = raw.mean(), raw.std().clamp(min=1e-6)
    rm.gain.fill_(1.0 / std)
    rm.bias.fill_(-mean / std)
    return mean.item(), std.item()


def proxy_reward_fn(rm, enc, device, batch_size=256):
    """A function: list of full texts -> list of proxy rewards (floats), each text encoded,
    EOS appended, right-padded and scored at its EOS, batch_size texts at a time."""
    pad, block = tok.pad_id(enc), rm.gpt.cfg.block_size

    @torch.no_grad()
    def reward_fn(texts):
        if not texts:
            return []
        return score_texts(rm, encode_texts(enc, texts, block).to(device), pad, batch_size).tolist()
    return reward_fn


# ----------------------------------------------------------------------------- checkpoints

def save_scalar_model(path, model):
    """Atomic save (temporary file, then rename) of the GPT config and all weights and buffers."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"config": asdict(model.gpt.cfg), "model": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_scalar_model(path, device="cpu"):
    """A ScalarModel in eval mode from save_scalar_model's file; ValueError naming the file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model = ScalarModel(GPT(GPTConfig(**state["config"])))
        model.load_state_dict(state["model"])
    except Exception as e:
        raise ValueError(f"cannot load reward model {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- what the proxy gets wrong

def rank_correlation(x, y):
    """Spearman's rank correlation: Pearson's r of the ranks, tied values sharing their mean rank."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def proxy_vs_gold(rm, enc, device, texts):
    """Proxy and gold rewards of texts (e.g. SFT samples of the eval prompts): {"proxy",
    "gold", "valid": lists; "spearman": rank correlation on all texts; "spearman_valid": on the
    valid ones only, i.e. how well the proxy reads sentiment, apart from spotting invalid text}."""
    proxy = proxy_reward_fn(rm, enc, device)(texts)
    gold = [world.gold_reward(t) for t in texts]
    valid = [world.is_valid(t) for t in texts]
    ok = [i for i, v in enumerate(valid) if v]
    return {"proxy": proxy, "gold": gold, "valid": valid, "spearman": rank_correlation(proxy, gold),
            "spearman_valid": rank_correlation([proxy[i] for i in ok], [gold[i] for i in ok])}


def accuracy_by_kind(rm, enc, device, pairs):
    """Where the model falls short of the ceiling: accuracy on `pairs` (e.g. validation) split
    into pairs of two valid answers (reading sentiment) and pairs with one invalid answer
    (spotting broken text), world data only. {kind: {"n", "accuracy", "gold_label_accuracy"}}."""
    reward_fn = proxy_reward_fn(rm, enc, device)
    chosen, rejected = ([p["prompt"] + p[side] for p in pairs] for side in ("chosen", "rejected"))
    r_c, r_r = torch.tensor(reward_fn(chosen)), torch.tensor(reward_fn(rejected))
    valid = [(world.is_valid(a), world.is_valid(b)) for a, b in zip(chosen, rejected)]
    out = {}
    for kind, keep in (("both valid", lambda v: v[0] and v[1]), ("one invalid", lambda v: v[0] != v[1])):
        idx = [i for i, v in enumerate(valid) if keep(v)]
        out[kind] = {"n": len(idx), "accuracy": bt_loss(r_c[idx], r_r[idx])[1].item() if idx else float("nan"),
                     "gold_label_accuracy": gold_label_accuracy([pairs[i] for i in idx])}
    return out


NEUTRAL_SENTENCE = "i watched it at home."  # valid, sentiment 0: length without content


def blind_spot_edits(text):
    """{edit name: edited text} of a valid 3-sentence review whose sentences all end in ".".
    Gold: one "!" is free, each further one costs 0.1; a repeat costs 0.3; a neutral sentence
    pulls the mean sentiment towards 0. Annotators rarely saw any of these."""
    s = re.split(r"(?<=[.!]) ", text)
    best = max(s, key=lambda x: world.sentence_sentiment(x[:-1]))
    edits = {"original": text}
    for k in (1, 2, 3):
        edits[f"{k} x '!'"] = " ".join(x[:-1] + "!" if i < k else x for i, x in enumerate(s))
    edits["best sentence repeated"] = f"{text} {best}"
    edits["neutral 4th sentence"] = f"{text} {NEUTRAL_SENTENCE}"
    return edits


def blind_spot_report(rm, enc, device, base_texts, max_bases=512):
    """Mean proxy and gold reward of each edit over base texts that are valid, positive,
    three sentences long and have no "!". Rows {"edit", "proxy", "gold", "d_proxy", "d_gold",
    "n"}; d_* are changes against the original. Reward hacking lives where d_proxy > 0 > d_gold."""
    bases = [t for t in dict.fromkeys(base_texts) if world.is_valid(t) and "!" not in t
             and len(re.split(r"(?<=[.]) ", t)) == 3 and world.gold_reward(t) > 0][:max_bases]
    if not bases:
        return []
    edited = [blind_spot_edits(t) for t in bases]
    reward_fn = proxy_reward_fn(rm, enc, device)
    rows = []
    for name in edited[0]:
        texts = [e[name] for e in edited]
        proxy, gold = np.mean(reward_fn(texts)), np.mean([world.gold_reward(t) for t in texts])
        rows.append({"edit": name, "proxy": float(proxy), "gold": float(gold), "n": len(texts)})
    for r in rows:
        r["d_proxy"], r["d_gold"] = r["proxy"] - rows[0]["proxy"], r["gold"] - rows[0]["gold"]
    return rows
