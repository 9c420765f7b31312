"""
PPO on per-token KL-shaped rewards: pi answers, a reward model scores, and
the frozen starting policy pi_ref anchors it. Token t is rewarded (Ziegler
et al. 2019; Stiennon et al. 2020, eq. 1)

    r_t = -beta * (log pi(x_t) - log pi_ref(x_t))   k1 (see kl.py)
    r_T = r_T + score(prompt, answer)                on the last token

so an answer's return is score - beta * KL(pi || pi_ref): every nat of
drift is paid for. A critic (a copy of the reward model) learns each
state's value, GAE turns rewards and values into advantages, and the
policy takes a few epochs of clipped steps. Defaults follow Huang et al.
(2024), "The N implementation details of RLHF with PPO": score at EOS,
a no-EOS penalty, dropout off, one temperature everywhere, the critic
from the reward model, whitened advantages, gamma 1, lambda 0.95.
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


@dataclass
class PPOConfig(rollout.RLConfig):  # rollout.RLConfig's knobs, and PPO's own
    critic_lr: float = 5e-5         # critic learning rate (Adam)
    value_clip: float = 0.2         # a value moves at most this far from its rollout value
    vf_coef: float = 0.5            # weight of the value loss
    gamma: float = 1.0              # discount: an answer is one episode with one score
    lam: float = 0.95               # GAE lambda: bias (0) against variance (1)
    kl_estimator: str = "k1"        # k1 | k2 | k3 | full: the per-token KL in the reward
    approx_kl_stop: float = 0.0     # end the epochs once approx_kl passes this (0: never)


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (each token alike)."""
    total = torch.where(mask.bool(), x, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries of x (B, T), 0 elsewhere,
    the mean and std of the whole batch: step sizes stop
    depending on the reward's scale."""
    every = dist.gather_cat(x[mask.bool()].float())
    mean = every.mean()
    var = ((every - mean) ** 2).mean()
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), whitened, 0.0)


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE (Schulman et al. 2016, eq. 16) per row. rewards, values, mask
    (B, T); values[:, t] = V(state before token t); the episode ends
    after the last response token (next value 0):

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
        R_t     = A_t + V_t      (the critic's target, the lambda-return)

    -> (advantages, returns), both (B, T) fp32, exactly 0 off the mask."""
    m = mask.bool()
    rewards = torch.where(m, rewards.float(), 0.0)
    values = torch.where(m, values.float(), 0.0)
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])

    for t in reversed(range(rewards.shape[1])):  # a recursion in t
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m[:, t], adv, 0.0)
        next_adv = advantages[:, t]
        next_value = values[:, t]

    returns = torch.where(m, advantages + values, 0.0)
    return advantages, returns


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), all (B, T):

        ratio_t = exp(logp_t - old_logp_t)
        loss = -mean_t min(ratio_t A_t, clip(ratio_t, 1 +- eps) A_t)

    A ratio past 1 +- eps in A's favour earns nothing: one batch cannot
    drag pi far. -> (loss, stats: clipfrac, approx_kl = k3 of KL(pi_old ||
    pi))."""
    log_ratio = logp.float() - old_logp.float()
    log_ratio = torch.where(mask.bool(), log_ratio, 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)

    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        approx_kl = torch.expm1(log_ratio) - log_ratio
        stats = {"clipfrac": masked_mean(clipped, mask),
                 "approx_kl": masked_mean(approx_kl, mask)}
    return -masked_mean(surrogate, mask), stats


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (the PPO2 baselines code; Huang et al. 2022),
    all (B, T):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    -> (loss, stats: vf_clipfrac, the share where the clipped term won)."""
    values = values.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    vf_clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the masked tokens."""
    m = mask.bool()
    returns, values = (dist.gather_cat(x[m]) for x in (returns, values))
    var = returns.var()
    if var == 0:
        return float("nan")
    return (1 - (returns - values).var() / var).item()


def optimise(policy, critic, batch, optimizer, cfg, pad_id, device, dtype,
             check_tol=None, ptx_loss=None):
    """cfg.epochs of shuffled minibatches over a rollout batch (tokens (B,
    T+1); logp, values, advantages, returns, mask (B, T)); check_tol: the
    first ratios must be 1 within this; ptx_loss(policy): a pretraining
    batch's NLL (cfg.ptx_coef). -> the epochs' mean stats."""
    epochs = []
    for epoch in range(cfg.epochs):
        sums, tokens = {}, 0
        minibatches = rollout.minibatches(batch, cfg.minibatch_size)
        for i, mb in enumerate(minibatches):
            mask = mb["mask"]
            with autocast(device, dtype):
                logp = token_logprobs(policy, mb["tokens"], pad_id, cfg.temperature)
                pad_mask = mb["tokens"] != pad_id
                values = critic(mb["tokens"], pad_mask)[:, :-1].float()
            if check_tol is not None and epoch == 0 and i == 0:
                rollout.check_ratio(logp, mb["logp"], mask, check_tol)

            loss, stats = policy_loss(logp, mb["logp"], mb["advantages"], mask,
                                      cfg.clip_eps)
            v_loss, v_stats = value_loss(values, mb["values"], mb["returns"], mask,
                                         cfg.value_clip)
            total = loss + cfg.vf_coef * v_loss
            if cfg.ptx_coef:  # PPO-ptx: pretraining's loss mixed in (rollout.py)
                ptx = ptx_loss(policy)
                total = total + cfg.ptx_coef * ptx
                stats["ptx_loss"] = ptx.detach()
            n = mask.sum()
            dist.step(total, optimizer, cfg.max_grad_norm, n, clip_each_group=True)

            stats.update(v_stats, policy_loss=loss.detach(), value_loss=v_loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * n
            tokens += n

        epochs.append(dist.mean_stats(sums, tokens))
        if cfg.approx_kl_stop and epochs[-1]["approx_kl"] > cfg.approx_kl_stop:
            break  # the policy has moved far enough from the sampler

    stats = {k: sum(e[k] for e in epochs) / len(epochs) for k in epochs[0]}
    return {**stats, "epochs_done": len(epochs)}


def train_ppo(policy, ref, score_fn, critic, enc, prompts, cfg, device="cpu",
              dtype="fp32", log=print, eval_fn=None, gold_fn=world.gold_reward,
              valid_fn=world.is_valid, ptx_loss=None):
    """PPO on `policy` (in place) against score_fn(tokens (B, T), prompt_len)
    -> (B,) raw scores; ref = freeze(policy); critic: a ScalarModel copy of
    the reward model. log gets each update's record. -> (policy, records)."""
    pad = tok.pad_id(enc)
    budget, controller, batches = rollout.start(cfg, enc, prompts, policy, cfg.rollouts)
    critic.requires_grad_(True)
    policy.eval()  # dropout off: the model we train is the one that sampled
    critic.eval()
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr},
              {"params": list(critic.parameters()), "lr": cfg.critic_lr}]
    optimizer = adamw(groups, device, cfg.lr, betas=(0.9, 0.999), eps=1e-5)
    history, t_start = [], time.time()

    for update in range(cfg.updates):
        t0, first = time.time(), update == 0
        ro = rollout.sample(policy, ref, enc, next(batches), budget,
                            cfg.temperature, device, dtype, check=first)
        scores = rollout.score(ro, score_fn, cfg, budget, device, dtype)
        mask, beta = ro["mask"], controller.value

        # the critic's value of every state, then the KL-shaped rewards
        with torch.no_grad(), autocast(device, dtype):
            values = critic(ro["tokens"], ro["tokens"] != pad)[:, :-1].float()
        rewards = kl.kl_penalized_rewards(scores, ro["logp"], ro["ref_logp"], mask,
                                          beta, cfg.kl_estimator, ro["logits"],
                                          ro["ref_logits"])

        # credit assignment: GAE, then advantages whitened over the batch
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        batch = dict(tokens=ro["tokens"], logp=ro["logp"], values=values,
                     returns=returns, mask=mask, advantages=whiten(advantages, mask))

        tol = rollout.tolerance(device, dtype)["ratio"] if first else None
        stats = optimise(policy, critic, batch, optimizer, cfg, pad, device, dtype, tol,
                         ptx_loss)
        stats["explained_variance"] = explained_variance(values, returns, mask)

        rec = rollout.record("ppo", update, ro, beta, stats, t0, gold_fn, valid_fn)
        controller.update(rec["kl_exact"], cfg.rollouts)  # mean per-ANSWER KL
        rollout.report(rec, policy, cfg.updates, cfg.eval_every, t_start, eval_fn, log)
        history.append(rec)
    return policy.eval(), history
