"""Direct Preference Optimisation (DPO): the KL-penalised RLHF objective, no reward model, sampler or critic.

PPO maximises E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref), whose optimum is (Rafailov et al. 2023, eq. 4)
    pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x),
so every policy is optimal for r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x). In the
Bradley-Terry likelihood of the labels Z cancels in chosen - rejected: fitting that reward to the
preferences IS training the policy, supervised, on the reward model's pairs, against PPO's frozen reference.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tokenizer as tok
from model import adamw, autocast
from reference import token_logprobs
from sft import lr_at


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """(B,) log-probs of whole answers (summed over their tokens, EOS included) under policy and reference
    -> (losses, chosen_rewards, rejected_rewards), each (B,) fp32, rewards detached. With the margin
        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]:
      "sigmoid"  -log sigmoid(beta h)       Rafailov et al. 2023, eq. 7 (DPO). label_smoothing eps > 0
                 trusts the label with probability 1 - eps (conservative DPO, Mitchell 2023): -(1 - eps) log
                 sigmoid(beta h) - eps log sigmoid(-beta h), optimal at beta h = log((1 - eps) / eps).
      "ipo"      (h - 1 / (2 beta))^2       Azar et al. 2023, eq. 17 (IPO): regress the margin onto a fixed
                 target, not up without end. Log-probs summed (the paper) or, given chosen_lengths,
                 rejected_lengths (B,), averaged per token (TRL: the same beta asks ~length x the margin).
    beta is the objective's KL coefficient: when large, a small log-ratio is already a big reward, the loss
    saturates (sigmoid) or the target shrinks to 0 (ipo), and pi stays near pi_ref; small: pi must move far.
    Only the margin of the implicit rewards beta (log pi - log pi_ref) enters the loss, so the chosen one
    can fall while training succeeds: beta = 0.1, log pi(y_w) -20 -> -22, log pi(y_l) -20 -> -26 give
    rewards -0.2, -0.6: margin +0.4, loss 0.51 < log 2; both lost probability, to answers nobody compared."""
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        if chosen_lengths is not None:
            raise ValueError("per-token averaging (chosen_lengths) applies to the ipo loss only")
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only; IPO has a finite target")
        if chosen_lengths is not None:
            h = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (choose 'sigmoid' or 'ipo')")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def encode_pairs(enc, pairs, block_size):
    """Pairs {"prompt", "chosen", "rejected"} -> tokens (N, 2, T), mask (N, 2, T-1), n_dropped. Along dim 1:
    0 chosen, 1 rejected, each prompt + completion + EOS, right-padded (tokenizer.encode_batch: mask 1 on
    completion and EOS targets). Pairs with a side too long for block_size are dropped, counted, never cut."""
    n, completions = len(pairs), [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    tokens, mask, keep = tok.encode_batch(enc, [p["prompt"] for p in pairs] * 2, completions, block_size)
    row = {i: r for r, i in enumerate(keep)}
    both = [[row[i], row[i + n]] for i in range(n) if i in row and i + n in row]
    idx = torch.tensor(both, dtype=torch.long).view(-1, 2)  # (pairs kept, 2): rows of chosen, rejected
    return tokens[idx], mask[idx], n - len(idx)


def flatten_pairs(tokens, mask):
    """(B, 2, T), (B, 2, T-1) -> (2B, T'), (2B, T'-1): all chosen rows, then all rejected rows, for one
    forward pass; columns after the batch's last response token (padding) are cut."""
    T = int(mask.sum((0, 1)).nonzero().max()) + 2  # the last target (an EOS) is token T-1
    return torch.cat([tokens[:, 0], tokens[:, 1]])[:, :T], torch.cat([mask[:, 0], mask[:, 1]])[:, :T - 1]


def sequence_logps(model, tokens, mask):
    """(N,) fp32 summed log-probs of the masked (response) targets of right-padded rows (N, T)."""
    return (token_logprobs(model, tokens) * mask).sum(1)


@torch.inference_mode()
def pair_logps(model, tokens, mask, device="cpu", dtype="fp32", batch_size=256):
    """(N, 2) summed log-probs of pairs (N, 2, T), chosen and rejected: the reference's, once before
    training (same path and autocast as the policy's, so equal at step 0), or the policy's for accuracy."""
    out = []
    with autocast(device, dtype):
        for i in range(0, len(tokens), batch_size):
            t, m = flatten_pairs(tokens[i:i + batch_size], mask[i:i + batch_size])
            out.append(sequence_logps(model, t.to(device), m.to(device)).float().cpu().view(2, -1).T)
    return torch.cat(out)


@dataclass
class DPOConfig:
    beta: float = 0.1             # KL coefficient of the implicit objective
    loss_type: str = "sigmoid"    # "sigmoid" (DPO) or "ipo"
    ipo_per_token: bool = False   # ipo: average the log-ratios per token (TRL) instead of summing
    label_smoothing: float = 0.0  # conservative DPO: the assumed label-flip rate
    sft_coef: float = 1.0         # + this x NLL per token of the chosen answers (RPO; 0: plain DPO)
    sources: str = "policy"       # "policy" (the SFT policy's answers) or "all" (+ world reviews and slips)
    epochs: float = 1.0           # passes over the pairs...
    max_steps: int = 400          # ...but at most this many steps
    batch_size: int = 32          # preference pairs per step (2x rows through the model)
    lr: float = 2e-4              # AdamW, no weight decay (it pulls towards 0, not towards pi_ref)
    warmup: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 100         # steps between eval_fn calls (slow: it samples)
    log_every: int = 10
    seed: int = 0


