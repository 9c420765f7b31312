"""
Every knob of `python train.py`, in one place: the presets (model, data and steps by size), each stage's
preset changes, and the flags, each with its line of --help and a check that stops bad input with one line.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field, fields

from grpo import VARIANTS

# ----------------------------------------------------------------------------- defaults and presets
# Model, data and steps per preset: "cpu" fits a laptop or 2 cores (the default without CUDA), "tiny"
# is CI's smoke test, "gpu" is about nanoGPT's shakespeare-char size. The stages' configs
# (RewardConfig, PPOConfig, GRPOConfig, DPOConfig) default to the cpu preset; STAGE_OVERRIDES has the others.
# Online DPO runs plain DPO (sft_coef 0): see docs/experiments.md, "Online against offline DPO".
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
                 ppo=dict(updates=8, rollouts=32, eval_every=4), dpo=dict(max_steps=40, batch_size=16),
                 grpo=dict(updates=8, rollouts=32, eval_every=4),
                 dpo_online=dict(online_steps=8, batch_size=16, sft_coef=0.0)),
    "cpu": dict(reward={}, ppo={}, dpo={}, grpo={}, dpo_online=dict(sft_coef=0.0)),
    "gpu": dict(reward=dict(n_prompts=2000, steps=500), dpo=dict(max_steps=300, batch_size=64),
                ppo=dict(updates=150, rollouts=256, minibatch_size=64),
                grpo=dict(updates=150, rollouts=256, minibatch_size=64),
                dpo_online=dict(online_steps=150, batch_size=128, sft_coef=0.0)),
}
ALGOS = {"ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "dpo-online": "online DPO"}  # --algo: name -> label


def flag(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:  # every flag with its line of --help; None: the preset's (or the stage config's) value
    preset: str = flag("auto", "the size of everything (auto: gpu on CUDA, else cpu)", (*PRESETS, "auto"))
    out: str = flag("out", "output folder: checkpoints, metrics, summary, plots")
    algo: str = flag("both", f"RLHF stage(s): {', '.join(ALGOS)}, a comma list, both (ppo,dpo) or all")
    beta: float = flag(None, "PPO's and GRPO's KL coefficient, held fixed (default: the adaptive controller)")
    kl_target: float = flag(None, "the adaptive controller's KL target, nats per answer")
    reward: str = flag("model", "what PPO and GRPO maximise: the reward model, or the world's exact gold "
                       "reward (nothing to hack)", ("model", "gold"))
    grpo_variant: str = flag("grpo", "GRPO's advantage, aggregation and KL place (grpo.py)", (*VARIANTS,))
    kl_in: str = flag(None, "GRPO's KL: k3 in the loss or k1 in the reward (default: the variant's)",
                      ("loss", "reward"))
    kl_estimator: str = flag("k1", "PPO's per-token KL in the reward (full: exact, but a token gets "
                             "no gradient at its own position, see kl.py)", ("k1", "k2", "k3", "full"))
    no_kl_baseline: bool = flag(False, "also run PPO with beta = 0 (reward hacking)")
    dpo_beta: float = flag(None, "DPO's beta, the strength of its implicit KL penalty")
    dpo_sft_coef: float = flag(None, "weight of DPO's NLL term on chosen answers: 0 = plain DPO")
    judge: str = flag("model", "online DPO's judge: the reward model or the simulated annotators",
                      ("model", "annotators"))
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
    rl_updates: int = flag(None, "PPO and GRPO updates")
    dpo_steps: int = flag(None, "DPO steps at most (online DPO: its steps)")


def fail(msg):
    """Bad input: one line naming the problem, exit code 2, no traceback. Under torchrun every rank has the
    same input and stops: rank 0 alone says why."""
    if os.environ.get("RANK", "0") == "0":
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
        if choices and v is not None and v not in choices:
            fail(f"{name} {v}: unknown (choose {', '.join(choices)})")
        if f.type is float and v is not None and not 0 <= v < float("inf"):
            fail(f"{name} {v}: must be a finite number >= 0")
        if f.type is int and v is not None and f.name != "seed" and v <= 0:
            fail(f"{name} {v}: must be a positive integer")
    if args.dpo_beta == 0:
        fail("--dpo-beta 0: DPO needs beta > 0 (it divides the reward by beta)")
    if args.kl_target == 0:
        fail("--kl-target 0: the adaptive controller needs a target > 0 (it divides by it)")
    args.algos = {"both": ["ppo", "dpo"], "all": list(ALGOS)}.get(args.algo, args.algo.split(","))
    if unknown := [a for a in args.algos if a not in ALGOS]:
        fail(f"--algo {unknown[0]}: unknown (choose {', '.join(ALGOS)}, a comma list, both or all)")
    return args


def configure(config_class, preset_overrides, **flags):
    """A stage's config: its defaults, then the preset's changes, then the flags that were given."""
    return config_class(**{**preset_overrides, **{k: v for k, v in flags.items() if v is not None}})
