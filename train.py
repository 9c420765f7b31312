"""
The whole leash pipeline, top to bottom (`python train.py --help`):

    world -> tokenizer -> pretrain -> SFT -> freeze the reference
          -> reward model -> PPO / GRPO / DPO / online DPO
          -> evaluation on fixed held-out prompts
          -> summary.json, metrics.jsonl, samples.md, plots

A finished stage is kept in OUT/stages/<name>.json with its config, and
a re-run with the same config reuses it. Under torchrun (dist.py) rank 0
alone writes and prints, and a failing rank stops the run with one line.
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch

import dist
import reward
import rollout
import tokenizer as tok
import userdata
import world
from cli import ALGOS, fail, parse_args, settings, stage_configs
from dpo import train_dpo
from online_dpo import reward_model_judge, train_online_dpo
from evaluate import evaluate_policy, gold_scores, verifiable
from grpo import train_grpo
from model import GPT, GPTConfig, load_checkpoint, pick_device, pick_dtype, save_checkpoint
from ppo import train_ppo
from reference import freeze, trainable
from report import (Logger, comparison_table, flops_per_token, fmt, matmul_peak_flops,
                    plot_stage, read_json, write_json, write_samples)
from sft import finetune, pretrain, pretraining_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    env = setup(parse_args(argv))
    args, data, out, P = env.args, env.data, env.out, env.P

    # ---- the tokenizer, the model's shape, the run's response budget
    cfg = {"preset": env.preset, "data": args.data, "seed": args.seed, **P}
    train_bpe = lambda: (tok.train_tokenizer(data["pretrain"], P["vocab_size"]), {})
    enc = stage(env, "tokenizer", cfg, train_bpe)[0]
    mcfg = GPTConfig(P["block_size"], tok.padded_vocab_size(enc), P["n_layer"], P["n_head"],
                     P["n_embd"], n_out=tok.pad_id(enc))  # PAD is never an output
    prompts = data["eval_prompts"] + data["train_prompts"]
    budget = rollout.response_budget(enc, prompts, mcfg.block_size)
    if budget < 8:
        fail(f"block size {mcfg.block_size} leaves {budget} tokens for an answer; "
             "raise --block-size")
    configs = stage_configs(args, env.preset, P, budget)
    log = Logger(out, flops_per_token(mcfg), matmul_peak_flops(env.device, env.dtype),
                 dist.is_main())
    n_params, N = GPT(mcfg).num_params() / 1e6, dist.world_size()
    print(f"leash: device {env.device}, dtype {env.dtype}, preset {env.preset}, out {out}, "
          f"{n_params:.2f}M parameters; matmul peak {log.peak / 1e9:.0f} GFLOP/s "
          f"(for MFU)" + f"; {N} ranks" * (N > 1))
    log.start({**cfg, "dtype": env.dtype, "args": asdict(args)})
    t_start, cfg = time.time(), {**cfg, "dtype": env.dtype}

    # ---- pretraining, then SFT: next-token loss on the corpus, then on prompt -> answer
    model = GPT(mcfg).to(env.device)
    for name, train_fn, texts, seed in (("pretrain", pretrain, data["pretrain"], args.seed),
                                        ("sft", finetune, data["sft"], args.seed + 1)):
        cfg = {**cfg, name: asdict(configs[name])}
        run = lambda: (model, {"val_loss": train_fn(model, enc, texts, configs[name],
                                                    env.device, env.dtype, log,
                                                    seed, args.compile)})
        model, result = stage(env, name, cfg, run)

    # ---- the reward model, fitted to the annotators' preferences between SFT answers
    cfg = {**cfg, "reward": asdict(configs["reward"])}
    rm, rm_result = stage(env, "reward_model", cfg,
                          lambda: reward_stage(env, enc, model, configs["reward"], log))
    # what every RLHF stage starts from: the SFT model, its frozen copy (the
    # reference: every KL is to it), the reward model and its pairs
    run = SimpleNamespace(**vars(env), enc=enc, budget=budget, log=log, sft=model,
                          ref=freeze(model), rm=rm, pairs=rm_result.pop("pairs"),
                          rcfg=configs["reward"],
                          score_fn=lambda t, P: reward.score(rm, t, tok.pad_id(enc)))
    sft_metrics = evaluate(run, model, sft_result := {})
    refs = data["eval_references"]
    summary = {"config": {**cfg, "args": asdict(args)}, "device": env.device,
               "dtype": env.dtype, "sft": {"val_loss": result["val_loss"], **sft_metrics},
               "reward_model": rm_result,
               "world_reference": {"gold_reward": sum(map(env.gold_fn, refs)) / len(refs),
                                   "distinct_2": world.distinct_n(refs, 2)}}
    columns, histories = {"SFT": sft_result["samples"]}, {}
    print(f"sft: valid {fmt(sft_metrics['valid_rate'])}, gold {sft_metrics['gold_reward']:.3f}"
          f" | reward model: val accuracy {rm_result['val_accuracy']:.3f}, gold-label "
          f"ceiling {rm_result['gold_label_accuracy']:.3f}")

    # ---- RLHF, each from the SFT model: PPO (and beta = 0), GRPO, DPO, online DPO
    for name in args.stages:
        train_fn = dpo_stage if name.startswith("dpo") else rl_stage
        extra = {"dpo": {}, "dpo_online": {"judge": args.judge}}.get(name, {"reward": args.reward})
        run_cfg = {**asdict(configs[name]), **extra}
        policy, result = stage(env, name, {**cfg, name: run_cfg},
                               lambda: train_fn(run, name, configs[name]))
        summary[name] = {k: v for k, v in result.items() if k not in ("history", "samples")}
        columns[args.labels[name]], histories[name] = result["samples"], result.get("history")
        if dist.is_main():
            plot_stage(out, name, histories, args.labels, summary)
            write_json(f"{out}/summary.json", summary)

    # ---- the results: summary.json, samples side by side, the comparison table
    summary["seconds"] = time.time() - t_start
    if dist.is_main():
        write_json(f"{out}/summary.json", summary)
        write_samples(f"{out}/samples.md", data["eval_prompts"], columns, env.gold_fn,
                      env.valid_fn)
    print(f"\n{comparison_table(summary)}\n\ndone in {summary['seconds']:.0f}s; "
          f"results in {out}/")
    dist.close()
    return summary


def setup(args):
    """Device, dtype, preset, data (checked before any work), folders."""
    try:
        device = pick_device(args.device)
        if dist.init(device)[1] > 1 and device == "mps":  # torchrun: join the group
            raise ValueError("torchrun on mps: torch.distributed runs on cuda (NCCL) "
                             "or cpu (gloo); add --device cpu")
        preset, P = settings(args, device)
        if args.data:
            data = userdata.build_datasets(args.data, args.seed,
                                           n_eval_prompts=P["eval_prompts"])
        else:
            wcfg = world.WorldConfig(args.seed, P["n_pretrain"], P["n_sft"],
                                     n_eval_prompts=P["eval_prompts"])
            data = world.build_datasets(wcfg)
    except ValueError as e:
        fail(str(e))

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dist.is_main():
        for sub in ("stages", "plots"):
            os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    else:  # rank 0 alone prints (errors still reach stderr) and writes
        sys.stdout = open(os.devnull, "w")
    torch.manual_seed(args.seed)  # every rank starts from the same weights
    return SimpleNamespace(args=args, data=data, device=device, P=P, preset=preset,
                           dtype=pick_dtype(args.dtype, device), out=args.out,
                           valid_fn=None if args.data else world.is_valid,
                           gold_fn=userdata.gold_reward if args.data else world.gold_reward)


def stage(env, name, config, run):
    """run() -> (model, result), saved to OUT/<name>.pt (or tokenizer.json)
    and OUT/stages/<name>.json = {config, result}; with the same config
    later, loaded instead (unless the file is missing or corrupt). Every
    rank decides alike; rank 0 writes; the ranks' weights must agree."""
    marker = f"{env.out}/stages/{name}.json"
    config = json.loads(json.dumps(config))
    is_tokenizer = name == "tokenizer"
    path = f"{env.out}/tokenizer.json" if is_tokenizer else f"{env.out}/{name}.pt"
    model = None
    if env.args.from_ and dist.is_main():  # --from: a finished run's stage, if it matches
        copy_stage(env.args.from_, env.out, name, os.path.basename(path), config)
    dist.barrier()  # rank 0 has copied before any rank looks
    if os.path.exists(marker) and read_json(marker)["config"] == config:
        try:
            if is_tokenizer:
                model = tok.load_tokenizer(path)
            else:
                model = load_checkpoint(path, env.device)[0]
            result = read_json(marker)["result"]
            print(f"{name}: reusing {path} (same config)")
        except ValueError as e:
            print(f"{name}: {e}; doing this stage again")
    dist.barrier()  # every rank has looked before rank 0 writes

    if model is None:
        model, result = run()
        if dist.is_main():
            if is_tokenizer:
                tok.save_tokenizer(model, path)
            else:
                save_checkpoint(path, model)
            write_json(marker, {"config": config, "result": result})
        dist.barrier()  # the files exist before any rank looks for the next

    if dist.world_size() > 1 and not is_tokenizer:
        digest = dist.same_weights(model, name)
        print(f"{name}: the same weights on all {dist.world_size()} ranks (sha256 {digest[:12]})")
    return model, result


