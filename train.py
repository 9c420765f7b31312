"""
The whole leash pipeline, top to bottom, and its command line (`python train.py --help`):
    world -> tokenizer -> pretrain -> SFT -> freeze reference -> reward model -> PPO / DPO
          -> evaluation on fixed held-out prompts -> summary.json, metrics.jsonl, samples.md, plots
Each finished stage is recorded in OUT/stages/<name>.json with its config; a re-run reuses it.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace

import torch

import reward
import tokenizer as tok
import userdata
import world
from dpo import DPOConfig, train_dpo
from evaluate import evaluate_policy
from model import GPT, GPTConfig, atomic_write, load_checkpoint, pick_device, pick_dtype, save_checkpoint
from ppo import PPOConfig, train_ppo
from reference import freeze, trainable
from report import Logger, comparison_table, flops_per_token, fmt, matmul_peak_flops, plot_rl, write_samples
from sft import TrainConfig, finetune, pretrain

# ----------------------------------------------------------------------------- defaults and presets
# Model, data and steps per preset: "cpu" fits a laptop or 2 cores (the default without CUDA), "tiny"
# is CI's smoke test, "gpu" is about nanoGPT's shakespeare-char size. The RL stages' configs
# (RewardConfig, PPOConfig, DPOConfig) default to the cpu preset; STAGE_OVERRIDES has the others.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1024, n_pretrain=4000,
                 n_sft=2000, eval_prompts=128, pretrain_steps=200, sft_steps=100, batch_size=32, lr=2e-3),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=1024, n_pretrain=20000,
                n_sft=8000, eval_prompts=256, pretrain_steps=1000, sft_steps=400, batch_size=32, lr=1e-3),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=1024, n_pretrain=100000,
                n_sft=20000, eval_prompts=512, pretrain_steps=3000, sft_steps=1000, batch_size=128, lr=6e-4),
}
STAGE_OVERRIDES = {
    "tiny": dict(reward=dict(n_prompts=200, world_groups=300, steps=100),
                 ppo=dict(updates=8, rollouts=32, eval_every=4), dpo=dict(max_steps=40, batch_size=16)),
    "cpu": dict(reward={}, ppo={}, dpo={}),
    "gpu": dict(reward=dict(n_prompts=2000, steps=500), dpo=dict(max_steps=300, batch_size=64),
                ppo=dict(updates=150, rollouts=256, minibatch_size=64)),
}


def flag(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:  # every flag with its line of --help; None: the preset's (or the stage config's) value
    preset: str = flag("auto", "the size of everything (auto: gpu on CUDA, else cpu)", (*PRESETS, "auto"))
    out: str = flag("out", "output folder: checkpoints, metrics, summary, plots")
    algo: str = flag("both", "which RLHF stage(s) to run", ("ppo", "dpo", "both"))
    beta: float = flag(None, "PPO's KL coefficient, held fixed (default: the adaptive controller)")
    kl_target: float = flag(None, "the adaptive controller's KL target, nats per answer")
    kl_estimator: str = flag("k1", "PPO's per-token KL in the reward (full: exact, but a token gets "
                             "no gradient at its own position, see kl.py)", ("k1", "k2", "k3", "full"))
    no_kl_baseline: bool = flag(False, "also run PPO with beta = 0 (reward hacking)")
    dpo_beta: float = flag(None, "DPO's beta, the strength of its implicit KL penalty")
    dpo_sft_coef: float = flag(None, "weight of DPO's NLL term on chosen answers: 0 = plain DPO")
    annotator_bias: float = flag(None, "the annotators' taste for '!' (0: no blind spot to learn)")
    data: str = flag(None, "train on this text file instead of the toy world")
    seed: int = flag(1337, "random seed (world, init, sampling)")
    device: str = flag("auto", "where to run", ("auto", "cpu", "cuda", "mps"))
    dtype: str = flag("auto", "bf16 autocast (log-probs, ratios, KL stay fp32)", ("auto", "fp32", "bf16"))
    compile: bool = flag(False, "torch.compile the model for pretraining and SFT (pays on CUDA)")
    n_layer: int = flag(None, "transformer layers")
    n_head: int = flag(None, "attention heads")
    n_embd: int = flag(None, "model width")
    block_size: int = flag(None, "longest prompt + answer, in tokens")
    vocab_size: int = flag(None, "BPE vocabulary, EOS and PAD included")
    eval_prompts: int = flag(None, "held-out prompts every policy is judged on")
    pretrain_steps: int = flag(None, "pretraining steps")
    sft_steps: int = flag(None, "SFT steps")
    rm_prompts: int = flag(None, "prompts the SFT policy answers for the reward model's data")
    rm_steps: int = flag(None, "reward-model steps")
    ppo_updates: int = flag(None, "PPO updates")
    dpo_steps: int = flag(None, "DPO steps at most")


def fail(msg):
    """Bad input: one line naming the problem, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    """The flags of Args, each one checked: a bad value stops the run with one line naming it."""
    parser = argparse.ArgumentParser(description="leash: KL-penalised RLHF from scratch")
    parser.error = lambda message: fail(f"{message} (see --help)")  # not argparse's usage dump
    for f in fields(Args):
        choices, default = f.metadata["choices"], "" if f.default is None else f" [{f.default}]"
        help = (" | ".join(choices) + ": " if choices else "") + f.metadata["help"] + default
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, default=f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), help=help, **kind)
    args = Args(**vars(parser.parse_args(argv)))
    for f in fields(Args):
        v, name, choices = getattr(args, f.name), "--" + f.name.replace("_", "-"), f.metadata["choices"]
        if choices and v not in choices:
            fail(f"{name} {v}: unknown (choose {', '.join(choices)})")
        if f.type is float and v is not None and not 0 <= v < float("inf"):
            fail(f"{name} {v}: must be a finite number >= 0")
        if f.type is int and v is not None and f.name != "seed" and v <= 0:
            fail(f"{name} {v}: must be a positive integer")
    if args.dpo_beta == 0:
        fail("--dpo-beta 0: DPO needs beta > 0 (it divides the reward by beta)")
    return args


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def stage(env, name, config, run):
    """Run a stage once: run() -> (model, result dict), the model saved to OUT/<name>.pt (a tokenizer to
    OUT/tokenizer.json) and OUT/stages/<name>.json = {config, result}. With the same config later, the
    saved model and result come back instead, unless the model's file is missing or corrupt."""
    marker, config = f"{env.out}/stages/{name}.json", json.loads(json.dumps(config))
    path = f"{env.out}/tokenizer.json" if name == "tokenizer" else f"{env.out}/{name}.pt"
    load = tok.load_tokenizer if name == "tokenizer" else lambda p: load_checkpoint(p, env.device)[0]
    if os.path.exists(marker) and read_json(marker)["config"] == config:
        try:
            model = load(path)
            print(f"{name}: reusing {path} (same config)")
            return model, read_json(marker)["result"]
        except ValueError as e:
            print(f"{name}: {e}; doing this stage again")
    model, result = run()
    tok.save_tokenizer(model, path) if name == "tokenizer" else save_checkpoint(path, model)
    write_json(marker, {"config": config, "result": result})
    return model, result


