"""
The whole leash pipeline, top to bottom, and its command line (`python train.py --help`):
    world -> tokenizer -> pretrain -> SFT -> freeze reference -> reward model -> PPO / GRPO / DPO / online DPO
          -> evaluation on fixed held-out prompts -> summary.json, metrics.jsonl, samples.md, plots
Each finished stage is recorded in OUT/stages/<name>.json with its config; a re-run reuses it. The presets
and flags are in cli.py. `torchrun --standalone --nproc_per_node N train.py` runs it on N ranks (dist.py):
rank 0 alone writes files and prints, every rank decides alike whether to reuse a stage, and a failing rank
stops the run with one line.
"""
import hashlib
import json
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, replace
from types import SimpleNamespace

import torch

import dist
import reward
import tokenizer as tok
import userdata
import world
from cli import ALGOS, PRESETS, STAGE_OVERRIDES, configure, fail, parse_args
from dpo import DPOConfig, reward_model_judge, train_dpo, train_online_dpo
from evaluate import evaluate_policy, gold_scores
from grpo import VARIANTS, GRPOConfig, train_grpo
from model import GPT, GPTConfig, load_checkpoint, pick_device, pick_dtype, save_checkpoint
from ppo import PPOConfig, train_ppo
from reference import freeze, trainable
from report import (Logger, comparison_table, flops_per_token, fmt, matmul_peak_flops, plot_rl, read_json,
                    write_json, write_samples)
from sft import TrainConfig, finetune, pretrain

HERE = os.path.dirname(os.path.abspath(__file__))


def stage(env, name, config, run):
    """Run a stage once: run() -> (model, result dict), the model saved to OUT/<name>.pt (a tokenizer to
    OUT/tokenizer.json) and OUT/stages/<name>.json = {config, result}. With the same config later, the
    saved model and result come back instead, unless the model's file is missing or corrupt. Data-parallel,
    every rank decides from the same files (rank 0 writes only once all have decided), rank 0 alone writes,
    and the ranks' weights must come out identical."""
    marker, config = f"{env.out}/stages/{name}.json", json.loads(json.dumps(config))
    path = f"{env.out}/tokenizer.json" if name == "tokenizer" else f"{env.out}/{name}.pt"
    load = tok.load_tokenizer if name == "tokenizer" else lambda p: load_checkpoint(p, env.device)[0]
    model = None
    if os.path.exists(marker) and read_json(marker)["config"] == config:
        try:
            model, result = load(path), read_json(marker)["result"]
            print(f"{name}: reusing {path} (same config)")
        except ValueError as e:
            print(f"{name}: {e}; doing this stage again")
    dist.barrier()  # every rank has looked before rank 0 writes
    if model is None:
        model, result = run()
        if dist.is_main():
            tok.save_tokenizer(model, path) if name == "tokenizer" else save_checkpoint(path, model)
            write_json(marker, {"config": config, "result": result})
        dist.barrier()  # the files are there before any rank looks for the next stage's
    if dist.world_size() > 1 and name != "tokenizer":
        if len(set(digests := dist.gather(weights_digest(model)))) > 1:
            raise RuntimeError(f"{name}: the ranks' weights differ: {', '.join(d[:12] for d in digests)}")
        print(f"{name}: the same weights on all {len(digests)} ranks (sha256 {digests[0][:12]})")
    return model, result


