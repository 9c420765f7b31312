"""
The whole leash pipeline, top to bottom:

    world -> tokenizer -> pretrain -> SFT -> freeze reference -> reward model -> PPO / DPO
          -> evaluation on fixed held-out prompts -> summary.json, metrics.jsonl, samples.md, plots

    python train.py                      # everything, preset picked for this machine
    python train.py --preset tiny --out out-tiny   # the same, small (about 2 minutes on a CPU)

Every finished stage leaves a checkpoint in --out; a re-run with the same --out and
config reuses it and says so.
"""
import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import tokenizer as tok
import userdata
import world
from dpo import DPOConfig, train_dpo
from evaluate import evaluate_policy
from model import GPT, GPTConfig
from ppo import PPOConfig, train_ppo
from reference import freeze
from report import Logger, comparison_table, fmt, plot_ppo, plot_reward_model, write_samples
from reward import (RewardConfig, accuracy_by_kind, blind_spot_report, load_scalar_model,
                    make_preferences, proxy_reward_fn, proxy_vs_gold, save_scalar_model, split_pairs,
                    train_reward_model)
from sft import TrainConfig, matmul_peak_flops, encode_pairs, encode_stream, load_checkpoint, rows_batch, \
    save_checkpoint, stream_batch, train_lm

# Presets: model size, data sizes, step counts and per-stage budgets that fit a device.
# "cpu" is the default on a laptop / 2-core machine, "tiny" is for smoke tests and CI,
# "gpu" is about nanoGPT's shakespeare-char size.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1024,
                 n_pretrain=4000, n_sft=2000, n_eval_prompts=128,
                 pretrain_steps=200, sft_steps=100, batch_size=32, lr=2e-3),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=1024,
                n_pretrain=20000, n_sft=8000, n_eval_prompts=256,
                pretrain_steps=1000, sft_steps=400, batch_size=32, lr=1e-3),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=1024,
                n_pretrain=100000, n_sft=20000, n_eval_prompts=512,
                pretrain_steps=3000, sft_steps=1000, batch_size=128, lr=6e-4),
}
# The RLHF stages' configs (RewardConfig, PPOConfig, DPOConfig) default to the cpu preset;
# these are the changes other presets make to them.
STAGE_OVERRIDES = {
    "tiny": dict(reward=dict(n_prompts=200, world_groups=300, steps=100),
                 ppo=dict(updates=8, rollouts=32, eval_every=4), dpo=dict(max_steps=40, batch_size=16)),
    "cpu": dict(reward={}, ppo={}, dpo={}),
    "gpu": dict(reward=dict(n_prompts=2000, steps=500), ppo=dict(updates=150, rollouts=256, minibatch_size=64),
                dpo=dict(max_steps=300, batch_size=64)),
}


