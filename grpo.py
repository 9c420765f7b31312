"""
GRPO, Dr. GRPO and RLOO: RLHF without a critic, the baseline taken from a group of answers to one prompt.

PPO's critic learns how good a state is, so an answer is judged against what was expected. These methods
answer each prompt G times and judge each answer against its siblings instead: no value model, no GAE, and
every token of an answer gets the answer's advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2; Ahmadian
et al. 2024, "Back to Basics", RLOO). They also differ from PPO, and among themselves, in where the KL goes:

    kl_in="reward"  score - beta * sum_t k1 before the baseline, as PPO; the policy gradient of
                    -beta KL(pi || pi_ref): pi* = pi_ref exp(r / beta) / Z (RLOO; Ahmadian et al. 2024)
    kl_in="loss"    + beta * k3 per token in the loss (DeepSeekMath, eq. 3-4); its value estimates KL(pi ||
                    pi_ref) but its gradient is that of KL(pi_ref || pi), the other direction (kl.py's table)

    variant     advantage                            aggregation   KL
    GRPO        (s - group mean) / group std         "sequence"    k3 in the loss
    Dr. GRPO    s - group mean                       "constant"    k3 in the loss (Liu et al. 2025)
    RLOO        s - mean of the group's others       "constant"    k1 in the reward

Dr. GRPO's point: dividing by the group's std weighs prompts whose answers agree (too easy, too hard) up,
and averaging per answer makes a token of a short answer count more than one of a long answer.
"""
import math
import time
from dataclasses import dataclass

import torch

import dist
import kl
import tokenizer as tok
import world
from evaluate import rollout_metrics
from model import adamw, autocast
from ppo import rollout, tolerance
from reference import token_logprobs

VARIANTS = {"grpo": ("group", "sequence", "loss"), "dr_grpo": ("none", "constant", "loss"),
            "rloo": ("rloo", "constant", "reward")}  # (advantage, aggregation, kl_in)


@dataclass
class GRPOConfig:
    updates: int = 80               # updates, each one rollout batch and its optimisation
    rollouts: int = 64              # answers sampled per update: rollouts / group_size prompts...
    group_size: int = 8             # ...each answered this many times
    minibatch_size: int = 16        # answers per gradient step
    epochs: int = 4                 # passes over each rollout batch
    clip_eps: float = 0.2           # ratio clip, as PPO's
    lr: float = 2e-5                # Adam
    max_grad_norm: float = 1.0
    advantage: str = "group"        # group | batch | none (std scale of group_advantages) | rloo
    aggregation: str = "sequence"   # sequence | token | constant (see grpo_loss)
    kl_in: str = "loss"             # loss (k3, GRPO) | reward (k1, RLOO and PPO)
    kl_controller: str = "adaptive"  # adaptive | fixed | schedule, as PPO's
    beta: float = 0.3               # KL coefficient at the start (as PPO's; DeepSeekMath fixed 0.04)
    beta_end: float = 0.3           # schedule: the final beta
    kl_target: float = 2.0          # adaptive: the wanted exact KL(pi || pi_ref), nats per answer
    kl_horizon: int = 256
    no_eos_score: float | None = -2.0  # an answer without EOS gets this score instead (as PPO)
    temperature: float = 1.0
    max_new_tokens: int = 0         # response budget; 0: up to the model's block_size
    eval_every: int = 10
    seed: int = 0


