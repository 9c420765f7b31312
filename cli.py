"""
Every knob of `python train.py` in one place: the presets, each stage's
changes per preset, the flags (checked: bad input stops with one line),
and `stage_configs`, which turns them into every stage's config.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field, fields, replace

from dpo import DPOConfig
from grpo import VARIANTS, GRPOConfig
from ppo import PPOConfig
from reward import RewardConfig
from sft import TrainConfig

# Model, data and steps per preset: "cpu" fits a laptop or 2 cores (the
# default without CUDA), "class" the same in a third of the time (for
# coursework), "tiny" is CI's smoke test, "gpu" is about nanoGPT's
# shakespeare-char size.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1024,
                 n_pretrain=4000, n_sft=2000, eval_prompts=128,
                 pretrain_steps=200, sft_steps=100, batch_size=32, lr=2e-3),
    "class": dict(n_layer=3, n_head=4, n_embd=96, block_size=64, vocab_size=1024,
                  n_pretrain=20000, n_sft=8000, eval_prompts=128,
                  pretrain_steps=700, sft_steps=300, batch_size=32, lr=1e-3),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=1024,
                n_pretrain=20000, n_sft=8000, eval_prompts=256,
                pretrain_steps=1000, sft_steps=400, batch_size=32, lr=1e-3),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=1024,
                n_pretrain=100000, n_sft=20000, eval_prompts=512,
                pretrain_steps=3000, sft_steps=1000, batch_size=128, lr=6e-4),
}

# Each stage's config changes per preset; the config classes' defaults
# are the cpu preset's.
STAGES = {
    "tiny": dict(reward=dict(n_prompts=200, world_groups=300, steps=100),
                 ppo=dict(updates=8, rollouts=32, eval_every=4),
                 grpo=dict(updates=8, rollouts=32, eval_every=4),
                 dpo=dict(steps=40, batch_size=16),
                 dpo_online=dict(steps=8, batch_size=16)),
    "class": dict(reward=dict(n_prompts=800, world_groups=1500, steps=400),
                  ppo=dict(updates=50, rollouts=48, lr=5e-5, kl_horizon=128, eval_every=25),
                  grpo=dict(updates=50, rollouts=48, lr=5e-5, kl_horizon=128, eval_every=25),
                  dpo=dict(steps=30), dpo_online=dict(steps=16)),
    "cpu": dict(reward={}, ppo={}, grpo={}, dpo={}, dpo_online=dict(steps=80)),
    "gpu": dict(reward=dict(n_prompts=2000, steps=500),
                ppo=dict(updates=150, rollouts=256, minibatch_size=64),
                grpo=dict(updates=150, rollouts=256, minibatch_size=64),
                dpo=dict(steps=300, batch_size=64),
                dpo_online=dict(steps=150, batch_size=128)),
}

ALGOS = {"ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "dpo-online": "online DPO"}  # --algo


def flag(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    """Every flag with its line of --help (None: the preset's value)."""
    preset: str = flag("auto", "model, data, steps (auto: gpu if CUDA)", (*PRESETS, "auto"))
    out: str = flag("out", "output folder: checkpoints, metrics, summary, plots")
    algo: str = flag("all", "ppo, grpo, dpo, dpo-online, a comma list, both (ppo,dpo) or all")
    from_: str = flag(None, "a finished run's folder: its stages with this run's config are reused")
    beta: float = flag(None, "PPO's and GRPO's KL coefficient, fixed (default: adaptive)")
    kl_target: float = flag(None, "the adaptive controller's KL target, nats per answer")
    reward: str = flag("model", "PPO's and GRPO's reward: the learned reward model; the "
                       "world's exact gold reward; or 1 if the answer is a valid review with "
                       "gold > 0, else 0", ("model", "gold", "verifiable"))
    grpo_variant: str = flag("grpo", "the GRPO family's member (grpo.py's table)",
                             (*VARIANTS,))
    ptx_coef: float = flag(None, "PPO-ptx: pretraining NLL mixed into PPO's and GRPO's loss")
    kl_in: str = flag(None, "GRPO's KL: k3 in the loss or k1 in the reward "
                      "(default: the variant's)", ("loss", "reward"))
    kl_estimator: str = flag("k1", "PPO's per-token KL in the reward (kl.py's table)",
                             ("k1", "k2", "k3", "full"))
    kl_loss_estimator: str = flag("k3", "GRPO's KL term in the loss (grpo_loss)",
                                  ("k3", "k1", "k2", "k3+", "k3_ratio"))
    skip_beta0: bool = flag(False, "skip PPO with beta = 0 (the reward-hacking run)")
    dpo_beta: float = flag(None, "DPO's beta, the strength of its implicit KL penalty")
    dpo_sft_coef: float = flag(None, "DPO's NLL term on chosen answers (0: plain DPO)")
    judge: str = flag("model", "online DPO's judge", ("model", "annotators"))
    annotator_bias: float = flag(None, "the annotators' taste for '!' (0: no blind spot)")
    data: str = flag(None, "train on this text file instead of the toy world")
    seed: int = flag(1337, "random seed (world, init, sampling)")
    device: str = flag("auto", "where to run", ("auto", "cpu", "cuda", "mps"))
    dtype: str = flag("auto", "bf16 autocast (log-probs, KL stay fp32)", ("auto", "fp32", "bf16"))
    compile: bool = flag(False, "torch.compile pretraining and SFT (pays on CUDA)")
    n_layer: int = flag(None, "transformer layers")
    n_head: int = flag(None, "attention heads")
    n_embd: int = flag(None, "model width")
    block_size: int = flag(None, "longest prompt + answer, in tokens")
    vocab_size: int = flag(None, "BPE vocabulary, EOS and PAD included")
    eval_prompts: int = flag(None, "held-out prompts every policy is judged on")
    pretrain_steps: int = flag(None, "pretraining steps")
    sft_steps: int = flag(None, "SFT steps")
    rm_prompts: int = flag(None, "prompts the SFT policy answers for the reward model")
    rm_steps: int = flag(None, "reward-model steps")
    rl_updates: int = flag(None, "PPO and GRPO updates")
    dpo_steps: int = flag(None, "DPO steps at most (online DPO: its steps)")


def fail(msg):
    """Bad input: one line naming the problem, exit code 2, no traceback.
    Under torchrun every rank has the same input: rank 0 says why."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(args):
    """Stop with one line naming a bad value."""
    for f in fields(Args):
        value, choices = getattr(args, f.name), f.metadata["choices"]
        name = "--" + f.name.strip("_").replace("_", "-")
        if value is None:
            continue
        if choices and value not in choices:
            fail(f"{name} {value}: unknown (choose {', '.join(choices)})")
        if f.type is float and not 0 <= value < float("inf"):
            fail(f"{name} {value}: must be a finite number >= 0")
        if f.type is int and f.name != "seed" and value <= 0:
            fail(f"{name} {value}: must be a positive integer")
    if args.dpo_beta == 0:
        fail("--dpo-beta 0: DPO needs beta > 0 (it divides the reward by beta)")
    if args.data and args.reward == "verifiable":
        fail("--reward verifiable checks reviews of the toy world: not with --data")
    if args.kl_target == 0:
        fail("--kl-target 0: the adaptive controller needs a target > 0 (it divides by it)")


def parse_args(argv=None):
    """The flags of Args, each one checked (`check`)."""
    parser = argparse.ArgumentParser(description="leash: KL-penalised RLHF from scratch")
    parser.error = lambda message: fail(f"{message} (see --help)")  # not a usage dump
    for f in fields(Args):
        choices = f.metadata["choices"]
        default = "" if f.default is None else f" [{f.default}]"
        help = (" | ".join(choices) + ": " if choices else "") + f.metadata["help"] + default
        if f.type is bool:
            kind = dict(action="store_true")
        else:
            kind = dict(type=f.type, default=f.default, metavar=f.name.strip("_").upper())
        name = "--" + f.name.strip("_").replace("_", "-")  # from_: --from
        parser.add_argument(name, dest=f.name, help=help, **kind)
    args = Args(**vars(parser.parse_args(argv)))
    check(args)

    lists = {"both": ["ppo", "dpo"], "all": list(ALGOS)}
    args.algos = lists.get(args.algo, args.algo.split(","))
    if unknown := [a for a in args.algos if a not in ALGOS]:
        fail(f"--algo {unknown[0]}: unknown (choose {', '.join(ALGOS)}, "
             "a comma list, both or all)")
    args.stages, args.labels = stages_and_labels(args)
    return args


def stages_and_labels(args):
    """The RLHF stages to run, in order (ppo_beta0: PPO with beta = 0),
    and each one's label in the table and plots."""
    with_ppo = "ppo" in args.algos
    stages = ["ppo"] * with_ppo + ["ppo_beta0"] * (with_ppo and not args.skip_beta0)
    stages += [a.replace("-", "_") for a in args.algos if a != "ppo"]
    labels = {a.replace("-", "_"): label for a, label in ALGOS.items()}
    labels["ppo_beta0"] = "PPO, beta=0"
    variant = [args.grpo_variant] * (args.grpo_variant != "grpo")
    variant += [f"KL in {args.kl_in}"] * bool(args.kl_in)
    variant += [f"{args.kl_loss_estimator} in the loss"] * (args.kl_loss_estimator != "k3")
    if variant:
        labels["grpo"] += f" ({', '.join(variant)})"
    return stages, labels


def settings(args, device):
    """(preset name, its model / data / steps with the flags given)."""
    preset = args.preset
    if preset == "auto":
        preset = "gpu" if device == "cuda" else "cpu"
    given = {k: getattr(args, k, None) for k in PRESETS[preset]}
    values = {k: v if given[k] is None else given[k] for k, v in PRESETS[preset].items()}
    return preset, values


def configure(config_class, changes, **flags):
    """A config: its defaults, then `changes`, then the flags given."""
    given = {k: v for k, v in flags.items() if v is not None}
    return config_class(**{**changes, **given})


def stage_configs(args, preset, P, budget):
    """Every stage's config from the preset P and the flags; budget: the
    run's fixed response budget in tokens (rollout.response_budget)."""
    stage = STAGES[preset]
    pretrain = TrainConfig(P["pretrain_steps"], P["batch_size"], P["lr"], warmup=50)
    sft = TrainConfig(P["sft_steps"], P["batch_size"], P["lr"] / 2, warmup=20)
    reward = configure(RewardConfig, stage["reward"], n_prompts=args.rm_prompts,
                       steps=args.rm_steps, annotator_bias=args.annotator_bias)

    # PPO and GRPO: the adaptive controller, or --beta held fixed
    rl = dict(seed=args.seed, updates=args.rl_updates, kl_target=args.kl_target,
              max_new_tokens=budget, ptx_coef=args.ptx_coef)
    if args.beta is not None:
        rl.update(kl_controller="fixed", beta=args.beta)
    ppo = configure(PPOConfig, stage["ppo"], kl_estimator=args.kl_estimator, **rl)
    ppo_beta0 = replace(ppo, kl_controller="fixed", beta=0.0)
    variant = {**stage["grpo"], **VARIANTS[args.grpo_variant]}
    grpo = configure(GRPOConfig, variant, kl_in=args.kl_in,
                     kl_loss_estimator=args.kl_loss_estimator, **rl)

    # DPO on the reward model's pairs (DPO + NLL by default); online DPO
    # runs plain DPO (docs/experiments.md, "Online against offline DPO")
    dpo = dict(seed=args.seed, beta=args.dpo_beta, steps=args.dpo_steps,
               max_new_tokens=budget)
    offline = configure(DPOConfig, stage["dpo"], sft_coef=args.dpo_sft_coef, **dpo)
    online_sft_coef = 0.0 if args.dpo_sft_coef is None else args.dpo_sft_coef
    online = configure(DPOConfig, stage["dpo_online"], sft_coef=online_sft_coef, **dpo)
    return dict(pretrain=pretrain, sft=sft, reward=reward, ppo=ppo, ppo_beta0=ppo_beta0,
                grpo=grpo, dpo=offline, dpo_online=online)