def implicit_accuracy(policy, tokens, mask, ref_logps, device="cpu", dtype="fp32"):
    """Share of pairs whose implicit reward beta * (log pi - log pi_ref) (any beta > 0) favours the chosen."""
    ratio = pair_logps(policy, tokens, mask, device, dtype) - ref_logps
    return (ratio[:, 0] > ratio[:, 1]).float().mean().item()


def train_dpo(policy, ref, enc, pairs, cfg: DPOConfig, device="cpu", dtype="fp32", log=print,
              eval_fn=None, val_pairs=None):
    """Train `policy` in place with DPO -> (policy, history). ref: the frozen reference, its log-probs
    precomputed once (None: the policy as it is now). cfg.sources "policy" keeps pairs with "source"
    "policy" (or none). log(dict) gets a record (batch means) every log_every steps, plus eval_fn(policy)'s
    dict, "eval_"-prefixed, every eval_every steps and at the end, then also val_accuracy (implicit accuracy
    on val_pairs). history: {"records", "eval" (last eval_fn dict), "implicit_accuracy" (None without
    val_pairs), "seconds", "n_pairs" (used), "n_dropped" (too long), "epochs"}."""
    t_start = time.time()
    if cfg.sources not in ("policy", "all"):
        raise ValueError(f"DPOConfig.sources {cfg.sources!r}: use 'policy' or 'all'")
    pairs = [p for p in pairs if cfg.sources == "all" or p.get("source", "policy") == "policy"]
    ref = policy if ref is None else ref
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens, mask, dropped = encode_pairs(enc, pairs, policy.cfg.block_size)
    B, n_all = cfg.batch_size, len(tokens)
    steps = min(math.ceil(cfg.epochs * n_all / B), cfg.max_steps)
    if steps * B < n_all:  # a random subset suffices; the reference need not see the rest
        keep = torch.randperm(n_all, generator=gen)[:steps * B]
        tokens, mask = tokens[keep], mask[keep]
    ref_logps = pair_logps(ref, tokens, mask, device, dtype).to(device)
    if val_pairs:
        val_tokens, val_mask, _ = encode_pairs(enc, val_pairs, policy.cfg.block_size)
        val = (val_tokens, val_mask, pair_logps(ref, val_tokens, val_mask, device, dtype))
    opt = adamw(policy.parameters(), device, cfg.lr)
    history, last_eval, order = {"records": []}, {}, torch.empty(0, dtype=torch.long)
    policy.train()
    t0 = time.time()
    for step in range(steps):
        while len(order) < B:  # shuffled epochs: every pair once before any pair twice
            order = torch.cat([order, torch.randperm(len(tokens), generator=gen)])
        idx, order = order[:B], order[B:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup)
        t, m = (x.to(device) for x in flatten_pairs(tokens[idx], mask[idx]))
        with autocast(device, dtype):
            logps = sequence_logps(policy, t, m)
        n_tok = m.sum(1)
        lengths = (n_tok[:B], n_tok[B:]) if cfg.ipo_per_token else (None, None)
        losses, r_w, r_l = dpo_loss(logps[:B], logps[B:], ref_logps[idx, 0], ref_logps[idx, 1], cfg.beta,
                                    cfg.loss_type, cfg.label_smoothing, *lengths)
        # RPO (Pang et al. 2024): keep the chosen answers likely, not lost to unrated, often invalid text
        chosen_nll = -logps[:B].sum() / n_tok[:B].sum()
        loss = losses.mean() + cfg.sft_coef * chosen_nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()
        evaluate = step == steps - 1 or (step + 1) % cfg.eval_every == 0
        if step % cfg.log_every == 0 or evaluate:
            elapsed, loss = time.time() - t0, loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"dpo: loss became {loss} at step {step}")
            rec = {"stage": "dpo", "step": step, "loss": loss, "chosen_reward": r_w.mean().item(),
                   "rejected_reward": r_l.mean().item(), "margin": (r_w - r_l).mean().item(),
                   "accuracy": (r_w > r_l).float().mean().item(), "chosen_nll": chosen_nll.item(),
                   "lr": opt.param_groups[0]["lr"], "epoch": (step + 1) * B / n_all,
                   "pairs_per_s": (step + 1) * B / elapsed,
                   "eta_s": elapsed / (step + 1) * (steps - step - 1)}
            if evaluate:
                policy.eval()
                if val_pairs and step == steps - 1:
                    rec["val_accuracy"] = implicit_accuracy(policy, *val, device, dtype)
                if eval_fn is not None:
                    last_eval = dict(eval_fn(policy))
                    rec.update({f"eval_{k}": v for k, v in last_eval.items()})
                policy.train()
            history["records"].append(rec)
            log(rec)
    policy.eval()
    history.update(eval=last_eval, implicit_accuracy=history["records"][-1].get("val_accuracy"),
                   seconds=time.time() - t_start, n_pairs=len(tokens), n_dropped=dropped,
                   epochs=steps * B / n_all)
    return policy, history
