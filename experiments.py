"""
The experiments of leash: what the KL penalty buys, one function (and command) each.

    python experiments.py hacking    --out out   # beta = 0 against the adaptive controller
    python experiments.py controller --out out   # the adaptive controller holds its KL target
    python experiments.py overopt    --out out   # gold and proxy reward against sqrt(KL)
    python experiments.py frontier   --out out   # gold reward against KL: PPO targets, DPO betas
    python experiments.py precision  --out out   # fp32 against bf16 autocast, two seeds each

Each one loads OUT/sft.pt, OUT/reward_model.pt and OUT/preferences.json (made by
`python train.py --out OUT`), trains fresh PPO (frontier and precision: also DPO) policies
from the SFT model, and writes OUT/plots/<name>.png, OUT/<name>.json and a markdown table
on stdout. Policies are judged the same way as in train.py: evaluate.evaluate_policy on
the fixed held-out prompts. Runs are cached in OUT/ppo_runs/ and OUT/dpo_runs/ together
with the run config of the SFT model and reward model they started from.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, replace

import torch

import dpo
import reward
import tokenizer as tok
import world
from evaluate import evaluate_policy
from ppo import PPOConfig, train_ppo
from reference import freeze
from sft import load_checkpoint


def setup(out, device):
    """Everything a PPO run needs, from the checkpoints in `out` and the run's own world."""
    policy, enc = load_checkpoint(os.path.join(out, "sft.pt"), device)
    rm = reward.load_scalar_model(os.path.join(out, "reward_model.pt"), device)
    run = torch.load(os.path.join(out, "sft.pt"), map_location="cpu", weights_only=True)["meta"].get("run_config", {})
    wcfg = world.WorldConfig(seed=run.get("seed", 1337), n_pretrain=run.get("n_pretrain", 20000),
                             n_sft=run.get("n_sft", 8000), n_eval_prompts=run.get("n_eval_prompts", 256))
    data = world.build_datasets(wcfg)
    longest = max(len(tok.encode(enc, p)) for p in data["eval_prompts"] + data["train_prompts"])
    max_new = policy.cfg.block_size - longest
    proxy = reward.proxy_reward_fn(rm, enc, device)

    def evaluate(model):
        return evaluate_policy(model, enc, data["eval_prompts"], max_new, device, ref=sft_ref, reward_fn=proxy)

    sft_ref = freeze(policy)
    with open(os.path.join(out, "preferences.json")) as f:
        prefs = json.load(f)  # the reward model's pairs (DPO learns from them) and its run config
    return dict(sft=policy, enc=enc, rm=rm, data=data, evaluate=evaluate, device=device, out=out,
                dtype=run.get("dtype", "fp32"),  # train in the dtype the run used
                pairs=prefs["pairs"], source=prefs["run_config"])


def run_file(out, kind, label, cfg, dtype):
    """OUT/<kind>/<label>_seed<seed>_<dtype>.json: where one run's result is cached."""
    name = f"{label} seed{cfg.seed} {dtype}".replace("=", "").replace(" ", "_")
    return os.path.join(out, kind, name + ".json")


def cached_run(path, cfg, env):
    """The cached result at path if it was made with this config from this very SFT model
    and reward model (a re-run of train.py into the same folder may have replaced them)."""
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["config"] == asdict(cfg) and cached.get("source") == env["source"]:
            print(f"{cached['label']}: reusing {path}")
            return cached
    return None


def progress(label):
    """A log function printing one short line per PPO update."""
    def log(r):
        line = (f"{label:>10} {r['step']:>3} | proxy {r['proxy_reward']:+.3f} gold {r['gold_reward']:+.3f} "
                f"valid {r['valid_rate']:.2f} kl {r['kl_exact']:6.2f} beta {r['beta']:.4f} "
                f"d2 {r['distinct_2']:.2f} {r['seconds']:.1f}s eta {r['eta_s']:.0f}s")
        if "eval_gold_reward" in r:
            line += f" || eval gold {r['eval_gold_reward']:+.3f} valid {r['eval_valid_rate']:.2f} kl {r['eval_kl']:.2f}"
        print(line, flush=True)
    return log


