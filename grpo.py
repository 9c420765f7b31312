"""
The GRPO family: RLHF without a critic. Each prompt is answered G times
and each answer judged against its siblings: no value model, no GAE,
every token gets its answer's advantage (Shao et al. 2024, DeepSeekMath,
sec. 4.1.2). Where the KL goes:

  kl_in="reward"  score - beta * sum_t k1 before the baseline, as PPO: the
                  gradient of -beta KL(pi || pi_ref), optimum pi_ref e^(r/beta) / Z
  kl_in="loss"    + beta * k3 per token (DeepSeekMath, eq. 3-4): its value
                  estimates KL(pi || pi_ref), its gradient is KL(pi_ref || pi)'s

  variant   advantage               aggregation  ratio; clip         KL
  GRPO      (s - mean) / group std  "sequence"   token; 0.2          k3 in the loss
  Dr. GRPO  s - group mean          "constant"   token; 0.2          k3 in the loss
  RLOO      s - mean of the others  "constant"   token; 0.2          k1 in the reward
  DAPO      (s - mean) / group std  "token"      token; 0.2, 0.28    none (beta 0)
  GSPO      (s - mean) / group std  "sequence"   answer; 0.01, 0.015 k3 in the loss

Dr. GRPO (Liu et al. 2025) drops the std (it weighs up prompts whose answers
agree) and the per-answer mean (it weighs up short answers' tokens). RLOO
(Ahmadian et al. 2024) judges an answer by its siblings alone. DAPO (Yu et
al. 2025) clips higher, drops the KL, replaces groups that all scored alike
(`dynamic_sample`) and shapes unended answers (rollout.py). GSPO (Zheng et
al. 2025) gives an answer one ratio. With the KL in the reward a std scale
prices a nat at beta / std, unlike per prompt: compare KL places unscaled.
"""
import time
from dataclasses import dataclass

import torch

import dist
import kl
import rollout
import tokenizer as tok
import world
from model import adamw, autocast
from reference import token_logprobs

# variant: its changes to GRPOConfig's defaults (GRPO's); the table above
VARIANTS = {
    "grpo": {},
    "dr_grpo": dict(advantage="none", aggregation="constant"),
    # RLOO here takes clipped epochs; the paper's one step per batch: epochs=1
    "rloo": dict(advantage="rloo", aggregation="constant", kl_in="reward"),
    "dapo": dict(aggregation="token", clip_eps_high=0.28, dynamic_sampling=True,
                 mask_unended=True, overlong_share=0.25, kl_controller="fixed", beta=0.0),
    # the paper's 3e-4 / 4e-4 clip 68% of tokens here (answers of ~15 tokens,
    # 4 epochs); these clip 15%, the share the paper reports (docs/experiments.md)
    "gspo": dict(ratio_level="sequence", clip_eps=0.01, clip_eps_high=0.015),
}


@dataclass
class GRPOConfig(rollout.RLConfig):  # rollout.RLConfig's knobs, and the group's
    group_size: int = 8             # answers per prompt (rollouts / group_size prompts)
    advantage: str = "group"        # group | batch | none (group_advantages) | rloo
    aggregation: str = "sequence"   # sequence | token | constant (grpo_loss)
    kl_in: str = "loss"             # loss (GRPO) | reward (k1, RLOO and PPO)
    kl_loss_estimator: str = "k3"   # in the loss: k3 | k1 | k2 | k3+ | k3_ratio (grpo_loss)
    clip_eps_high: float | None = None  # upper clip 1 + this (None: clip_eps)
    ratio_level: str = "token"      # token | sequence (GSPO: one ratio per answer)
    dynamic_sampling: bool = False  # replace groups whose scores all tie (DAPO)
    max_resampled: int = 64         # dynamic sampling: extra groups per update, at most
    mask_unended: bool = False      # unended answers out of the loss (rollout.py)


