"""
Direct Preference Optimisation (DPO): the KL-penalised RLHF objective without
a reward model, a sampler or a critic.

PPO maximises  E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref).  That objective has a
closed-form optimum (Rafailov et al. 2023, eq. 4)

    pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x),

so, turned around, every policy defines the reward it is optimal for:
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x). Put that reward into
the Bradley-Terry likelihood of the annotators' labels and Z cancels in the
difference chosen - rejected: fitting the reward to the preferences by maximum
likelihood IS training the policy. So DPO is supervised learning on the same
annotated pairs the reward model saw, with the same frozen reference as PPO.

What the reference contributes is only log pi_ref of each pair's two responses;
those never change, so they are computed once before training
(`reference.precompute_logprobs`) and the reference can then leave memory.
"""
import copy
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import tokenizer as tok
from reference import freeze, gather_logprobs, precompute_logprobs
from sft import adamw, autocast_context, load_checkpoint, lr_at


# ----------------------------------------------------------------------------- the loss

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses and the implicit rewards.

    Inputs: (B,) log-probs of whole responses (summed over response tokens, EOS
    included) under the policy and the reference. Returns (losses, chosen_rewards,
    rejected_rewards), each (B,) fp32; the rewards are detached.

    With the log-ratio margin  h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]:
      "sigmoid"  -log sigmoid(beta * h)          Rafailov et al. 2023, eq. 7 (DPO)
                 with label_smoothing eps > 0 the label is trusted with probability 1 - eps:
                 -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                 (conservative DPO, Mitchell 2023); its optimum is a finite margin
                 beta h = log((1 - eps) / eps) instead of h -> infinity.
      "ipo"      (h - 1 / (2 beta))^2             Azar et al. 2023, eq. 17 (IPO): regress
                 the margin onto a fixed target instead of pushing it up without end.
    beta is the KL coefficient of the objective the policy is optimal for. Large beta:
    a small log-ratio already gives a big reward (beta * h), the loss saturates
    (sigmoid) or the target margin shrinks to 0 (ipo), and pi stays near pi_ref. Small
    beta: the policy must move far from pi_ref to express the same preference.

    The implicit reward of a response is beta * (log pi - log pi_ref). Only the margin
    enters the loss, so the chosen reward can fall while training succeeds: with
    beta = 0.1, log pi(y_w) going from -20 to -22 and log pi(y_l) from -20 to -26 gives
    rewards -0.2 and -0.6, margin +0.4, and a loss of 0.51 < log 2 = 0.69 at the start.
    Probability left both responses (for others nobody compared), the rejected faster.
    """
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        # logsigmoid is the stable form of log(1 / (1 + exp(-x))) for any sign of x
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only; IPO already has a finite target")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (choose 'sigmoid' or 'ipo')")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# ----------------------------------------------------------------------------- data

def encode_preference_pairs(enc, pairs, block_size):
    """Pairs {"prompt", "chosen", "rejected", ...} (chosen / rejected are completions: the
    full text is prompt + completion) -> tokens (N, 2, T), mask (N, 2, T-1), n_dropped.

    Along dim 1, index 0 is the chosen response and 1 the rejected one. Each row is
    prompt + completion + EOS, right-padded with PAD; the mask is 1 where the target is
    a completion token or the EOS (as in SFT). The prompt and the completion are encoded
    separately, the way the policy saw them when it sampled. Pairs in which either side
    does not fit in block_size are dropped and counted, never truncated."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    rows, prompt_lens = [], []
    for pair in pairs:
        p = tok.encode(enc, pair["prompt"])
        both = [p + tok.encode(enc, pair[k]) + [eos] for k in ("chosen", "rejected")]
        if max(map(len, both)) <= block_size:
            rows.append(both)
            prompt_lens.append(len(p))
    if not rows:
        raise ValueError(f"no preference pair fits in block_size={block_size}")
    T = max(len(r) for both in rows for r in both)
    tokens = torch.full((len(rows), 2, T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), 2, T - 1)
    for i, (both, p) in enumerate(zip(rows, prompt_lens)):
        for j, r in enumerate(both):
            tokens[i, j, :len(r)] = torch.tensor(r)
            mask[i, j, p - 1:len(r) - 1] = 1.0
    return tokens, mask, len(pairs) - len(rows)


def flatten_pairs(tokens, mask):
    """(B, 2, T), (B, 2, T-1) -> (2B, T'), (2B, T'-1): all chosen rows, then all rejected
    rows, so both go through the model in one forward pass. Columns after the last
    response token of the batch are cut (pure padding: compute for nothing)."""
    T = int(mask.sum((0, 1)).nonzero().max()) + 2  # the last target (an EOS) is token T-1
    return torch.cat([tokens[:, 0], tokens[:, 1]])[:, :T], torch.cat([mask[:, 0], mask[:, 1]])[:, :T - 1]


