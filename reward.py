"""The reward model: a scalar model fitted to simulated annotators' preferences.

People cannot give a reward number, only say which of two answers they like more; Bradley & Terry (1952) model
that as P(a preferred to b) = sigmoid(r(a) - r(b)), and bt_loss fits r to the labels by maximum likelihood.
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
from model import ScalarModel, adamw, autocast
from sft import lr_at


@dataclass
class RewardConfig:
    n_prompts: int = 1000          # training prompts answered by the SFT policy
    samples_per_prompt: int = 8    # answers per prompt (and reviews per world group): up to 28 pairs
    world_groups: int = 2000       # groups of k real reviews (make_preferences): free lessons in sentiment
    world_slips: float = 0.5       # share of them (4+ words) given a slip (splice): lessons in broken text
    annotator_tau: float = world.TAU           # annotators' noise (world.annotator_prob)
    annotator_bias: float = world.EXCLAIM_BIAS  # their taste for "!" (0: no blind spot to learn)
    steps: int = 800               # optimiser steps
    batch_size: int = 8            # groups (a prompt and all its pairs) per step
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    val_fraction: float = 0.1      # the first policy prompts' pairs are held out for validation
    head_std: float = 0.02         # a small head: every answer starts near reward 0
    annotator_seed: int = 0        # the annotators' coin flips (and the head's init)
    eval_every: int = 100
    sample_batch: int = 1024       # answers per generate() call


def label_group(prompt, texts, rng, source, cfg, gold_fn=None):
    """All k(k-1)/2 pairs of one prompt's k distinct full texts (Ouyang et al. 2022, sec. 3.5), labelled by
    world.annotate (noisy, fond of "!" that gold does not pay for). Pairs store completions; gold_fn
    replaces world.gold_reward (userdata.py)."""
    gold = {t: (gold_fn or world.gold_reward)(t) for t in texts}  # identical twins collapse: no choice
    ordered = [(a, b) if world.annotate(a, b, rng, cfg.annotator_tau, cfg.annotator_bias, gold_fn) else (b, a)
               for a, b in itertools.combinations(gold, 2)]
    return [{"prompt": prompt, "chosen": a[len(prompt):], "rejected": b[len(prompt):],
             "gold_chosen": gold[a], "gold_rejected": gold[b], "source": source} for a, b in ordered]


def annotator_judge(rng, cfg, gold_fn=None):
    """The annotators of label_group as online DPO's judge (dpo.train_online_dpo): one noisy label a pair,
    judge(texts_a, texts_b, ...) -> [True where a is preferred]."""
    return lambda texts_a, texts_b, *_: [world.annotate(a, b, rng, cfg.annotator_tau, cfg.annotator_bias,
                                                        gold_fn) for a, b in zip(texts_a, texts_b)]


def splice(review, other, rng):
    """A review with a slip, the kind of mistake the SFT policy makes (usually invalid, gold -1): its first
    words (at least 3) joined to the tail of another review, e.g. "the hero was" + "a mess. what a film."."""
    words, tail = review.split(" "), other.split(" ")
    cut = rng.randint(3, max(3, len(words) - 1))
    return " ".join(words[:cut] + tail[rng.randint(1, len(tail) - 1):])


@torch.no_grad()
def make_preferences(policy, enc, prompts, cfg, device, seed, gold_fn=None, dtype="fp32"):
    """(pairs by prompt, n_unended), deterministic given seed and cfg. "policy": the first cfg.n_prompts
    prompts, each answered k = cfg.samples_per_prompt times by `policy` at temperature 1; answers cut off
    with no EOS are unfinished: left out, counted in n_unended. "world" (none with gold_fn): cfg.world_groups
    groups of k reviews sharing their first two words (the prompt), cfg.world_slips slipped (`splice`)."""
    k, pad, eos = cfg.samples_per_prompt, tok.pad_id(enc), tok.eos_id(enc)
    repeated = [p for p in prompts[:cfg.n_prompts] for _ in range(k)]
    gen, answers = torch.Generator(device).manual_seed(seed), []  # answers: (text, ended)
    for i in range(0, len(repeated), cfg.sample_batch):
        ids = tok.left_pad([tok.encode(enc, p) for p in repeated[i:i + cfg.sample_batch]], pad).to(device)
        with autocast(device, dtype, sampling=True):
            tokens, _ = policy.generate(ids, policy.cfg.block_size - ids.shape[1], eos, pad, generator=gen)
        answers += zip(*tok.decode_responses(enc, tokens, ids.shape[1]))
    rng, pairs = random.Random(cfg.annotator_seed), []
    for j, prompt in enumerate(repeated[::k]):
        texts = [prompt + a for a, ended in answers[j * k:(j + 1) * k] if ended]
        pairs += label_group(prompt, texts, rng, "policy", cfg, gold_fn)
    world_rng, waiting, n_groups = random.Random(seed), {}, 0
    while gold_fn is None and n_groups < cfg.world_groups:
        review = world.generate_review(world_rng)
        if len(words := review.split(" ")) < 3:  # nothing left to complete after a two-word prompt
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
    """(train, val): validation is the pairs of the first val_fraction of the policy's prompts, so it
    measures the reward model where PPO uses it, and no prompt is on both sides."""
    on_policy = lambda p: p.get("source", "policy") == "policy"
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs if on_policy(p)))
    val_prompts = set(prompts[:round(val_fraction * len(prompts))])
    is_val = [on_policy(p) and p["prompt"] in val_prompts for p in pairs]
    return [p for p, v in zip(pairs, is_val) if not v], [p for p, v in zip(pairs, is_val) if v]


def gold_label_accuracy(pairs):
    """Share of labels gold agrees with (ties half): label noise caps a reward model's accuracy near this."""
    return sum((p["gold_chosen"] > p["gold_rejected"]) + 0.5 * (p["gold_chosen"] == p["gold_rejected"])
               for p in pairs) / max(1, len(pairs))


