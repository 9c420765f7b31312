"""The reward model: a scalar model fitted to simulated annotators' preferences.
People cannot give a reward number, only say which of two answers they like
more. Bradley & Terry (1952) model that as

    P(a preferred to b) = sigmoid(r(a) - r(b)),

and bt_loss fits r to the labels by maximum likelihood.
"""
import itertools
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dist
import tokenizer as tok
import world
from evaluate import answer
from model import ScalarModel, adamw, autocast
from sft import set_lr


@dataclass
class RewardConfig:
    n_prompts: int = 1000  # prompts answered by the SFT policy
    samples_per_prompt: int = 8  # k: answers per prompt, reviews per world group
    world_groups: int = 2000  # groups of k real reviews: sentiment lessons
    world_slips: float = 0.5  # share slipped (splice): broken-text lessons
    annotator_tau: float = world.TAU  # noise (world.annotator_prob)
    annotator_bias: float = world.EXCLAIM_BIAS  # taste for "!" (0: no blind spot)
    steps: int = 800  # optimiser steps
    batch_size: int = 8  # groups (a prompt and all its pairs) per step
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient norm clip
    val_fraction: float = 0.1  # policy prompts held out (split_pairs)
    head_std: float = 0.02  # a small head: every answer starts near 0
    annotator_seed: int = 0  # annotators' coins, head's init
    eval_every: int = 100
    sample_batch: int = 1024  # answers per generate() call


def annotator_judge(rng, cfg, gold_fn=None):
    """The simulated annotators (world.annotate: noisy, fond of a "!" that gold
    ignores) as judge(texts_a, texts_b, ...) -> [True where a is preferred]."""
    def judge(texts_a, texts_b, *_):
        return [world.annotate(a, b, rng, cfg.annotator_tau, cfg.annotator_bias, gold_fn)
                for a, b in zip(texts_a, texts_b)]
    return judge


def label_group(prompt, texts, rng, source, cfg, gold_fn=None):
    """All k(k-1)/2 pairs of one prompt's k distinct full texts (Ouyang et al. 2022,
    sec. 3.5), stored as completions; gold_fn replaces world.gold_reward (userdata.py)."""
    gold = {t: (gold_fn or world.gold_reward)(t) for t in texts}  # twins collapse
    pairs = list(itertools.combinations(gold, 2))
    judge = annotator_judge(rng, cfg, gold_fn)
    wins = judge([a for a, _ in pairs], [b for _, b in pairs])
    ordered = [(a, b) if won else (b, a) for (a, b), won in zip(pairs, wins)]
    return [{"prompt": prompt, "chosen": a[len(prompt):], "rejected": b[len(prompt):],
             "gold_chosen": gold[a], "gold_rejected": gold[b], "source": source}
            for a, b in ordered]


def splice(review, other, rng):
    """A review with a slip, the kind of mistake the SFT policy makes (usually
    invalid, gold -1): its first words (at least 3) joined to the tail of
    another review, e.g. "the hero was" + "a mess. what a film."."""
    words, tail = review.split(" "), other.split(" ")
    cut = rng.randint(3, max(3, len(words) - 1))
    return " ".join(words[:cut] + tail[rng.randint(1, len(tail) - 1):])


@torch.no_grad()
def make_preferences(policy, enc, prompts, cfg, device, seed, gold_fn=None,
                     dtype="fp32"):
    """(pairs by prompt, n_unended), deterministic given seed and cfg. "policy": the
    first cfg.n_prompts prompts, each answered k times by `policy` at temperature 1;
    answers cut off with no EOS are left out, counted in n_unended. "world" (none
    with gold_fn): cfg.world_groups groups of k reviews sharing their first two
    words (the prompt), cfg.world_slips slipped."""
    k = cfg.samples_per_prompt
    repeated = [p for p in prompts[:cfg.n_prompts] for _ in range(k)]
    gen = torch.Generator(device).manual_seed(seed)
    answers = []  # (full text, ended)
    for i in range(0, len(repeated), cfg.sample_batch):
        batch = repeated[i:i + cfg.sample_batch]
        budget = policy.cfg.block_size - max(len(tok.encode(enc, p)) for p in batch)
        *_, texts, ended = answer(policy, enc, batch, budget, device, dtype, generator=gen)
        answers += zip(texts, ended)

    rng = random.Random(cfg.annotator_seed)
    pairs = []
    for j, prompt in enumerate(repeated[::k]):
        texts = [text for text, ended in answers[j * k:(j + 1) * k] if ended]
        pairs += label_group(prompt, texts, rng, "policy", cfg, gold_fn)

    world_rng = random.Random(seed)
    waiting = {}  # prompt -> its reviews, until there are k
    n_groups = 0
    while gold_fn is None and n_groups < cfg.world_groups:
        review = world.generate_review(world_rng)
        words = review.split(" ")
        if len(words) < 3:  # nothing to complete after the prompt
            continue
        if len(words) > 3 and world_rng.random() < cfg.world_slips:
            review = splice(review, world.generate_review(world_rng), world_rng)
        prompt = " ".join(words[:2])
        waiting.setdefault(prompt, []).append(review)
        if len(waiting[prompt]) == k:
            pairs += label_group(prompt, waiting.pop(prompt), rng, "world", cfg)
            n_groups += 1
    return pairs, sum(not ended for _, ended in answers)