def sequence_logps(model, tokens, mask):
    """(N,) fp32 sum over response targets of log pi(token). Rows are right-padded only,
    so plain causal attention is exact and no pad mask is needed."""
    logp = gather_logprobs(model(tokens)[:, :-1], tokens[:, 1:])  # fp32 even under autocast
    return (logp * mask).sum(1)


def reference_logps(ref, tokens, mask, device="cpu", dtype="fp32", batch_size=512):
    """(N, 2) summed log-probs of the chosen / rejected responses under the frozen
    reference, computed once. It runs on the same path as the policy's forward (plain
    causal attention: pad_id=None; the same autocast), so at step 0 they agree exactly."""
    rows, row_mask = tokens.flatten(0, 1), mask.flatten(0, 1)  # chosen 0, rejected 0, chosen 1, ...
    batches = ((rows[i:i + batch_size].to(device), row_mask[i:i + batch_size].to(device))
               for i in range(0, len(rows), batch_size))
    with autocast_context(device, dtype):
        return precompute_logprobs(ref, batches, pad_id=None).view(-1, 2)


# ----------------------------------------------------------------------------- training

@dataclass
class DPOConfig:
    # Defaults: the "cpu" preset, about 45 s on 2 cores (400 steps of 32 pairs, 4 evaluations).
    # Measured on its SFT model (beta 0.1; gold reward of SFT -0.03): plain DPO (sft_coef 0)
    # after 100 steps gold -0.01, KL 0.4; after 200 steps gold -0.09 and validity 0.91 -> 0.82;
    # 100 steps at lr 3e-4: gold -0.25, validity 0.65, KL 3.9 (the chosen answers' likelihood
    # falls too, and the freed mass goes to broken text).
    # With sft_coef 1 (RPO), 400 steps at lr 2e-4: gold +0.08, validity 0.95, KL 0.35.
    beta: float = 0.1             # KL coefficient of the implicit objective
    loss_type: str = "sigmoid"    # "sigmoid" (DPO) or "ipo"
    label_smoothing: float = 0.0  # conservative DPO: assumed label-flip rate
    sft_coef: float = 1.0         # + this x NLL per token of the chosen responses (RPO; 0: plain DPO)
    sources: str = "policy"       # which pairs: "policy" (the SFT policy's own answers) or "all"
                                  # (also the world's reviews and slips the reward model saw)
    epochs: float = 1.0           # passes over the pairs
    max_steps: int = 400          # ...but at most this many steps (the time budget)
    batch_size: int = 32          # preference pairs per step (2x rows through the model)
    lr: float = 2e-4              # AdamW; DPO wants a far smaller lr than SFT
    warmup: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 100         # steps between eval_fn calls (it is slow: it samples)
    log_every: int = 10
    seed: int = 0


@torch.no_grad()
def implicit_accuracy(policy, tokens, mask, ref_logps, beta, device="cpu", dtype="fp32", batch_size=256):
    """Fraction of pairs whose implicit reward beta * (log pi - log pi_ref) is higher for
    the chosen response than for the rejected one."""
    hits = 0
    with autocast_context(device, dtype):
        for i in range(0, len(tokens), batch_size):
            t, m = flatten_pairs(tokens[i:i + batch_size], mask[i:i + batch_size])
            logps = sequence_logps(policy, t.to(device), m.to(device)).cpu()
            b = len(logps) // 2
            _, rc, rr = dpo_loss(logps[:b], logps[b:], ref_logps[i:i + b, 0], ref_logps[i:i + b, 1], beta)
            hits += (rc > rr).sum().item()
    return hits / len(tokens)


