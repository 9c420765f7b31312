"""
The KL penalty: how far the policy pi has drifted from the frozen reference pi_ref.

RLHF maximises  E[score] - beta * KL(pi || pi_ref)  (Ziegler et al. 2019, eq. 2;
Ouyang et al. 2022, eq. 2). KL over whole sequences is a sum of per-position terms,
so in code it is spent token by token, and at each token we only see the one we
sampled. Hence the estimators of Schulman, "Approximating KL Divergence" (2020),
with log r = ref_logp - logp = log pi_ref(x) - log pi(x) and x ~ pi:

    k1 = -log r              unbiased, noisy, negative whenever pi_ref(x) > pi(x)
    k2 = (log r)^2 / 2       biased (little, near pi_ref), always >= 0
    k3 = (r - 1) - log r     unbiased, always >= 0, low variance near pi_ref

Why does a logged KL come out negative? The true KL never is, but the mean of k1
over a batch can be: many sampled tokens are ones the reference likes more (k1 < 0),
and a few hundred samples do not average that noise away (see the demo's seq<0).

Which estimator is "right" depends on what you do with it. With x ~ pi, the
sampling itself not differentiated, per position given its prefix (tests/test_kl.py
checks each line exactly):

    used as ...                          expected gradient
    reward, REINFORCE/PPO (k1)           grad KL(pi || pi_ref)            exact
    reward, REINFORCE/PPO (k3)           grad KL(pi||pi_ref) - grad KL(pi_ref||pi)
    reward, REINFORCE/PPO ("full")       0 at its own position (a constant per prefix)
    loss, differentiated (k1)            0
    loss, differentiated (k2)            grad KL(pi || pi_ref)            exact
    loss, differentiated (k3, GRPO)      grad KL(pi_ref || pi)            the other one!

Units: per token in nats, except for the controllers, which want the per-SEQUENCE KL
(summed over response tokens, see `sequence_kl`).
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F

LOG_RATIO_CLAMP = 20.0  # see k3


def k1(logp, ref_logp):
    """k1 = -log r = logp - ref_logp. Shape of the inputs, fp32.

    E_pi[k1] = KL(pi || pi_ref) exactly: unbiased. Variance Var_pi[log r], which is
    large compared with KL itself when pi is near pi_ref (for N(0,1) vs N(mu,1):
    KL = mu^2/2 but Var = mu^2). Negative for every token that pi_ref likes more
    than pi does, so a single sample (and a small batch mean) can be < 0."""
    return logp.float() - ref_logp.float()


def k2(logp, ref_logp):
    """k2 = (log r)^2 / 2. Shape of the inputs, fp32. Always >= 0.

    Biased: E_pi[k2] = KL + O(KL^{3/2}), matching KL to second order in
    (pi - pi_ref) (for N(0,1) vs N(mu,1): E[k2] = mu^2/2 + mu^4/8). Its variance is
    small near pi_ref ((2 mu^4 + mu^6)/4 in the Gaussian case), large far from it."""
    log_r = ref_logp.float() - logp.float()
    return 0.5 * log_r * log_r


def k3(logp, ref_logp):
    """k3 = (r - 1) - log r, r = pi_ref(x)/pi(x). Shape of the inputs, fp32. >= 0.

    Unbiased: E_pi[r - 1] = sum_x pi_ref(x) - 1 = 0, so it is k1 plus a zero-mean
    control variate, and >= 0 because e^y >= 1 + y. Lower variance than k1 near
    pi_ref (Gaussian case: e^{mu^2} - 1 - mu^2 ~ mu^4/2 vs mu^2), but r is
    heavy-tailed: a token pi finds unlikely and pi_ref likes gives a huge r.
    So the log-ratio is clamped to [-20, 20]: exp(88.7) already overflows fp32 (and
    bf16), sums of many e^80's overflow much sooner, and at |log r| = 20 the token's
    estimate is ~5e8 nats, far past any healthy value (< 1), so the clamp changes
    only broken tokens, bounds the loss, and stops their gradient (it is 0 past the
    clamp). expm1 keeps r - 1 accurate when r is close to 1."""
    log_r = (ref_logp.float() - logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(log_r) - log_r


def full_kl(logits, ref_logits, reverse=True):
    """Exact KL over the vocabulary at each position. logits, ref_logits (B, T, V) ->
    (B, T) in nats, fp32.

    reverse=True:  KL(pi || pi_ref) = sum_x pi(x) (log pi(x) - log pi_ref(x)), the
      expectation under the policy being trained, like the "reverse" KL of
      variational inference (mode-seeking). This is the one RLHF penalises and the
      one k1/k2/k3 estimate. (Some RLHF articles call it "forward" because pi comes
      first; leash follows the variational-inference name.)
    reverse=False: KL(pi_ref || pi), the expectation under the reference ("forward",
      mass-covering; the one maximum likelihood on pi_ref's samples minimises).
    As an estimator it is k1 averaged over the token instead of sampled: same mean
    per position, no token-level noise (the prefixes are still samples)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    if not reverse:
        logp, ref_logp = ref_logp, logp
    p = logp.exp()
    # 0 * log 0 = 0: tokens pi cannot emit (logit -inf) contribute nothing.
    return torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(-1)


def token_kl(logp, ref_logp, estimator="k1", logits=None, ref_logits=None):
    """The per-token estimate (B, T) named by `estimator` ("k1", "k2", "k3", "full").
    "full" needs logits and ref_logits (B, T, V), aligned with logp: logits[:, t]
    is the distribution that produced the token whose log-prob is logp[:, t]."""
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError('estimator "full" needs logits and ref_logits')
        return full_kl(logits, ref_logits)
    funcs = {"k1": k1, "k2": k2, "k3": k3}
    if estimator not in funcs:
        raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2, k3 or full")
    return funcs[estimator](logp, ref_logp)


def _masked(x, mask):
    # torch.where, not x * mask: inf * 0 = nan, and garbage outside the mask (log-probs
    # of padding) must not leak into sums or into gradients.
    return torch.where(mask.bool(), x.float(), 0.0)


def sequence_kl(logp, ref_logp, mask, estimator="k1", logits=None, ref_logits=None):
    """(B,) KL estimate per sequence in nats: the per-token estimate summed over the
    response tokens (mask == 1). This is the unit the KL controllers want."""
    logp, ref_logp = _masked(logp, mask), _masked(ref_logp, mask)
    return _masked(token_kl(logp, ref_logp, estimator, logits, ref_logits), mask).sum(-1)


@torch.no_grad()
def kl_penalized_rewards(scores, logp, ref_logp, mask, beta, estimator="k1",
                         logits=None, ref_logits=None):
    """Per-token rewards (B, T) for PPO: -beta * KL estimate on every response token,
    plus the sequence's score on its last response token; exactly 0 elsewhere.

    scores (B,): reward-model score of each whole sequence. logp, ref_logp, mask
    (B, T) over next-token positions, mask 1 on response tokens (EOS included).
    Stiennon et al. 2020 eq. 1 / Ouyang et al. 2022 eq. 2: R = score - beta * KL,
    with the KL spread over the tokens that incurred it, so credit assignment
    (GAE in ppo.py) sees where the drift happened. Rewards are data: no gradient.
    Use k1 here: as a reward it gives exactly grad KL(pi || pi_ref) (module table)."""
    keep = mask.bool()
    if not bool(keep.any(-1).all()):
        raise ValueError("every row needs at least one response token to carry its score")
    est = token_kl(_masked(logp, mask), _masked(ref_logp, mask), estimator, logits, ref_logits)
    rewards = _masked(-beta * est, mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    last = torch.where(keep, positions, -1).max(-1).values  # last response token per row
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float()
    return rewards


def kl_loss(logp, ref_logp, mask, estimator="k3"):
    """KL in the loss (GRPO; Shao et al. 2024, DeepSeekMath, eq. 3-4): scalar mean of
    k3 over all response tokens, with gradients through logp. Add coef * kl_loss to
    the policy loss instead of putting -beta * KL in the reward.

    The catch: tokens are sampled from pi, and that sampling is not differentiated.
    grad k3 = (1 - pi_ref/pi) grad log pi, so per position (given the prefix)
        E_pi[grad k3] = sum_x (pi(x) - pi_ref(x)) grad log pi(x)
                      = -sum_x pi_ref(x) grad log pi(x) = grad KL(pi_ref || pi),
    the gradient of the OTHER direction (forward, mass-covering), although the value
    of k3 estimates KL(pi || pi_ref). k1 as a REINFORCE reward instead gives
    E_pi[k1 grad log pi] = grad KL(pi || pi_ref) exactly; so does k2 in the loss
    (grad k2 = (log pi - log pi_ref) grad log pi): try estimator="k2".
    GRPO averages per sequence, then over sequences; here every response token in the
    batch weighs the same, so long answers are not down-weighted."""
    ref_logp = ref_logp.detach()  # the reference is fixed
    est = token_kl(_masked(logp, mask), _masked(ref_logp, mask), estimator)
    return _masked(est, mask).sum() / mask.float().sum().clamp(min=1.0)


class FixedKLController:
    """A constant KL coefficient beta; update() does nothing."""

    def __init__(self, value):
        self.value = value

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, sec 2.2):

        e = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    (the paper writes K_beta for n_steps / horizon). KL above target raises beta.

    !!! current_kl is the mean per-SEQUENCE KL in nats: summed over each response's
    tokens (`sequence_kl`), then averaged over the batch. Feed it a per-token mean
    and the controller will happily hold the per-token KL at the target, i.e. the
    sequences ~length times too far from pi_ref. target is in the same unit. !!!
    n_steps: episodes (sequences) in the batch this KL was measured on."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class LinearKLSchedule:
    """beta moving linearly from start to end over n_updates calls, then staying at
    end: the "start loose, then tighten" practice (small start, larger end). Same
    interface as the controllers; update() ignores the KL and advances one step."""

    def __init__(self, start, end, n_updates):
        self.start, self.end, self.n_updates, self.step = start, end, n_updates, 0
        self.value = start if n_updates > 0 else end

    def update(self, current_kl, n_steps):
        self.step = min(self.step + 1, self.n_updates)
        frac = self.step / self.n_updates if self.n_updates > 0 else 1.0
        self.value = self.start + (self.end - self.start) * frac


# ----------------------------------------------------------------------------- demo

def _demo_models(out, n):
    """(policy, reference, prompts (n, P) left-padded, eos_id, pad_id, description)."""
    from model import GPT, GPTConfig
    sft_path, pre_path = os.path.join(out, "sft.pt"), os.path.join(out, "pretrain.pt")
    if os.path.exists(sft_path) and os.path.exists(pre_path):
        import tokenizer as tok
        import world
        from evaluate import left_pad
        from sft import load_checkpoint
        policy, enc = load_checkpoint(sft_path)
        ref, _ = load_checkpoint(pre_path)
        cfg = world.WorldConfig(n_pretrain=0, n_sft=0, n_train_prompts=0, n_eval_prompts=n)
        prompts = [tok.encode(enc, p) for p in world.build_datasets(cfg)["eval_prompts"]]
        return (policy, ref, left_pad(prompts, tok.pad_id(enc)), tok.eos_id(enc), tok.pad_id(enc),
                f"{sft_path} vs its parent {pre_path}")
    policy = GPT(GPTConfig(block_size=72, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # prompt: token 0; eos = pad = -1 is never sampled, so every completion is full length
    prompts = torch.zeros(n, 1, dtype=torch.long)
    return policy.eval(), ref.eval(), prompts, -1, -1, "random GPT vs a copy + N(0, 0.05^2) weight noise"


@torch.no_grad()
def demo(out="out", n=256, lengths=(4, 8, 16, 32, 64)):
    from reference import response_mask, token_logprobs
    torch.manual_seed(0)
    policy, ref, prompts, eos, pad, what = _demo_models(out, n)
    print(f"KL(pi || pi_ref) estimators, {n} samples per length: {what}\n"
          "full = exact KL over the vocabulary at each sampled prefix; seq<0 = share of "
          "sequences whose estimate is negative")
    stats = {e: [] for e in ("k1", "k2", "k3", "full")}
    fits = [L for L in lengths if prompts.shape[1] + L <= policy.cfg.block_size]
    if len(fits) < len(lengths):
        print(f"(skipping max_new_tokens {[L for L in lengths if L not in fits]}: longer than block_size)")
    lengths = fits
    print(f"{'max_new':>7} {'len':>5} {'est':>4} | {'tok mean':>9} {'tok std':>8} | "
          f"{'seq mean':>9} {'seq std':>8} {'seq<0':>6}")
    for L in lengths:
        tokens, _ = policy.generate(prompts, L, eos, pad)
        logp, logits = token_logprobs(policy, tokens, pad, return_logits=True)
        ref_logp, ref_logits = token_logprobs(ref, tokens, pad, return_logits=True)
        mask = response_mask(tokens, prompts.shape[1], pad)
        for e in stats:
            tok_est = token_kl(logp, ref_logp, e, logits, ref_logits)[mask.bool()]
            seq = sequence_kl(logp, ref_logp, mask, e, logits, ref_logits)
            stats[e].append((seq.mean().item(), seq.std().item()))
            print(f"{L:>7} {mask.sum(1).mean().item():>5.1f} {e:>4} | {tok_est.mean().item():>9.4f} "
                  f"{tok_est.std().item():>8.4f} | {seq.mean().item():>9.4f} {seq.std().item():>8.4f} "
                  f"{(seq < 0).float().mean().item():>6.1%}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for e, rows in stats.items():
        mean, std = zip(*rows)
        label = "full (exact)" if e == "full" else e
        left.errorbar(lengths, mean, yerr=[s / n ** 0.5 for s in std], label=label, capsize=3)
        right.plot(lengths, std, marker="o", label=label)
    left.set(xscale="log", xlabel="max_new_tokens", ylabel="nats per sequence",
             title="mean per-sequence KL (+- 1 s.e.)")
    right.set(xscale="log", yscale="log", xlabel="max_new_tokens", ylabel="nats per sequence",
              title="spread (std) of the per-sequence estimate")
    for ax in (left, right):
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
    left.legend()
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    path = os.path.join(out, "plots", "kl_estimators.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="KL estimators vs the exact KL on policy samples")
    parser.add_argument("--out", default="out",
                        help="folder with sft.pt and pretrain.pt; plots go to OUT/plots")
    parser.add_argument("--n", type=int, default=256, help="samples per completion length")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    demo(args.out, args.n)
