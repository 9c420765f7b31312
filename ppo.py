"""
PPO on per-token KL-shaped rewards: the reinforcement-learning stage of RLHF.

The policy pi (first the SFT model) answers prompts, a reward model scores them and a frozen copy of the
starting policy, pi_ref, anchors it. Token t is rewarded (Ziegler et al. 2019; Stiennon et al. 2020, eq. 1)
    r_t = -beta * (log pi(x_t) - log pi_ref(x_t))       the k1 KL estimate, see kl.py
    r_T = r_T + score(prompt, response)                  on the last token (EOS)
so an answer's return is score - beta * KL(pi || pi_ref): every nat of drift is paid for. An update: rollout,
rewards, GAE, ppo_epochs of minibatch steps on the clipped surrogate and value losses, then the KL controller
sees the mean exact KL. Defaults follow Huang et al. (2024), "The N implementation details of RLHF with
PPO": score at EOS, PAD distinct from EOS, dropout off, one temperature for sampling and every log-prob,
critic initialised from the reward model, whitened advantages, gamma 1, lambda 0.95. Sanity checks at
update 0 (ratio 1, KL 0, sampled log-probs equal recomputed ones) catch bugs that look like "RL is flaky".
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
from reference import response_mask, token_logprobs


@dataclass
class PPOConfig:
    updates: int = 80               # PPO updates, each one rollout batch and its optimisation
    rollouts: int = 64              # answers sampled per update
    minibatch_size: int = 16        # answers per gradient step
    ppo_epochs: int = 4             # passes over each rollout batch
    clip_eps: float = 0.2           # ratio clip of the surrogate (Schulman et al. 2017, eq. 7)
    value_clip: float = 0.2         # a value may move at most this far from its rollout value
    vf_coef: float = 0.5            # weight of the value loss
    lr: float = 2e-5                # policy learning rate (Adam)
    critic_lr: float = 5e-5         # critic learning rate (Adam)
    max_grad_norm: float = 1.0      # gradient clip, policy and critic separately
    gamma: float = 1.0              # discount: an answer is one episode with one score
    lam: float = 0.95               # GAE lambda: bias (0) against variance (1)
    kl_controller: str = "adaptive"  # adaptive | fixed | schedule (beta to beta_end)
    beta: float = 0.3               # KL coefficient at the start (throughout, if fixed)
    beta_end: float = 0.3           # schedule: the final beta
    kl_target: float = 2.0          # adaptive: the wanted KL(pi || pi_ref), nats per SEQUENCE
    kl_horizon: int = 256           # adaptive: beta moves <= 20% * rollouts / horizon per update
    kl_estimator: str = "k1"        # k1 | k2 | k3 | full: the per-token KL in the reward
    # The score an answer without EOS gets INSTEAD of the reward model's (lm-human-preferences; TRL's
    # missing_eos_penalty is subtracted from it). RM units: SFT answers have mean 0, std 1. None: keep it.
    no_eos_score: float | None = -2.0
    approx_kl_stop: float = 0.0     # stop an update's epochs once mean approx_kl passes this (0: never)
    temperature: float = 1.0        # sampling temperature, also used for every log-prob
    max_new_tokens: int = 0         # response budget; 0: up to the model's block_size
    eval_every: int = 10            # call eval_fn every this many updates (and after the last)
    seed: int = 0                   # prompt order, sampling and minibatch shuffling


def tolerance(device, dtype):
    """How far recomputed log-probs (and ratios) may be from the sampled ones at update 0. fp32 on a CPU
    agrees to ~1e-6; bf16 (and a GPU's TF32) keeps ~3 digits, and decoding one row takes other kernels."""
    exact = dtype == "fp32" and torch.device(device).type == "cpu"
    return {"logp": 1e-4, "ratio": 1e-5} if exact else {"logp": 0.1, "ratio": 0.02}


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (every token of the batch weighs the same). Data-parallel:
    this rank's term of the mean over every rank's tokens (dist.rank_weight; dist.all_mean gives the mean)."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1) * dist.rank_weight(mask.sum())


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries of x (B, T), 0 elsewhere: steps stop scaling with rewards.
    Data-parallel, mean and std are those of every rank's entries."""
    mean = dist.all_mean(masked_mean(x, mask))
    var = dist.all_mean(masked_mean((x - mean) ** 2, mask))
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE (Schulman et al. 2016, eq. 16) per row; rewards, values, mask (B, T), mask 1 on response tokens,
    values[:, t] = V(state before token t); the episode ends after the last response token (next value 0):
        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
        R_t     = A_t + V_t          (the critic's target: the lambda-return)
    Returns (advantages, returns), both (B, T) fp32 and exactly 0 outside the mask."""
    m = mask.bool()
    rewards, values = torch.where(m, rewards.float(), 0.0), torch.where(m, values.float(), 0.0)
    advantages = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):  # a recursion in t: it cannot be one tensor op
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = advantages[:, t] = torch.where(m[:, t], delta + gamma * lam * next_adv, 0.0)
        next_value = values[:, t]
    return advantages, torch.where(m, advantages + values, 0.0)


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise; all inputs (B, T):
        ratio_t = exp(logp_t - old_logp_t),  loss = -mean_t min(ratio_t A_t, clip(ratio_t, 1 +- eps) A_t)
    A ratio past 1 +- eps in the advantage's favour earns nothing, so one batch cannot drag pi far. Returns
    (loss, 0-d stats): clipfrac (share |ratio - 1| > eps), approx_kl (k3 of KL(pi_old || pi)), ratio_max."""
    log_ratio = torch.where(mask.bool(), logp.float() - old_logp.float(), 0.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                 "ratio_max": dist.all_max(torch.where(mask.bool(), ratio, 0.0).max())}
    return -masked_mean(surrogate, mask), stats


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (the PPO2 baselines code; Huang et al. 2022), all (B, T):
        V_clip = V_old + clip(V - V_old, -c, c),   loss = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
    Returns (loss, stats) with vf_clipfrac, the share of tokens where the clipped term won."""
    clipped = old_values + (values.float() - old_values).clamp(-clip, clip)
    err, err_clipped = (values.float() - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(err, err_clipped), mask), \
        {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the mask: 1 a perfect critic, 0 no better than the mean. Data-parallel,
    over every rank's tokens (gathered)."""
    m, every = mask.bool(), lambda x: torch.cat(dist.gather(x.cpu())).to(x.device)
    returns, values = every(returns[m]), every(values[m])
    var = returns.var()
    return float("nan") if var == 0 else (1 - (returns - values).var() / var).item()


@torch.no_grad()
def rollout(policy, ref, critic, score_fn, enc, prompts, cfg, device, dtype, check=False):
    """Sample an answer per prompt -> dict: tokens (B, T+1); mask, logp, ref_logp, values (B, T; None without
    a critic); logits, ref_logits (B, T, V) at the temperature; raw scores, ended (B,); texts."""
    pad = tok.pad_id(enc)
    prompt = tok.left_pad([tok.encode(enc, p) for p in prompts], pad).to(device)
    P = prompt.shape[1]
    max_new = min(cfg.max_new_tokens or policy.cfg.block_size, policy.cfg.block_size - P)
    with autocast(device, dtype, sampling=True):
        tokens, gen_logp = policy.generate(prompt, max_new, tok.eos_id(enc), pad, cfg.temperature)
    with autocast(device, dtype):
        logp, logits = token_logprobs(policy, tokens, pad, cfg.temperature, return_logits=True)
        ref_logp, ref_logits = token_logprobs(ref, tokens, pad, cfg.temperature, return_logits=True)
        values = critic(tokens, tokens != pad)[:, :-1].float() if critic is not None else None
        scores = score_fn(tokens, P).float()
    mask = response_mask(tokens, P, pad)
    answers, ended = tok.decode_responses(enc, tokens, P)
    if check:  # one distribution for sampling and recomputing (temperature, dropout, padding), and KL 0
        pairs = {"recorded while sampling vs recomputed": (gen_logp, logp[:, P - 1:], mask[:, P - 1:]),
                 "of policy vs ref = freeze(policy) at update 0": (logp, ref_logp, mask)}
        for what, (a, b, m) in pairs.items():
            diff = torch.where(m.bool(), a - b, 0.0).abs().max().item()
            if diff > tolerance(device, dtype)["logp"]:
                raise RuntimeError(f"sanity check: log-probs {what} differ by {diff:.2e}")
    return dict(tokens=tokens, mask=mask, logp=logp, ref_logp=ref_logp, values=values, logits=logits,
                ref_logits=ref_logits, scores=scores, ended=torch.tensor(ended, device=device),
                texts=[p + a for p, a in zip(prompts, answers)])


def optimise(policy, critic, batch, optimizer, cfg, pad_id, device, dtype, check_tol=None):
    """ppo_epochs passes of shuffled minibatches over a rollout batch (tokens (B, T+1); logp, values,
    advantages, returns, mask (B, T)), in place, each param group's gradient norm clipped on its own.
    check_tol: the first ratios must be 1 within this. Returns stats' minibatch means, ppo_epochs_done.
    Data-parallel, `batch` is this rank's share and so is each minibatch (minibatch_size / N rows); the
    stats are every rank's (masked_mean's terms, averaged over the ranks)."""
    B, sums, n, size = batch["mask"].shape[0], {}, 0, dist.per_rank(cfg.minibatch_size)
    for epoch in range(cfg.ppo_epochs):
        perm, epoch_kl = torch.randperm(B, device=device), []
        for start in range(0, B, size):
            mb = {k: v[perm[start:start + size]] for k, v in batch.items()}
            with autocast(device, dtype):
                logp = token_logprobs(policy, mb["tokens"], pad_id, cfg.temperature)
                values = critic(mb["tokens"], mb["tokens"] != pad_id)[:, :-1].float()
            if check_tol is not None and epoch == 0 and start == 0:  # no step yet: a ratio != 1 is a bug
                dev = torch.where(mb["mask"].bool(), (logp - mb["logp"]).exp() - 1, 0.0).abs().max().item()
                if dev > check_tol:
                    raise RuntimeError(f"sanity check: ratio differs from 1 by {dev:.2e} before any step")
            loss, stats = policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], cfg.clip_eps)
            v_loss, v_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.value_clip)
            stats.update(v_stats, policy_loss=loss.detach(), value_loss=v_loss.detach())
            optimizer.zero_grad(set_to_none=True)
            (loss + cfg.vf_coef * v_loss).backward()
            dist.average_gradients(p for group in optimizer.param_groups for p in group["params"])
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
            optimizer.step()
            sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
            n, epoch_kl = n + 1, epoch_kl + [stats["approx_kl"]]
        if cfg.approx_kl_stop and dist.all_mean(torch.stack(epoch_kl).mean()).item() > cfg.approx_kl_stop:
            break  # the policy has moved far enough from the sampler for this batch
    return {**{k: dist.all_mean(v / n) for k, v in sums.items()}, "ppo_epochs_done": epoch + 1}


