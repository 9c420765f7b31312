"""
What a run shows a person: one progress line per log step (every record also goes
to metrics.jsonl), the comparison table of policies, their answers side by side
(samples.md), and the plots of PPO and of the reward model.
"""
import json
import os
import time


class Logger:
    """Appends every record to metrics.jsonl (all keys) and prints one progress line
    with the keys a practitioner watches (the ones present in the record)."""
    SHOW = ["loss", "val_loss", "accuracy", "val_accuracy", "margin", "proxy_reward", "gold_reward",
            "kl_exact", "kl_max", "beta", "entropy", "clipfrac", "approx_kl", "explained_variance",
            "valid_rate", "length"]

    def __init__(self, out):
        self.path = os.path.join(out, "metrics.jsonl")

    def start(self, config):
        """Mark where a run begins: a re-run into the same folder appends to the same file,
        so every run opens with {"stage": "run", "step": 0, "time", "config"}."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": "run", "step": 0, "time": time.time(), "config": config}) + "\n")

    def __call__(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        parts = [f"{rec['stage']:>9} {rec['step']:>5}"]
        parts += [f"{k} {rec[k]:.4g}" for k in self.SHOW if isinstance(rec.get(k), float)]
        if "ms_per_step" in rec:
            parts.append(f"{rec['ms_per_step']:.0f} ms/step")
        if "seconds" in rec:
            parts.append(f"{rec['seconds']:.2f} s/update")
        if "pairs_per_s" in rec:
            parts.append(f"{rec['pairs_per_s']:.0f} pairs/s")
        if "tok_per_s" in rec:
            parts.append(f"{rec['tok_per_s']:.0f} tok/s")
        if isinstance(rec.get("mfu"), float):
            parts.append(f"mfu {100 * rec['mfu']:.1f}%")
        if "eta_s" in rec:
            parts.append(f"eta {rec['eta_s']:.0f}s")
        print(" | ".join(parts), flush=True)
        evals = {k[5:]: v for k, v in rec.items() if k.startswith("eval_") and isinstance(v, float)}
        if evals:  # PPO's periodic evaluation on the held-out prompts
            print(" " * 16 + "eval: " + "  ".join(f"{k} {v:.3f}" for k, v in evals.items()), flush=True)


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def comparison_table(summary):
    """A markdown table of every policy's figures on the evaluation prompts."""
    dpo = summary.get("dpo") or {}
    dpo_label = "DPO + NLL (RPO)" if dpo.get("sft_coef") else "DPO"  # sft_coef: see dpo.DPOConfig
    rows = [("SFT", "sft"), ("PPO", "ppo"), ("PPO, beta=0", "ppo_beta0"), (dpo_label, "dpo")]
    lines = ["| policy | gold reward | proxy reward | KL to ref (nats) | valid | distinct-2 | seconds |",
             "|---|---|---|---|---|---|---|"]
    for label, key in rows:
        m = summary.get(key)
        if m:
            lines.append(f"| {label} | {m['gold_reward']:.3f} | {fmt(m.get('proxy_reward'))} | {fmt(m.get('kl'), '.2f')} "
                         f"| {fmt(m.get('valid_rate'))} | {m['distinct_2']:.3f} | {fmt(m.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def write_samples(path, prompts, columns, gold_fn, valid_fn, n=12):
    """samples.md: the same evaluation prompts answered by each policy, side by side."""
    out = ["# Samples on the evaluation prompts", "",
           "Temperature 1, no top-k / top-p. Each answer: [gold reward, valid] text.", ""]
    for i, prompt in enumerate(prompts[:n]):
        out.append(f"## `{prompt}`")
        for name, texts in columns.items():
            t = texts[i]
            valid = "n/a" if valid_fn is None else ("valid" if valid_fn(t) else "INVALID")
            out.append(f"- **{name}** [{gold_fn(t):+.2f}, {valid}] {t}")
        out.append("")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(out))
    os.replace(tmp, path)


def plot_ppo(history, path, title):
    """KL and beta over updates, and proxy and gold reward over updates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [h["kl_exact"] for h in history], label="exact KL (nats/seq)")
    ax1.plot(steps, [h["kl"] for h in history], alpha=0.5, label="k1 estimate")
    ax1.set(xlabel="PPO update", ylabel="KL(pi || pi_ref)", title=f"{title}: KL and beta")
    ax1b = ax1.twinx()
    ax1b.plot(steps, [h["beta"] for h in history], color="tab:red", label="beta")
    ax1b.set_ylabel("beta", color="tab:red")
    ax1.legend(loc="upper left")
    ax2.plot(steps, [h["proxy_reward"] for h in history], label="proxy (reward model)")
    ax2.plot(steps, [h["gold_reward"] for h in history], label="gold (the world)")
    ax2.plot(steps, [h["valid_rate"] for h in history], label="valid rate", linestyle=":")
    ax2.set(xlabel="PPO update", title=f"{title}: rewards on training rollouts")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reward_model(proxy_gold, blind_spot, path):
    """One PNG, two panels: proxy_vs_gold's scatter (Spearman in the title), and the change
    of proxy and gold under each blind_spot_report edit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for valid, color, label in ((True, "tab:blue", "valid"), (False, "tab:red", "invalid (gold -1)")):
        pts = [(g, p) for g, p, v in zip(proxy_gold["gold"], proxy_gold["proxy"], proxy_gold["valid"]) if v == valid]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
