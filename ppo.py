"""
PPO on per-token KL-shaped rewards: the reinforcement-learning stage of RLHF.

The policy pi (it starts as the SFT model) answers prompts; a reward model scores
each finished answer; a frozen copy of the starting policy, pi_ref, anchors it.
Every response token t gets a reward (Ziegler et al. 2019; Stiennon et al. 2020, eq. 1)

    r_t = -beta * (log pi(x_t) - log pi_ref(x_t))       the k1 KL estimate, see kl.py
    r_T = r_T + score(prompt, response)                  on the last token (EOS)

so the return of a whole answer is score - beta * KL(pi || pi_ref): PPO maximises the
score while paying, token by token, for every nat it moves away from pi_ref.

One update:
  1. rollout   sample answers (temperature 1, no top-k/top-p, KV cache), stop at EOS;
               one forward each through policy, reference, critic and reward model.
  2. rewards   the RM score read at EOS (a fixed penalty if the answer never ended),
               spread into per-token rewards with the KL penalty of the current beta.
  3. GAE       advantages (gamma 1, lambda 0.95; Schulman et al. 2016), whitened.
  4. optimise  ppo_epochs passes over shuffled minibatches of the clipped surrogate
               (Schulman et al. 2017, eq. 7) plus a clipped value loss.
  5. beta      the KL controller sees the batch's mean per-sequence KL (the exact one,
               kl.full_kl summed over the answer: k1's mean without its noise).

Defaults follow Huang et al. (2024), "The N implementation details of RLHF with PPO":
score on the EOS token, PAD distinct from EOS, dropout off, the same temperature for
policy and reference log-probs, a critic initialised from the reward model, whitened
advantages. Three sanity checks stay on because they are nearly free (see `rollout`
and `optimise`); each one catches a bug that otherwise shows up only as "RL is flaky".
"""
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kl
import reward
import tokenizer as tok
import world
from evaluate import decode_responses, left_pad
from reference import gather_logprobs, response_mask
from sft import adamw, autocast_context


@dataclass
class PPOConfig:
    # Defaults: the cpu preset (4 x 128 GPT), about 3 minutes on 2 busy cores. 80 updates,
    # because at 40 the adaptive controller has not yet settled (KL +43% over its target).
    # The tiny preset (train.STAGE_OVERRIDES) runs 8 updates of 32 as a smoke test.
    updates: int = 80               # PPO updates, each = one rollout batch + its optimisation
    rollouts: int = 64              # answers sampled per update (the batch)
    minibatch_size: int = 16        # answers per gradient step
    ppo_epochs: int = 4             # passes over each rollout batch
    clip_eps: float = 0.2           # ratio clip of the surrogate (Schulman et al. 2017, eq. 7)
    value_clip: float = 0.2         # a value may move at most this far from its rollout value
    vf_coef: float = 0.5            # weight of the value loss in the summed loss
    lr: float = 2e-5                # policy learning rate (Adam); 5e-5 already drifts into RM blind spots
    critic_lr: float = 5e-5         # critic learning rate (Adam)
    max_grad_norm: float = 1.0      # gradient clip, applied to policy and critic separately
    gamma: float = 1.0              # discount: 1, an answer is one episode with one score
    lam: float = 0.95               # GAE lambda: bias (0) against variance (1)
    kl_controller: str = "adaptive"  # adaptive | fixed | schedule (beta from init_beta to beta_end)
    init_beta: float = 0.3          # KL coefficient at the start (the whole time if fixed)
    beta_end: float = 0.3           # final beta of the linear schedule
    kl_target: float = 2.0          # adaptive: wanted KL(pi || pi_ref), nats per SEQUENCE
    kl_horizon: int = 256           # adaptive: beta changes by <= 20% * rollouts / horizon per update
    kl_estimator: str = "k1"        # k1 | k2 | k3 | full: the per-token KL in the reward
    missing_eos_penalty: float | None = -2.0  # score of an answer without EOS; RM units (SFT: mean 0,
                                    # std 1), so below ~98% of SFT answers. None: keep its score
    target_kl: float = 0.0          # stop an update's epochs early once approx_kl exceeds this (0: never)
    temperature: float = 1.0        # sampling temperature, also used for every log-prob
    max_new_tokens: int = 0         # response budget; 0 = up to the model's block_size
    eval_every: int = 10            # call eval_fn every this many updates (and after the last)
    seed: int = 0                   # prompt order, sampling and minibatch shuffling
    sanity_checks: bool = True      # the three cheap checks (ratio, KL at update 0, logp)