@dataclass
class Args:
    preset: str = field(default="auto", metadata={"help": "tiny | cpu | gpu | auto (gpu on cuda, else cpu)"})
    out: str = field(default="out", metadata={"help": "output folder: checkpoints, metrics, summary, plots"})
    algo: str = field(default="both", metadata={"help": "ppo | dpo | both: which RLHF stage(s) to run"})
    beta: float = field(default=None, metadata={"help": "PPO KL coefficient, held fixed (default: adaptive controller)"})
    kl_target: float = field(default=None, metadata={"help": "adaptive controller's target KL, nats per sequence (default: PPOConfig's)"})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k2 | k3 | full: per-token KL in PPO's reward"})
    dpo_beta: float = field(default=None, metadata={"help": "DPO's beta, strength of its implicit KL penalty (default: DPOConfig's)"})
    dpo_sft_coef: float = field(default=None, metadata={"help": "weight of DPO's NLL term on chosen answers: 0 = plain DPO (default: DPOConfig's 1, RPO)"})
    no_kl_baseline: bool = field(default=False, metadata={"help": "also run PPO with beta = 0 (reward hacking)"})
    data: str = field(default=None, metadata={"help": "train on this text file instead of the toy world"})
    seed: int = field(default=1337, metadata={"help": "random seed (world, init, sampling)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 (autocast; log-probs and KL stay fp32)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model for pretraining and SFT (pays on CUDA)"})
    n_layer: int = field(default=None, metadata={"help": "transformer layers (default: preset)"})
    n_head: int = field(default=None, metadata={"help": "attention heads (default: preset)"})
    n_embd: int = field(default=None, metadata={"help": "model width (default: preset)"})
    block_size: int = field(default=None, metadata={"help": "longest prompt + response in tokens (default: preset)"})
    vocab_size: int = field(default=None, metadata={"help": "BPE vocabulary incl. EOS and PAD (default: preset)"})
    pretrain_steps: int = field(default=None, metadata={"help": "pretraining steps (default: preset)"})
    sft_steps: int = field(default=None, metadata={"help": "SFT steps (default: preset)"})
    rm_steps: int = field(default=None, metadata={"help": "reward-model steps (default: preset)"})
    ppo_updates: int = field(default=None, metadata={"help": "PPO updates (default: preset)"})
    dpo_steps: int = field(default=None, metadata={"help": "DPO steps at most (default: preset)"})


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage first
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    parser = OneLineParser(description="leash: KL-penalised RLHF from scratch")
    for f in fields(Args):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(name, action="store_true", help=f.metadata["help"])
        else:
            shown = "" if f.default is None else f" [{f.default}]"
            parser.add_argument(name, type=f.type, default=f.default, help=f.metadata["help"] + shown)
    args = Args(**vars(parser.parse_args(argv)))
    if args.algo not in ("ppo", "dpo", "both"):
        fail(f"--algo {args.algo}: unknown (choose ppo, dpo or both)")
    if args.kl_estimator not in ("k1", "k2", "k3", "full"):
        fail(f"--kl-estimator {args.kl_estimator}: unknown (choose k1, k2, k3 or full)")
    for name in ("beta", "kl_target", "dpo_beta", "dpo_sft_coef"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and v < float("inf")):
            fail(f"--{name.replace('_', '-')} {v}: must be a finite number >= 0")
    if args.dpo_beta == 0:
        fail("--dpo-beta 0: DPO needs beta > 0 (it divides the reward by beta)")
    for f in fields(Args):
        v = getattr(args, f.name)
        if f.type is int and v is not None and f.name != "seed" and v <= 0:
            fail(f"--{f.name.replace('_', '-')} {v}: must be a positive integer")
    return args


def fail(msg):
    """Bad input: one line naming the problem, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps: no MPS device is available")
    if name not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: unknown (choose auto, cpu, cuda or mps)")
    return name


def cpu_has_bf16_matmul():
    """True if this CPU multiplies bf16 matrices natively (Linux flags amx_bf16 or avx512_bf16:
    Intel Sapphire Rapids, AMD Zen 4 and later). bench.py measured such a CPU here: a bf16
    matmul 4x as fast as fp32. Without the instructions bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def pick_dtype(name, device):
    """auto: bf16 autocast where the hardware makes it pay (CUDA with bf16, a CPU with bf16
    matrix instructions), else fp32. Log-probs, ratios, KL and losses are fp32 either way."""
    if name == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device == "cpu" and cpu_has_bf16_matmul() else "fp32"
    if name not in ("fp32", "bf16"):
        fail(f"--dtype {name}: unknown (choose auto, fp32 or bf16)")
    return name


def write_json(path, obj):
    """Atomic JSON write: temporary file, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def stage_done(path, config):
    """A finished stage is a checkpoint whose recorded config matches this run's."""
    if not os.path.exists(path):
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"note: {path} is unreadable; redoing that stage")
        return False
    return state.get("meta", {}).get("run_config") == config


def rlhf_stage(name, path, run_config, train_fn, device):
    """Reuse a finished stage (its checkpoint and result), or run train_fn() -> (policy,
    result) and save both atomically."""
    if stage_done(path, run_config):
        print(f"{name}: reusing {path}")
        return load_checkpoint(path, device)[0], load_meta(path)["result"]
    policy, result = train_fn()
    save_checkpoint(path, policy, {"run_config": run_config, "result": result})
    return policy, result


def trainable_copy(model):
    policy = copy.deepcopy(model)
    for p in policy.parameters():
        p.requires_grad_(True)
    return policy