def copy_stage(source, out, name, file, config):
    """--from: source's stage `name` (its file, then its marker) into out,
    if out has no such stage yet and source's has the same config."""
    marker = f"{source}/stages/{name}.json"
    if os.path.exists(f"{out}/stages/{name}.json") or not os.path.exists(marker):
        return
    if read_json(marker)["config"] == config:
        shutil.copyfile(f"{source}/{file}", f"{out}/{file}")
        shutil.copyfile(marker, f"{out}/stages/{name}.json")


def evaluate(run, policy, keep=None):
    """A policy's held-out figures (and samples, into `keep`)."""
    metrics, samples = evaluate_policy(policy, run.enc, run.data["eval_prompts"], run.budget,
                                       run.device, run.dtype, run.ref, run.score_fn, 1234,
                                       run.gold_fn, run.valid_fn,
                                       heldout=run.data["eval_references"])
    if keep is not None:
        keep.update(metrics, samples=samples)
    return metrics


def reward_stage(env, enc, sft, rcfg, log):
    """Preference pairs (kept for DPO; rank 0's on every rank), then the reward model."""
    gold_fn = env.args.data and env.gold_fn
    pairs, n_unended = reward.make_preferences(sft, enc, env.data["train_prompts"], rcfg,
                                               env.device, env.args.seed, gold_fn, env.dtype)
    pairs, n_unended = dist.broadcast((pairs, n_unended))
    if not all(reward.split_pairs(pairs, rcfg.val_fraction)):  # bad input: no traceback
        fail(f"{len(pairs)} preference pairs ({n_unended} SFT answers never ended): too few "
             "for a reward model's training and validation; raise --sft-steps or --rm-prompts")
    rm, metrics = reward.train_reward_model(sft, enc, pairs, rcfg, env.device, env.dtype, log)
    return rm, {**metrics, "n_unended_answers": n_unended, "pairs": pairs}