def group_advantages(scores, group_size, scale="group"):
    """scores (N,) in consecutive groups of group_size answers to one
    prompt -> (N,) fp32 advantages s - mean(group), divided by

      "group"  the group's std (Bessel) + 1e-4   (GRPO)
      "batch"  the std of the whole batch + 1e-4
      "none"   nothing                           (Dr. GRPO)

    A group of equal scores gets 0, not NaN."""
    groups = scores.float().view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale == "group":
        std = groups.std(1).repeat_interleave(group_size)
        return centred / (std + 1e-4)
    if scale == "batch":
        return centred / (dist.gather_cat(scores.float()).std() + 1e-4)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scale {scale!r}: use group, batch or none")


def rloo_advantages(scores, group_size):
    """scores (N,) in groups -> (N,) s_i - mean_{j != i} s_j (Ahmadian et
    al. 2024, eq. 4): a baseline blind to the answer it judges, so the
    gradient stays unbiased; = G / (G - 1) * (s_i - group mean)."""
    groups = scores.float().view(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def advantages(scores, logp, ref_logp, mask, beta, cfg):
    """(N,) advantages of scores (N,): kl_in="reward" pays the KL first,
    score - beta * sum_t k1; then the variant's baseline and scale."""
    if cfg.kl_in == "reward":
        scores = scores - beta * kl.sequence_kl(logp, ref_logp, mask, "k1")
    elif cfg.kl_in != "loss":
        raise ValueError(f"unknown kl_in {cfg.kl_in!r}: use loss or reward")
    if cfg.advantage == "rloo":
        return rloo_advantages(scores, cfg.group_size)
    return group_advantages(scores, cfg.group_size, cfg.advantage)


def ratios(logp, old_logp, mask, level="token"):
    """(N, T) pi / pi_old of each response token ("token"), or on every
    token of an answer exp of the mean of its log-ratios ("sequence",
    GSPO: Zheng et al. 2025, eq. 7); 1 outside the mask."""
    log_ratio = torch.where(mask.bool(), logp.float() - old_logp.float(), 0.0)
    if level == "sequence":  # one ratio per answer, on all its tokens
        n_tokens = mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(1, keepdim=True) / n_tokens).expand_as(log_ratio)
    elif level != "token":
        raise ValueError(f"unknown ratio_level {level!r}: use token or sequence")
    return torch.exp(log_ratio)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.0,
              aggregation="sequence", clip_eps_high=None, ratio_level="token",
              max_new_tokens=None, kl_estimator="k3"):
    """GRPO's objective as a loss (Shao et al. 2024, eq. 3). logp, old_logp,
    ref_logp, mask (N, T); advantages (N,) or (N, T). rho = exp(logp - old_logp)
    per token ("token"), or for every token of an answer exp of the mean of its
    log-ratios ("sequence": GSPO, Zheng et al. 2025):

        l_t = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * k3

    eps_high = clip_eps_high, or clip_eps when None (DAPO's clip-higher: > eps);
    aggregated "sequence": mean over each answer's tokens, then over
    answers (GRPO; TRL's grpo); "token": mean over all response tokens
    (DAPO, Yu et al. 2025; TRL's bnpo); "constant": sum / (N *
    max_new_tokens), the run's fixed response budget, never the batch's
    width, so padding changes nothing (Dr. GRPO; TRL's dr_grpo). kl_estimator:
    kl.token_kl's ("k3" as GRPO, "k2", "k3+"...), or "k3_ratio": k3 x rho, rho
    differentiated (TRL's use_bias_correction_kl; DeepSeek-V3.2). -> 0-d."""
    m = mask.bool()
    adv = advantages.float()
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = ratios(logp, old_logp, mask, ratio_level)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta:
        estimator = "k3" if kl_estimator == "k3_ratio" else kl_estimator
        penalty = kl.token_kl(logp, ref_logp.detach(), estimator)
        if kl_estimator == "k3_ratio":  # unbiased from pi_old's samples
            penalty = penalty * ratio
        per_token = per_token + beta * penalty
    per_token = torch.where(m, per_token, 0.0)

    if aggregation == "sequence":
        per_answer = per_token.sum(1) / mask.sum(1).clamp(min=1)
        return per_answer.mean()
    if aggregation == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    if aggregation == "constant":
        if not max_new_tokens:
            raise ValueError('aggregation "constant" needs max_new_tokens, the budget')
        return per_token.sum() / (mask.shape[0] * max_new_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}: "
                     "use sequence, token or constant")