def run_ppo(env, label, cfg, out=None):
    """Train a fresh copy of the SFT policy; returns history, final eval metrics, samples.
    With `out`, the result is kept in OUT/ppo_runs/<label>_seed<seed>_<dtype>.json and reused
    by any later experiment that asks for the same run (hacking and overopt share beta=0)."""
    path = out and run_file(out, "ppo_runs", label, cfg, env["dtype"])
    cached = cached_run(path, cfg, env)
    if cached:
        return cached
    policy = freeze(env["sft"])  # a detached copy...
    for p in policy.parameters():
        p.requires_grad_(True)  # ...made trainable again
    ref = freeze(policy)
    t0 = time.time()
    eval_fn = lambda m: env["evaluate"](m)[0]
    policy, history = train_ppo(policy, ref, env["rm"], env["enc"], env["data"]["train_prompts"], cfg,
                                env["device"], env["dtype"], log=progress(label), eval_fn=eval_fn)
    metrics, samples = env["evaluate"](policy)
    result = dict(label=label, config=asdict(cfg), source=env["source"], seconds=time.time() - t0,
                  history=history, final=metrics, samples=samples)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f)
    return result


def sft_baseline(env):
    metrics, samples = env["evaluate"](env["sft"])
    return dict(label="SFT", final=metrics, samples=samples)


def table(runs, keys=("proxy_reward", "gold_reward", "valid_rate", "distinct_2", "kl", "eos_rate")):
    """Markdown table of each run's final evaluation."""
    lines = ["| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in runs:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['final'].get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def save(out, name, result, fig):
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plots", f"{name}.png"), dpi=120)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}/plots/{name}.png and {out}/{name}.json")


