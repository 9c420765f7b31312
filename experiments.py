"""
The experiments of leash: what the KL penalty buys, one function (and command) each.

    python experiments.py hacking    --out out   # beta = 0 against the adaptive controller
    python experiments.py controller --out out   # the adaptive controller holds its KL target
    python experiments.py overopt    --out out   # gold and proxy reward against sqrt(KL)
    python experiments.py frontier   --out out   # gold reward against KL: PPO, GRPO, RLOO, DPO, online
    python experiments.py klplace    --out out   # GRPO: k3 or k2 in the loss, k1 in the reward
    python experiments.py gold       --out out   # GRPO on the gold reward: beta = 0 against the controller
    python experiments.py rlvr       --out out   # GRPO, Dr. GRPO, DAPO, GSPO: 0/1 check or reward model
    python experiments.py precision  --out out   # fp32 against bf16 autocast, two seeds each
    python experiments.py kl         --out out   # the KL estimators k1, k2, k3 against the exact KL
    python experiments.py reward     --out out   # what the reward model gets wrong
    python experiments.py klgrad [--json]        # each way to put the KL in: its exact gradient

Each one reads a finished run of `python train.py --out OUT`: OUT/sft.pt, OUT/tokenizer.json,
OUT/reward_model.pt and the run's config and preference pairs (OUT/stages/reward_model.json),
from which it rebuilds the run's world. The RL experiments train fresh PPO or GRPO (frontier and
precision: also DPO) policies from the SFT model with the run's preset and dtype, judged as
train.py judges them (evaluate.evaluate_policy on the fixed held-out prompts). Runs are cached
in OUT/ppo_runs/, grpo_runs/ and dpo_runs/ with the config of the run they started from. Every command
writes OUT/plots/<name>.png, OUT/<name>.json and a markdown table on stdout (kl draws
plots/kl_estimators.png, reward plots/reward_model.png). klgrad needs no run: it enumerates every
answer of a tiny table policy, prints its tables and writes docs/klgrad.png (--out-plot).
"""
import argparse
import itertools
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

import cli  # the pipeline's presets
import dpo
import online_dpo
import reward
import tokenizer as tok
import world
from evaluate import evaluate_policy, gold_scores, verifiable
from grpo import VARIANTS, GRPOConfig, train_grpo
from kl import full_kl, k1, k2, k3, sequence_kl, token_kl
from model import autocast, load_checkpoint, pick_device
from ppo import PPOConfig, train_ppo
from reference import freeze, response_mask, token_logprobs, trainable
from sft import pretraining_loss


def read_json(path):
    with open(path) as f:
        return json.load(f)


def setup(out, device):
    """Everything the experiments need, from the checkpoints in `out` and the run's own world."""
    stage_file = os.path.join(out, "stages", "reward_model.json")
    if not os.path.exists(stage_file):
        sys.exit(f"error: no {stage_file}; run `python train.py --out {out}` first")
    stage = read_json(stage_file)
    source = stage["config"]  # the run's config: preset, seed, world sizes, dtype, reward, ...
    if source.get("data"):
        sys.exit(f"error: {out} was trained on --data {source['data']}; the experiments need the "
                 "toy world's gold reward and validity")
    sft = load_checkpoint(os.path.join(out, "sft.pt"), device)[0]
    enc = tok.load_tokenizer(os.path.join(out, "tokenizer.json"))
    rm = load_checkpoint(os.path.join(out, "reward_model.pt"), device)[0]
    data = world.build_datasets(world.WorldConfig(source["seed"], source["n_pretrain"], source["n_sft"],
                                                  n_eval_prompts=source["eval_prompts"]))
    longest = max(len(tok.encode(enc, p)) for p in data["eval_prompts"] + data["train_prompts"])
    pad = tok.pad_id(enc)
    return dict(sft=sft, ref=freeze(sft), enc=enc, rm=rm, data=data, device=device, out=out,
                max_new=sft.cfg.block_size - longest, dtype=source["dtype"],  # train as the run did
                score_fn=lambda tokens, prompt_len: reward.score(rm, tokens, pad),
                pairs=stage["result"]["pairs"], source=source,
                rm_result=stage["result"])


def evaluate(env, model):
    """(metrics, texts) of a policy on the held-out prompts, in env's dtype, as train.py does."""
    return evaluate_policy(model, env["enc"], env["data"]["eval_prompts"], env["max_new"], env["device"],
                           env["dtype"], env["ref"], env["score_fn"], heldout=env["data"]["eval_references"])


def run_file(out, kind, label, cfg, dtype):
    """OUT/<kind>/<label>_seed<seed>_<dtype>.json: where one run's result is cached."""
    name = f"{label} seed{cfg.seed} {dtype}".replace("=", "").replace(" ", "_")
    return os.path.join(out, kind, name + ".json")


def cached_run(path, cfg, env, reward="model"):
    """The cached result at path if it was made with this config, against this reward, from this very
    SFT model and reward model (a re-run of train.py into the same folder may have replaced them)."""
    if path and os.path.exists(path):
        cached = read_json(path)
        if cached["config"] == json.loads(json.dumps(asdict(cfg))) and cached.get("source") == env["source"] \
                and cached.get("reward", "model") == reward:
            print(f"{cached['label']}: reusing {path}")
            return cached
    return None


def write_run(path, result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)


def progress(label, updates):
    """A log function printing one short line per PPO update, with its time and the run's ETA."""
    def log(r):
        line = (f"{label:>10} {r['step'] + 1:>3}/{updates} | proxy {r['proxy_reward']:+.3f} "
                f"gold {r['gold_reward']:+.3f} valid {r['valid_rate']:.2f} kl {r['kl_exact']:6.2f} "
                f"beta {r['beta']:.4f} d2 {r['distinct_2']:.2f} | {r['seconds']:.1f} s/update "
                f"eta {r['eta_s']:.0f}s")
        if "eval_gold_reward" in r:
            line += (f" || eval gold {r['eval_gold_reward']:+.3f} valid {r['eval_valid_rate']:.2f} "
                     f"kl {r['eval_kl']:.2f}")
        print(line, flush=True)
    return log


@torch.no_grad()
def forward_kl(env, policy):
    """Mean exact KL(pi_ref || pi) per answer, the direction GRPO's k3 loss pulls on: the reference answers
    the held-out prompts (its own samples, drawn once per env) and full_kl(reverse=False) is summed over
    each answer's tokens. evaluate()'s kl is the other direction, on the policy's samples."""
    enc, device, pad = env["enc"], env["device"], tok.pad_id(env["enc"])
    if "ref_samples" not in env:
        prompt = tok.left_pad([tok.encode(enc, p) for p in env["data"]["eval_prompts"]], pad).to(device)
        with autocast(device, env["dtype"], sampling=True):
            tokens, _ = env["ref"].generate(prompt, env["max_new"], tok.eos_id(enc), pad,
                                            generator=torch.Generator(device).manual_seed(4321))
        env["ref_samples"] = (tokens, prompt.shape[1])
    tokens, P = env["ref_samples"]
    _, logits = token_logprobs(policy, tokens, pad, return_logits=True)
    _, ref_logits = token_logprobs(env["ref"], tokens, pad, return_logits=True)
    return (full_kl(logits, ref_logits, reverse=False) * response_mask(tokens, P, pad)).sum(1).mean().item()


def run_ppo(env, label, cfg, out=None, reward="model"):
    """Train a fresh copy of the SFT policy with PPO (cfg a PPOConfig; critic: a copy of the reward
    model) or GRPO (a GRPOConfig) against the reward model or (reward "gold") the world's gold reward;
    returns {label, config, reward, source, seconds, history, final (eval metrics and kl_forward),
    samples}. With `out`, the result is kept in OUT/ppo_runs/ (or grpo_runs/)
    <label>_seed<seed>_<dtype>.json and reused by any later experiment that asks for the same run."""
    is_ppo = isinstance(cfg, PPOConfig)
    path = out and run_file(out, "ppo_runs" if is_ppo else "grpo_runs", label, cfg, env["dtype"])
    cached = cached_run(path, cfg, env, reward)
    if cached:
        return cached
    t0 = time.time()
    judge = {"gold": world.gold_reward, "verifiable": verifiable}.get(reward)
    score_fn = env["score_fn"] if reward == "model" else lambda t, P: gold_scores(env["enc"], t, P, judge)
    ptx = pretraining_loss(env["enc"], env["data"]["pretrain"], cfg.minibatch_size, env["sft"].cfg.block_size,
                           cfg.seed, env["device"], env["dtype"]) if cfg.ptx_coef else None
    rest = (env["enc"], env["data"]["train_prompts"], cfg, env["device"], env["dtype"],
            progress(label, cfg.updates), lambda m: evaluate(env, m)[0], world.gold_reward,
            world.is_valid, ptx)
    policy, history = train_ppo(trainable(env["sft"]), env["ref"], score_fn, trainable(env["rm"]), *rest) \
        if is_ppo else train_grpo(trainable(env["sft"]), env["ref"], score_fn, *rest)
    metrics, samples = evaluate(env, policy)
    final = {**metrics, "kl_forward": forward_kl(env, policy)}
    result = dict(label=label, config=asdict(cfg), reward=reward, source=env["source"],
                  seconds=time.time() - t0, history=history, final=final, samples=samples)
    if path:
        write_run(path, result)
    return result