# fp32 agreements are ~1e-6 in practice; bf16 matmuls round logits to ~3 digits.
TOLERANCE = {"fp32": dict(logp=1e-4, ratio=1e-5), "bf16": dict(logp=0.1, ratio=0.02)}


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (every token of the batch weighs the same)."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries; 0 outside the mask. x, mask (B, T).
    Whitened advantages make the step size independent of the reward's scale."""
    m = mask.bool()
    mean = x[m].mean()
    var = ((x[m] - mean) ** 2).mean()
    return torch.where(m, (x - mean) * torch.rsqrt(var + eps), 0.0)


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per row.

    rewards, values, mask: (B, T), mask 1 on response tokens only (0 on the prompt and
    the trailing padding). values[:, t] = V(state before the token at t). The episode
    ends after the last response token (its next value is 0):
        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
        R_t     = A_t + V_t          (the critic's target: the lambda-return)
    Returns (advantages, returns), both (B, T) fp32 and exactly 0 outside the mask."""
    m = mask.bool()
    rewards = torch.where(m, rewards.float(), 0.0)
    values = torch.where(m, values.float(), 0.0)  # also makes V = 0 after the end
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0.0)
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, torch.where(m, advantages + values, 0.0)


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise. All (B, T):

        ratio_t = pi(x_t) / pi_old(x_t) = exp(logp_t - old_logp_t)
        loss    = -mean_t min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t)

    The min makes it a pessimistic bound: moving a ratio past 1 +- eps in the direction
    the advantage likes earns nothing, so one batch cannot drag the policy far.
    Returns (loss, stats): clipfrac (share of tokens with |ratio - 1| > eps), approx_kl
    (KL(pi_old || pi) by k3 = (ratio - 1) - log ratio), ratio_max."""
    log_ratio = torch.where(mask.bool(), logp.float() - old_logp.float(), 0.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -masked_mean(surrogate, mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
                 "ratio_max": ratio[mask.bool()].max().item()}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (the PPO2 baselines code; Huang et al. 2022), all (B, T):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss   = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Like the ratio clip, it keeps one batch from moving the critic far.
    Returns (loss, stats) with vf_clipfrac (share of tokens where the clipped term won)."""
    values = values.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).item()}


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the mask: 1 = the critic predicts returns perfectly,
    0 = no better than their mean, < 0 = worse."""
    m = mask.bool()
    var = returns[m].var()
    return float("nan") if var == 0 else (1 - (returns[m] - values[m]).var() / var).item()


# ----------------------------------------------------------------------------- rollout

def real_tokens(tokens, pad_id):
    """The pad mask (True on real tokens), or None when there is no padding (fast path)."""
    pad_mask = tokens != pad_id
    return None if bool(pad_mask.all()) else pad_mask


def forward_logp(policy, tokens, pad_id, temperature):
    """(logp (B, T-1) fp32, logits (B, T-1, V)) of each next token: the ONE function that
    computes the policy's log-probs, so rollout and optimisation agree bit for bit."""
    logits = policy(tokens, real_tokens(tokens, pad_id))[:, :-1]
    return gather_logprobs(logits, tokens[:, 1:], temperature), logits


def forward_values(critic, tokens, pad_id):
    """(B, T-1) fp32: values[:, t] = V(tokens[:, :t+1]), the state before target t."""
    return critic(tokens, real_tokens(tokens, pad_id))[:, :-1].float()


def rollout(policy, ref, critic, score_fn, enc, prompts, cfg, ctx, check_ref=False, tol=TOLERANCE["fp32"]):
    """Sample one answer per prompt and everything PPO needs about it, as a dict of
    tensors with T = columns of `tokens` - 1 (aligned with the next-token targets):
    tokens (B, T+1), mask, logp, ref_logp, values (B, T), logits, ref_logits (B, T, V)
    (divided by the temperature), scores (B,) raw score, ended (B,) bool, texts."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    device = next(policy.parameters()).device
    prompt = left_pad([tok.encode(enc, p) for p in prompts], pad).to(device)
    P = prompt.shape[1]
    max_new = min(cfg.max_new_tokens or policy.cfg.block_size, policy.cfg.block_size - P)
    with torch.no_grad(), ctx:
        tokens, gen_logp = policy.generate(prompt, max_new, eos, pad, cfg.temperature)
        logp, logits = forward_logp(policy, tokens, pad, cfg.temperature)
        values = forward_values(critic, tokens, pad)
    with torch.inference_mode(), ctx:  # the frozen models never need autograd
        ref_logp, ref_logits = forward_logp(ref, tokens, pad, cfg.temperature)
        scores = score_fn(tokens, P).float()
    mask = response_mask(tokens, P, pad)
    texts, ended = decode_responses(enc, tokens.cpu(), P)
    out = dict(tokens=tokens, mask=mask, logp=logp, ref_logp=ref_logp.clone(), values=values,
               logits=logits.float() / cfg.temperature, ref_logits=ref_logits.float() / cfg.temperature,
               scores=scores.clone(), ended=torch.tensor(ended, device=device),
               texts=[p + r for p, r in zip(prompts, texts)])
    if cfg.sanity_checks:
        # Sampling and recomputation must be the same distribution, or every ratio and
        # KL below is off from the start (a temperature, dropout or padding mismatch).
        diff = (torch.where(mask[:, P - 1:].bool(), gen_logp - logp[:, P - 1:], 0.0)).abs().max().item()
        if diff > tol["logp"]:
            raise RuntimeError(f"sanity check: log-probs recorded while sampling differ from the "
                               f"recomputed ones by {diff:.2e} (> {tol['logp']}); check temperature, "
                               f"dropout and the padding masks")
        if check_ref:  # the reference is a frozen copy of this very policy: KL is exactly 0
            diff = torch.where(mask.bool(), logp - out["ref_logp"], 0.0).abs().max().item()
            if diff > tol["logp"]:
                raise RuntimeError(f"sanity check: at update 0 the policy's log-probs differ from the "
                                   f"reference's by {diff:.2e}; the reference must be freeze(policy)")
    return out


# ----------------------------------------------------------------------------- optimise

def optimise(batch, forward, optimizer, cfg, tol=TOLERANCE["fp32"]):
    """ppo_epochs passes of shuffled minibatches over one rollout batch.

    batch: dict of (B, T) tensors: logp (the rollout's), advantages, mask, and, if there
    is a critic, values (the rollout's) and returns. forward(idx) -> (logp, values or
    None) for rows idx, with gradients. Each param group of `optimizer` has its
    gradient norm clipped on its own, so a large value gradient cannot shrink the
    policy's step. Returns the mean of each statistic over the minibatches."""
    B = batch["mask"].shape[0]
    sums, n = {}, 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, device=batch["mask"].device)
        epoch_kl = []
        for start in range(0, B, cfg.minibatch_size):
            idx = perm[start:start + cfg.minibatch_size]
            mask = batch["mask"][idx]
            logp, values = forward(idx)
            if cfg.sanity_checks and epoch == 0 and start == 0:
                # Nothing has moved yet, so pi == pi_old: a ratio != 1 means the loss does
                # not see the policy that sampled (dropout, a different temperature, ...).
                dev = torch.where(mask.bool(), (logp.float() - batch["logp"][idx]).exp() - 1, 0.0).abs().max().item()
                if dev > tol["ratio"]:
                    raise RuntimeError(f"sanity check: ratio differs from 1 by {dev:.2e} before any step")
            loss, stats = policy_loss(logp, batch["logp"][idx], batch["advantages"][idx], mask, cfg.clip_eps)
            stats["policy_loss"] = loss.item()
            if values is not None:
                v_loss, v_stats = value_loss(values, batch["values"][idx], batch["returns"][idx], mask, cfg.value_clip)
                loss = loss + cfg.vf_coef * v_loss
                stats.update(v_stats, value_loss=v_loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
            optimizer.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            epoch_kl.append(stats["approx_kl"])
        if cfg.target_kl and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:
            break  # the policy has moved far enough from the sampler for this batch
    out = {k: v / n for k, v in sums.items()}
    out["ppo_epochs_done"] = epoch + 1
    return out


@torch.no_grad()
def rollout_stats(ro, returns, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """What one rollout batch says about the policy (means over its answers). valid_fn None:
    validity is not measured (a user's own text has no grammar), valid_rate is NaN."""
    mask, texts = ro["mask"], ro["texts"]
    seq_exact = (kl.full_kl(ro["logits"], ro["ref_logits"]) * mask).sum(1)
    logp_all = torch.log_softmax(ro["logits"], -1)
    return {"proxy_reward": ro["scores"].mean().item(),
            "gold_reward": sum(map(gold_fn, texts)) / len(texts),
            "kl": kl.sequence_kl(ro["logp"], ro["ref_logp"], mask, "k1").mean().item(),
            "kl_exact": seq_exact.mean().item(), "kl_max": seq_exact.max().item(),
            "entropy": masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask).item(),
            "explained_variance": explained_variance(ro["values"], returns, mask),
            "length": mask.sum(1).mean().item(),
            "valid_rate": sum(map(valid_fn, texts)) / len(texts) if valid_fn else float("nan"),
            "distinct_2": world.distinct_n(texts, 2),
            "eos_rate": ro["ended"].float().mean().item()}


def make_controller(cfg):
    if cfg.kl_controller == "adaptive":
        return kl.AdaptiveKLController(cfg.init_beta, cfg.kl_target, cfg.kl_horizon)
    if cfg.kl_controller == "fixed":
        return kl.FixedKLController(cfg.init_beta)
    if cfg.kl_controller == "schedule":
        return kl.LinearKLSchedule(cfg.init_beta, cfg.beta_end, cfg.updates)
    raise ValueError(f"unknown kl_controller {cfg.kl_controller!r}: use adaptive, fixed or schedule")


def train_ppo(policy, ref, reward_model, enc, prompts, cfg, device="cpu", dtype="fp32", log=print, eval_fn=None,
              gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """PPO from `policy` (trained in place) against `reward_model`, anchored to `ref`.

    reward_model: a reward.ScalarModel, read at each answer's EOS (reward.score); the
      critic starts as a copy of it. Or any function (tokens (B, T), prompt_len) -> (B,)
      scores; then the critic starts from the policy's trunk with a zero head.
    ref: reference.freeze(policy) taken before training (checked at update 0).
    prompts: training prompts (str). log(dict) gets one record per update; eval_fn(policy)
      -> dict is called every eval_every updates and after the last, its keys merged into
      that record with an "eval_" prefix. gold_fn, valid_fn judge the sampled texts for the
      records (userdata.py's for a user's own text; valid_fn None: not measured).
      Returns (policy, history: list of the records).
    Record keys: proxy_reward (RM score before the EOS penalty), gold_reward, kl (k1) and
    kl_exact (mean nats per answer), kl_max, beta (used this update), entropy (nats per
    token), clipfrac, approx_kl, ratio_max, policy_loss, value_loss, vf_clipfrac,
    explained_variance, length (tokens), valid_rate, distinct_2, eos_rate, ppo_epochs_done,
    seconds, eta_s."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pad = tok.pad_id(enc)
    if isinstance(reward_model, nn.Module):
        reward_model.eval()
        score_fn = lambda tokens, P: reward.score(reward_model, tokens, pad)
        critic = copy.deepcopy(reward_model)  # it already knows what a good answer looks like
    else:
        score_fn = reward_model
        critic = reward.ScalarModel(policy).to(device)
    for p in critic.parameters():
        p.requires_grad_(True)
    # eval mode throughout: dropout off, so the model we train is the one that sampled.
    policy.eval(), critic.eval()
    # One Adam, two param groups (own learning rates, gradients clipped per group).
    optimizer = adamw([{"params": list(policy.parameters()), "lr": cfg.lr},
                       {"params": list(critic.parameters()), "lr": cfg.critic_lr}], device, cfg.lr,
                      betas=(0.9, 0.999), eps=1e-5)  # weight decay 0: plain Adam
    controller = make_controller(cfg)
    ctx = autocast_context(device, dtype)
    tol = TOLERANCE[dtype]
    order, history, t_start = [], [], time.time()
    for update in range(cfg.updates):
        t0 = time.time()
        while len(order) < cfg.rollouts:  # walk through the prompts in shuffled passes
            order += torch.randperm(len(prompts), generator=gen).tolist()
        batch_prompts, order = [prompts[i] for i in order[:cfg.rollouts]], order[cfg.rollouts:]
        ro = rollout(policy, ref, critic, score_fn, enc, batch_prompts, cfg, ctx, update == 0, tol)
        mask, beta = ro["mask"], controller.value
        scores = ro["scores"]
        if cfg.missing_eos_penalty is not None:  # an answer cut off by the budget is not an answer
            scores = torch.where(ro["ended"], scores, cfg.missing_eos_penalty)
        rewards = kl.kl_penalized_rewards(scores, ro["logp"], ro["ref_logp"], mask, beta,
                                          cfg.kl_estimator, ro["logits"], ro["ref_logits"])
        advantages, returns = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        batch = dict(logp=ro["logp"], values=ro["values"], returns=returns, mask=mask,
                     advantages=whiten(advantages, mask))

        def forward(idx):
            tokens = ro["tokens"][idx]
            # Drop the columns that are padding in every row of this minibatch (a single
            # long answer pads the whole batch), then pad the outputs back with zeros.
            width = int((tokens != pad).any(0).nonzero().max()) + 1
            cut = tokens.shape[1] - width
            tokens = tokens[:, :width]
            with ctx:
                logp, _ = forward_logp(policy, tokens, pad, cfg.temperature)
                values = forward_values(critic, tokens, pad)
            return F.pad(logp, (0, cut)), F.pad(values, (0, cut))

        stats = optimise(batch, forward, optimizer, cfg, tol)
        rec = {"stage": "ppo", "step": update, "beta": beta, **rollout_stats(ro, returns, gold_fn, valid_fn), **stats}
        controller.update(rec["kl_exact"], cfg.rollouts)
        rec["seconds"] = time.time() - t0
        last = update == cfg.updates - 1
        if eval_fn is not None and ((update + 1) % cfg.eval_every == 0 or last):
            rec.update({f"eval_{k}": v for k, v in eval_fn(policy).items()})
        rec["eta_s"] = (time.time() - t_start) / (update + 1) * (cfg.updates - update - 1)
        if not all(math.isfinite(v) for v in (rec["policy_loss"], rec["kl_exact"])):
            raise FloatingPointError(f"ppo: non-finite loss or KL at update {update}: {rec}")
        log(rec)
        history.append(rec)
    return policy.eval(), history