def split_pairs(pairs, val_fraction):
    """(train, val): val holds the pairs of the first val_fraction of the
    policy's prompts (where PPO uses the reward model); no prompt in both."""
    on_policy = lambda p: p.get("source", "policy") == "policy"
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs if on_policy(p)))
    val_prompts = set(prompts[:round(val_fraction * len(prompts))])
    is_val = [on_policy(p) and p["prompt"] in val_prompts for p in pairs]
    return ([p for p, v in zip(pairs, is_val) if not v],
            [p for p, v in zip(pairs, is_val) if v])


def gold_label_accuracy(pairs):
    """Share of labels gold agrees with (ties half): accuracy's noise ceiling."""
    margins = [p["gold_chosen"] - p["gold_rejected"] for p in pairs]
    return sum((m > 0) + 0.5 * (m == 0) for m in margins) / max(1, len(pairs))


def bt_loss(r_chosen, r_rejected):
    """r_chosen, r_rejected (N,) -> scalars: loss (Ouyang et al. 2022, eq. 1)
        -mean log sigmoid(r_chosen - r_rejected)    (logsigmoid: no overflow)
    and accuracy, the share with r_chosen > r_rejected (ties half)."""
    margin = r_chosen - r_rejected
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    return dist.mean(-F.logsigmoid(margin)), dist.mean(wins)


def score(model, tokens, pad_id):
    """(B,) value at each row's last non-PAD token (the EOS if any);
    rows (B, T) may be padded either side."""
    real = tokens != pad_id
    last = (torch.arange(tokens.shape[1], device=tokens.device) * real).argmax(1)
    return model(tokens, real).gather(1, last[:, None])[:, 0]


def score_rows(model, tokens, pad_id, chunk=32):
    """(M,) scores of right-padded rows (M, T), scored in length-sorted
    chunks cut to their longest row. No rows: an empty (0,) tensor."""
    if len(tokens) == 0:
        return torch.zeros(0, device=tokens.device)
    lengths = (tokens != pad_id).sum(1)
    order = lengths.argsort()
    parts = [score(model, tokens[idx, :int(lengths[idx].max())], pad_id)
             for idx in order.split(chunk)]
    return torch.cat(parts)[order.argsort()]


def encode_pairs(enc, pairs, block_size):
    """(tokens (M, T), chosen (N,), rejected (N,), pairs kept): each distinct
    full text once, as prompt + completion + EOS, and the rows of each pair's
    two texts. Pairs with a text too long are left out."""
    sides = ("chosen", "rejected")
    texts = list(dict.fromkeys((p["prompt"], p[s]) for p in pairs for s in sides))
    tokens, _, keep = tok.encode_batch(enc, *zip(*texts), block_size)
    row = {texts[i]: r for r, i in enumerate(keep)}
    pairs = [p for p in pairs if all((p["prompt"], p[s]) in row for s in sides)]
    rows = [[row[p["prompt"], p[s]] for p in pairs] for s in sides]
    chosen, rejected = (torch.tensor(r, dtype=torch.long) for r in rows)
    return tokens, chosen, rejected, pairs


def pair_scores(rm, tokens, chosen, rejected, pad_id):
    """(r_chosen (N,), r_rejected (N,)), each text the pairs use scored once."""
    rows, where = torch.unique(torch.cat([chosen, rejected]), return_inverse=True)
    return score_rows(rm, tokens[rows], pad_id)[where].tensor_split([len(chosen)])


