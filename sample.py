"""
Generate from any checkpoint of a run, and judge each completion.

    python sample.py                                   # out/ppo.pt (or the latest stage there)
    python sample.py --ckpt out/sft.pt --prompt "the plot was" --prompt "i watched" -n 3
    python sample.py --ckpt out/dpo.pt --temperature 0.7

Each completion is printed with its gold reward and whether it is a valid sentence
of the world's language (and the reward model's opinion, when the run has one).
"""
import argparse
import os
import sys

import torch

import world
from evaluate import sample_batch
from sft import load_checkpoint

STAGES = ("ppo.pt", "dpo.pt", "sft.pt", "pretrain.pt")


def main(argv=None):
    p = argparse.ArgumentParser(description="sample from a leash checkpoint")
    p.add_argument("--out", default="out", help="the run's output folder")
    p.add_argument("--ckpt", default=None, help="checkpoint file (default: the latest stage in --out)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: eval prompts)")
    p.add_argument("-n", type=int, default=2, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1 = the policy as trained)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    args = p.parse_args(argv)
    if args.temperature <= 0:
        sys.exit("error: --temperature must be > 0")
    ckpt = args.ckpt or next((os.path.join(args.out, s) for s in STAGES
                              if os.path.exists(os.path.join(args.out, s))), None)
    if ckpt is None:
        sys.exit(f"error: no checkpoint in {args.out}/ (run `python train.py --out {args.out}` first)")
    try:
        model, enc = load_checkpoint(ckpt, args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    prompts = args.prompt or world.build_datasets(world.WorldConfig(n_pretrain=10, n_sft=10))["eval_prompts"][:4]
    proxy = None
    rm_path = os.path.join(os.path.dirname(ckpt) or ".", "reward_model.pt")
    if os.path.exists(rm_path):
        from reward import load_scalar_model, proxy_reward_fn
        proxy = proxy_reward_fn(load_scalar_model(rm_path, args.device), enc, args.device)
    torch.manual_seed(args.seed)
    max_new = model.cfg.block_size - max(len(enc.encode_ordinary(q)) for q in prompts)
    if max_new < 1:
        sys.exit(f"error: a prompt is longer than the model's block size ({model.cfg.block_size} tokens)")
    batch = [q for q in prompts for _ in range(args.n)]
    _, _, texts, ended = sample_batch(model, enc, batch, max_new, args.device, args.temperature)
    scores = proxy(texts) if proxy else [None] * len(texts)
    print(f"{ckpt}: {len(texts)} samples at temperature {args.temperature}\n")
    for text, e, s in zip(texts, ended, scores):
        judged = f"gold {world.gold_reward(text):+.2f}  valid {'yes' if world.is_valid(text) else 'no '}"
        judged += f"  proxy {s:+.2f}" if s is not None else ""
        print(f"[{judged}{'' if e else '  no EOS'}]  {text}")


if __name__ == "__main__":
    main()