def optimise(policy, batch, optimizer, cfg, beta, budget, pad_id, device, dtype,
             check_tol=None, ptx_loss=None):
    """cfg.epochs of shuffled minibatches over a rollout batch (tokens,
    logp, ref_logp, mask, advantages (N,)). beta: k3's coefficient in the
    loss; budget: "constant"'s; check_tol: the first ratios must be 1
    within this; ptx_loss(policy): a pretraining batch's NLL, mixed in by
    cfg.ptx_coef. -> (sums, counts) of the stats."""
    sums, counts = {}, {}

    def add(name, value, n):  # a sum over n items, for a global mean
        sums[name] = sums.get(name, 0.0) + value * n
        counts[name] = counts.get(name, 0) + n

    for epoch in range(cfg.epochs):
        minibatches = rollout.minibatches(batch, cfg.minibatch_size)
        for i, mb in enumerate(minibatches):
            mask = mb["mask"]
            with autocast(device, dtype):
                logp = token_logprobs(policy, mb["tokens"], pad_id, cfg.temperature)
            if check_tol is not None and epoch == 0 and i == 0:
                rollout.check_ratio(logp, mb["logp"], mask, check_tol)

            loss = grpo_loss(logp, mb["logp"], mb["ref_logp"], mb["advantages"], mask,
                             cfg.clip_eps, beta, cfg.aggregation, cfg.clip_eps_high,
                             cfg.ratio_level, budget, cfg.kl_loss_estimator)
            total = loss
            if cfg.ptx_coef:  # PPO-ptx: pretraining's loss mixed in (rollout.py)
                ptx = ptx_loss(policy)
                total = loss + cfg.ptx_coef * ptx
                add("ptx_loss", ptx.detach(), 1)
            # "token" is a mean over tokens; the others, over answers
            n = mask.sum() if cfg.aggregation == "token" else len(mask)
            dist.step(total, optimizer, cfg.max_grad_norm, n)

            with torch.no_grad():  # where the clip is active, as TRL logs it
                m = mask.bool()
                ratio = ratios(logp, mb["logp"], mask, cfg.ratio_level)[m]
                adv = mb["advantages"][:, None].expand_as(mask)[m]
                low = (ratio < 1 - cfg.clip_eps) & (adv < 0)
                high = (ratio > 1 + (cfg.clip_eps_high or cfg.clip_eps)) & (adv > 0)
                log_ratio = (logp - mb["logp"])[m]
                add("policy_loss", loss.detach(), n)
                add("clipfrac", (low | high).float().mean(), m.sum())
                add("clip_low", low.float().mean(), m.sum())
                add("clip_high", high.float().mean(), m.sum())
                add("approx_kl", (torch.expm1(log_ratio) - log_ratio).mean(), m.sum())
    return sums, counts


def tied(scores, group_size):
    """(groups,) bool: True where every answer of a group scored the same
    (its advantages are all 0: nothing to learn from it)."""
    groups = scores.view(-1, group_size)
    return groups.amax(1) == groups.amin(1)