@torch.no_grad()
def bt_figures(rm, tokens, chosen, rejected, pad_id, dtype="fp32"):
    """(loss, accuracy) of rm on the pairs; leaves rm in eval mode."""
    rm.eval()
    mine = dist.shard(len(chosen))
    with autocast(tokens.device, dtype):
        scores = pair_scores(rm, tokens, chosen[mine], rejected[mine], pad_id)
        loss, accuracy = bt_loss(*scores)
    figures = dist.mean_stats({"loss": loss, "accuracy": accuracy})
    return figures["loss"], figures["accuracy"]


def train_reward_model(sft_model, enc, pairs, cfg, device, dtype="fp32", log=print):
    """Fit a ScalarModel (trunk copied from sft_model) to the labels -> (rm in
    eval mode, normalised on the SFT answers of the training pairs, metrics)."""
    start = time.time()
    pad = tok.pad_id(enc)
    block = sft_model.cfg.block_size
    train, val = split_pairs(pairs, cfg.val_fraction)
    tr_tokens, tr_c, tr_r, train = encode_pairs(enc, train, block)
    va_tokens, va_c, va_r, val = encode_pairs(enc, val, block)
    tr_tokens, va_tokens = tr_tokens.to(device), va_tokens.to(device)
    new = [int(a["prompt"] != b["prompt"]) for a, b in zip(train, train[1:])]
    group = torch.tensor([0] + new).cumsum(0)  # each pair's prompt: 0, 1, ...
    n_groups = int(group[-1]) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.annotator_seed)
        rm = ScalarModel(sft_model, cfg.head_std).to(device)
    opt = adamw(rm.parameters(), device, cfg.lr, weight_decay=cfg.weight_decay)

    gen = torch.Generator().manual_seed(cfg.annotator_seed)
    order = torch.empty(0, dtype=torch.long)
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # new epoch: reshuffle
            order = torch.randperm(n_groups, generator=gen)
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        mine = torch.isin(group, batch[dist.shard(cfg.batch_size)])
        rm.train()
        set_lr(opt, step, cfg.steps, cfg)
        with autocast(device, dtype):
            scores = pair_scores(rm, tr_tokens, tr_c[mine], tr_r[mine], pad)
            loss, accuracy = bt_loss(*scores)
        dist.step(loss, opt, cfg.max_grad_norm)
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            figures = dist.mean_stats({"loss": loss.detach(), "accuracy": accuracy})
            val_loss, val_acc = bt_figures(rm, va_tokens, va_c, va_r, pad, dtype)
            per_step = (time.time() - start) / (step + 1)
            log({"stage": "reward_model", "step": step, **figures,
                 "val_loss": val_loss, "val_accuracy": val_acc,
                 "lr": opt.param_groups[0]["lr"], "ms_per_step": 1000 * per_step,
                 "eta_s": per_step * (cfg.steps - step - 1)})

    # as many train pairs as val pairs (the first groups): a gap is overfitting
    first = group < round(n_groups * len(val) / max(1, len(train))) + 1
    train_acc = bt_figures(rm, tr_tokens, tr_c[first], tr_r[first], pad, dtype)[1]
    policy = torch.tensor([p.get("source", "policy") == "policy" for p in train])
    answers = torch.unique(torch.cat([tr_c[policy], tr_r[policy]]))
    normalize(rm, tr_tokens[answers[:2048]], pad)
    return rm, {"val_accuracy": val_acc, "val_loss": val_loss, "train_accuracy": train_acc,
                "gold_label_accuracy": gold_label_accuracy(val), "n_pairs": len(pairs),
                "n_train": len(train), "n_val": len(val), "seconds": time.time() - start}


@torch.no_grad()
def normalize(rm, tokens, pad_id):
    """Set rm.gain and rm.bias so that the right-padded rows `tokens`
    score mean 0, std 1; returns the raw (mean, std). The loss sees only
    differences of r: this puts PPO's KL coefficient on a known scale."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    raw = dist.gather_cat(score_rows(rm, tokens[dist.shard(len(tokens))], pad_id))
    mean = raw.mean()
    std = raw.std().clamp(min=1e-6)
    rm.gain.fill_(1.0 / std)
    rm.bias.fill_(-mean / std)
    return mean.item(), std.item()


@torch.no_grad()
def score_texts(rm, enc, texts, chunk=256):
    """Proxy rewards (list of floats) of full texts, each read at its EOS."""
    if not texts:
        return []
    tokens, _, keep = tok.encode_batch(enc, [""] * len(texts), texts, rm.gpt.cfg.block_size)
    if len(keep) != len(texts):
        raise ValueError(f"{len(texts) - len(keep)} texts do not fit in block_size")
    tokens = tokens.to(rm.head.weight.device)
    return score_rows(rm, tokens, tok.pad_id(enc), chunk).tolist()