def bt_loss(r_chosen, r_rejected):
    """r_chosen, r_rejected (N,) -> scalars: loss -mean log sigmoid(r_chosen - r_rejected) (Ouyang et al.
    2022, eq. 1; logsigmoid: no overflow) and accuracy, the share with r_chosen > r_rejected (ties half)."""
    margin = r_chosen - r_rejected
    return -F.logsigmoid(margin).mean(), ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def score(model, tokens, pad_id):
    """(B,) value at each row's last non-PAD token (the EOS if any); rows (B, T) may be padded either side."""
    values = model(tokens, tokens != pad_id)
    last = (torch.arange(tokens.shape[1], device=tokens.device) * (tokens != pad_id)).argmax(1)
    return values.gather(1, last[:, None])[:, 0]


def score_rows(model, tokens, pad_id, chunk=32):
    """(M,) scores of right-padded rows (M, T), scored in length-sorted chunks cut to their longest row."""
    lengths = (tokens != pad_id).sum(1)
    order = lengths.argsort()
    parts = [score(model, tokens[idx, :int(lengths[idx].max())], pad_id) for idx in order.split(chunk)]
    return torch.cat(parts)[order.argsort()]


def encode_pairs(enc, pairs, block_size):
    """(tokens (M, T), chosen (N,), rejected (N,), pairs kept): each distinct full text once, as prompt +
    completion + EOS, and the rows of each pair's two texts. Pairs with a text too long are left out."""
    texts = list(dict.fromkeys((p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")))
    tokens, _, keep = tok.encode_batch(enc, *zip(*texts), block_size)
    row = {texts[i]: r for r, i in enumerate(keep)}
    pairs = [p for p in pairs if (p["prompt"], p["chosen"]) in row and (p["prompt"], p["rejected"]) in row]
    index = lambda side: torch.tensor([row[p["prompt"], p[side]] for p in pairs], dtype=torch.long)
    return tokens, index("chosen"), index("rejected"), pairs


def pair_scores(rm, tokens, chosen, rejected, pad_id):
    """(r_chosen (N,), r_rejected (N,)); each text the pairs use is scored once."""
    rows, where = torch.unique(torch.cat([chosen, rejected]), return_inverse=True)
    return score_rows(rm, tokens[rows], pad_id)[where].tensor_split([len(chosen)])


def train_reward_model(sft_model, enc, pairs, cfg, device, dtype="fp32", log=print):
    """Fit a ScalarModel (trunk copied from sft_model) to the labels, a step being cfg.batch_size prompts with
    all their pairs -> (rm in eval mode, normalised on the SFT answers of the training pairs, metrics).
    Data-parallel, each rank takes its share of a step's prompts, and of the pairs a figure is measured on."""
    t0, pad, block = time.time(), tok.pad_id(enc), sft_model.cfg.block_size
    train, val = split_pairs(pairs, cfg.val_fraction)
    tr_tokens, tr_c, tr_r, train = encode_pairs(enc, train, block)
    va_tokens, va_c, va_r, val = encode_pairs(enc, val, block)
    tr_tokens, va_tokens = tr_tokens.to(device), va_tokens.to(device)
    group = torch.tensor([0] + [int(a["prompt"] != b["prompt"]) for a, b in zip(train, train[1:])]).cumsum(0)
    n_groups = int(group[-1]) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.annotator_seed)
        rm = ScalarModel(sft_model, cfg.head_std).to(device)
    opt = adamw(rm.parameters(), device, cfg.lr, weight_decay=cfg.weight_decay)

    def accuracy(tokens, chosen, rejected):  # (loss, accuracy) over all ranks' pairs; leaves rm in eval mode
        rm.eval()
        chosen, rejected = chosen[dist.shard(len(chosen))], rejected[dist.shard(len(rejected))]  # this rank's
        w = dist.rank_weight(torch.tensor(len(chosen), device=device))
        with torch.no_grad(), autocast(device, dtype):
            figures = bt_loss(*pair_scores(rm, tokens, chosen, rejected, pad))
        return [dist.all_mean(x * w).item() for x in figures]
    gen, order = torch.Generator().manual_seed(cfg.annotator_seed), torch.empty(0, dtype=torch.long)
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a new epoch: reshuffle the prompts
            order = torch.randperm(n_groups, generator=gen)
        mine = order[:cfg.batch_size][dist.shard(cfg.batch_size)]  # this rank's prompts of the step's
        in_batch, order = torch.isin(group, mine), order[cfg.batch_size:]
        w = dist.rank_weight(in_batch.sum().to(device))  # a loss over all ranks' pairs: see dist.rank_weight
        rm.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        with autocast(device, dtype):
            loss, acc = bt_loss(*pair_scores(rm, tr_tokens, tr_c[in_batch], tr_r[in_batch], pad))
        opt.zero_grad(set_to_none=True)
        (loss * w).backward()
        dist.average_gradients(rm.parameters())
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            val_loss, val_acc = accuracy(va_tokens, va_c, va_r)
            per_step = (time.time() - t0) / (step + 1)
            log({"stage": "reward_model", "step": step, "loss": dist.all_mean(loss.detach() * w).item(),
                 "accuracy": dist.all_mean(acc * w).item(),
                 "val_loss": val_loss, "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"],
                 "ms_per_step": 1000 * per_step, "eta_s": per_step * (cfg.steps - step - 1)})
    # as many training pairs as validation has, from the first groups: a gap is overfitting
    first = group < round(n_groups * len(val) / max(1, len(train))) + 1
    train_acc = accuracy(tr_tokens, tr_c[first], tr_r[first])[1]
    on_policy = torch.tensor([p.get("source", "policy") == "policy" for p in train])
    normalize(rm, tr_tokens[torch.unique(torch.cat([tr_c[on_policy], tr_r[on_policy]]))[:2048]], pad)
    return rm, {"val_accuracy": val_acc, "val_loss": val_loss, "train_accuracy": train_acc,
                "gold_label_accuracy": gold_label_accuracy(val), "n_pairs": len(pairs),
                "n_train": len(train), "n_val": len(val), "seconds": time.time() - t0}


@torch.no_grad()
def normalize(rm, tokens, pad_id):
    """Set rm.gain and rm.bias so that the right-padded rows `tokens` score mean 0, std 1; returns the raw
    (mean, std). The loss sees only differences of r: this puts PPO's KL coefficient on a known scale.
    Data-parallel (the same rows on every rank), each rank scores its share, and a sum gathers the scores."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    mine, raw = dist.shard(len(tokens)), torch.zeros(len(tokens), device=tokens.device)
    raw[mine] = score_rows(rm, tokens[mine], pad_id)
    raw = dist.all_sum(raw)  # each rank's rows, zeros elsewhere: the sum holds every score
    mean, std = raw.mean(), raw.std().clamp(min=1e-6)
    rm.gain.fill_(1.0 / std)
    rm.bias.fill_(-mean / std)
    return mean.item(), std.item()


@torch.no_grad()
def score_texts(rm, enc, texts, chunk=256):
    """Proxy rewards (list of floats) of full texts, each encoded with EOS and read there."""
    if not texts:
        return []
    tokens, _, keep = tok.encode_batch(enc, [""] * len(texts), texts, rm.gpt.cfg.block_size)
    if len(keep) != len(texts):
        raise ValueError(f"{len(texts) - len(keep)} texts do not fit in block_size")
    return score_rows(rm, tokens.to(rm.head.weight.device), tok.pad_id(enc), chunk).tolist()
