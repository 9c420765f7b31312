"""The KL penalty: how far the policy pi is from the frozen reference pi_ref.

RLHF maximises  E[score] - beta * KL(pi || pi_ref)  (Ziegler et al. 2019, eq. 2;
Ouyang et al. 2022, eq. 2). Sequence KL is a sum of per-position terms and code sees
only the sampled token, hence Schulman's estimators ("Approximating KL Divergence",
2020), elementwise, with log r = ref_logp - logp = log pi_ref(x) - log pi(x), x ~ pi.
Exact moments for pi = N(0, 1), pi_ref = N(mu, 1), KL = mu^2/2:

    estimator             bias, sign                mean             variance
    k1 = -log r           unbiased, noisy, can < 0  mu^2/2           mu^2
    k2 = (log r)^2 / 2    biased, >= 0              mu^2/2 + mu^4/8  (2 mu^4 + mu^6)/4
    k3 = (r - 1) - log r  unbiased, >= 0            mu^2/2           e^{mu^2} - 1 - mu^2

So a logged k1 KL can be negative (the true KL never is): a few hundred samples
do not average away the tokens the reference likes more (`experiments.py kl`).
Which estimator is "right" depends on its use; expected gradient per position,
x ~ pi, the sampling not differentiated (tests/test_kl.py checks each):

    used as ...                      expected gradient
    reward, REINFORCE/PPO (k1)       grad KL(pi || pi_ref)   exact
    reward, REINFORCE/PPO (k3)       grad KL(pi||pi_ref) - grad KL(pi_ref||pi)
    reward, REINFORCE/PPO ("full")   0 at its own position (constant per prefix)
    loss, differentiated (k1)        0
    loss, differentiated (k2, k3+)   grad KL(pi || pi_ref)   exact
    loss, differentiated (k3, GRPO)  grad KL(pi_ref || pi)   the other one!
    loss, k3 x pi / pi_old (ratio differentiated)  grad KL(pi || pi_ref), off-policy too

Per position only: over a sequence a token also changes the KL of every later
token, which k1 in the reward with reward-to-go pays for and a per-token loss does
not (`experiments.py klgrad` computes the gap exactly).
"""
import torch


def k1(logp, ref_logp):
    """k1 = -log r = logp - ref_logp. E_pi[k1] = KL(pi || pi_ref)."""
    return logp.float() - ref_logp.float()


def k2(logp, ref_logp):
    """k2 = (log r)^2 / 2. Matches KL to second order in (pi - pi_ref)."""
    log_r = ref_logp.float() - logp.float()
    return 0.5 * log_r * log_r


def k3(logp, ref_logp):
    """k3 = (r - 1) - log r, r = pi_ref(x)/pi(x): k1 plus the zero-mean control
    variate r - 1 (E_pi[r] = sum_x pi_ref(x) = 1), and >= 0 (e^y >= 1 + y).
    r is heavy-tailed and exp(88.7) overflows fp32, so log r is clamped to
    [-20, 20], already ~5e8 nats (healthy: < 1): only broken tokens change
    (bounded, no gradient). expm1: accurate near r = 1."""
    log_r = (ref_logp.float() - logp.float()).clamp(-20.0, 20.0)
    return torch.expm1(log_r) - log_r