def weights_digest(model):
    """sha256 (hex) of a model's state_dict, bit for bit: ranks that train alike end with equal digests."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup(args):
    """What every stage shares: device, dtype, preset, data (checked before any work), folders."""
    try:
        device = pick_device(args.device)
        if dist.init(device)[1] > 1 and device == "mps":  # under torchrun: join the ranks' group
            raise ValueError("torchrun on mps: torch.distributed runs on cuda (NCCL) or cpu (gloo); "
                             "add --device cpu")
        preset = args.preset if args.preset != "auto" else ("gpu" if device == "cuda" else "cpu")
        P = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in PRESETS[preset].items()}
        data = userdata.build_datasets(args.data, args.seed, n_eval_prompts=P["eval_prompts"]) if args.data \
            else world.build_datasets(world.WorldConfig(args.seed, P["n_pretrain"], P["n_sft"],
                                                        n_eval_prompts=P["eval_prompts"]))
    except ValueError as e:
        fail(str(e))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dist.is_main():
        for sub in ("stages", "plots"):
            os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    else:  # rank 0 alone prints (errors still reach stderr) and writes files
        sys.stdout = open(os.devnull, "w")
    torch.manual_seed(args.seed)  # every rank starts from the same weights
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
    env.log = Logger(out, flops_per_token(mcfg), matmul_peak_flops(env.device, env.dtype), dist.is_main())
    n_params, N = GPT(mcfg).num_params() / 1e6, dist.world_size()
    print(f"leash: device {env.device}, dtype {env.dtype}, preset {env.preset}, out {out}, {n_params:.2f}M "
          f"parameters; matmul peak {env.log.peak / 1e9:.0f} GFLOP/s (for MFU)" + f"; {N} ranks" * (N > 1))
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
    env.rcfg = rcfg
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
    # ---- RLHF, each run from the SFT model: PPO (and PPO without a KL penalty), GRPO, DPO, online DPO
    names = ["ppo"] * ("ppo" in args.algos) + ["ppo_beta0"] * args.no_kl_baseline + \
        [n.replace("-", "_") for n in args.algos if n != "ppo"]
    labels = {**{n.replace("-", "_"): label for n, label in ALGOS.items()}, "ppo_beta0": "PPO, beta=0"}
    variant = [args.grpo_variant] * (args.grpo_variant != "grpo") + [f"KL in {args.kl_in}"] * bool(args.kl_in)
    labels["grpo"] += f" ({', '.join(variant)})" if variant else ""
    for name in names:
        run, run_cfg = (dpo_stage if name.startswith("dpo") else rl_stage)(env, name)
        policy, result = stage(env, name, {**cfg, name: run_cfg}, run)
        summary[name] = {k: v for k, v in result.items() if k not in ("history", "samples")}
        columns[labels[name]] = result["samples"]
        if dist.is_main():
            if "history" in result:
                plot_rl(result["history"], f"{out}/plots/{name}.png", labels[name])
            write_json(f"{out}/summary.json", summary)
    # ---- the results: summary.json, samples side by side, the comparison table
    summary["seconds"] = time.time() - t_start
    if dist.is_main():
        write_json(f"{out}/summary.json", summary)
        write_samples(f"{out}/samples.md", data["eval_prompts"], columns, env.gold_fn, env.valid_fn)
    print(f"\n{comparison_table(summary)}\n\ndone in {summary['seconds']:.0f}s; results in {out}/")
    dist.close()
    return summary


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


def rl_stage(env, name):
    """(run, config) of PPO (name ppo, ppo_beta0: beta 0) or GRPO: the adaptive controller or --beta held
    fixed, maximising the reward model's score or (--reward gold) the world's gold reward."""
    a, result, is_ppo = env.args, {}, name.startswith("ppo")
    flags = dict(seed=a.seed, updates=a.rl_updates, kl_target=a.kl_target)
    advantage, aggregation, kl_in = VARIANTS[a.grpo_variant]
    rl_cfg = configure(PPOConfig, env.over["ppo"], kl_estimator=a.kl_estimator, **flags) if is_ppo else \
        configure(GRPOConfig, env.over["grpo"], advantage=advantage, aggregation=aggregation,
                  kl_in=a.kl_in or kl_in, **flags)
    beta = 0.0 if name == "ppo_beta0" else a.beta
    rl_cfg = rl_cfg if beta is None else replace(rl_cfg, kl_controller="fixed", beta=beta)
    score_fn = env.score_fn if a.reward == "model" else lambda t, P: gold_scores(env.enc, t, P, env.gold_fn)

    def run():
        t0, log = time.time(), lambda rec: env.log({**rec, "stage": name})
        rest = (env.enc, env.data["train_prompts"], rl_cfg, env.device, env.dtype, log,
                lambda m: evaluate(env, m, result), env.gold_fn, env.valid_fn)
        policy, history = train_ppo(trainable(env.sft), env.ref, score_fn, trainable(env.rm), *rest) \
            if is_ppo else train_grpo(trainable(env.sft), env.ref, score_fn, *rest)
        curves = ("step", "kl", "kl_exact", "beta", "proxy_reward", "gold_reward", "valid_rate")
        target = None if beta is not None else rl_cfg.kl_target
        result.update(kl_target=target, beta_final=history[-1]["beta"],
                      seconds=time.time() - t0, history=[{k: h[k] for k in curves} for h in history])
        return policy, result
    return run, {**asdict(rl_cfg), "reward": a.reward}


def dpo_stage(env, name):
    """(run, config) of DPO on the reward model's training pairs (dpo), or online on the policy's own fresh
    pairs judged by the reward model or the annotators (dpo_online), against the same reference."""
    a, result, online = env.args, {}, name == "dpo_online"
    steps = dict(online_steps=a.dpo_steps) if online else dict(max_steps=a.dpo_steps)
    dcfg = configure(DPOConfig, env.over[name], seed=a.seed, beta=a.dpo_beta, sft_coef=a.dpo_sft_coef,
                     **steps)

    def run():
        keep = lambda m: evaluate(env, m, result)
        if online:
            policy, history = train_online_dpo(trainable(env.sft), env.ref, env.enc,
                                               env.data["train_prompts"], judge(env), dcfg, env.device,
                                               env.dtype, env.log, keep)
            result.update({k: history[k] for k in ("skipped_share", "judge_calls", "n_pairs")})
        else:
            train_pairs, val_pairs = reward.split_pairs(env.pairs, env.val_fraction)
            policy, history = train_dpo(trainable(env.sft), env.ref, env.enc, train_pairs, dcfg, env.device,
                                        env.dtype, env.log, keep, val_pairs)
        result.update(implicit_accuracy=history["implicit_accuracy"], beta=dcfg.beta, sft_coef=dcfg.sft_coef,
                      seconds=history["seconds"])
        return policy, result
    return run, {**asdict(dcfg), **({"judge": a.judge} if online else {})}


def judge(env):
    """Online DPO's judge of a pair: the reward model (the proxy PPO maximises) or the annotators."""
    if env.args.judge == "model":
        return reward_model_judge(env.rm, tok.pad_id(env.enc))
    return reward.annotator_judge(random.Random(env.args.seed + dist.rank()), env.rcfg,
                                  env.args.data and env.gold_fn)


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # a loss went NaN/inf: stop, keep every finished stage
        fail(f"{e}; finished stages are kept")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: finished stages are saved; the same command resumes from there"
                 if dist.is_main() else 130)
    except Exception as e:  # under torchrun: one line, naming the rank, instead of N tracebacks
        if dist.world_size() == 1:
            raise
        ours = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(HERE + os.sep)]
        if ours and os.path.basename(ours[-1].filename) == "dist.py":  # a collective broke: another rank
            time.sleep(5)  # died, and torchrun ends this one (its line or torchrun's says why), or it hangs
        at = f" ({os.path.basename(ours[-1].filename)}:{ours[-1].lineno})" if ours else ""
        sys.exit(f"error: rank {dist.rank()}/{dist.world_size()}: {type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:300]}{at}")