def dynamic_sample(ro, scores, draw, group_size, cap, pad_id):
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11): while groups of
    the batch `ro` (scores (N,)) tie, draw(k) -> (rollout, scores) of k
    fresh groups, at most `cap` in all; the batch keeps its size, groups
    with a signal first. -> (ro, scores, groups drawn)."""
    n_groups, parts, drawn = len(scores) // group_size, [(ro, scores)], 0
    signal = lambda: sum(int((~tied(s, group_size)).sum()) for _, s in parts)
    while (missing := n_groups - signal()) > 0 and drawn < cap:
        k = min(missing, cap - drawn)
        parts.append(draw(k))
        drawn += k

    ro = rollout.join([r for r, _ in parts], pad_id)
    scores = torch.cat([s for _, s in parts])
    order = torch.argsort(tied(scores, group_size).int(), stable=True)[:n_groups]
    rows = (order[:, None] * group_size + torch.arange(group_size)).flatten()
    return rollout.take(ro, rows.to(scores.device)), scores[rows], drawn


def train_grpo(policy, ref, score_fn, enc, prompts, cfg, device="cpu", dtype="fp32",
               log=print, eval_fn=None, gold_fn=world.gold_reward,
               valid_fn=world.is_valid, ptx_loss=None):
    """The GRPO family (cfg: a VARIANTS entry's fields), as train_ppo but
    with no critic: each update answers rollouts / group_size prompts
    group_size times. -> (policy, records)."""
    G = cfg.group_size
    if cfg.rollouts % G or G < 2:
        raise ValueError(f"rollouts {cfg.rollouts} must be a multiple of "
                         f"group_size {G} >= 2")
    pad = tok.pad_id(enc)
    n_prompts = cfg.rollouts // G  # each answered G times
    budget, controller, batches = rollout.start(cfg, enc, prompts, policy, n_prompts, G)
    policy.eval()  # dropout off: the model we train is the one that sampled
    optimizer = adamw(policy.parameters(), device, cfg.lr, betas=(0.9, 0.999), eps=1e-5)
    history, t_start = [], time.time()

    def draw(k, check=False):  # k fresh groups and their scores
        ro = rollout.sample(policy, ref, enc, next(batches)[:k * G], budget,
                            cfg.temperature, device, dtype, check)
        return ro, rollout.score(ro, score_fn, cfg, budget, device, dtype)

    for update in range(cfg.updates):
        t0, first = time.time(), update == 0
        ro, scores = draw(n_prompts, check=first)
        # groups whose answers all score alike carry no signal: DAPO swaps them
        tied_before, drawn = tied(scores, G), 0
        if cfg.dynamic_sampling:
            ro, scores, drawn = dynamic_sample(ro, scores, draw, G, cfg.max_resampled, pad)
        mask, beta = ro["mask"], controller.value

        # each answer against its group, the KL paid in the score or the loss
        adv = advantages(scores, ro["logp"], ro["ref_logp"], mask, beta, cfg)
        beta_in_loss = beta if cfg.kl_in == "loss" else 0.0
        if cfg.mask_unended:  # unended answers leave the loss (rollout.py)
            mask = mask * ro["ended"][:, None]
        batch = dict(tokens=ro["tokens"], logp=ro["logp"], ref_logp=ro["ref_logp"],
                     mask=mask, advantages=adv)

        tol = rollout.tolerance(device, dtype)["ratio"] if first else None
        sums, counts = optimise(policy, batch, optimizer, cfg, beta_in_loss, budget,
                                pad, device, dtype, tol, ptx_loss)
        # per group of the batch: tied before and after, fresh groups drawn
        sums.update(tied_groups=tied_before.sum(), tied_after=tied(scores, G).sum(),
                    resampled=drawn)
        counts.update(dict.fromkeys(("tied_groups", "tied_after", "resampled"), len(tied_before)))

        stats = dist.mean_stats(sums, counts)
        rec = rollout.record("grpo", update, ro, beta, stats, t0, gold_fn, valid_fn)
        controller.update(rec["kl_exact"], cfg.rollouts)  # mean per-ANSWER KL
        rollout.report(rec, policy, cfg.updates, cfg.eval_every, t_start, eval_fn, log)
        history.append(rec)
    return policy.eval(), history