def sft_baseline(env):
    metrics, samples = evaluate(env, env["sft"])
    return dict(label="SFT", final=metrics, samples=samples)


def num(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def table(runs, keys=("proxy_reward", "gold_reward", "valid_rate", "distinct_2", "kl", "eos_rate")):
    """Markdown table of each run's final evaluation."""
    lines = ["| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in runs:
        lines.append(f"| {r['label']} | " + " | ".join(num(r["final"].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def kl_scale(set_scale, values):
    """A symlog axis when the KLs span decades (beta = 0 reaches 10+ nats), else a linear one."""
    set_scale("symlog" if max(values, default=0.0) > 10 else "linear")


def save(out, name, result, fig, plot=None):
    """OUT/plots/<plot or name>.png and OUT/<name>.json."""
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    png = os.path.join(out, "plots", f"{plot or name}.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    pyplot().close(fig)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {png} and {out}/{name}.json")


def smooth(xs, k=5):
    """Trailing moving average: per-update batch metrics are noisy."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


# ----------------------------------------------------------------------------- 1. reward hacking

def no_penalty(cfg, beta=0.0):
    """A fixed (by default zero) KL coefficient, evaluated often enough to trace a curve."""
    return replace(cfg, kl_controller="fixed", beta=beta, eval_every=max(1, cfg.updates // 12))


def hacking(env, cfg, out):
    """beta = 0 (no KL penalty) against the adaptive controller: same seed, same budget."""
    plt = pyplot()
    runs = [sft_baseline(env),
            run_ppo(env, "beta=0", no_penalty(cfg), out),
            run_ppo(env, "adaptive", cfg, out)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for key, ax in zip(("proxy_reward", "gold_reward", "valid_rate", "kl_exact"), axes.flat):
        for r in runs[1:]:
            ax.plot(smooth([h[key] for h in r["history"]]), label=r["label"])
        sft_value = runs[0]["final"].get(key.replace("_exact", ""), float("nan"))
        ax.axhline(sft_value, color="gray", ls=":", label="SFT")
        ax.set(xlabel="PPO update", title=key + " (training batches, 5-update mean)")
    kl_scale(axes[1, 1].set_yscale, [h["kl_exact"] for r in runs[1:] for h in r["history"]])
    axes[1, 1].set_ylim(0, None)
    axes[0, 0].legend()
    print("\n" + table(runs) + "\n")
    for i in range(6):
        print(f"- prompt {env['data']['eval_prompts'][i]!r}")
        for r in runs:
            print(f"  - {r['label']}: {r['samples'][i]}")
    save(out, "hacking", runs, fig)
    return runs


# ----------------------------------------------------------------------------- 2. the controller

def controller(env, cfg, out, targets):
    """The adaptive controller (Ziegler et al. 2019) at one or more KL targets: the mean
    exact per-sequence KL over the last quarter of the updates should be within 25%."""
    plt = pyplot()
    runs = [run_ppo(env, f"target {t:g}", replace(cfg, kl_target=t), out) for t in targets]
    fig, (ax_kl, ax_beta) = plt.subplots(1, 2, figsize=(10, 4))
    print("\n| KL target (nats/seq) | mean KL, last quarter | ratio | final beta | eval gold | eval valid |\n"
          "|---|---|---|---|---|---|")
    for r, t in zip(runs, targets):
        kls = [h["kl_exact"] for h in r["history"]]
        tail = kls[-max(1, len(kls) // 4):]
        r["kl_last_quarter"] = sum(tail) / len(tail)
        r["within_25pct"] = abs(r["kl_last_quarter"] / t - 1) <= 0.25
        line, = ax_kl.plot(kls, label=f"target {t:g}")
        ax_kl.axhline(t, color=line.get_color(), ls=":")
        ax_beta.plot([h["beta"] for h in r["history"]], color=line.get_color(), label=f"target {t:g}")
        print(f"| {t:g} | {r['kl_last_quarter']:.2f} | {r['kl_last_quarter'] / t:.2f} | "
              f"{r['history'][-1]['beta']:.4f} | {r['final']['gold_reward']:.3f} | "
              f"{r['final']['valid_rate']:.3f} |")
    ax_kl.set(xlabel="PPO update", ylabel="KL(pi || pi_ref), nats per sequence",
              title="KL per batch (dotted: target)")
    ax_beta.set(xlabel="PPO update", ylabel="beta", yscale="log", title="KL coefficient")
    ax_kl.legend()
    save(out, "controller", runs, fig)
    return runs


# ----------------------------------------------------------------------------- 3. overoptimization

def d_log_d(d):
    """d log d elementwise, with 0 log 0 = 0 (its limit)."""
    d = np.asarray(d, dtype=float)
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def fit_rl_form(d, gain):
    """(alpha, beta) of Gao et al.'s (2022) RL form gain(d) = d (alpha - beta log d), d = sqrt(KL),
    by least squares; the form is 0 at d = 0, so the fit passes through the SFT point."""
    X = np.stack([np.asarray(d, dtype=float), -d_log_d(d)], 1)
    alpha, beta = np.linalg.lstsq(X, np.asarray(gain, dtype=float), rcond=None)[0]
    return float(alpha), float(beta)


def overopt(env, cfg, out, beta=0.0):
    """Gold and proxy reward against d = sqrt(KL) as a weakly penalised policy drifts (Gao et al.
    2022, fig. 1 in miniature). Gao et al. fit the gold reward gain over the starting policy with
        RL (this experiment):  gold(d) = d (alpha - beta log d), its peak at d = exp(alpha / beta - 1)
        best-of-n:             gold(d) = d (alpha - beta d)   (not drawn: no best-of-n here)
    The RL form is fitted by least squares through the SFT point (d = 0, gain 0) and drawn."""
    plt = pyplot()
    base = sft_baseline(env)
    run = run_ppo(env, f"beta={beta:g}", no_penalty(cfg, beta), out)
    points = [dict(kl=0.0, gold=base["final"]["gold_reward"], proxy=base["final"]["proxy_reward"],
                   valid=base["final"]["valid_rate"], step="SFT")]
    points += [dict(kl=h["eval_kl"], gold=h["eval_gold_reward"], proxy=h["eval_proxy_reward"],
                    valid=h["eval_valid_rate"], step=h["step"]) for h in run["history"] if "eval_kl" in h]
    d = np.sqrt(np.maximum([p["kl"] for p in points], 0.0))
    gold = np.array([p["gold"] for p in points]) - points[0]["gold"]
    proxy = np.array([p["proxy"] for p in points]) - points[0]["proxy"]
    alpha, b = fit_rl_form(d, gold)
    peak_fit = float(np.exp(min(alpha / b - 1, 700))) if b > 0 else float("inf")  # where the fit peaks
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(d, proxy, "o-", label="proxy (reward model)")
    ax.plot(d, gold, "s-", label="gold (world)")
    grid = np.linspace(0, 1.05 * (peak_fit if d.max() < peak_fit <= 2 * d.max() else d.max()), 200)
    ax.plot(grid, grid * alpha - b * d_log_d(grid), "k:",
            label=f"gold fit, Gao et al.'s RL form d(alpha - beta ln d): alpha {alpha:.3f}, beta {b:.3f}")
    if peak_fit <= grid[-1]:
        ax.axvline(peak_fit, color="k", ls=":", lw=0.8,
                   label=f"the fit's peak, d = exp(alpha / beta - 1) = {peak_fit:.2f}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="d = sqrt(KL(pi || pi_ref)), sqrt(nats per sequence)", ylabel="reward gain over SFT",
           title=f"overoptimization, PPO with beta={beta:g}")
    ax.legend(fontsize=8)
    print("\n| step | KL | sqrt KL | proxy - SFT | gold - SFT | valid |\n|---|---|---|---|---|---|")
    for p, di, g, pr in zip(points, d, gold, proxy):
        print(f"| {p['step']} | {p['kl']:.2f} | {di:.2f} | {pr:+.3f} | {g:+.3f} | {num(p['valid'])} |")
    peak = int(np.argmax(gold))
    result = dict(points=points, fit=dict(form="d (alpha - beta log d)", alpha=alpha, beta=b,
                                          peak_sqrt_kl=peak_fit if b > 0 else None),
                  gold_peak_sqrt_kl=float(d[peak]), run=run, sft=base)
    turn = f"peaks at sqrt(KL) = {peak_fit:.2f}" if b > 0 else "has no peak (beta <= 0: it never turns down)"
    print(f"gold fit, RL form d (alpha - beta log d): alpha {alpha:.3f}, beta {b:.3f}; the fit {turn}; "
          f"the measured gold peaks at sqrt(KL) = {d[peak]:.2f}; the proxy ends at {proxy[-1]:+.3f}")
    save(out, "overopt", result, fig)
    return result


# ----------------------------------------------------------------------------- 4. the frontier

def dpo_sweep(policy_ckpt, enc, pairs, betas, cfg, device="cpu", dtype="fp32", log=print,
              eval_fn=None, val_pairs=None):
    """One DPO run per beta, each from a fresh copy of the same starting policy (a checkpoint
    path or a model), which is also the reference. Returns one dict per beta: {"beta",
    **eval_fn's last metrics, "implicit_accuracy", "seconds"}: points of the reward-KL frontier
    (gold_reward against kl). eval_fn(policy) must measure KL against the starting policy
    (evaluate.evaluate_policy with ref=that policy)."""
    start = load_checkpoint(policy_ckpt, device)[0] if isinstance(policy_ckpt, str) else policy_ckpt
    ref = freeze(start)
    points = []
    for beta in betas:
        _, hist = dpo.train_dpo(trainable(start), ref, enc, pairs, replace(cfg, beta=beta), device, dtype,
                                lambda rec: log({**rec, "beta": beta}), eval_fn, val_pairs)
        points.append({"beta": beta, **hist["eval"], "implicit_accuracy": hist["implicit_accuracy"],
                       "seconds": hist["seconds"]})
    return points


def run_dpo(env, label, cfg):
    """DPO from the SFT model on the reward model's training pairs (cfg.sources says which);
    the result is kept in OUT/dpo_runs/<label>_seed<seed>_<dtype>.json and reused."""
    path = run_file(env["out"], "dpo_runs", label, cfg, env["dtype"])
    cached = cached_run(path, cfg, env)
    if cached:
        return cached
    train_pairs, val_pairs = reward.split_pairs(env["pairs"], env["source"]["reward"]["val_fraction"])
    log = lambda r: print(f"{label:>14} {r['step'] + 1:>4} | loss {r['loss']:.3f} margin {r['margin']:+.2f} "
                          f"acc {r['accuracy']:.2f} | {r['pairs_per_s']:.0f} pairs/s eta {r['eta_s']:.0f}s",
                          flush=True)
    point = dpo_sweep(env["sft"], env["enc"], train_pairs, [cfg.beta], cfg, env["device"], env["dtype"], log,
                      lambda m: evaluate(env, m)[0], val_pairs)[0]
    result = dict(label=label, config=asdict(cfg), source=env["source"], final=point)
    write_run(path, result)
    return result


def run_dpo_online(env, label, cfg, judge="model"):
    """Online DPO from the SFT model (online_dpo.train_online_dpo): each step's pairs are the policy's own fresh
    answers, labelled by the reward model (judge "model": the proxy PPO maximises, as many calls as PPO's
    at the default budget) or the simulated annotators ("annotators"); kept in OUT/dpo_online_runs/."""
    path = run_file(env["out"], "dpo_online_runs", label, cfg, env["dtype"])
    cached = cached_run(path, cfg, env, judge)
    if cached:
        return cached
    judge_fn = online_dpo.reward_model_judge(env["rm"], tok.pad_id(env["enc"])) if judge == "model" else \
        reward.annotator_judge(random.Random(cfg.seed), reward.RewardConfig(**env["source"]["reward"]))
    log = lambda rec: print(f"{label:>14} {rec['step'] + 1:>4} | loss {num(rec.get('loss'))} margin "
                            f"{num(rec.get('margin'), '+.2f')} skipped {rec['skipped_share']:.2f} | "
                            f"{rec['pairs_per_s']:.0f} pairs/s eta {rec['eta_s']:.0f}s", flush=True)
    t0 = time.time()
    policy, hist = online_dpo.train_online_dpo(trainable(env["sft"]), env["ref"], env["enc"],
                                        env["data"]["train_prompts"], judge_fn, cfg, env["device"],
                                        env["dtype"], log, lambda m: evaluate(env, m)[0])
    metrics, samples = evaluate(env, policy)
    final = {**metrics, "kl_forward": forward_kl(env, policy), **{k: hist[k] for k in (
        "implicit_accuracy", "skipped_share", "judge_calls", "n_pairs")}}
    result = dict(label=label, config=asdict(cfg), reward=judge, source=env["source"],
                  seconds=time.time() - t0, final=final, samples=samples)
    write_run(path, result)
    return result


def plain_dpo(cfg):
    """Plain DPO (Rafailov et al. 2023; no NLL term) at its best budget here: it overfits the
    pairs beyond ~100 steps. The default DPOConfig is DPO + NLL (RPO), leash's default."""
    return replace(cfg, sft_coef=0.0, lr=1e-4, steps=min(cfg.steps, 100))


def frontier(env, cfg, gcfg, dcfg, out, targets, dpo_betas, online_betas):
    """The reward-KL frontier (Rafailov et al. 2023, fig. 2 left, in miniature): gold reward
    against the exact KL to the reference on the held-out prompts, for PPO, GRPO and RLOO with the
    adaptive controller at several KL targets, and plain DPO and DPO + NLL (RPO, leash's default) at
    several betas, and online DPO (plain: fresh pairs judged by the reward model, as many reward-model calls
    as PPO) at several betas; every policy from the same SFT model, judged by the same evaluation."""
    plt = pyplot()
    base = sft_baseline(env)
    ppo_runs = [run_ppo(env, f"target {t:g}", replace(cfg, kl_target=t), out) for t in targets]
    grpo_runs, rloo_runs = ([run_ppo(env, f"{v} target {t:g}", replace(variant(gcfg, v), kl_target=t), out)
                             for t in targets] for v in ("grpo", "rloo"))
    dpo_runs = [run_dpo(env, f"DPO beta={b:g}", replace(plain_dpo(dcfg), beta=b)) for b in dpo_betas]
    rpo_runs = [run_dpo(env, f"RPO beta={b:g}", replace(dcfg, beta=b)) for b in dpo_betas]
    online_runs = [run_dpo_online(env, f"online DPO beta={b:g}", replace(dcfg, beta=b, sft_coef=0.0))
                   for b in online_betas]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([0], [base["final"]["gold_reward"]], color="gray", marker="*", s=120, label="SFT", zorder=3)
    target, beta = lambda r: r["config"]["kl_target"], lambda r: r["config"]["beta"]
    for runs, name, marker, knob in ((ppo_runs, "PPO (KL target)", "o", target),
                                     (grpo_runs, "GRPO (KL target)", "D", target),
                                     (rloo_runs, "RLOO (KL target)", "v", target),
                                     (dpo_runs, "DPO (beta)", "s", lambda r: r["config"]["beta"]),
                                     (rpo_runs, "DPO + NLL, RPO (beta)", "^", lambda r: r["config"]["beta"]),
                                     (online_runs, "online DPO (beta)", "P", beta)):
        runs = sorted(runs, key=lambda r: r["final"]["kl"])  # a frontier is drawn along KL
        xs, ys = [r["final"]["kl"] for r in runs], [r["final"]["gold_reward"] for r in runs]
        ax.plot(xs, ys, marker + "-", label=name)
        for r, x, y in zip(runs, xs, ys):
            ax.annotate(f"{knob(r):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="KL(pi || pi_ref) on held-out prompts, nats per answer", ylabel="gold reward",
           title="reward-KL frontier: every point one policy")
    every = ppo_runs + grpo_runs + rloo_runs + dpo_runs + rpo_runs + online_runs
    kl_scale(ax.set_xscale, [r["final"]["kl"] for r in every])
    ax.legend(fontsize=8)
    print("\n" + table([base] + every) + "\n")
    save(out, "frontier", dict(sft=base, ppo=ppo_runs, grpo=grpo_runs, rloo=rloo_runs, dpo=dpo_runs,
                               rpo=rpo_runs, dpo_online=online_runs), fig)
    return every


# ----------------------------------------------------------------------------- 5. precision

def precision(env, cfg, dcfg, out, seeds=(0, 1), dpo_beta=0.1):
    """The same PPO (adaptive, cfg's KL target) and DPO + NLL runs in fp32 and under bf16
    autocast, at two seeds each: does the fast default land where fp32 does, within seed noise?
    Each policy is evaluated in its own dtype."""
    plt = pyplot()
    runs = []
    for dtype in ("fp32", "bf16"):
        denv = dict(env, dtype=dtype)
        for seed in seeds:
            r = run_ppo(denv, f"target {cfg.kl_target:g}", replace(cfg, seed=seed), out)
            runs.append(dict(r, algo="PPO", dtype=dtype, seed=seed, label=f"PPO {dtype} seed {seed}"))
            r = run_dpo(denv, f"RPO beta={dpo_beta:g}", replace(dcfg, beta=dpo_beta, seed=seed))
            runs.append(dict(r, algo="DPO", dtype=dtype, seed=seed, label=f"DPO (RPO) {dtype} seed {seed}"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in runs:
        ax.scatter(r["final"]["kl"], r["final"]["gold_reward"], marker="o" if r["algo"] == "PPO" else "s",
                   color="tab:blue" if r["dtype"] == "fp32" else "tab:orange")
        ax.annotate(f"{r['algo']} s{r['seed']}", (r["final"]["kl"], r["final"]["gold_reward"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="tab:blue", label="fp32")
    ax.scatter([], [], color="tab:orange", label="bf16 autocast")
    ax.set(xlabel="KL(pi || pi_ref), nats per answer", ylabel="gold reward",
           title="fp32 against bf16, two seeds")
    ax.legend()
    print("\n" + table(runs) + "\n")
    for r in runs:
        print(f"{r['label']}: {r.get('seconds', r['final'].get('seconds', float('nan'))):.0f} s")
    keep = ("label", "algo", "dtype", "seed", "final")
    save(out, "precision", [{k: r[k] for k in keep} for r in runs], fig)
    return runs


# ----------------------------------------------------------------------------- 6. the KL estimators

def _demo_models(out, n, device):
    """(policy, reference, prompts (n, P) left-padded, eos_id, pad_id, description): the run's SFT
    model against its parent, the pretrained model; without a run, a random GPT against a noisy copy."""
    from model import GPT, GPTConfig
    sft_path, pre_path = os.path.join(out, "sft.pt"), os.path.join(out, "pretrain.pt")
    if os.path.exists(sft_path) and os.path.exists(pre_path):
        policy, ref = load_checkpoint(sft_path, device)[0], load_checkpoint(pre_path, device)[0]
        enc = tok.load_tokenizer(os.path.join(out, "tokenizer.json"))
        cfg = world.WorldConfig(n_pretrain=0, n_sft=0, n_train_prompts=0, n_eval_prompts=n)
        prompts = [tok.encode(enc, p) for p in world.build_datasets(cfg)["eval_prompts"]]
        pad = tok.pad_id(enc)
        return (policy, ref, tok.left_pad(prompts, pad).to(device), tok.eos_id(enc), pad,
                f"{sft_path} vs its parent {pre_path}")
    policy = GPT(GPTConfig(block_size=72, vocab_size=64, n_layer=2, n_head=2, n_embd=64)).to(device)
    ref = freeze(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # prompt: token 0; eos = pad = -1 is never sampled, so every completion is full length
    prompts = torch.zeros(n, 1, dtype=torch.long, device=device)
    return policy.eval(), ref, prompts, -1, -1, "random GPT vs a copy + N(0, 0.05^2) weight noise"


@torch.no_grad()
def kl_estimators(out="out", n=256, device="cpu", lengths=(4, 8, 16, 32, 64)):
    """Schulman's k1, k2, k3 and the exact KL (full_kl) on the same samples of the policy, per
    token and summed per sequence, at several answer lengths: all are unbiased for the mean, but
    their spread differs, and k1 of a sequence is negative in a share of the samples."""
    torch.manual_seed(0)
    policy, ref, prompts, eos, pad, what = _demo_models(out, n, device)
    print(f"KL(pi || pi_ref) estimators, {n} samples per length: {what}")
    fits = [L for L in lengths if prompts.shape[1] + L <= policy.cfg.block_size]
    if len(fits) < len(lengths):
        print(f"(skipping max_new_tokens {[L for L in lengths if L not in fits]}: longer than block_size)")
    lengths, stats, rows, t0 = fits, {e: [] for e in ("k1", "k2", "k3", "full")}, [], time.time()
    for i, L in enumerate(lengths):
        tokens, _ = policy.generate(prompts, L, eos, pad)
        logp, logits = token_logprobs(policy, tokens, pad, return_logits=True)
        ref_logp, ref_logits = token_logprobs(ref, tokens, pad, return_logits=True)
        mask = response_mask(tokens, prompts.shape[1], pad)
        for e in stats:
            tok_est = token_kl(logp, ref_logp, e, logits, ref_logits)[mask.bool()]
            seq = sequence_kl(logp, ref_logp, mask, e, logits, ref_logits)
            stats[e].append((seq.mean().item(), seq.std().item()))
            rows.append(dict(max_new=L, length=mask.sum(1).mean().item(), estimator=e,
                             tok_mean=tok_est.mean().item(), tok_std=tok_est.std().item(),
                             seq_mean=seq.mean().item(), seq_std=seq.std().item(),
                             seq_negative=(seq < 0).float().mean().item()))
        rate = (time.time() - t0) / (i + 1)
        print(f"kl: max_new_tokens {L} done ({i + 1}/{len(lengths)}), {rate:.1f} s/length, "
              f"eta {rate * (len(lengths) - i - 1):.0f}s", flush=True)
    print("\nfull = exact KL over the vocabulary at each sampled prefix; seq<0 = share of sequences "
          "whose estimate is negative\n\n"
          "| max_new | len | est | tok mean | tok std | seq mean | seq std | seq<0 |\n" + "|---" * 8 + "|")
    for r in rows:
        print(f"| {r['max_new']} | {r['length']:.1f} | {r['estimator']} | {r['tok_mean']:.4f} | "
              f"{r['tok_std']:.4f} | {r['seq_mean']:.4f} | {r['seq_std']:.4f} | {r['seq_negative']:.1%} |")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for e, st in stats.items():
        mean, std = zip(*st)
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
    save(out, "kl", dict(models=what, n=n, rows=rows), fig, plot="kl_estimators")
    return rows


# ----------------------------------------------------------------------------- 7. the reward model

def rank_correlation(x, y):
    """Spearman's rank correlation: Pearson's r of the ranks, tied values sharing their mean rank."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=float)
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return np.bincount(inverse, weights=r)[inverse] / counts[inverse]
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def annotator_label_accuracy(pairs, tau=world.TAU, bias=world.EXCLAIM_BIAS):
    """How often the annotators' more likely choice (world.annotator_prob: gold AND the "!" bias,
    with the run's tau and bias) is the label they gave, ties counting half: the Bayes ceiling."""
    probs = [world.annotator_prob(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"], tau, bias)
             for p in pairs]
    return sum(1.0 if q > 0.5 else 0.5 if q == 0.5 else 0.0 for q in probs) / max(1, len(probs))


def proxy_vs_gold(rm, enc, texts):
    """Proxy and gold rewards of texts (e.g. SFT samples of the eval prompts): {"proxy", "gold",
    "valid": lists; "spearman": rank correlation on all texts; "spearman_valid": on the valid ones
    only, i.e. how well the proxy reads sentiment, apart from spotting invalid text}."""
    proxy = reward.score_texts(rm, enc, texts)
    gold, valid = [world.gold_reward(t) for t in texts], [world.is_valid(t) for t in texts]
    ok = [i for i, v in enumerate(valid) if v]
    return {"proxy": proxy, "gold": gold, "valid": valid, "spearman": rank_correlation(proxy, gold),
            "spearman_valid": rank_correlation([proxy[i] for i in ok], [gold[i] for i in ok])}


def accuracy_by_kind(rm, enc, pairs):
    """Where the model falls short of the ceiling: accuracy on `pairs` (e.g. validation, whose
    texts fit the block by construction) split into pairs of two valid answers (reading
    sentiment) and pairs with one invalid answer (spotting broken text); pairs of two invalid
    answers are left out. {kind: {"n", "accuracy", "gold_label_accuracy"}}."""
    chosen, rejected = ([p["prompt"] + p[side] for p in pairs] for side in ("chosen", "rejected"))
    r = torch.tensor(reward.score_texts(rm, enc, chosen + rejected) if pairs else [])
    r_c, r_r = r[:len(pairs)], r[len(pairs):]
    valid = [(world.is_valid(a), world.is_valid(b)) for a, b in zip(chosen, rejected)]
    out = {}
    for kind, keep in (("both valid", lambda v: v[0] and v[1]), ("one invalid", lambda v: v[0] != v[1])):
        idx = [i for i, v in enumerate(valid) if keep(v)]
        out[kind] = {"n": len(idx),
                     "accuracy": reward.bt_loss(r_c[idx], r_r[idx])[1].item() if idx else float("nan"),
                     "gold_label_accuracy": reward.gold_label_accuracy([pairs[i] for i in idx])}
    return out


NEUTRAL_SENTENCE = "i watched it at home."  # valid, sentiment 0: length without content


def blind_spot_edits(text):
    """{edit name: edited text} of a valid 3-sentence review whose sentences all end in ".".
    Gold: one "!" is free, each further one costs 0.1; a repeat costs 0.3; a neutral sentence
    pulls the mean sentiment towards 0. Annotators rarely saw any of these."""
    s = re.split(r"(?<=[.!]) ", text)
    best = max(s, key=lambda x: world.sentence_sentiment(x[:-1]))
    edits = {"original": text}
    for k in (1, 2, 3):
        edits[f"{k} x '!'"] = " ".join(x[:-1] + "!" if i < k else x for i, x in enumerate(s))
    edits["best sentence repeated"] = f"{text} {best}"
    edits["neutral 4th sentence"] = f"{text} {NEUTRAL_SENTENCE}"
    return edits


def blind_spot_report(rm, enc, base_texts, max_bases=512):
    """Mean proxy and gold reward of each edit over base texts that are valid, positive, three
    sentences long, have no "!" and fit the reward model's block with every edit. Rows {"edit",
    "proxy", "gold", "d_proxy", "d_gold", "n"}; d_* are changes against the original. Reward
    hacking lives where d_proxy > 0 > d_gold."""
    block = rm.gpt.cfg.block_size
    fits = lambda e: all(len(tok.encode(enc, t)) < block for t in e.values())  # + EOS <= block
    candidates = (t for t in dict.fromkeys(base_texts) if world.is_valid(t) and "!" not in t
                  and len(re.split(r"(?<=[.]) ", t)) == 3 and world.gold_reward(t) > 0)
    edited = list(itertools.islice((e for e in map(blind_spot_edits, candidates) if fits(e)), max_bases))
    if not edited:
        return []
    rows = []
    for name in edited[0]:
        texts = [e[name] for e in edited]
        rows.append({"edit": name, "proxy": float(np.mean(reward.score_texts(rm, enc, texts))),
                     "gold": float(np.mean([world.gold_reward(t) for t in texts])), "n": len(texts)})
    for r in rows:
        r["d_proxy"], r["d_gold"] = r["proxy"] - rows[0]["proxy"], r["gold"] - rows[0]["gold"]
    return rows


def plot_reward_model(proxy_gold, blind_spot, path=None):
    """A figure with two panels: proxy_vs_gold's scatter (Spearman in the title), and the change
    of proxy and gold under each blind_spot_report edit. Saved to path if given."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for valid, color, label in ((True, "tab:blue", "valid"), (False, "tab:red", "invalid (gold -1)")):
        pts = [(g, p) for g, p, v in zip(proxy_gold["gold"], proxy_gold["proxy"], proxy_gold["valid"])
               if v == valid]
        if pts:
            ax1.scatter(*zip(*pts), s=8, alpha=0.5, color=color, label=label)
    ax1.legend(loc="upper left")
    ax1.set(xlabel="gold reward", ylabel="proxy reward (SFT mean 0, std 1)",
            title=f"proxy vs gold on SFT samples: Spearman {proxy_gold['spearman']:.2f} "
                  f"({proxy_gold['spearman_valid']:.2f} on valid)")
    rows = blind_spot[1:]
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["d_proxy"] for r in rows], 0.4, label="proxy change (std units)")
    ax2.bar([i + 0.2 for i in x], [r["d_gold"] for r in rows], 0.4, label="gold change")
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(x, [r["edit"] for r in rows], rotation=20, ha="right")
    ax2.set(title="blind spot: edits of positive 3-sentence reviews")
    ax2.legend()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def reward_model(env, out):
    """The reward model's diagnostics: validation accuracy against its ceilings, split by kind of
    pair; proxy against gold on SFT samples of the eval prompts; the blind spot."""
    rcfg, rm, enc, t0 = env["source"]["reward"], env["rm"], env["enc"], time.time()
    _, val = reward.split_pairs(env["pairs"], rcfg["val_fraction"])
    kinds = accuracy_by_kind(rm, enc, val)
    print(f"reward: scored {len(val)} validation pairs ({time.time() - t0:.1f}s); sampling the SFT model on "
          f"{len(env['data']['eval_prompts'])} eval prompts", flush=True)
    _, sft_samples = evaluate(env, env["sft"])
    pg = proxy_vs_gold(rm, enc, sft_samples)
    spot = blind_spot_report(rm, enc, env["data"]["pretrain"] + sft_samples)
    print(f"reward: done in {time.time() - t0:.1f}s")
    res = env["rm_result"]
    result = dict(val_accuracy=res["val_accuracy"], gold_label_accuracy=reward.gold_label_accuracy(val),
                  annotator_label_accuracy=annotator_label_accuracy(val, rcfg["annotator_tau"],
                                                                    rcfg["annotator_bias"]),
                  val_accuracy_by_kind=kinds, spearman_proxy_gold=pg["spearman"],
                  spearman_proxy_gold_valid=pg["spearman_valid"], blind_spot=spot, proxy_vs_gold=pg)
    print(f"\nreward model: val accuracy {res['val_accuracy']:.3f} (gold-label ceiling "
          f"{result['gold_label_accuracy']:.3f}, annotators' own ceiling "
          f"{result['annotator_label_accuracy']:.3f}), "
          f"proxy-gold Spearman {pg['spearman']:.3f} on {len(sft_samples)} SFT samples "
          f"({pg['spearman_valid']:.3f} on the valid ones)")
    for kind, a in kinds.items():
        print(f"  {kind} pairs ({a['n']}): {num(a['accuracy'])} (ceiling {num(a['gold_label_accuracy'])})")
    print(f"\nblind spot ({spot[0]['n'] if spot else 0} positive 3-sentence reviews, each edited):\n\n"
          "| edit | proxy | gold | proxy change | gold change |\n|---|---|---|---|---|")
    for r in spot:
        print(f"| {r['edit']} | {r['proxy']:+.3f} | {r['gold']:+.3f} | {r['d_proxy']:+.3f} | "
              f"{r['d_gold']:+.3f} |")
    save(out, "reward", result, plot_reward_model(pg, spot), plot="reward_model")
    return result


# ----------------------------------------------------------------------------- 7. where the KL goes

def variant(gcfg, name):
    """gcfg (a GRPO config) with one of grpo.VARIANTS' changes."""
    return replace(gcfg, **VARIANTS[name])


KL_PLACES = {"k3 in the loss (GRPO)": dict(kl_in="loss", kl_loss_estimator="k3"),
             "k2 in the loss": dict(kl_in="loss", kl_loss_estimator="k2"),
             "k1 in the reward (RLOO, PPO)": dict(kl_in="reward")}


def kl_place_configs(gcfg, betas):
    """{arm: [a GRPOConfig per beta]} for each place of the KL (KL_PLACES), at fixed betas, all with
    unscaled group advantages ("none"): divided by a group's std, a nat in the reward would cost
    beta / std, a different price per prompt, and a group whose scores tie would be ranked by its KL
    alone whatever beta is."""
    return {arm: [replace(gcfg, **place, advantage="none", kl_controller="fixed", beta=b)
                  for b in betas] for arm, place in KL_PLACES.items()}


def kl_place(env, gcfg, out, betas):
    """GRPO with k3 in the loss, with k2 in the loss, and with k1 in the reward (RLOO's and PPO's
    place), at the same fixed betas (kl_place_configs): which direction of the KL does each hold
    down? Both are measured exactly at the end: KL(pi || pi_ref) on the policy's answers,
    KL(pi_ref || pi) on the reference's."""
    plt = pyplot()
    tag = lambda c: f"{c.kl_in}_{c.kl_loss_estimator if c.kl_in == 'loss' else 'k1'}"
    runs = {arm: [run_ppo(env, f"GRPO {tag(c)} beta={c.beta:g} unscaled", c, out) for c in cfgs]
            for arm, cfgs in kl_place_configs(gcfg, betas).items()}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for (arm, arm_runs), marker in zip(runs.items(), ("o-", "^-.", "s--")):
        for ax, key in zip(axes, ("kl", "kl_forward", "gold_reward")):
            ax.plot(betas, [r["final"][key] for r in arm_runs], marker, label=arm)
    for ax, title in zip(axes, ("KL(pi || pi_ref), policy's answers", "KL(pi_ref || pi), reference's answers",
                                "gold reward")):
        ax.set(xscale="log", xlabel="beta (fixed)", title=title)
    axes[0].set_ylabel("nats per answer")
    axes[0].legend(fontsize=8)
    every = [r for arm_runs in runs.values() for r in arm_runs]
    keys = ("proxy_reward", "gold_reward", "valid_rate", "distinct_2", "kl", "kl_forward")
    print("\n" + table([sft_baseline(env)] + every, keys) + "\n")
    save(out, "klplace", {k: [{key: r[key] for key in ("label", "config", "final")} for r in v]
                          for k, v in runs.items()}, fig)
    return runs


# ----------------------------------------------------------------------------- 8. a reward not to hack

def gold(env, gcfg, out):
    """GRPO on the world's exact, continuous gold reward (nothing to hack) at beta = 0 and with the
    adaptive controller, beside GRPO at beta = 0 on the reward model: without a proxy, does beta = 0
    still hurt? Traced per update: gold reward, diversity (distinct-2) and exact KL. `rlvr` asks the
    same of the whole GRPO family on a 0/1 check (a verifiable reward)."""
    plt = pyplot()
    every_tenth = lambda c: replace(c, eval_every=max(1, c.updates // 10))
    runs = [run_ppo(env, "gold beta=0", every_tenth(no_penalty(gcfg)), out, reward="gold"),
            run_ppo(env, f"gold target {gcfg.kl_target:g}", every_tenth(gcfg), out, reward="gold"),
            run_ppo(env, "proxy beta=0", every_tenth(no_penalty(gcfg)), out)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for r in runs:
        for ax, key in zip(axes, ("gold_reward", "distinct_2", "kl_exact")):
            ax.plot(smooth([h[key] for h in r["history"]]), label=r["label"])
    for ax, title in zip(axes, ("gold reward (rollouts)", "distinct-2 (rollouts)", "exact KL(pi || pi_ref)")):
        ax.set(xlabel="update", title=title)
    axes[0].legend(fontsize=8)
    print("\n" + table([sft_baseline(env)] + runs, ("proxy_reward", "gold_reward", "valid_rate", "distinct_2",
                                                    "kl", "kl_forward", "eos_rate")) + "\n")
    save(out, "gold", [{k: r[k] for k in ("label", "config", "reward", "final")} for r in runs], fig)
    return runs


# ----------------------------------------------------------------------- 8b. verifiable rewards

RLVR_VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo")
RLVR_KEYS = ("gold_reward", "proxy_reward", "kl", "valid_rate", "distinct_2", "heldout_nll",
             "length", "tied_groups", "resampled", "clip_low", "clip_high")


def rlvr_row(run):
    """A run's final evaluation, with its rollouts' means over the last quarter of updates (answer length
    in tokens, the share of tied groups, groups resampled per group, the clip fractions)."""
    last = run["history"][-max(1, len(run["history"]) // 4):]
    means = {k: sum(h.get(k, 0.0) for h in last) / len(last)
             for k in ("length", "tied_groups", "resampled", "clip_low", "clip_high")}
    return {**run, "final": {**run["final"], **means}}


def rlvr(env, gcfg, out, ptx_coef=1.0):
    """GRPO, Dr. GRPO, DAPO and GSPO (grpo.VARIANTS) on the verifiable 0/1 check (evaluate.verifiable:
    a valid review with gold > 0) and on the learned reward model, each with the leash (the adaptive
    controller) and without it (beta = 0), and DAPO at beta = 0 with PPO-ptx: where can the KL term go,
    where does dropping it hack, and what does dropping it cost with nothing to hack (heldout_nll)?
    Plot: gold reward against KL, proxy against gold, and each variant's answer length per update."""
    plt = pyplot()
    runs = []
    for reward in ("verifiable", "model"):
        for name in RLVR_VARIANTS:
            leashed = replace(variant(gcfg, name), kl_controller="adaptive", beta=gcfg.beta)
            unleashed = replace(leashed, kl_controller="fixed", beta=0.0)
            for tag, cfg in (("leash", leashed), ("beta=0", unleashed)):
                runs.append(run_ppo(env, f"{name} {reward} {tag}", cfg, out, reward=reward))
        ptx = replace(variant(gcfg, "dapo"), ptx_coef=ptx_coef)
        runs.append(run_ppo(env, f"dapo {reward} beta=0 ptx{ptx_coef:g}", ptx, out, reward=reward))
    rows = [rlvr_row(r) for r in runs]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = dict(zip(RLVR_VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for r in rows:
        name, reward, tag = r["label"].split(" ", 2)
        style = dict(color=colors[name], marker="o" if reward == "verifiable" else "s",
                     fillstyle="full" if tag == "leash" else "none", linestyle="none", markersize=8)
        axes[0].plot(r["final"]["kl"], r["final"]["gold_reward"], **style)
        axes[1].plot(r["final"]["proxy_reward"], r["final"]["gold_reward"], **style)
        if reward == "verifiable" and tag == "beta=0":
            axes[2].plot(smooth([h["length"] for h in r["history"]]), color=colors[name], label=name)
    sft = sft_baseline(env)["final"]
    for ax in axes[:2]:
        ax.axhline(sft["gold_reward"], color="gray", linestyle=":", label="SFT")
    axes[0].set(xlabel="exact KL(pi || pi_ref), nats per answer", ylabel="gold reward (-1..1)",
                title="circles: 0/1 check, squares: reward model;\nfilled: leash, hollow: beta = 0")
    axes[1].set(xlabel="proxy reward (SFT standard deviations)", ylabel="gold reward (-1..1)",
                title="proxy against gold")
    axes[2].set(xlabel="update", ylabel="answer length (tokens, rollouts)",
                title="length drift, 0/1 check, beta = 0")
    axes[2].legend(fontsize=8)
    for name, color in colors.items():
        axes[0].plot([], [], color=color, marker="o", linestyle="none", label=name)
    axes[0].legend(fontsize=8)
    print("\n" + table([sft_baseline(env)] + rows, RLVR_KEYS) + "\n")
    save(out, "rlvr", [{k: r[k] for k in ("label", "config", "reward", "final")} for r in rows], fig)
    return rows


# --------------------------------------------------------------------------- 9. the KL-gradient lab
# Every way of putting the KL in, and the gradient it gives IN EXPECTATION, computed exactly: the
# policy and the reference are tables of logits, one row per prefix, over V = 3 tokens, so all V^T
# answers of length T are enumerated and weighted by their probability (no sampling noise).
# Sources: k1, k2, k3 (Schulman, "Approximating KL Divergence", 2020); the gap between the
# sequence's KL and per-token KL losses (Tang & Munos 2025, arXiv 2506.09477); "k3+" (verl's
# low_var_kl+: k3's value, k2's gradient); k3 times pi/pi_old (DeepSeek-V3.2's unbiased KL, TRL's
# use_bias_correction_kl). A surrogate maps a batch b of answers (a dict: lp, ref_lp, sampler_lp
# (N, T), the log-probs of their tokens under pi, pi_ref and the sampler; logits, ref_logits
# (N, T, V)) to (N,) values whose gradient, through lp and logits only, is the method's update.

LAB_VOCAB = 3
KLGRAD_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "klgrad.png")


def lab_tables(seed=0, vocab=LAB_VOCAB, max_len=6, drift=1.2, step=0.3):
    """Logit tables (P, V), float64, one row per prefix of length 0 .. max_len - 1, P = (V^max_len
    - 1) / (V - 1) (lab_sequences gives the row of a prefix): ref ~ N(0, 1) per logit; policy =
    ref + a move of norm `drift` in a random direction per row (centred: softmax ignores a shift),
    0.1-0.2 nats of KL per token; old = policy - a move of norm `step`: the policy one small step
    ago (pi_old, as after an epoch of PPO or GRPO)."""
    g = torch.Generator().manual_seed(seed)
    P = (vocab ** max_len - 1) // (vocab - 1)

    def move(size):
        d = torch.randn(P, vocab, generator=g, dtype=torch.float64)
        d = d - d.mean(-1, keepdim=True)
        return size * d / d.norm(dim=-1, keepdim=True)
    ref = torch.randn(P, vocab, generator=g, dtype=torch.float64)
    policy = ref + move(drift)
    return dict(ref=ref, policy=policy, old=policy - move(step))


def lab_sequences(T, vocab=LAB_VOCAB):
    """(seqs, rows), both (V^T, T) long: every answer of length T, and the table row of the prefix
    x_<t that token t is drawn from: prefixes by length, then as base-V numbers (row 0: empty)."""
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=T)), dtype=torch.long)
    rows, number = torch.zeros_like(seqs), torch.zeros(len(seqs), dtype=torch.long)
    for t in range(T):
        rows[:, t] = (vocab ** t - 1) // (vocab - 1) + number
        number = number * vocab + seqs[:, t]
    return seqs, rows


def token_logps(logits, seqs):
    """(N, T) log-prob of each answer's tokens, from logits (N, T, V) and seqs (N, T)."""
    return torch.log_softmax(logits, -1).gather(-1, seqs[..., None]).squeeze(-1)


def true_gradients(tables, T):
    """({"reverse": grad KL(pi || pi_ref), "forward": grad KL(pi_ref || pi)}, {their values}):
    the KLs of answers of length T, sum over all V^T answers of P(x) log(P(x) / P_ref(x)) with
    P(x) = prod_t pi(x_t | x_<t), and their gradients (P * V,) w.r.t. the policy's logit table."""
    seqs, rows = lab_sequences(T, tables["ref"].shape[1])
    table = tables["policy"].clone().requires_grad_()
    logp = token_logps(table[rows], seqs).sum(-1)
    ref_logp = token_logps(tables["ref"][rows], seqs).sum(-1)
    kls = {"reverse": (logp.exp() * (logp - ref_logp)).sum(),
           "forward": (ref_logp.exp() * (ref_logp - logp)).sum()}
    grads = {k: torch.autograd.grad(v, table, retain_graph=True)[0].flatten()
             for k, v in kls.items()}
    return grads, {k: v.item() for k, v in kls.items()}


def to_go(x):
    """(N, T): sum_{u >= t} x_u, the return from token t on (gamma = 1)."""
    return x.flip(-1).cumsum(-1).flip(-1)


def per_token_loss(estimator):
    """sum_t estimator(logp_t, ref_logp_t) (N,), differentiated: a KL loss, GRPO's place (Shao
    et al. 2024, eq. 4), with one of Schulman's (2020) estimators k1, k2, k3."""
    return lambda b: estimator(b["lp"], b["ref_lp"]).sum(-1)


def k1_reward_to_go(b):
    """(N,) sum_t log pi(x_t) * sum_{u>=t} k1_u, the return not differentiated: REINFORCE
    (Williams 1992; PPO with gamma = lambda = 1) with the reward -k1 (Schulman 2020) on every
    token (kl.kl_penalized_rewards), written as a loss to minimise."""
    return (b["lp"] * to_go(k1(b["lp"], b["ref_lp"])).detach()).sum(-1)


def k1_reward_own(b):
    """(N,) sum_t log pi(x_t) * k1_t: the same with gamma = 0, each token credited with its own
    k1 only."""
    return (b["lp"] * k1(b["lp"], b["ref_lp"]).detach()).sum(-1)


def future_kl_term(b):
    """(N,) sum_t log pi(x_t) * sum_{u>t} k1_u: what reward-to-go adds to gamma = 0 (and to a k2
    loss): how token t changes the KL of every later token, the term a per-token KL loss drops
    (Tang & Munos 2025, arXiv 2506.09477)."""
    est = k1(b["lp"], b["ref_lp"]).detach()
    return (b["lp"] * (to_go(est) - est)).sum(-1)


def k3_plus(b):
    """(N,) sum_t k2_t + (k3_t - k2_t).detach(): k3's value, k2's gradient (verl's "k3+",
    low_var_kl+)."""
    est2, est3 = k2(b["lp"], b["ref_lp"]), k3(b["lp"], b["ref_lp"])
    return (est2 + (est3 - est2).detach()).sum(-1)


def full_loss(b):
    """(N,) sum_t kl.full_kl(x_<t): the exact KL(pi || pi_ref) over the vocabulary at each
    sampled prefix, differentiated (the prefixes stay as sampled)."""
    return full_kl(b["logits"], b["ref_logits"]).sum(-1)


def k3_ratio(b):
    """(N,) sum_t pi(x_t) / pi_s(x_t) * k3_t, the ratio differentiated, pi_s the sampler (pi_old,
    or pi itself: the ratio's value is then 1): DeepSeek-V3.2's importance-weighted k3 (its
    report's "unbiased KL estimate"; TRL's use_bias_correction_kl)."""
    return (torch.exp(b["lp"] - b["sampler_lp"]) * k3(b["lp"], b["ref_lp"])).sum(-1)


def sequence_score(b):
    """(N,) sum_t log pi(x_t) * K, K = sum_u k1_u = log P(x) / P_ref(x): the whole answer's k1
    as the return of every token (REINFORCE on the sequence, no reward-to-go)."""
    return b["lp"].sum(-1) * k1(b["lp"], b["ref_lp"]).sum(-1).detach()


def sequence_loss(estimator):
    """(N,) estimator(log P(x), log P_ref(x)): the answer's summed log-probs as ONE sample of a
    distribution over answers, differentiated (k1 gives sum_t k1_t, the per-token k1 loss)."""
    return lambda b: estimator(b["lp"].sum(-1), b["ref_lp"].sum(-1))


# name: (sampler, surrogate). A method's expected gradient is E_sampler[grad surrogate].
KLGRAD_METHODS = {
    "k1-reward-togo": ("policy", k1_reward_to_go),
    "k1-reward-own": ("policy", k1_reward_own),
    "k1-loss": ("policy", per_token_loss(k1)),
    "k2-loss": ("policy", per_token_loss(k2)),
    "k3-loss": ("policy", per_token_loss(k3)),
    "full-loss": ("policy", full_loss),
    "k3+-loss": ("policy", k3_plus),
    "k3-ratio-loss": ("policy", k3_ratio),
    "seq-k1-reward": ("policy", sequence_score),
    "seq-k1-loss": ("policy", sequence_loss(k1)),
    "seq-k2-loss": ("policy", sequence_loss(k2)),
    "seq-k3-loss": ("policy", sequence_loss(k3)),
    "old-k3-loss": ("old", per_token_loss(k3)),
    "old-k3-ratio-loss": ("old", k3_ratio),
}
KLGRAD_LEGEND = {
    "k1-reward-togo": "k1 in the reward, reward-to-go (REINFORCE, gamma = 1)",
    "k1-reward-own": "k1 in the reward, own token only (gamma = 0)",
    "k1-loss": "k1 as a loss, summed over tokens", "k2-loss": "k2 as a loss",
    "k3-loss": "k3 as a loss (GRPO)", "full-loss": "kl.full_kl per position as a loss",
    "k3+-loss": "k3's value, k2's gradient (verl)",
    "k3-ratio-loss": "k3 * pi/pi_s as a loss, on-policy (ratio 1, differentiated)",
    "seq-k1-reward": "REINFORCE with the answer's k1 = log P/P_ref as every token's return",
    "seq-k1-loss": "log P/P_ref as one loss (= k1-loss)",
    "seq-k2-loss": "(log P/P_ref)^2 / 2 as one loss", "seq-k3-loss": "k3 of the answer as one loss",
    "old-k3-loss": "k3 as a loss, answers from pi_old",
    "old-k3-ratio-loss": "k3 * pi/pi_old as a loss, answers from pi_old (DeepSeek-V3.2)",
}


def answer_gradients(tables, T, surrogate, sampler="policy"):
    """(G, w): G (V^T, P * V), each answer's gradient of its surrogate w.r.t. the policy's logit
    table; w (V^T,) each answer's probability under the sampler ("policy" or "old"), a constant
    as in training. The exact expected gradient is w @ G; a batch of n answers estimates it by the
    mean of their rows. Each answer gets its own copy of its rows, so one backward gives all G."""
    vocab = tables["ref"].shape[1]
    seqs, rows = lab_sequences(T, vocab)
    logits = tables["policy"][rows].requires_grad_()  # (N, T, V)
    sampler_lp = token_logps(tables[sampler][rows], seqs)
    b = dict(lp=token_logps(logits, seqs), ref_lp=token_logps(tables["ref"][rows], seqs),
             logits=logits, ref_logits=tables["ref"][rows], sampler_lp=sampler_lp)
    (grad,) = torch.autograd.grad(surrogate(b).sum(), logits)
    G = torch.zeros(len(seqs), len(tables["ref"]), vocab, dtype=torch.float64)
    G[torch.arange(len(seqs))[:, None], rows] = grad  # an answer's rows are distinct
    return G.flatten(1), sampler_lp.sum(-1).exp()


def expected_gradient(tables, T, surrogate, sampler="policy"):
    """(P * V,) E_sampler[grad surrogate], exactly: sum over answers of P_sampler(x) grad f(x)."""
    G, w = answer_gradients(tables, T, surrogate, sampler)
    return w @ G


def compare(g, truth):
    """(relative error ||g - g_true|| / ||g_true||, cosine; 0 for a zero g, as k1's loss gives)."""
    norm, true_norm = g.norm().item(), truth.norm().item()
    cos = 0.0 if norm < 1e-9 * true_norm else (g @ truth).item() / (norm * true_norm)
    return (g - truth).norm().item() / true_norm, cos


def batch_weights(w, n, batches, generator):
    """(batches, N): each simulated batch's share of each answer, n answers drawn from w (N,)."""
    idx = torch.multinomial(w, n * batches, replacement=True, generator=generator)
    counts = torch.zeros(batches, len(w), dtype=torch.float64)
    counts.scatter_add_(1, idx.view(batches, n), torch.ones(batches, n, dtype=torch.float64))
    return counts / n


def sampling_std(G, w, shares, n):
    """(simulated, exact): the root-mean-square deviation of a batch's estimate (shares @ G, the
    mean gradient of its n answers) from the exact mean w @ G over the simulated batches, and its
    exact value sqrt(sum_x w(x) ||G(x) - w @ G||^2 / n)."""
    mean = w @ G
    simulated = (shares @ G - mean).square().sum(1).mean().sqrt().item()
    return simulated, (w @ (G - mean).square().sum(1) / n).sqrt().item()


def klgrad_rows(tables, lengths, n=64, batches=200, seed=0, log=print):
    """One row per method and T: rel_err and cos against grad KL(pi || pi_ref) ("reverse") and
    grad KL(pi_ref || pi) ("forward"), and std: a batch of n answers' RMS deviation from the
    method's exact mean, over ||grad KL(pi || pi_ref)|| (std_exact: its closed form)."""
    g, rows, t0 = torch.Generator().manual_seed(seed), [], time.time()
    for T in lengths:
        truth, kls = true_gradients(tables, T)
        shares = {}  # the same batches for every method with the same sampler
        for method, (sampler, surrogate) in KLGRAD_METHODS.items():
            G, w = answer_gradients(tables, T, surrogate, sampler)
            if sampler not in shares:
                shares[sampler] = batch_weights(w, n, batches, g)
            row = dict(method=method, T=T, sampler=sampler, n=n, batches=batches,
                       kl_reverse=kls["reverse"], kl_forward=kls["forward"])
            for direction in ("reverse", "forward"):
                rel, cos = compare(w @ G, truth[direction])
                row.update({f"rel_err_{direction}": rel, f"cos_{direction}": cos})
            std, std_exact = sampling_std(G, w, shares[sampler], n)
            scale = truth["reverse"].norm().item()
            rows.append(dict(row, std=std / scale, std_exact=std_exact / scale))
        log(f"klgrad: T = {T} done ({len(w)} answers, KL(pi || pi_ref) {kls['reverse']:.3f}, "
            f"KL(pi_ref || pi) {kls['forward']:.3f}), {time.time() - t0:.1f}s", flush=True)
    return rows


def klgrad_tables(rows, lengths):
    """Markdown: for each direction, rel_err (cos) per method and T; then std per method and T."""
    head = "| method | " + " | ".join(f"T = {T}" for T in lengths) + " |\n" + "|---" * (
        len(lengths) + 1) + "|\n"
    cell = {(r["method"], r["T"]): r for r in rows}
    out = []
    parts = (("KL(pi || pi_ref): rel_err (cos)", "{rel_err_reverse:.3f} ({cos_reverse:+.3f})"),
             ("KL(pi_ref || pi): rel_err (cos)", "{rel_err_forward:.3f} ({cos_forward:+.3f})"),
             ("std of a batch's estimate / ||grad KL(pi || pi_ref)||", "{std:.3f}"))
    for title, fmt in parts:
        lines = [f"| {m} | " + " | ".join(fmt.format(**cell[m, T]) for T in lengths) + " |"
                 for m in KLGRAD_METHODS]
        out.append(f"{title}\n\n{head}" + "\n".join(lines))
    return "\n\n".join(out)


def same_gradient_groups(rows, tol=1e-5):
    """[[method, ...], ...]: methods whose relative errors agree (to tol) in both directions at
    every T, i.e. (here) with the same expected gradient: they share a line of the plot."""
    groups = []  # (errors, [methods])
    for method in KLGRAD_METHODS:
        errs = torch.tensor([(r["rel_err_reverse"], r["rel_err_forward"])
                             for r in rows if r["method"] == method])
        match = next((g for e, g in groups if (e - errs).abs().max() < tol), None)
        if match is None:
            groups.append((errs, [method]))
        else:
            match.append(method)
    return [g for _, g in groups]


def plot_klgrad(rows, lengths, path):
    """Relative error against T per method, one panel per KL direction, written to path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for group, marker in zip(same_gradient_groups(rows), itertools.cycle("os^vDP*X")):
        for ax, direction in zip(axes, ("reverse", "forward")):
            ys = [r[f"rel_err_{direction}"] for T in lengths for r in rows
                  if r["method"] == group[0] and r["T"] == T]
            ax.plot(lengths, ys, marker=marker, label=" = ".join(group))
    for ax, title in zip(axes, ("against grad KL(pi || pi_ref)", "against grad KL(pi_ref || pi)")):
        ax.set(xlabel="answer length T", title=title, xticks=list(lengths))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error of the expected gradient")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8,
               title="methods with the same expected gradient share a line")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def klgrad(out_plot=KLGRAD_PLOT, as_json=False, max_len=6, n=64, batches=200, seed=0):
    """The KL-gradient lab: every method of KLGRAD_METHODS against the exact gradients of both
    sequence KLs, T = 1 .. max_len; prints the tables (stderr with as_json, stdout then holding
    one JSON array of the rows), writes the plot to out_plot. Returns the rows."""
    log = lambda *a, **k: print(*a, file=sys.stderr if as_json else sys.stdout, **k)
    tables, lengths = lab_tables(seed, max_len=max_len), list(range(1, max_len + 1))
    log(f"klgrad: V = {LAB_VOCAB}, T = 1 .. {max_len}, seed {seed}; std from {batches} batches of "
        f"n = {n} answers")
    rows = klgrad_rows(tables, lengths, n, batches, seed, log)
    log("\n" + klgrad_tables(rows, lengths) + "\n")
    log("\n".join(f"  {m}: {d}" for m, d in KLGRAD_LEGEND.items()) + "\n")
    plot_klgrad(rows, lengths, out_plot)
    log(f"wrote {out_plot}")
    if as_json:
        print(json.dumps(rows))
    return rows


# ----------------------------------------------------------------------------- the command line

EXPERIMENTS = ("hacking", "controller", "overopt", "frontier", "precision", "kl", "reward",
               "klplace", "gold", "rlvr", "klgrad")
# PPO updates per run when --updates is not given, as a share of the preset's (cpu: 80): the
# controller needs time to settle; hacking and overopt see the damage well before.
UPDATE_SHARE = {"hacking": 0.75, "controller": 1.0, "overopt": 0.75, "frontier": 1.0, "precision": 1.0,
                "klplace": 1.0, "gold": 1.0, "rlvr": 1.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description="leash's experiments, one per subcommand")
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which experiment to run")
    parser.add_argument("--out", default="out", help="a finished run of train.py; results go here too")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to run (auto: as train.py picks)")
    parser.add_argument("--updates", type=int, default=None,
                        help="PPO / GRPO updates per run (default: the preset's; 3/4: hacking, overopt)")
    parser.add_argument("--kl-target", type=float, nargs="+", default=None,
                        help="KL target(s), nats per sequence (controller: 2 and 4; frontier: 1 2 4 8)")
    parser.add_argument("--beta", type=float, default=0.0, help="overopt: the fixed KL coefficient")
    parser.add_argument("--grpo-beta", type=float, nargs="+", default=[0.01, 0.04, 0.1, 0.3],
                        help="klplace: GRPO's fixed beta values")
    parser.add_argument("--dpo-beta", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                        help="frontier: DPO's beta values")
    parser.add_argument("--online-beta", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                        help="frontier: online DPO's beta values")
    parser.add_argument("--dpo-steps", type=int, default=None,
                        help="DPO steps at most (default: the run preset's; plain DPO at most 100)")
    parser.add_argument("--n", type=int, default=None,
                        help="kl: samples per answer length (256); klgrad: answers per batch (64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="PPO and DPO seed, the same for every run of an experiment "
                             "(precision: 0 and 1; klgrad: its tables and batches)")
    parser.add_argument("--json", action="store_true",
                        help="klgrad: stdout is one JSON array of rows, everything else to stderr")
    parser.add_argument("--out-plot", default=KLGRAD_PLOT, help="klgrad: where its plot goes")
    parser.add_argument("--max-len", type=int, default=6, help="klgrad: the longest answer, T")
    parser.add_argument("--batches", type=int, default=200,
                        help="klgrad: simulated batches for the std of a batch's estimate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; use 1 when runs share the CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, name, t0 = pick_device(args.device), args.experiment, time.time()
    if name == "kl":
        kl_estimators(args.out, args.n or 256, device)
    elif name == "klgrad":  # no run needed: exact tables on the CPU
        klgrad(args.out_plot, args.json, args.max_len, args.n or 64, args.batches, args.seed)
    else:
        run_experiment(name, args, device)
    print(f"{name}: {time.time() - t0:.0f}s", file=sys.stderr if args.json else sys.stdout)


def run_experiment(name, args, device):
    env = setup(args.out, device)
    print(f"{name}: device {device}, dtype {env['dtype']}, preset {env['source']['preset']}, run {args.out}")
    if name == "reward":
        return reward_model(env, args.out)
    over = cli.STAGES[env["source"]["preset"]]
    cfg = replace(PPOConfig(), **over["ppo"], seed=args.seed)
    cfg = replace(cfg, updates=args.updates or max(1, round(UPDATE_SHARE[name] * cfg.updates)))
    gcfg = replace(GRPOConfig(), **over["grpo"], seed=args.seed, updates=cfg.updates)
    dcfg = replace(dpo.DPOConfig(), **over["dpo"], seed=args.seed)
    dcfg = replace(dcfg, steps=args.dpo_steps or dcfg.steps)
    if name == "controller":
        controller(env, cfg, args.out, args.kl_target or [2.0, 4.0])
    elif name == "overopt":
        overopt(env, cfg, args.out, args.beta)
    elif name == "frontier":
        frontier(env, cfg, gcfg, dcfg, args.out, args.kl_target or [1.0, 2.0, 4.0, 8.0], args.dpo_beta,
                 args.online_beta)
    elif name == "klplace":
        kl_place(env, gcfg, args.out, args.grpo_beta)
    elif name == "gold":
        gold(env, gcfg, args.out)
    elif name == "rlvr":
        rlvr(env, gcfg, args.out)
    elif name == "precision":
        precision(env, cfg, dcfg, args.out)
    else:
        hacking(env, cfg, args.out)


if __name__ == "__main__":
    main()