def group_advantages(scores, group_size, scale="group"):
    """scores (N,) in consecutive groups of group_size answers to one prompt -> (N,) fp32 advantages
    s - mean(group), divided by the group's std (Bessel) + 1e-4 for scale "group" (GRPO), by the std of all N
    + 1e-4 for "batch" (data-parallel: of every rank's), or not at all for "none" (Dr. GRPO). A group of equal
    scores gets 0 (not NaN)."""
    groups = scores.float().view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale == "group":
        return centred / (groups.std(1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return centred / (torch.cat(dist.gather(scores.float().cpu())).to(scores.device).std() + 1e-4)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scale {scale!r}: use group, batch or none")


def rloo_advantages(scores, group_size):
    """scores (N,) in groups -> (N,) s_i - mean_{j != i} s_j (Kool et al. 2019; Ahmadian et al. 2024, eq. 4):
    a baseline that does not see the answer it judges, so the policy gradient stays unbiased.
    = G / (G - 1) * (s_i - group mean)."""
    groups = scores.float().view(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.0, aggregation="sequence"):
    """The GRPO objective as a loss (Shao et al. 2024, eq. 3). logp, old_logp, ref_logp, mask (N, T);
    advantages (N,) (every token of an answer gets its answer's) or (N, T). Per token, rho = exp(logp -
    old_logp):   l_t = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3(logp, ref_logp)
    aggregated "sequence": mean over each answer's tokens, then over answers (GRPO); "token": mean over all
    response tokens (DAPO, Yu et al. 2025); "constant": sum / (N * T), T the width (Dr. GRPO). -> 0-d fp32.
    Data-parallel, this rank's term of the loss over every rank's answers: "token" weighs its mean by its
    share of the tokens (dist.rank_weight) and "constant" takes T, the width, as the widest rank's."""
    m = mask.bool()
    adv = advantages.float()[:, None] if advantages.dim() == 1 else advantages.float()
    ratio = torch.exp(torch.where(m, logp.float() - old_logp.float(), 0.0))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta:
        per_token = per_token + beta * kl.k3(logp, ref_logp)
    per_token = torch.where(m, per_token, 0.0)
    if aggregation == "sequence":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "token":
        return per_token.sum() / mask.sum().clamp(min=1) * dist.rank_weight(mask.sum())
    if aggregation == "constant":
        width = dist.all_max(torch.tensor(mask.shape[1], device=mask.device))  # a device tensor: NCCL
        return per_token.sum() / (mask.shape[0] * int(width))
    raise ValueError(f"unknown aggregation {aggregation!r}: use sequence, token or constant")


def optimise(policy, batch, optimizer, cfg, beta, pad_id, device, dtype, check_tol=None):
    """epochs passes of shuffled minibatches over a rollout batch (tokens (N, T+1); logp, ref_logp, mask
    (N, T); advantages (N,)), in place. beta: the k3 coefficient in the loss (0 when the KL is in the
    reward). check_tol: the first ratios must be 1 within this. Returns the minibatch means of the stats.
    Data-parallel, `batch` is this rank's share, each minibatch too, and the stats are every rank's."""
    N, sums, n, size = batch["mask"].shape[0], {}, 0, dist.per_rank(cfg.minibatch_size)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(N, device=device)
        for start in range(0, N, size):
            mb = {k: v[perm[start:start + size]] for k, v in batch.items()}
            with autocast(device, dtype):
                logp = token_logprobs(policy, mb["tokens"], pad_id, cfg.temperature)
            m = mb["mask"].bool()
            log_ratio = torch.where(m, logp - mb["logp"], 0.0)
            if check_tol is not None and epoch == 0 and start == 0:  # no step yet: a ratio != 1 is a bug
                if (dev := log_ratio.exp().sub(1).abs().max().item()) > check_tol:
                    raise RuntimeError(f"sanity check: ratio differs from 1 by {dev:.2e} before any step")
            loss = grpo_loss(logp, mb["logp"], mb["ref_logp"], mb["advantages"], mb["mask"], cfg.clip_eps,
                             beta, cfg.aggregation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(policy.parameters())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():  # as ppo.policy_loss's: clipped share, k3 of KL(pi_old || pi)
                clipped, w = (log_ratio.exp() - 1).abs() > cfg.clip_eps, dist.rank_weight(m.sum())
                stats = {"policy_loss": loss.detach(), "clipfrac": clipped[m].float().mean() * w,
                         "approx_kl": (torch.expm1(log_ratio) - log_ratio)[m].mean() * w}
            sums, n = {k: sums.get(k, 0.0) + v for k, v in stats.items()}, n + 1
    return {k: dist.all_mean(v / n) for k, v in sums.items()}


def train_grpo(policy, ref, score_fn, enc, prompts, cfg, device="cpu", dtype="fp32", log=print, eval_fn=None,
               gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """GRPO / Dr. GRPO / RLOO (cfg's advantage, aggregation, kl_in) from `policy` (trained in place) against
    score_fn(tokens (B, T), prompt_len) -> (B,) raw scores; ref = freeze(policy). Each update samples
    cfg.group_size answers to each of rollouts / group_size prompts with ppo.rollout; log gets each update's
    record (PPO's keys but no critic's), eval_fn(policy) as eval_* every eval_every. -> (policy, records).
    Data-parallel, each rank answers its share of the update's prompts (a group never spans ranks) with its
    own seed: rollouts / N must be a multiple of group_size."""
    if cfg.rollouts % (cfg.group_size * (N := dist.world_size())) or cfg.group_size < 2:
        raise ValueError(f"rollouts {cfg.rollouts} must be a multiple of group_size {cfg.group_size} >= 2"
                         + (f" times {N} ranks (a group stays on one rank)" if N > 1 else ""))
    torch.manual_seed(cfg.seed + dist.rank())  # ranks sample different answers from identical weights
    gen, pad = torch.Generator().manual_seed(cfg.seed), tok.pad_id(enc)
    n_prompts = cfg.rollouts // cfg.group_size
    policy.eval()  # dropout off: the model we train is the one that sampled
    optimizer = adamw(policy.parameters(), device, cfg.lr, betas=(0.9, 0.999), eps=1e-5)
    controller = kl.make_controller(cfg.kl_controller, cfg.beta, cfg.kl_target, cfg.kl_horizon,
                                    cfg.beta_end, cfg.updates)
    order, history, t_start = [], [], time.time()
    for update in range(cfg.updates):
        t0 = time.time()
        while len(order) < n_prompts:
            order += torch.randperm(len(prompts), generator=gen).tolist()
        mine = order[:n_prompts][dist.shard(n_prompts)]  # this rank's prompts, each answered group_size times
        group_prompts = [prompts[i] for i in mine for _ in range(cfg.group_size)]
        order = order[n_prompts:]
        ro = rollout(policy, ref, None, score_fn, enc, group_prompts, cfg, device, dtype, check=update == 0)
        mask, beta, scores = ro["mask"], controller.value, ro["scores"]
        if cfg.no_eos_score is not None:
            scores = torch.where(ro["ended"], scores, cfg.no_eos_score)
        zero_std = (scores.view(-1, cfg.group_size).std(1) == 0).float().mean()  # groups the score can't rank
        if cfg.kl_in == "reward":  # RLOO / PPO: every nat of drift costs beta, before the baseline
            scores = scores - beta * kl.sequence_kl(ro["logp"], ro["ref_logp"], mask, "k1")
        elif cfg.kl_in != "loss":
            raise ValueError(f"unknown kl_in {cfg.kl_in!r}: use loss or reward")
        advantages = rloo_advantages(scores, cfg.group_size) if cfg.advantage == "rloo" else \
            group_advantages(scores, cfg.group_size, cfg.advantage)
        batch = dict(tokens=ro["tokens"], logp=ro["logp"], ref_logp=ro["ref_logp"], mask=mask,
                     advantages=advantages)
        stats = optimise(policy, batch, optimizer, cfg, beta if cfg.kl_in == "loss" else 0.0, pad, device,
                         dtype, tolerance(device, dtype)["ratio"] if update == 0 else None)
        rec = {"stage": "grpo", "step": update, "beta": beta, **rollout_metrics(ro, gold_fn, valid_fn),
               "zero_std_groups": dist.all_mean(zero_std).item(),
               **{k: float(v) for k, v in stats.items()}, "seconds": time.time() - t0}
        controller.update(rec["kl_exact"], cfg.rollouts)  # every rank's exact KL(pi || pi_ref) per answer
        if eval_fn is not None and ((update + 1) % cfg.eval_every == 0 or update == cfg.updates - 1):
            rec.update({f"eval_{k}": v for k, v in eval_fn(policy).items()})
        rec["eta_s"] = (time.time() - t_start) / (update + 1) * (cfg.updates - update - 1)
        if not (math.isfinite(rec["policy_loss"]) and math.isfinite(rec["kl_exact"])):
            raise FloatingPointError(f"grpo: non-finite loss or KL at update {update}")
        log(rec)
        history.append(rec)
    return policy.eval(), history
