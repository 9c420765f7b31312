"""What a run shows: progress lines (with MFU), the table, samples.md, plots."""
import json
import os
import pathlib
import time

import torch

from model import atomic_write


def flops_per_token(cfg):
    """Training FLOPs per token, forward + backward (PaLM appendix B; nanoGPT's
    count): 6 * parameters + 12 * layers * width * context for attention."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def matmul_peak_flops(device="cpu", dtype="fp32", repeats=10):
    """Best FLOP/s of a square matmul on this device and dtype, measured now:
    MFU's denominator (a laptop has no datasheet, a shared machine gives less)."""
    cuda = torch.device(device).type == "cuda"
    n, inner = (4096, 10) if cuda else (1024, 1)  # GPU: 10 per timing, sync amortised
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(2, n, n, device=device, dtype=kind)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for _ in range(repeats + 2):  # the first two are warm-up
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / inner)
    return 2 * n ** 3 / min(times[2:])


class Logger:
    """Writes each record to metrics.jsonl and prints one line of the keys to
    watch (tok_per_s as MFU too); with main False (not rank 0), neither."""
    SHOW = ("loss val_loss accuracy val_accuracy margin proxy_reward gold_reward "
            "kl_exact kl_max beta entropy clipfrac approx_kl explained_variance "
            "valid_rate length").split()
    UNITS = {"ms_per_step": "{:.0f} ms/step", "seconds": "{:.2f} s/update",
             "pairs_per_s": "{:.0f} pairs/s", "tok_per_s": "{:.0f} tok/s",
             "mfu": "mfu {:.1f}%", "eta_s": "eta {:.0f}s"}

    def __init__(self, out, flops_per_token=None, peak_flops=None, main=True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.flops, self.peak = flops_per_token, peak_flops
        self.main = main

    def start(self, config):
        """Each run opens with a {"stage": "run"} record: a re-run appends."""
        self({"stage": "run", "step": 0, "time": time.time(), "config": config}, show=False)

    def __call__(self, rec, show=True):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "tok_per_s" in rec and self.peak:  # MFU is shown, not written
            rec = {**rec, "mfu": 100 * self.flops * rec["tok_per_s"] / self.peak}
        if not show:
            return
        parts = [f"{rec['stage']:>9} {rec['step']:>5}"]
        parts += [f"{k} {rec[k]:.4g}" for k in self.SHOW if isinstance(rec.get(k), float)]
        parts += [spec.format(rec[k]) for k, spec in self.UNITS.items() if k in rec]
        print(" | ".join(parts), flush=True)
        evals = [f"{k[5:]} {v:.3f}" for k, v in rec.items()
                 if k[:5] == "eval_" and isinstance(v, float)]
        if evals:  # the periodic evaluation on the held-out prompts
            print(" " * 16 + "eval: " + "  ".join(evals), flush=True)


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


def write_json(path, obj):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def comparison_table(summary):
    """A markdown table of every policy's figures on the evaluation prompts."""
    dpo = "DPO + NLL (RPO)" if (summary.get("dpo") or {}).get("sft_coef") else "DPO"
    header = ("| policy | gold reward | proxy reward | KL to ref (nats) | valid "
              '| distinct-2 | with "!" | held-out NLL | seconds |')
    lines = [header, "|---" * 9 + "|"]
    rows = (("SFT", "sft"), ("PPO", "ppo"), ("PPO, beta=0", "ppo_beta0"),
            ("GRPO", "grpo"), (dpo, "dpo"), ("online DPO", "dpo_online"))
    for label, key in rows:
        if m := summary.get(key):
            cells = [label, f"{m['gold_reward']:.3f}", fmt(m.get("proxy_reward")),
                     fmt(m.get("kl"), ".2f"), fmt(m.get("valid_rate")),
                     f"{m['distinct_2']:.3f}", fmt(m.get("exclaim_share"), ".2f"),
                     fmt(m.get("heldout_nll")),
                     fmt(m.get("seconds"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_samples(path, prompts, columns, gold_fn, valid_fn, n=12):
    """samples.md: the same evaluation prompts answered by each policy."""
    out = ["# Samples on the evaluation prompts", "",
           "Temperature 1, no top-k / top-p. Each answer: [gold reward, valid] text."]
    for i, prompt in enumerate(prompts[:n]):
        out += ["", f"## `{prompt}`"]
        for name, texts in columns.items():
            valid = "n/a"
            if valid_fn is not None:
                valid = "valid" if valid_fn(texts[i]) else "INVALID"
            out.append(f"- **{name}** [{gold_fn(texts[i]):+.2f}, {valid}] {texts[i]}")
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(out) + "\n"))


# Each panel of a stage's figure: its title, y axis with unit, the curves
# (record key, label) of the logged steps, the held-out evaluation's key.
# A panel no run has data for is left out (DPO has no beta, PPO no margin).
PANELS = [
    ("KL to the reference", "nats per answer",
     [("kl_exact", "exact"), ("kl", "k1 estimate"), ("kl_k3", "k3 estimate")], "eval_kl"),
    ("KL coefficient", "beta", [("beta", "beta")], None),
    ("gold reward (the truth)", "gold reward, -1..1", [("gold_reward", "rollouts")],
     "eval_gold_reward"),
    ("proxy reward (the reward model)", "SFT standard deviations",
     [("proxy_reward", "rollouts")], "eval_proxy_reward"),
    ("validity and the hack", "share of answers",
     [("valid_rate", "valid"), ("exclaim_share", 'with "!"')], "eval_valid_rate"),
    ("entropy", "nats per token", [("entropy", "rollouts")], None),
    ("DPO loss (with RPO's NLL term)", "nats per pair", [("loss", "loss")], None),
    ("implicit rewards", "beta * log ratio, nats",
     [("chosen_reward", "chosen"), ("rejected_reward", "rejected"), ("margin", "margin")],
     None),
]
COLORS = ("C0", "C3", "C2", "C1")  # one per run on the same axes


def plot_stage(out, name, histories, labels, summary):
    """plots/<name>.png; with PPO's runs with and without the leash both
    done, plots/hacking.png: the two on the same axes."""
    if histories[name]:  # (a stage done before plots kept its records: none)
        plot_rl({labels[name]: histories[name]}, f"{out}/plots/{name}.png",
                summary[name].get("kl_target"))
    if name.startswith("ppo") and {"ppo", "ppo_beta0"} <= set(histories):
        both = {labels[k]: histories[k] for k in ("ppo", "ppo_beta0")}
        plot_rl(both, f"{out}/plots/hacking.png", summary["ppo"].get("kl_target"))


def plot_rl(runs, path, kl_target=None):
    """runs {label: logged records} -> one figure (PANELS, one line style
    per curve, one colour per run), and gold and proxy reward against the
    exact KL (the path each run took); kl_target: a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no GUI, nothing to close
    has = lambda key: any(key in r for records in runs.values() for r in records)
    panels = [p for p in PANELS if any(has(key) for key, _ in p[2]) or has(p[3])]
    fig = Figure(figsize=(16, 7.5), layout="constrained")
    axes = fig.subplots(2, (len(panels) + 2) // 2).flatten()

    for ax, (title, unit, curves, eval_key) in zip(axes, panels):
        for (label, records), color in zip(runs.items(), COLORS):
            steps = [r["step"] for r in records]
            for (key, name), style in zip(curves, ("-", "--", ":")):
                if has(key):
                    values = [r.get(key, float("nan")) for r in records]
                    ax.plot(steps, values, style, color=color, label=f"{label}: {name}")
            evals = [(r["step"], r[eval_key]) for r in records if eval_key in r]
            if evals:
                ax.plot(*zip(*evals), "o", color=color, label=f"{label}: held-out")
        if title.startswith("KL to") and kl_target:
            ax.axhline(kl_target, color="gray", linestyle="--", label="KL target")
        if unit == "beta":
            ax.set_ylim(bottom=0)  # beta = 0 throughout: a flat line at the bottom
        ax.set(title=title, xlabel="step", ylabel=unit)
        ax.legend(fontsize=7)

    spare = list(axes[len(panels):])
    if has("kl_exact"):  # where each RL run went: reward against KL
        ax = spare.pop(0)
        for (label, records), color in zip(runs.items(), COLORS):
            kls = [r["kl_exact"] for r in records]
            ax.plot(kls, [r["gold_reward"] for r in records], "-", color=color,
                    label=f"{label}: gold")
            ax.plot(kls, [r["proxy_reward"] for r in records], ":", color=color,
                    label=f"{label}: proxy")
        ax.set(title="reward against KL, rollouts", xlabel="exact KL, nats per answer",
               ylabel="gold (-1..1), proxy (SFT sd)")
        ax.legend(fontsize=7)
    for ax in spare:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
