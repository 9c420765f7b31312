"""
Generate from any checkpoint of a run, and judge each completion.

    python sample.py                                   # out/ppo.pt (or the latest stage there)
    python sample.py --ckpt out/sft.pt --prompt "the plot was" --prompt "i watched" -n 3
    python sample.py --ckpt out/dpo.pt --temperature 0.7
    python sample.py --ckpt out/ppo_beta0.pt --kl     # where the KL is: log pi - log pi_ref per token

Each completion is printed with its gold reward and whether it is a valid sentence of the
world's language (and the reward model's opinion, when the run has one). The tokenizer is the
run's (tokenizer.json beside the checkpoint); the default prompts are the run's first eval prompts.
With --kl each answer's tokens are printed with log pi(token) - log pi_ref(token), the reference being
the run's SFT model (sft.pt beside the checkpoint), at temperature 1 as in training; their sum is the
k1 estimate of the answer's KL(pi || pi_ref), the quantity the leash prices.
"""
import argparse
import json
import os
import sys

import torch

import tokenizer as tok
import userdata
import world
from model import autocast, load_checkpoint, pick_device
from reference import response_mask, token_logprobs

STAGES = ("ppo.pt", "dpo.pt", "sft.pt", "pretrain.pt")


def run_config(folder):
    """The run's config (stages/tokenizer.json), or {} if the folder has none."""
    try:
        with open(os.path.join(folder, "stages", "tokenizer.json")) as f:
            return json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return {}


def default_prompts(cfg, k=4):
    """The run's first k eval prompts, rebuilt as train.py built them (from its text file with
    --data, else its world); without a run config, the default world's."""
    if cfg.get("data"):
        data = userdata.build_datasets(cfg["data"], cfg["seed"], n_eval_prompts=cfg["eval_prompts"])
    elif cfg:
        data = world.build_datasets(world.WorldConfig(cfg["seed"], cfg["n_pretrain"], cfg["n_sft"],
                                                      n_eval_prompts=cfg["eval_prompts"]))
    else:
        data = world.build_datasets(world.WorldConfig(n_pretrain=10, n_sft=10))
    return data["eval_prompts"][:k]


@torch.no_grad()
def token_kl_lines(policy, ref, enc, tokens, prompt_len):
    """For each answer in tokens (B, T): one line of its tokens, each followed by [log pi - log pi_ref]
    in nats, and their sum (k1 of the answer's KL)."""
    pad, eos = tok.pad_id(enc), tok.eos_id(enc)
    log_ratio = token_logprobs(policy, tokens, pad) - token_logprobs(ref, tokens, pad)
    mask = response_mask(tokens, prompt_len, pad)
    lines = []
    for row, ratios, m in zip(tokens, log_ratio, mask):
        cols = m.nonzero().flatten().tolist()
        words = [("<EOS>" if row[c + 1] == eos else enc.decode([row[c + 1].item()])) for c in cols]
        pieces = [f"{w.strip() or repr(w)}[{ratios[c].item():+.2f}]" for w, c in zip(words, cols)]
        lines.append(" ".join(pieces) + f"  = {sum(ratios[c].item() for c in cols):+.2f} nats")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="sample from a leash checkpoint")
    p.add_argument("--out", default="out", help="the run's output folder")
    p.add_argument("--ckpt", default=None, help="checkpoint file (default: the latest stage in --out)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: eval prompts)")
    p.add_argument("-n", type=int, default=2, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (1 = the policy as trained)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="where to run")
    p.add_argument("--kl", action="store_true",
                   help="print each answer token's log pi - log pi_ref against the run's sft.pt")
    args = p.parse_args(argv)
    if args.temperature <= 0:
        sys.exit("error: --temperature must be > 0")
    device = pick_device(args.device)
    ckpt = args.ckpt or next((os.path.join(args.out, s) for s in STAGES
                              if os.path.exists(os.path.join(args.out, s))), None)
    if ckpt is None:
        sys.exit(f"error: no checkpoint in {args.out}/ (run `python train.py --out {args.out}` first)")
    folder = os.path.dirname(ckpt) or "."
    try:
        model = load_checkpoint(ckpt, device)[0]
        enc = tok.load_tokenizer(os.path.join(folder, "tokenizer.json"))
    except ValueError as e:
        sys.exit(f"error: {e}")
    cfg = run_config(folder)
    user_text = bool(cfg.get("data"))  # a user's text: its own gold reward, no validity
    gold_fn, valid_fn = (userdata.gold_reward, None) if user_text else (world.gold_reward, world.is_valid)
    prompts = args.prompt or default_prompts(cfg)
    pad, eos = tok.pad_id(enc), tok.eos_id(enc)
    batch = [q for q in prompts for _ in range(args.n)]
    ids = tok.left_pad([tok.encode(enc, q) for q in batch], pad).to(device)
    max_new = model.cfg.block_size - ids.shape[1]
    if max_new < 1:
        sys.exit(f"error: a prompt is longer than the model's block size ({model.cfg.block_size} tokens)")
    gen = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad(), autocast(device, cfg.get("dtype", "fp32"), sampling=True):
        tokens, _ = model.generate(ids, max_new, eos, pad, args.temperature, generator=gen)
    answers, ended = tok.decode_responses(enc, tokens, ids.shape[1])
    texts = [q + a for q, a in zip(batch, answers)]
    scores = [None] * len(texts)
    rm_path = os.path.join(folder, "reward_model.pt")
    if os.path.exists(rm_path):
        import reward
        scores = reward.score_texts(load_checkpoint(rm_path, device)[0], enc, texts)
    print(f"{ckpt}: {len(texts)} samples at temperature {args.temperature}\n")
    for text, e, s in zip(texts, ended, scores):
        judged = f"gold {gold_fn(text):+.2f}"
        judged += f"  valid {'yes' if valid_fn(text) else 'no '}" if valid_fn else ""
        judged += f"  proxy {s:+.2f}" if s is not None else ""
        print(f"[{judged}{'' if e else '  no EOS'}]  {text}")
    if args.kl:
        ref_path = os.path.join(folder, "sft.pt")
        if not os.path.exists(ref_path):
            sys.exit(f"error: --kl needs the reference, {ref_path}")
        ref = load_checkpoint(ref_path, device)[0]
        print("\nwhere the KL is, log pi - log pi_ref per answer token (nats):\n")
        for text, line in zip(texts, token_kl_lines(model, ref, enc, tokens, ids.shape[1])):
            print(f"{text}\n    {line}")


if __name__ == "__main__":
    main()