def train_dpo(policy, ref, enc, pairs, cfg: DPOConfig, device="cpu", dtype="fp32", log=print,
              eval_fn=None, val_pairs=None):
    """Train `policy` (in place) with DPO on preference pairs. Returns (policy, history).

    ref: the frozen reference; used once, to precompute log-probs (None: the policy as it
    is now, which is the reference when DPO starts from the SFT model).
    log(dict) gets a record every cfg.log_every steps: stage "dpo", step, loss,
    chosen_reward, rejected_reward, margin, accuracy (batch means), chosen_nll (per token),
    lr, epoch, pairs_per_s, eta_s;
    every cfg.eval_every steps and at the end also eval_fn(policy) (a dict, merged in); the
    last record also has val_accuracy (implicit accuracy on val_pairs). history: {"records":
    all logged records, "eval": the last eval_fn dict, "implicit_accuracy": on val_pairs
    (None without), "seconds", "n_pairs" (used), "n_dropped" (too long), "epochs"}.
    cfg.sources "policy" keeps the pairs whose "source" is "policy" (or that have none).
    """
    t_start = time.time()
    if cfg.sources not in ("policy", "all"):
        raise ValueError(f"DPOConfig.sources {cfg.sources!r}: use 'policy' or 'all'")
    if cfg.sources == "policy":
        pairs = [p for p in pairs if p.get("source", "policy") == "policy"]
    ref = policy if ref is None else ref
    block = policy.cfg.block_size
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens, mask, dropped = encode_preference_pairs(enc, pairs, block)
    B, n_all = cfg.batch_size, len(tokens)
    steps = min(math.ceil(cfg.epochs * n_all / B), cfg.max_steps)
    if steps * B < n_all:  # a random subset suffices; the reference need not see the rest
        keep = torch.randperm(len(tokens), generator=gen)[:steps * B]
        tokens, mask = tokens[keep], mask[keep]
    ref_logps = reference_logps(ref, tokens, mask, device, dtype)
    if val_pairs:
        val_tokens, val_mask, _ = encode_preference_pairs(enc, val_pairs, block)
        val_ref_logps = reference_logps(ref, val_tokens, val_mask, device, dtype)
    N = len(tokens)
    # No weight decay: it pulls weights towards 0, not towards the reference; the KL
    # regularisation is beta's job.
    opt = adamw(policy.parameters(), device, cfg.lr)
    ctx = autocast_context(device, dtype)
    records, last_eval, order = [], {}, torch.empty(0, dtype=torch.long)
    policy.train()
    t0 = time.time()
    for step in range(steps):
        while len(order) < B:  # shuffled epochs: every pair once before any pair twice
            order = torch.cat([order, torch.randperm(N, generator=gen)])
        idx, order = order[:B], order[B:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup)
        t, m = flatten_pairs(tokens[idx], mask[idx])
        with ctx:
            logps = sequence_logps(policy, t.to(device), m.to(device))
        b = len(idx)
        ref_c, ref_r = ref_logps[idx, 0].to(device), ref_logps[idx, 1].to(device)
        losses, chosen_r, rejected_r = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, cfg.beta,
                                                cfg.loss_type, cfg.label_smoothing)
        loss = losses.mean()
        # Optionally keep the chosen responses likely (Pang et al. 2024, RPO): plain DPO may
        # lower both sides and hand the probability to text nobody rated, often invalid.
        chosen_nll = -logps[:b].sum() / m[:b].sum().to(device)
        if cfg.sft_coef:
            loss = loss + cfg.sft_coef * chosen_nll
        if not torch.isfinite(loss):
            raise FloatingPointError(f"dpo: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()

        last = step == steps - 1
        evaluate = last or (step + 1) % cfg.eval_every == 0
        if step % cfg.log_every == 0 or evaluate:
            elapsed = time.time() - t0
            rec = {"stage": "dpo", "step": step, "loss": loss.item(),
                   "chosen_reward": chosen_r.mean().item(), "rejected_reward": rejected_r.mean().item(),
                   "margin": (chosen_r - rejected_r).mean().item(),
                   "accuracy": (chosen_r > rejected_r).float().mean().item(),
                   "chosen_nll": chosen_nll.item(),
                   "lr": opt.param_groups[0]["lr"], "epoch": (step + 1) * B / n_all,
                   "pairs_per_s": (step + 1) * B / elapsed,
                   "eta_s": elapsed / (step + 1) * (steps - step - 1)}
            if evaluate:
                policy.eval()
                if val_pairs and last:  # a forward pass over all of them: only once
                    rec["val_accuracy"] = implicit_accuracy(policy, val_tokens, val_mask, val_ref_logps,
                                                            cfg.beta, device, dtype)
                if eval_fn is not None:
                    last_eval = dict(eval_fn(policy))
                    rec.update(last_eval)
                policy.train()
            records.append(rec)
            log(rec)
    policy.eval()
    history = {"records": records, "eval": last_eval,
               "implicit_accuracy": records[-1].get("val_accuracy"),
               "seconds": time.time() - t_start, "n_pairs": N, "n_dropped": dropped,
               "epochs": steps * B / n_all}
    return policy, history


# ----------------------------------------------------------------------------- the frontier

def dpo_sweep(policy_ckpt, enc, pairs, betas, cfg: DPOConfig, device="cpu", dtype="fp32", log=print,
              eval_fn=None, val_pairs=None):
    """One DPO run per beta, each from a fresh copy of the same starting policy (a
    checkpoint path or a model), which is also the reference. Returns one dict per beta:
    {"beta", **eval_fn's last metrics, "implicit_accuracy", "seconds"}: the points of
    the reward-KL frontier (gold_reward against kl). eval_fn(policy) must measure KL
    against the starting policy (evaluate.evaluate_policy with ref=that policy)."""
    start = load_checkpoint(policy_ckpt, device)[0] if isinstance(policy_ckpt, str) else policy_ckpt
    ref = freeze(start)
    points = []
    for beta in betas:
        policy = copy.deepcopy(start)
        for p in policy.parameters():
            p.requires_grad_(True)
        run_cfg = replace(cfg, beta=beta)
        _, hist = train_dpo(policy, ref, enc, pairs, run_cfg, device, dtype,
                            lambda rec: log({**rec, "beta": beta}), eval_fn, val_pairs)
        points.append({"beta": beta, **hist["eval"], "implicit_accuracy": hist["implicit_accuracy"],
                       "seconds": hist["seconds"]})
    return points
