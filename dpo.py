"""DPO: the KL-penalised objective with no critic, no reward model and no
sampler.

E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref) is maximised by
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) (Rafailov et al.
2023, eq. 4), so any policy is optimal for the reward r = beta *
log(pi / pi_ref) + beta * log Z(x). In the Bradley-Terry likelihood of
a pair Z cancels: fitting that reward to the preferences IS training
the policy, against PPO's frozen reference. Here (train_dpo) the pairs
are the SFT policy's answers, labelled once; online_dpo.py takes the
same `dpo_step` on the policy's own fresh answers.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dist
import rollout
import tokenizer as tok
from model import adamw, autocast
from reference import token_logprobs
from sft import set_lr


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta, loss_type="sigmoid", label_smoothing=0.0,
             chosen_lengths=None, rejected_lengths=None):
    """(B,) log-probs of whole answers (summed, EOS included) under the policy
    and the reference -> (losses, chosen_rewards, rejected_rewards), each (B,)
    fp32, rewards detached. With the margin
    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]:

      "sigmoid"  -log sigmoid(beta h)    Rafailov et al. 2023, eq. 7; label_smoothing
                 eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (cDPO)
      "ipo"      (h - 1 / (2 beta))^2    Azar et al. 2023, eq. 17: a fixed margin target;
                 per token (TRL) given chosen_lengths, rejected_lengths (B,)

    Large beta: a small log-ratio is already a big reward, pi stays near pi_ref.
    Only the margin counts: a chosen answer's reward can fall while training
    succeeds (beta 0.1, log pi(y_w) -20 -> -22, log pi(y_l) -20 -> -26: margin
    +0.4, loss 0.51 < log 2)."""
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratio - rejected_logratio

    if loss_type == "sigmoid":
        if chosen_lengths is not None:
            raise ValueError("per-token averaging (chosen_lengths) applies to ipo only")
        trusted = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        flipped = -label_smoothing * F.logsigmoid(-beta * h)
        losses = trusted + flipped
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        if chosen_lengths is not None:
            h = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid or ipo")

    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def encode_pairs(enc, pairs, block_size):
    """Pairs {"prompt", "chosen", "rejected"} -> tokens (N, 2, T), mask
    (N, 2, T-1), n_dropped; dim 1: chosen, rejected, each prompt +
    completion + EOS, right-padded. A pair too long is dropped, not cut."""
    n = len(pairs)
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    tokens, mask, keep = tok.encode_batch(enc, prompts, completions, block_size)
    row = {i: r for r, i in enumerate(keep)}
    both = [[row[i], row[i + n]] for i in range(n) if i in row and i + n in row]
    idx = torch.tensor(both, dtype=torch.long).view(-1, 2)  # (kept, 2) rows
    return tokens[idx], mask[idx], n - len(idx)


def flatten_pairs(tokens, mask):
    """(B, 2, T), (B, 2, T-1) -> (2B, T'), (2B, T'-1): the chosen rows,
    then the rejected, for one forward pass; trailing padding cut."""
    T = int(mask.sum((0, 1)).nonzero().max()) + 2  # last target: token T-1
    rows = torch.cat([tokens[:, 0], tokens[:, 1]])
    row_mask = torch.cat([mask[:, 0], mask[:, 1]])
    return rows[:, :T], row_mask[:, :T - 1]


def sequence_logps(model, tokens, mask, pad_id=None):
    """(N,) log-probs of rows (N, T) summed over the masked targets."""
    return (token_logprobs(model, tokens, pad_id) * mask).sum(1)


@torch.inference_mode()
def pair_logps(model, tokens, mask, device="cpu", dtype="fp32", batch_size=256):
    """(N, 2) summed log-probs of pairs (N, 2, T): the reference's, once
    (the policy's path and autocast: equal at step 0), or the policy's."""
    out = []
    with autocast(device, dtype):
        for i in range(0, len(tokens), batch_size):
            rows, rows_mask = flatten_pairs(tokens[i:i + batch_size],
                                            mask[i:i + batch_size])
            logps = sequence_logps(model, rows.to(device), rows_mask.to(device))
            out.append(logps.float().cpu().view(2, -1).T)
    return torch.cat(out)


@dataclass
class DPOConfig:
    beta: float = 0.1             # KL coefficient of the implicit objective
    loss_type: str = "sigmoid"    # "sigmoid" (DPO) or "ipo"
    ipo_per_token: bool = False   # ipo: log-ratios averaged per token (TRL), not summed
    label_smoothing: float = 0.0  # conservative DPO: the assumed label-flip rate
    sft_coef: float = 1.0         # + this x NLL per chosen token (RPO; 0: plain DPO)
    sources: str = "policy"       # "policy": the SFT policy's pairs; "all": + world's
    epochs: float = 1.0           # offline: passes over the pairs...
    steps: int = 400              # ...but at most this many steps; online: its steps
    batch_size: int = 32          # pairs per step; online: prompts, answered twice
    lr: float = 2e-4              # AdamW, no weight decay (it pulls to 0, not pi_ref)
    warmup: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 100         # steps between eval_fn calls (slow: it samples)
    log_every: int = 10
    seed: int = 0
    sample_every: int = 1         # online: k > 1 is iterative DPO, k steps a sampling
    max_new_tokens: int = 0       # online budget; 0: block_size - longest prompt


def dpo_step(policy, opt, tokens, mask, ref_logps, cfg, device="cpu", dtype="fp32",
             pad_id=None):
    """One step on n pairs: tokens (2n, T), the chosen rows then the
    rejected (pad_id: left-padded), mask (2n, T-1), ref_logps (2n,).
    loss = mean dpo_loss + sft_coef * NLL per chosen token (RPO, Pang et
    al. 2024: the chosen answers stay likely, not lost to unrated text).
    -> the figures from before the step."""
    n = len(tokens) // 2
    n_tok = mask.sum(1)
    with autocast(device, dtype):
        logps = sequence_logps(policy, tokens, mask, pad_id)

    lengths = (n_tok[:n], n_tok[n:]) if cfg.ipo_per_token else (None, None)
    losses, r_w, r_l = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
                                cfg.beta, cfg.loss_type, cfg.label_smoothing, *lengths)
    chosen_tokens = n_tok[:n].sum()
    nll_sum = -logps[:n].sum()

    # this rank's shares of a mean over pairs and one over chosen tokens
    nll = nll_sum / chosen_tokens.clamp(min=1)
    loss = dist.mean(losses) + cfg.sft_coef * nll * dist.share(chosen_tokens)
    dist.step(loss, opt, cfg.max_grad_norm)

    h = (r_w - r_l).detach()
    sums = dict(dpo_loss=losses.detach().sum(), chosen_reward=r_w.sum(),
                rejected_reward=r_l.sum(), margin=h.sum(), accuracy=(h > 0).sum(),
                chosen_nll=nll_sum.detach())
    counts = {k: n for k in sums} | {"chosen_nll": chosen_tokens}
    figures = dist.mean_stats(sums, counts)
    figures["loss"] = figures["dpo_loss"] + cfg.sft_coef * figures["chosen_nll"]
    return figures


def due(step, steps, cfg):
    """Log this step: every log_every, every eval and the last."""
    last = step == steps - 1
    return last or step % cfg.log_every == 0 or (step + 1) % cfg.eval_every == 0


def implicit_accuracy(policy, tokens, mask, ref_logps, device="cpu", dtype="fp32"):
    """Share of pairs whose implicit reward favours the chosen answer."""
    ratio = pair_logps(policy, tokens, mask, device, dtype) - ref_logps
    return (ratio[:, 0] > ratio[:, 1]).float().mean().item()


def train_dpo(policy, ref, enc, pairs, cfg: DPOConfig, device="cpu", dtype="fp32",
              log=print, eval_fn=None, val_pairs=None):
    """Train `policy` in place on preference pairs -> (policy, history:
    records, eval, implicit_accuracy on val_pairs, seconds, n_pairs,
    n_dropped, epochs). ref: the frozen reference (None: the policy now)."""
    if cfg.sources not in ("policy", "all"):
        raise ValueError(f"DPOConfig.sources {cfg.sources!r}: use 'policy' or 'all'")
    if cfg.sources == "policy":
        pairs = [p for p in pairs if p.get("source", "policy") == "policy"]
    ref = policy if ref is None else ref
    t0, gen = time.time(), torch.Generator().manual_seed(cfg.seed)
    tokens, mask, dropped = encode_pairs(enc, pairs, policy.cfg.block_size)

    # epochs over the pairs (a random subset if fewer steps suffice)
    B, n_all = cfg.batch_size, len(tokens)
    steps = min(math.ceil(cfg.epochs * n_all / B), cfg.steps)
    keep = torch.randperm(n_all, generator=gen)[:steps * B]
    tokens, mask = tokens[keep], mask[keep]
    passes = math.ceil(steps * B / len(tokens))
    order = torch.cat([torch.randperm(len(tokens), generator=gen) for _ in range(passes)])
    batches = [order[s * B:(s + 1) * B][dist.shard(B)] for s in range(steps)]

    # the reference's log-probs, once, of the pairs to be seen
    ref_logps = torch.zeros(len(tokens), 2)
    seen = torch.cat(batches).unique()
    ref_logps[seen] = pair_logps(ref, tokens[seen], mask[seen], device, dtype)
    if val_pairs:
        val_tokens, val_mask, _ = encode_pairs(enc, val_pairs, policy.cfg.block_size)
        val_ref = pair_logps(ref, val_tokens, val_mask, device, dtype)

    opt = adamw(policy.parameters(), device, cfg.lr)
    policy.train()
    records, last_eval = [], {}
    for step, idx in enumerate(batches):
        rows, rows_mask = flatten_pairs(tokens[idx], mask[idx])
        rows_ref = torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]])
        set_lr(opt, step, steps, cfg)
        figures = dpo_step(policy, opt, rows.to(device), rows_mask.to(device),
                           rows_ref.to(device), cfg, device, dtype)
        if not due(step, steps, cfg):
            continue
        pairs_per_s = (step + 1) * B / (time.time() - t0)
        rec = {"stage": "dpo", "step": step, **figures, "lr": opt.param_groups[0]["lr"],
               "epoch": (step + 1) * B / n_all, "pairs_per_s": pairs_per_s}
        if step == steps - 1 and val_pairs:
            rec["val_accuracy"] = implicit_accuracy(policy.eval(), val_tokens, val_mask,
                                                    val_ref, device, dtype)
        last_eval = rollout.report(rec, policy.train(), steps, cfg.eval_every, t0, eval_fn,
                                   log) or last_eval
        records.append(rec)
    return policy.eval(), dict(records=records, eval=last_eval, n_dropped=dropped,
                               implicit_accuracy=records[-1].get("val_accuracy"),
                               seconds=time.time() - t0, n_pairs=len(tokens),
                               epochs=steps * B / n_all)