def full_kl(logits, ref_logits, reverse=True):
    """Exact KL (B, T), fp32 nats, from logits, ref_logits (B, T, V). reverse=True:
    KL(pi || pi_ref) = sum_x pi(x) (log pi(x) - log pi_ref(x)), k1 averaged, not
    sampled: the one RLHF penalises ("reverse", mode-seeking, as in variational
    inference; some RLHF texts say "forward", pi first). reverse=False:
    KL(pi_ref || pi), mass-covering (fitting pi to pi_ref's samples minimises it)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    if not reverse:
        logp, ref_logp = ref_logp, logp
    p = logp.exp()
    return torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(-1)  # 0 log 0 = 0


def token_kl(logp, ref_logp, estimator="k1", logits=None, ref_logits=None):
    """Per-token estimate (B, T) named by `estimator` ("k1", "k2", "k3", "k3+": k3's
    value with k2's gradient (verl), "full": needs logits, ref_logits (B, T, V),
    logits[:, t] having produced the token of logp[:, t])."""
    if estimator == "k3+":
        return k2(logp, ref_logp) + (k3(logp, ref_logp) - k2(logp, ref_logp)).detach()
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError('estimator "full" needs logits and ref_logits')
        return full_kl(logits, ref_logits)
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2, k3, k3+ or full")
    return {"k1": k1, "k2": k2, "k3": k3}[estimator](logp, ref_logp)


def _masked(x, mask):
    """Not x * mask: inf * 0 = nan; padding garbage must reach no sum or gradient."""
    return torch.where(mask.bool(), x.float(), 0.0)


def sequence_kl(logp, ref_logp, mask, estimator="k1", logits=None, ref_logits=None):
    """(B,) KL per sequence in nats: the token estimates summed over the response."""
    logp, ref_logp = _masked(logp, mask), _masked(ref_logp, mask)
    return _masked(token_kl(logp, ref_logp, estimator, logits, ref_logits), mask).sum(-1)


@torch.no_grad()
def kl_penalized_rewards(scores, logp, ref_logp, mask, beta,
                         estimator="k1", logits=None, ref_logits=None):
    """PPO rewards (B, T): -beta * KL estimate on each response token, plus the
    score (B,) on the last; exactly 0 elsewhere. logp, ref_logp, mask (B, T).

    R = score - beta * KL (Stiennon et al. 2020 eq. 1; Ouyang et al. 2022 eq.
    2), the KL spread over the tokens that incurred it, so credit assignment
    (GAE in ppo.py) sees where the drift happened. Use k1 (module table)."""
    keep = mask.bool()
    if not bool(keep.any(-1).all()):
        raise ValueError("every row needs a response token to carry its score")
    logp, ref_logp = _masked(logp, mask), _masked(ref_logp, mask)
    est = token_kl(logp, ref_logp, estimator, logits, ref_logits)
    rewards = _masked(-beta * est, mask)
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(keep, columns, -1).max(-1).values
    rewards[torch.arange(len(mask), device=mask.device), last] += scores.float()
    return rewards


class FixedKLController:
    """A constant KL coefficient beta; update() does nothing."""
    def __init__(self, value):
        self.value = value

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019,
    sec 2.2; K_beta = n_steps / horizon, n_steps: sequences in the KL's batch):

        e = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    !!! current_kl, target: batch-mean per-SEQUENCE KL in nats (`sequence_kl`). Fed
    a per-token mean, it lets sequences drift ~length times too far from pi_ref. !!!"""
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target, self.horizon = target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class LinearKLSchedule:
    """beta: start to end linearly over n_updates update()s, then end ("start loose")."""
    def __init__(self, start, end, n_updates):
        self.start, self.end, self.n_updates = start, end, n_updates
        self.step = 0
        self.value = start if n_updates > 0 else end

    def update(self, current_kl, n_steps):
        self.step = min(self.step + 1, self.n_updates)
        frac = self.step / self.n_updates if self.n_updates > 0 else 1.0
        self.value = self.start + (self.end - self.start) * frac


def make_controller(kind, beta, kl_target=None, horizon=None,
                    beta_end=None, n_updates=None):
    """A run's beta: "fixed", "adaptive" (to kl_target) or "schedule" (to beta_end)."""
    if kind == "adaptive":
        return AdaptiveKLController(beta, kl_target, horizon)
    if kind == "fixed":
        return FixedKLController(beta)
    if kind == "schedule":
        return LinearKLSchedule(beta, beta_end, n_updates)
    raise ValueError(f"unknown KL controller {kind!r}: use adaptive, fixed or schedule")