def smooth(xs, k=5):
    """Trailing moving average: per-update batch metrics are noisy."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


# ----------------------------------------------------------------------------- 1. reward hacking

def no_penalty(cfg, beta=0.0):
    """A fixed (by default zero) KL coefficient, evaluated often enough to trace a curve."""
    return replace(cfg, kl_controller="fixed", init_beta=beta, eval_every=max(1, cfg.updates // 12))


def hacking(env, cfg, out):
    """beta = 0 (no KL penalty) against the adaptive controller: same seed, same budget."""
    import matplotlib.pyplot as plt
    runs = [sft_baseline(env),
            run_ppo(env, "beta=0", no_penalty(cfg), out),
            run_ppo(env, "adaptive", cfg, out)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for key, ax in zip(("proxy_reward", "gold_reward", "valid_rate", "kl_exact"), axes.flat):
        for r in runs[1:]:
            ax.plot(smooth([h[key] for h in r["history"]]), label=r["label"])
        ax.axhline(runs[0]["final"].get(key.replace("_exact", ""), float("nan")), color="gray", ls=":", label="SFT")
        ax.set(xlabel="PPO update", title=key + " (training batches, 5-update mean)")
    axes[1, 1].set(yscale="symlog", ylim=(0, None))
    axes[0, 0].legend()
    print("\n" + table(runs) + "\n")
    for i in range(6):
        print(f"- prompt {env['data']['eval_prompts'][i]!r}")
        for r in runs:
            print(f"  - {r['label']}: {r['samples'][i]}")
    save(out, "hacking", runs, fig)
    return runs


# ----------------------------------------------------------------------------- 2. the controller

def controller(env, cfg, out, targets=None):
    """The adaptive controller (Ziegler et al. 2019) at one or more KL targets: the mean
    exact per-sequence KL over the last quarter of the updates should be within 25%."""
    import matplotlib.pyplot as plt
    targets = targets or [cfg.kl_target]
    runs = [run_ppo(env, f"target {t:g}", replace(cfg, kl_target=t), out) for t in targets]
    fig, (ax_kl, ax_beta) = plt.subplots(1, 2, figsize=(10, 4))
    print("\n| KL target (nats/seq) | mean KL, last quarter | ratio | final beta | eval gold | eval valid |\n|---|---|---|---|---|---|")
    for r, t in zip(runs, targets):
        kls = [h["kl_exact"] for h in r["history"]]
        tail = kls[-max(1, len(kls) // 4):]
        r["kl_last_quarter"] = sum(tail) / len(tail)
        r["within_25pct"] = abs(r["kl_last_quarter"] / t - 1) <= 0.25
        line, = ax_kl.plot(kls, label=f"target {t:g}")
        ax_kl.axhline(t, color=line.get_color(), ls=":")
        ax_beta.plot([h["beta"] for h in r["history"]], color=line.get_color(), label=f"target {t:g}")
        print(f"| {t:g} | {r['kl_last_quarter']:.2f} | {r['kl_last_quarter'] / t:.2f} | {r['history'][-1]['beta']:.4f} "
              f"| {r['final']['gold_reward']:.3f} | {r['final']['valid_rate']:.3f} |")
    ax_kl.set(xlabel="PPO update", ylabel="KL(pi || pi_ref), nats per sequence", title="KL per batch (dotted: target)")
    ax_beta.set(xlabel="PPO update", ylabel="beta", yscale="log", title="KL coefficient")
    ax_kl.legend()
    save(out, "controller", runs, fig)
    return runs


# ----------------------------------------------------------------------------- 3. overoptimization

def overopt(env, cfg, out, beta=0.0):
    """Gold and proxy reward against sqrt(KL) as a weakly penalised policy drifts (Gao et al.
    2022, fig. 1 in miniature). Gao et al. fit gold(d) = d (alpha - b d), d = sqrt(KL), for RL;
    the same fit is drawn here (through the SFT point)."""
    import matplotlib.pyplot as plt
    import numpy as np
    base = sft_baseline(env)
    run = run_ppo(env, f"beta={beta:g}", no_penalty(cfg, beta), out)
    points = [dict(kl=0.0, gold=base["final"]["gold_reward"], proxy=base["final"]["proxy_reward"])]
    points += [dict(kl=h["eval_kl"], gold=h["eval_gold_reward"], proxy=h["eval_proxy_reward"],
                    valid=h["eval_valid_rate"], step=h["step"]) for h in run["history"] if "eval_kl" in h]
    d = np.sqrt(np.maximum([p["kl"] for p in points], 0.0))
    gold = np.array([p["gold"] for p in points]) - points[0]["gold"]
    proxy = np.array([p["proxy"] for p in points]) - points[0]["proxy"]
    alpha, b = np.linalg.lstsq(np.stack([d, -d * d], 1), gold, rcond=None)[0]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(d, proxy, "o-", label="proxy (reward model)")
    ax.plot(d, gold, "s-", label="gold (world)")
    grid = np.linspace(0, d.max(), 100)
    ax.plot(grid, grid * (alpha - b * grid), "k:", label=f"fit d({alpha:.2f} {-b:+.3f} d)")
    ax.set(xlabel="sqrt(KL(pi || pi_ref)), sqrt(nats per sequence)", ylabel="reward gain over SFT",
           title=f"overoptimization, PPO with beta={beta:g}")
    ax.legend()
    print("\n| step | KL | sqrt KL | proxy - SFT | gold - SFT | valid |\n|---|---|---|---|---|---|")
    for p, di, g, pr in zip(points, d, gold, proxy):
        print(f"| {p.get('step', 'SFT')} | {p['kl']:.2f} | {di:.2f} | {pr:+.3f} | {g:+.3f} | {p.get('valid', base['final']['valid_rate']):.3f} |")
    peak = int(np.argmax(gold))
    result = dict(points=points, fit=dict(alpha=alpha, b=b), gold_peak_sqrt_kl=float(d[peak]),
                  run=run, sft=base)
    print(f"gold peaks at sqrt(KL) = {d[peak]:.2f} (fit: {alpha / (2 * b) if b > 0 else float('inf'):.2f}); "
          f"the proxy keeps rising: {proxy[-1]:+.3f} at the end")
    save(out, "overopt", result, fig)
    return result


# ----------------------------------------------------------------------------- 4. the frontier

def run_dpo(env, label, cfg):
    """DPO from the SFT model on the reward model's training pairs (cfg.sources says which);
    the result is kept in OUT/dpo_runs/<label>_seed<seed>_<dtype>.json and reused."""
    path = run_file(env["out"], "dpo_runs", label, cfg, env["dtype"])
    cached = cached_run(path, cfg, env)
    if cached:
        return cached
    train_pairs, val_pairs = reward.split_pairs(env["pairs"], env["source"]["reward"]["val_fraction"])
    log = lambda r: print(f"{label:>10} {r['step']:>3} | loss {r['loss']:.3f} margin {r['margin']:+.2f} "
                          f"acc {r['accuracy']:.2f} eta {r['eta_s']:.0f}s", flush=True)
    point = dpo.dpo_sweep(env["sft"], env["enc"], train_pairs, [cfg.beta], cfg, env["device"], env["dtype"], log,
                          lambda m: env["evaluate"](m)[0], val_pairs)[0]
    result = dict(label=label, config=asdict(cfg), source=env["source"], final=point)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)
    return result


# plain DPO (Rafailov et al. 2023) at its best budget here, and leash's default (DPO + NLL, RPO)
PLAIN_DPO = dict(sft_coef=0.0, max_steps=100, lr=1e-4)


def frontier(env, cfg, out, targets, dpo_betas):
    """The reward-KL frontier (Rafailov et al. 2023, fig. 2 left, in miniature): gold reward
    against the exact KL to the reference on the held-out prompts, for PPO with the adaptive
    controller at several KL targets, and plain DPO and DPO + NLL (RPO, leash's default) at
    several betas; every policy from the same SFT model, judged by the same evaluation."""
    import matplotlib.pyplot as plt
    base = sft_baseline(env)
    ppo_runs = [run_ppo(env, f"target {t:g}", replace(cfg, kl_target=t), out) for t in targets]
    dpo_runs = [run_dpo(env, f"DPO beta={b:g}", dpo.DPOConfig(beta=b, seed=cfg.seed, **PLAIN_DPO))
                for b in dpo_betas]
    rpo_runs = [run_dpo(env, f"RPO beta={b:g}", dpo.DPOConfig(beta=b, seed=cfg.seed)) for b in dpo_betas]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([0], [base["final"]["gold_reward"]], color="gray", marker="*", s=120, label="SFT", zorder=3)
    for runs, name, marker, knob in ((ppo_runs, "PPO (KL target)", "o", lambda r: r["config"]["kl_target"]),
                                     (dpo_runs, "DPO (beta)", "s", lambda r: r["config"]["beta"]),
                                     (rpo_runs, "DPO + NLL, RPO (beta)", "^", lambda r: r["config"]["beta"])):
        runs = sorted(runs, key=lambda r: r["final"]["kl"])  # a frontier is drawn along KL
        xs, ys = [r["final"]["kl"] for r in runs], [r["final"]["gold_reward"] for r in runs]
        ax.plot(xs, ys, marker + "-", label=name)
        for r, x, y in zip(runs, xs, ys):
            ax.annotate(f"{knob(r):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="KL(pi || pi_ref) on held-out prompts, nats per answer", ylabel="gold reward",
           xscale="symlog", title="reward-KL frontier: every point one policy")
    ax.legend()
    print("\n" + table([base] + ppo_runs + dpo_runs + rpo_runs) + "\n")
    save(out, "frontier", dict(sft=base, ppo=ppo_runs, dpo=dpo_runs, rpo=rpo_runs), fig)
    return ppo_runs, dpo_runs, rpo_runs


# ----------------------------------------------------------------------------- 5. precision

def precision(env, cfg, out, seeds=(0, 1), dpo_beta=0.1):
    """The same PPO (adaptive, cfg's KL target) and DPO runs in fp32 and under bf16 autocast,
    at two seeds each: does the fast default land where fp32 does, within seed noise?"""
    import matplotlib.pyplot as plt
    runs = []
    for dtype in ("fp32", "bf16"):
        denv = dict(env, dtype=dtype)
        for seed in seeds:
            r = run_ppo(denv, f"target {cfg.kl_target:g}", replace(cfg, seed=seed), out)
            runs.append(dict(r, algo="PPO", dtype=dtype, seed=seed, label=f"PPO {dtype} seed {seed}"))
            r = run_dpo(denv, f"RPO beta={dpo_beta:g}", dpo.DPOConfig(beta=dpo_beta, seed=seed))
            runs.append(dict(r, algo="DPO", dtype=dtype, seed=seed, label=f"DPO (RPO) {dtype} seed {seed}"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in runs:
        ax.scatter(r["final"]["kl"], r["final"]["gold_reward"], marker="o" if r["algo"] == "PPO" else "s",
                   color="tab:blue" if r["dtype"] == "fp32" else "tab:orange")
        ax.annotate(f"{r['algo']} s{r['seed']}", (r["final"]["kl"], r["final"]["gold_reward"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="tab:blue", label="fp32")
    ax.scatter([], [], color="tab:orange", label="bf16 autocast")
    ax.set(xlabel="KL(pi || pi_ref), nats per answer", ylabel="gold reward", title="fp32 against bf16, two seeds")
    ax.legend()
    print("\n" + table(runs) + "\n")
    for r in runs:
        print(f"{r['label']}: {r.get('seconds', r['final'].get('seconds', float('nan'))):.0f} s")
    save(out, "precision", [{k: r[k] for k in ("label", "algo", "dtype", "seed", "final")} for r in runs], fig)
    return runs


EXPERIMENTS = {"hacking": hacking, "controller": controller, "overopt": overopt, "frontier": frontier,
               "precision": precision}
# PPO updates per run when --updates is not given: the controller needs time to settle.
DEFAULT_UPDATES = {"hacking": 60, "controller": 80, "overopt": 60, "frontier": 80, "precision": 80}


def main(argv=None):
    parser = argparse.ArgumentParser(description="leash's PPO experiments")
    parser.add_argument("experiment", choices=list(EXPERIMENTS), help="which experiment to run")
    parser.add_argument("--out", default="out", help="folder with sft.pt and reward_model.pt; results go here")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates per run (default: per experiment)")
    parser.add_argument("--kl-target", type=float, nargs="+", default=None,
                        help="controller: KL target(s) in nats per sequence (default: 2 and 4; frontier: 1 2 4 8)")
    parser.add_argument("--beta", type=float, default=0.0, help="overopt: the fixed KL coefficient")
    parser.add_argument("--dpo-beta", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                        help="frontier: DPO's beta values")
    parser.add_argument("--seed", type=int, default=0,
                        help="PPO and DPO seed, the same for every run of an experiment (precision: 0 and 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 when several runs share the CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = setup(args.out, args.device)
    cfg = PPOConfig(seed=args.seed, updates=args.updates or DEFAULT_UPDATES[args.experiment])
    t0 = time.time()
    if args.experiment == "controller":
        controller(env, cfg, args.out, args.kl_target or [2.0, 4.0])
    elif args.experiment == "overopt":
        overopt(env, cfg, args.out, args.beta)
    elif args.experiment == "frontier":
        frontier(env, cfg, args.out, args.kl_target or [1.0, 2.0, 4.0, 8.0], args.dpo_beta)
    elif args.experiment == "precision":
        precision(env, cfg, args.out)
    else:
        hacking(env, cfg, args.out)
    print(f"{args.experiment}: {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