def train_ppo(policy, ref, score_fn, critic, enc, prompts, cfg, device="cpu", dtype="fp32", log=print,
              eval_fn=None, gold_fn=world.gold_reward, valid_fn=world.is_valid):
    """PPO from `policy` (trained in place) against score_fn(tokens (B, T), prompt_len) -> (B,) raw scores;
    ref = freeze(policy); critic: a ScalarModel copy of the reward model. log gets each update's `rec`
    (evaluate.rollout_metrics: proxy_reward before the no-EOS rule, kl, kl_exact...; eval_fn(policy) as
    eval_* every eval_every updates); gold_fn, valid_fn (None: skip) judge texts. -> (policy, records).
    Data-parallel, each rank answers its share (rollouts / N) of the update's prompts with its own seed."""
    torch.manual_seed(cfg.seed + dist.rank())  # ranks sample different answers from identical weights
    dist.per_rank(cfg.rollouts)  # ValueError unless the ranks split the rollouts evenly: they step together
    gen, pad = torch.Generator().manual_seed(cfg.seed), tok.pad_id(enc)
    critic.requires_grad_(True)
    policy.eval(), critic.eval()  # dropout off: the model we train is the one that sampled
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr},
              {"params": list(critic.parameters()), "lr": cfg.critic_lr}]
    optimizer = adamw(groups, device, cfg.lr, betas=(0.9, 0.999), eps=1e-5)  # plain Adam, own lrs
    controller = kl.make_controller(cfg.kl_controller, cfg.beta, cfg.kl_target, cfg.kl_horizon,
                                    cfg.beta_end, cfg.updates)
    order, history, t_start = [], [], time.time()
    for update in range(cfg.updates):
        t0 = time.time()
        while len(order) < cfg.rollouts:  # walk through the prompts in shuffled passes
            order += torch.randperm(len(prompts), generator=gen).tolist()
        mine = order[:cfg.rollouts][dist.shard(cfg.rollouts)]  # this rank's share of the update's prompts
        batch_prompts, order = [prompts[i] for i in mine], order[cfg.rollouts:]
        ro = rollout(policy, ref, critic, score_fn, enc, batch_prompts, cfg, device, dtype, check=update == 0)
        mask, beta, scores = ro["mask"], controller.value, ro["scores"]
        if cfg.no_eos_score is not None:  # an answer cut off by the budget is not an answer
            scores = torch.where(ro["ended"], scores, cfg.no_eos_score)
        rewards = kl.kl_penalized_rewards(scores, ro["logp"], ro["ref_logp"], mask, beta,
                                          cfg.kl_estimator, ro["logits"], ro["ref_logits"])
        advantages, returns = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        batch = dict(tokens=ro["tokens"], logp=ro["logp"], values=ro["values"], returns=returns, mask=mask,
                     advantages=whiten(advantages, mask))
        stats = optimise(policy, critic, batch, optimizer, cfg, pad, device, dtype,
                         tolerance(device, dtype)["ratio"] if update == 0 else None)
        rec = {"stage": "ppo", "step": update, "beta": beta, **rollout_metrics(ro, gold_fn, valid_fn),
               "explained_variance": explained_variance(ro["values"], returns, mask),
               **{k: float(v) for k, v in stats.items()}, "seconds": time.time() - t0}
        controller.update(rec["kl_exact"], cfg.rollouts)  # every rank's mean per-SEQUENCE KL, as it wants
        if eval_fn is not None and ((update + 1) % cfg.eval_every == 0 or update == cfg.updates - 1):
            rec.update({f"eval_{k}": v for k, v in eval_fn(policy).items()})
        rec["eta_s"] = (time.time() - t_start) / (update + 1) * (cfg.updates - update - 1)
        if not (math.isfinite(rec["policy_loss"]) and math.isfinite(rec["kl_exact"])):
            raise FloatingPointError(f"ppo: non-finite loss or KL at update {update}")
        log(rec)
        history.append(rec)
    return policy.eval(), history