def setup(args):
    """What every stage shares: device, dtype, preset, data (checked before any work), folders."""
    try:
        device = pick_device(args.device)
        preset = args.preset if args.preset != "auto" else ("gpu" if device == "cuda" else "cpu")
        P = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in PRESETS[preset].items()}
        data = userdata.build_datasets(args.data, args.seed, n_eval_prompts=P["eval_prompts"]) if args.data \
            else world.build_datasets(world.WorldConfig(args.seed, P["n_pretrain"], P["n_sft"],
                                                        n_eval_prompts=P["eval_prompts"]))
    except ValueError as e:
        fail(str(e))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for sub in ("stages", "plots"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    torch.manual_seed(args.seed)
    return SimpleNamespace(args=args, data=data, device=device, dtype=pick_dtype(args.dtype, device), P=P,
                           out=args.out, preset=preset,
                           over=STAGE_OVERRIDES[preset], valid_fn=None if args.data else world.is_valid,
                           gold_fn=userdata.gold_reward if args.data else world.gold_reward)


def main(argv=None):
    env = setup(parse_args(argv))
    args, data, P, out = env.args, env.data, env.P, env.out
    # ---- the tokenizer; each stage's config holds its parents' configs too
    cfg = {"preset": env.preset, "data": args.data, "seed": args.seed, **P}
    train_tokenizer = lambda: (tok.train_tokenizer(data["pretrain"], P["vocab_size"]), {})
    enc = env.enc = stage(env, "tokenizer", cfg, train_tokenizer)[0]
    mcfg = GPTConfig(P["block_size"], tok.padded_vocab_size(enc), P["n_layer"], P["n_head"], P["n_embd"],
                     n_out=tok.pad_id(enc))  # PAD is the last id: never an output
    prompts = data["eval_prompts"] + data["train_prompts"]
    env.max_new = P["block_size"] - max(len(tok.encode(enc, p)) for p in prompts)
    if env.max_new < 8:
        fail(f"block size {P['block_size']} leaves {env.max_new} tokens for an answer; raise --block-size")
    env.log = Logger(out, flops_per_token(mcfg), matmul_peak_flops(env.device, env.dtype))
    n_params = GPT(mcfg).num_params() / 1e6
    print(f"leash: device {env.device}, dtype {env.dtype}, preset {env.preset}, out {out}, {n_params:.2f}M "
          f"parameters; matmul peak {env.log.peak / 1e9:.0f} GFLOP/s (for MFU)")
    env.log.start({**cfg, "dtype": env.dtype, "args": asdict(args)})
    t_start, cfg = time.time(), {**cfg, "dtype": env.dtype}
    # ---- pretraining, then SFT: the next-token loss on the corpus, then on prompt -> answer + EOS
    model = GPT(mcfg).to(env.device)
    for name, train_fn, texts, lr, steps, warmup, seed in (
            ("pretrain", pretrain, data["pretrain"], P["lr"], P["pretrain_steps"], 50, args.seed),
            ("sft", finetune, data["sft"], P["lr"] / 2, P["sft_steps"], 20, args.seed + 1)):
        tcfg = TrainConfig(steps, P["batch_size"], lr, warmup)
        cfg = {**cfg, name: asdict(tcfg)}
        run = lambda: (model, {"val_loss": train_fn(model, enc, texts, tcfg, env.device, env.dtype, env.log,
                                                    seed, args.compile)})
        model, result = stage(env, name, cfg, run)
    env.sft, env.ref = model, freeze(model)  # the reference: every KL below is measured against it
    # ---- the reward model, fitted to the annotators' preferences between SFT answers
    rcfg = configure(reward.RewardConfig, env.over["reward"], n_prompts=args.rm_prompts, steps=args.rm_steps,
                     annotator_bias=args.annotator_bias)
    cfg = {**cfg, "reward": asdict(rcfg)}
    env.rm, rm_result = stage(env, "reward_model", cfg, lambda: reward_stage(env, rcfg))
    env.pairs, env.val_fraction = rm_result["pairs"], rcfg.val_fraction
    rm_metrics = {k: v for k, v in rm_result.items() if k != "pairs"}
    env.score_fn = lambda tokens, prompt_len: reward.score(env.rm, tokens, tok.pad_id(enc))
    metrics = evaluate(env, model, sft_result := {})
    refs = data["eval_references"]
    summary = {"config": {**cfg, "args": asdict(args)}, "device": env.device, "dtype": env.dtype,
               "sft": {"val_loss": result["val_loss"], **metrics}, "reward_model": rm_metrics,
               "world_reference": {"gold_reward": sum(map(env.gold_fn, refs)) / len(refs),
                                   "distinct_2": world.distinct_n(refs, 2)}}
    columns = {"SFT": sft_result["samples"]}
    acc, ceiling = rm_metrics["val_accuracy"], rm_metrics["gold_label_accuracy"]
    print(f"sft: valid {fmt(metrics['valid_rate'])}, gold {metrics['gold_reward']:.3f} | reward model: "
          f"val accuracy {acc:.3f}, gold-label ceiling {ceiling:.3f}")
    # ---- RLHF, each run from the SFT model: PPO, PPO without a KL penalty, DPO
    runs = [("ppo", "PPO", args.beta)] * (args.algo != "dpo") + [("ppo_beta0", "PPO, beta=0", 0.0)] * \
        args.no_kl_baseline + [("dpo", "DPO", None)] * (args.algo != "ppo")
    for name, label, beta in runs:
        run, run_cfg = ppo_stage(env, name, beta) if name.startswith("ppo") else dpo_stage(env)
        policy, result = stage(env, name, {**cfg, name: run_cfg}, run)
        summary[name] = {k: v for k, v in result.items() if k not in ("history", "samples")}
        columns[label] = result["samples"]
        if "history" in result:
            plot_rl(result["history"], f"{out}/plots/{name}.png", name)
        write_json(f"{out}/summary.json", summary)
    # ---- the results: summary.json, samples side by side, the comparison table
    summary["seconds"] = time.time() - t_start
    write_json(f"{out}/summary.json", summary)
    write_samples(f"{out}/samples.md", data["eval_prompts"], columns, env.gold_fn, env.valid_fn)
    print(f"\n{comparison_table(summary)}\n\ndone in {summary['seconds']:.0f}s; results in {out}/")
    return summary


def configure(config_class, preset_overrides, **flags):
    """A stage's config: its defaults, then the preset's changes, then the flags that were given."""
    return config_class(**{**preset_overrides, **{k: v for k, v in flags.items() if v is not None}})


def evaluate(env, policy, keep=None):
    """A policy's metrics on the held-out prompts (kept with its samples in `keep`): every stage's judge."""
    metrics, samples = evaluate_policy(policy, env.enc, env.data["eval_prompts"], env.max_new, env.device,
                                       env.dtype, env.ref, env.score_fn, 1234, env.gold_fn, env.valid_fn)
    if keep is not None:
        keep.update(metrics, samples=samples)
    return metrics


def reward_stage(env, rcfg):
    """Preference pairs from the SFT policy and the annotators (kept for DPO), then the reward model."""
    pairs, n_unended = reward.make_preferences(env.sft, env.enc, env.data["train_prompts"], rcfg, env.device,
                                               env.args.seed, env.args.data and env.gold_fn, env.dtype)
    rm, metrics = reward.train_reward_model(env.sft, env.enc, pairs, rcfg, env.device, env.dtype, env.log)
    return rm, {**metrics, "n_unended_answers": n_unended, "pairs": pairs}


def ppo_stage(env, name, beta):
    """(run, config) of PPO: the adaptive controller, or a fixed beta when one is given."""
    a, result = env.args, {}
    pcfg = configure(PPOConfig, env.over["ppo"], kl_estimator=a.kl_estimator, seed=a.seed,
                     updates=a.ppo_updates, kl_target=a.kl_target)
    pcfg = pcfg if beta is None else replace(pcfg, kl_controller="fixed", beta=beta)

    def run():
        t0, log = time.time(), lambda rec: env.log({**rec, "stage": name})
        policy, history = train_ppo(trainable(env.sft), env.ref, env.score_fn, trainable(env.rm), env.enc,
                                    env.data["train_prompts"], pcfg, env.device, env.dtype, log,
                                    lambda m: evaluate(env, m, result), env.gold_fn, env.valid_fn)
        curves = ("step", "kl", "kl_exact", "beta", "proxy_reward", "gold_reward", "valid_rate")
        result.update(kl_target=None if beta is not None else pcfg.kl_target, beta_final=history[-1]["beta"],
                      seconds=time.time() - t0, history=[{k: h[k] for k in curves} for h in history])
        return policy, result
    return run, asdict(pcfg)


def dpo_stage(env):
    """(run, config) of DPO on the reward model's training pairs, against the same reference."""
    a, result = env.args, {}
    dcfg = configure(DPOConfig, env.over["dpo"], seed=a.seed, beta=a.dpo_beta, sft_coef=a.dpo_sft_coef,
                     max_steps=a.dpo_steps)

    def run():
        train_pairs, val_pairs = reward.split_pairs(env.pairs, env.val_fraction)
        policy, history = train_dpo(trainable(env.sft), env.ref, env.enc, train_pairs, dcfg, env.device,
                                    env.dtype, env.log, lambda m: evaluate(env, m, result), val_pairs)
        result.update(implicit_accuracy=history["implicit_accuracy"], beta=dcfg.beta, sft_coef=dcfg.sft_coef,
                      seconds=history["seconds"])
        return policy, result
    return run, asdict(dcfg)


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # a loss went NaN/inf: stop, keep every finished stage
        fail(f"{e}; finished stages are kept")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: finished stages are saved; the same command resumes from there")