def load_meta(path):
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    preset_name = args.preset if args.preset != "auto" else ("gpu" if device == "cuda" else "cpu")
    if preset_name not in PRESETS:
        fail(f"--preset {args.preset}: unknown (choose {', '.join(PRESETS)} or auto)")
    P = dict(PRESETS[preset_name])
    for k in P:
        if getattr(args, k, None) is not None:
            P[k] = getattr(args, k)
    dtype = pick_dtype(args.dtype, device)
    # ---- the data: the toy world, or a user's text file (checked before any work)
    if args.data:
        try:
            data = userdata.build_datasets(args.data, args.seed, n_eval_prompts=P["n_eval_prompts"])
        except ValueError as e:
            fail(str(e))
        gold_fn, valid_fn = userdata.gold_reward, None
    else:
        data = world.build_datasets(world.WorldConfig(seed=args.seed, n_pretrain=P["n_pretrain"],
                                                      n_sft=P["n_sft"], n_eval_prompts=P["n_eval_prompts"]))
        gold_fn, valid_fn = world.gold_reward, world.is_valid
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(os.path.join(args.out, "plots"), exist_ok=True)
    peak = matmul_peak_flops(device, dtype)
    print(f"leash: device {device}, dtype {dtype}, preset {preset_name}, out {args.out} "
          f"(measured matmul peak {peak / 1e9:.0f} GFLOP/s, the MFU denominator)")
    torch.manual_seed(args.seed)
    log = Logger(args.out)
    t_start = time.time()
    base_config = {"preset": preset_name, "seed": args.seed, "data": args.data, "dtype": dtype, **P}
    summary = {"config": {**base_config, **{k: getattr(args, k) for k in
                          ("algo", "beta", "kl_target", "kl_estimator", "dpo_beta", "dpo_sft_coef")}},
               "device": device, "dtype": dtype}
    log.start(summary["config"])

    # ---- the tokenizer, trained on the pretraining text
    tok_path = os.path.join(args.out, "tokenizer.json")
    enc = None
    if os.path.exists(tok_path) and os.path.exists(os.path.join(args.out, "pretrain.pt")) \
            and stage_done(os.path.join(args.out, "pretrain.pt"), base_config):
        enc = tok.load_tokenizer(tok_path)
    if enc is None:
        enc = tok.train_tokenizer(data["pretrain"], P["vocab_size"])
        tok.save_tokenizer(enc, tok_path)
    mcfg = GPTConfig(block_size=P["block_size"], vocab_size=tok.padded_vocab_size(enc),
                     n_layer=P["n_layer"], n_head=P["n_head"], n_embd=P["n_embd"],
                     n_out=tok.pad_id(enc))  # PAD is the last id: never an output
    longest_prompt = max(len(tok.encode(enc, p)) for p in data["eval_prompts"] + data["train_prompts"])
    max_new = P["block_size"] - longest_prompt
    if max_new < 8:
        fail(f"block size {P['block_size']} leaves {max_new} tokens for an answer; raise --block-size")

    # ---- pretraining: next-token prediction on the corpus
    pre_path = os.path.join(args.out, "pretrain.pt")
    if stage_done(pre_path, base_config):
        print(f"pretrain: reusing {pre_path}")
        model, _ = load_checkpoint(pre_path, device)
    else:
        model = GPT(mcfg).to(device)
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters")
        stream = encode_stream(enc, data["pretrain"])
        if len(stream) < 20 * P["block_size"]:
            fail(f"the text is too short: {len(stream)} tokens for block size {P['block_size']}")
        n_val = len(stream) // 10
        train_stream, val_stream = stream[:-n_val], stream[-n_val:]
        gen = torch.Generator().manual_seed(args.seed)
        B, T = P["batch_size"], P["block_size"]
        tcfg = TrainConfig(steps=P["pretrain_steps"], batch_size=B, lr=P["lr"])
        vl = train_lm(model, lambda: stream_batch(train_stream, B, T, gen),
                      lambda: stream_batch(val_stream, B, T, gen), tcfg, device, dtype, "pretrain", log, peak, args.compile)
        save_checkpoint(pre_path, model, {"run_config": base_config, "val_loss": vl})

    # ---- SFT: prompt -> completion + EOS, loss on the completion only
    sft_path = os.path.join(args.out, "sft.pt")
    if stage_done(sft_path, base_config):
        print(f"sft: reusing {sft_path}")
        model, _ = load_checkpoint(sft_path, device)
        sft_val = load_meta(sft_path)["val_loss"]
    else:
        tokens, mask, dropped = encode_pairs(enc, data["sft"], P["block_size"])
        n_val = len(tokens) // 10
        gen = torch.Generator().manual_seed(args.seed + 1)
        B = P["batch_size"]
        tcfg = TrainConfig(steps=P["sft_steps"], batch_size=B, lr=P["lr"] / 2, warmup=20)
        sft_val = train_lm(model, lambda: rows_batch(tokens[n_val:], mask[n_val:], B, gen),
                           lambda: rows_batch(tokens[:n_val], mask[:n_val], B, gen), tcfg, device, dtype, "sft", log, peak, args.compile)
        save_checkpoint(sft_path, model, {"run_config": base_config, "val_loss": sft_val})
    sft_model = model

    # ---- the reference: the SFT policy, frozen. Every KL below is measured against it.
    ref = freeze(sft_model)

    # ---- the reward model, trained on annotator preferences between SFT samples
    over = STAGE_OVERRIDES[preset_name]
    rcfg = replace(RewardConfig(), **over["reward"], **({"steps": args.rm_steps} if args.rm_steps else {}))
    rm_path, pairs_path = os.path.join(args.out, "reward_model.pt"), os.path.join(args.out, "preferences.json")
    rm_config = {**base_config, "reward": asdict(rcfg)}
    if os.path.exists(pairs_path) and os.path.exists(rm_path) and load_json(pairs_path).get("run_config") == rm_config:
        print(f"reward_model: reusing {rm_path}")
        rm = load_scalar_model(rm_path, device)
        saved = load_json(pairs_path)
        pairs, rm_metrics = saved["pairs"], saved["metrics"]
    else:
        t0 = time.time()
        pairs = make_preferences(sft_model, enc, data["train_prompts"], rcfg, device, args.seed,
                                 gold_fn if args.data else None)
        rm, rm_metrics = train_reward_model(sft_model, enc, pairs, rcfg, device, dtype, log)
        rm_metrics["seconds"] = time.time() - t0
        save_scalar_model(rm_path, rm)
        write_json(pairs_path, {"run_config": rm_config, "metrics": rm_metrics, "pairs": pairs})
    proxy_fn = proxy_reward_fn(rm, enc, device)
    train_pairs, val_pairs = split_pairs(pairs, rcfg.val_fraction)

    def eval_fn(policy):
        return evaluate_policy(policy, enc, data["eval_prompts"], max_new, device, ref=ref, reward_fn=proxy_fn,
                               gold_fn=gold_fn, valid_fn=valid_fn)[0]

    # ---- SFT's figures on the fixed evaluation prompts, and the reward model's report
    metrics, sft_samples = evaluate_policy(sft_model, enc, data["eval_prompts"], max_new, device, ref=ref,
                                           reward_fn=proxy_fn, gold_fn=gold_fn, valid_fn=valid_fn)
    refs = data["eval_references"]
    summary["sft"] = {"val_loss": sft_val, **metrics}
    summary["world_reference"] = {"gold_reward": sum(map(gold_fn, refs)) / len(refs),
                                  "distinct_2": world.distinct_n(refs, 2)}
    pg = proxy_vs_gold(rm, enc, device, sft_samples) if not args.data else None
    spot = blind_spot_report(rm, enc, device, data["pretrain"] + sft_samples) if not args.data else []
    summary["reward_model"] = {**rm_metrics, "spearman_proxy_gold": pg["spearman"] if pg else None,
                               "val_accuracy_by_kind": accuracy_by_kind(rm, enc, device, val_pairs)
                               if not args.data else None, "blind_spot": spot}
    if pg and spot:
        plot_reward_model(pg, spot, os.path.join(args.out, "plots", "reward_model.png"))
    print(f"sft: valid {fmt(metrics['valid_rate'])}  gold {metrics['gold_reward']:.3f}  "
          f"distinct-2 {metrics['distinct_2']:.3f}  (the world's own reviews: gold "
          f"{summary['world_reference']['gold_reward']:.3f}, distinct-2 {summary['world_reference']['distinct_2']:.3f})")
    print(f"reward_model: val accuracy {rm_metrics['val_accuracy']:.3f} (gold-label ceiling "
          f"{rm_metrics['gold_label_accuracy']:.3f})" + (f", proxy-gold Spearman {pg['spearman']:.3f}" if pg else ""))
    for kind, a in (summary["reward_model"]["val_accuracy_by_kind"] or {}).items():
        print(f"  {kind} pairs ({a['n']}): {a['accuracy']:.3f} (ceiling {a['gold_label_accuracy']:.3f})")
    columns = {"SFT": sft_samples}
    write_json(os.path.join(args.out, "summary.json"), summary)

    # ---- PPO on per-token KL-shaped rewards (and, when asked, with no KL at all)
    ppo_runs = []
    if args.algo in ("ppo", "both"):
        ppo_runs.append(("ppo", args.beta))
    if args.no_kl_baseline:
        ppo_runs.append(("ppo_beta0", 0.0))
    for name, beta in ppo_runs:
        pcfg = replace(PPOConfig(), **over["ppo"], kl_estimator=args.kl_estimator, seed=args.seed)
        if args.ppo_updates:
            pcfg = replace(pcfg, updates=args.ppo_updates, eval_every=max(1, args.ppo_updates // 4))
        if args.kl_target is not None:
            pcfg = replace(pcfg, kl_target=args.kl_target)
        if beta is not None:
            pcfg = replace(pcfg, kl_controller="fixed", init_beta=beta)
        run_config = {**rm_config, name: asdict(pcfg)}

        def run_ppo(pcfg=pcfg, name=name, beta=beta):
            t0 = time.time()
            policy, history = train_ppo(trainable_copy(sft_model), ref, rm, enc, data["train_prompts"], pcfg,
                                        device, dtype, lambda r: log({**r, "stage": name}), eval_fn, gold_fn, valid_fn)
            return policy, {**eval_fn(policy), "kl_target": None if beta is not None else pcfg.kl_target,
                            "beta_final": history[-1]["beta"], "seconds": time.time() - t0,
                            "history": [{k: h[k] for k in ("step", "kl", "kl_exact", "beta", "proxy_reward",
                                                            "gold_reward", "valid_rate")} for h in history]}
        policy, result = rlhf_stage(name, os.path.join(args.out, f"{name}.pt"), run_config, run_ppo, device)
        summary[name] = {k: v for k, v in result.items() if k != "history"}
        plot_ppo(result["history"], os.path.join(args.out, "plots", f"{name}.png"), name)
        columns["PPO" if name == "ppo" else "PPO, beta=0"] = evaluate_policy(
            policy, enc, data["eval_prompts"], max_new, device, gold_fn=gold_fn, valid_fn=valid_fn)[1]
        write_json(os.path.join(args.out, "summary.json"), summary)

    # ---- DPO on the same preference pairs, against the same reference
    if args.algo in ("dpo", "both"):
        dcfg = replace(DPOConfig(), **over["dpo"], seed=args.seed)
        if args.dpo_beta is not None:
            dcfg = replace(dcfg, beta=args.dpo_beta)
        if args.dpo_sft_coef is not None:
            dcfg = replace(dcfg, sft_coef=args.dpo_sft_coef)
        if args.dpo_steps:
            dcfg = replace(dcfg, max_steps=args.dpo_steps)
        run_config = {**rm_config, "dpo": asdict(dcfg)}

        def run_dpo():
            t0 = time.time()
            policy, history = train_dpo(trainable_copy(sft_model), ref, enc, train_pairs, dcfg, device, dtype,
                                        log, eval_fn, val_pairs)
            return policy, {**history["eval"], "implicit_accuracy": history["implicit_accuracy"],
                            "beta": dcfg.beta, "sft_coef": dcfg.sft_coef, "seconds": time.time() - t0}
        policy, result = rlhf_stage("dpo", os.path.join(args.out, "dpo.pt"), run_config, run_dpo, device)
        summary["dpo"] = result
        columns["DPO"] = evaluate_policy(policy, enc, data["eval_prompts"], max_new, device,
                                         gold_fn=gold_fn, valid_fn=valid_fn)[1]

    # ---- the results: samples side by side, a comparison table, summary.json
    summary["seconds"] = time.time() - t_start
    write_json(os.path.join(args.out, "summary.json"), summary)
    write_samples(os.path.join(args.out, "samples.md"), data["eval_prompts"], columns, gold_fn, valid_fn)
    print()
    print(comparison_table(summary))
    print(f"\ndone in {summary['seconds']:.0f}s; results in {args.out}/ (summary.json, samples.md, plots/)")
    return summary


def load_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # a loss went NaN/inf: stop, keep every finished stage
        fail(f"{e}; finished stages are kept in their checkpoints")
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are saved; the same command resumes from there", file=sys.stderr)
        sys.exit(130)