def rl_stage(run, name, cfg):
    """PPO (ppo_beta0: beta 0) or GRPO on the reward model, the gold reward
    or the verifiable 0/1 check (--reward)."""
    score_fn = run.score_fn
    judges = {"gold": run.gold_fn, "verifiable": verifiable}  # (verifiable: not with --data)
    if judge := judges.get(run.args.reward):
        score_fn = lambda tokens, P: gold_scores(run.enc, tokens, P, judge)
    result, t0 = {}, time.time()
    log = lambda rec: run.log({**rec, "stage": name})
    ptx = pretraining_loss(run.enc, run.data["pretrain"], cfg.minibatch_size,
                           run.sft.cfg.block_size, cfg.seed + dist.rank(), run.device,
                           run.dtype) if cfg.ptx_coef else None
    rest = (run.enc, run.data["train_prompts"], cfg, run.device, run.dtype, log,
            lambda m: evaluate(run, m, result), run.gold_fn, run.valid_fn, ptx)
    if name.startswith("ppo"):
        policy, history = train_ppo(trainable(run.sft), run.ref, score_fn,
                                    trainable(run.rm), *rest)
    else:
        policy, history = train_grpo(trainable(run.sft), run.ref, score_fn, *rest)
    result.update(kl_target=cfg.kl_target if cfg.kl_controller == "adaptive" else None,
                  beta_final=history[-1]["beta"], seconds=time.time() - t0, history=history)
    return policy, result


def dpo_stage(run, name, cfg):
    """DPO on the reward model's training pairs, or online DPO on the
    policy's own fresh pairs, against the same reference."""
    result = {}
    keep = lambda m: evaluate(run, m, result)
    if name == "dpo_online":
        policy, history = train_online_dpo(trainable(run.sft), run.ref, run.enc,
                                           run.data["train_prompts"], judge(run), cfg,
                                           run.device, run.dtype, run.log, keep)
        result.update({k: history[k] for k in ("skipped_share", "judge_calls", "n_pairs")})
    else:
        train_pairs, val_pairs = reward.split_pairs(run.pairs, run.rcfg.val_fraction)
        policy, history = train_dpo(trainable(run.sft), run.ref, run.enc, train_pairs, cfg,
                                    run.device, run.dtype, run.log, keep, val_pairs)
    result.update(implicit_accuracy=history["implicit_accuracy"], beta=cfg.beta,
                  sft_coef=cfg.sft_coef, seconds=history["seconds"], history=history["records"])
    return policy, result


def judge(run):
    """Online DPO's judge: the reward model PPO maximises, or the annotators."""
    if run.args.judge == "model":
        return reward_model_judge(run.rm, tok.pad_id(run.enc))
    rng = random.Random(run.args.seed + dist.rank())
    return reward.annotator_judge(rng, run.rcfg, run.args.data and run.gold_fn)


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # a loss went NaN/inf: stop, keep finished stages
        fail(f"{e}; finished stages are kept")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: finished stages are saved; the same command resumes "
                 "from there" if dist.is_main() else 130)
    except Exception as e:  # under torchrun: one line naming the rank, not N tracebacks
        if dist.world_size() == 1:
            raise
        dist.exit_naming_rank(e, HERE)
