"""End to end: `python train.py --preset tiny` runs every stage, writes its outputs, is
deterministic on the CPU, and a re-run resumes: finished stages are reused, a corrupt or
missing one is redone, and the results come out the same. And the gpu preset runs at all."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import tokenizer as tok
from model import GPT, ScalarModel, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny preset with fewer steps: every stage still runs, the test takes a third of the time
SHORT = ["--pretrain-steps", "100", "--sft-steps", "50", "--rm-prompts", "100", "--rm-steps", "40",
         "--rl-updates", "4", "--dpo-steps", "20", "--eval-prompts", "64"]
STAGES = ("tokenizer", "pretrain", "sft", "reward_model", "ppo", "dpo")


def run(out, flags, preset="tiny"):
    """flags: more train.py arguments (--dtype comes from `pytest --dtype`; see conftest.py)."""
    r = subprocess.run([sys.executable, "train.py", "--preset", preset, "--device", "cpu", "--out", out, *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def figures(out):
    """Every policy's figures from summary.json (times left out: they vary run to run)."""
    s = json.load(open(os.path.join(out, "summary.json")))
    return {k: {m: v for m, v in s[k].items() if m != "seconds"} for k in ("sft", "reward_model", "ppo", "dpo")}


def test_tiny_pipeline_end_to_end_deterministic_and_resumable(tmp_path, dtype_flag):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = SHORT + dtype_flag
    out = run(a, flags)
    assert "reusing" not in out
    summary = json.load(open(os.path.join(a, "summary.json")))
    for key in ("val_loss", "valid_rate", "gold_reward", "distinct_2", "heldout_nll", "exclaim_share", "exclaims"):
        assert key in summary["sft"]
    # the default run: every method, and PPO without the leash beside PPO with it
    assert {"ppo", "ppo_beta0", "grpo", "dpo", "dpo_online"} <= set(summary)
    for name in ("ppo", "ppo_beta0", "grpo", "dpo", "dpo_online"):
        assert summary[name]["heldout_nll"] > 0 and 0 <= summary[name]["exclaim_share"] <= 1, name
    for key in ("val_accuracy", "gold_label_accuracy", "n_unended_answers"):
        assert key in summary["reward_model"]
    for key in ("gold_reward", "proxy_reward", "kl", "kl_target", "beta_final", "valid_rate", "distinct_2", "seconds"):
        assert key in summary["ppo"]
    for key in ("gold_reward", "proxy_reward", "kl", "valid_rate", "distinct_2", "implicit_accuracy", "seconds"):
        assert key in summary["dpo"]
    assert summary["ppo"]["kl"] > 0 and -1 <= summary["ppo"]["gold_reward"] <= 1
    records = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert {"pretrain", "sft", "reward_model", "ppo", "dpo"} <= {r["stage"] for r in records}
    assert [r["step"] for r in records if r["stage"] == "ppo"] == [0, 1, 2, 3]
    assert any("eval_gold_reward" in r for r in records if r["stage"] == "dpo")  # DPO's eval, prefixed
    for f in ("samples.md", "plots/ppo.png", "plots/ppo_beta0.png", "plots/hacking.png", "plots/grpo.png",
              "plots/dpo.png", "plots/dpo_online.png", "tokenizer.json",
              *(f"{name}.pt" for name in STAGES[1:])):
        assert os.path.exists(os.path.join(a, f)), f
    # every stage left a marker with its config and result; the reward model's config is there
    for name in STAGES:
        marker = json.load(open(os.path.join(a, "stages", f"{name}.json")))
        assert set(marker) == {"config", "result"}, name
    rm_config = json.load(open(os.path.join(a, "stages", "reward_model.json")))["config"]
    assert rm_config["seed"] == 1337
    assert rm_config["reward"]["n_prompts"] == 100 and rm_config["reward"]["steps"] == 40  # the flags
    # the preference pairs are kept with the reward model's result (DPO trains on them after a resume)
    pairs = json.load(open(os.path.join(a, "stages", "reward_model.json")))["result"]["pairs"]
    assert isinstance(pairs, list) and {"prompt", "chosen", "rejected", "source"} <= set(pairs[0])
    assert summary["reward_model"]["n_pairs"] == len(pairs) and "pairs" not in summary["reward_model"]
    # the checkpoints load on their own; the tokenizer comes from tokenizer.json
    enc = tok.load_tokenizer(os.path.join(a, "tokenizer.json"))
    policy, _ = load_checkpoint(os.path.join(a, "ppo.pt"))
    rm, _ = load_checkpoint(os.path.join(a, "reward_model.pt"))
    assert type(policy) is GPT and type(rm) is ScalarModel
    assert policy.cfg.vocab_size == tok.padded_vocab_size(enc) and policy.cfg.n_out == tok.pad_id(enc)
    # Same seed, same config, CPU: the same figures (PPO and DPO only, to keep the test short).
    flags = flags + ["--algo", "both", "--skip-beta0"]
    run(b, flags)
    assert figures(a) == figures(b)
    # A stage killed mid-write left garbage, another never finished: the re-run reuses the
    # earlier stages, redoes those two, and lands on the same figures.
    with open(os.path.join(b, "ppo.pt"), "wb") as f:
        f.write(b"half a checkpoint")
    os.remove(os.path.join(b, "dpo.pt"))
    out = run(b, flags)
    for name in ("tokenizer", "pretrain", "sft", "reward_model"):
        assert f"{name}: reusing" in out, name
    assert "ppo: reusing" not in out and "dpo: reusing" not in out
    assert "ppo: cannot load" in out and "dpo: cannot load" in out
    assert figures(a) == figures(b)
    # the two runs into b each opened their part of the (appended) metrics file with a marker
    records = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [r["stage"] for r in records].count("run") == 2 and records[0]["stage"] == "run"
    # --from: a new folder starts from a's finished stages whose config is the same; PPO's is not
    c = str(tmp_path / "c")
    out = run(c, flags + ["--from", a, "--algo", "ppo", "--skip-beta0", "--beta", "0.05"])
    for name in ("tokenizer", "pretrain", "sft", "reward_model"):
        assert f"{name}: reusing" in out, name
    assert "ppo: reusing" not in out and "pretrain   " not in out  # no pretraining step was logged
    assert json.load(open(os.path.join(c, "summary.json")))["sft"] == summary["sft"]
    # another config for a stage redoes that stage and the ones after it, not the ones before
    other = [("10" if x == "20" else x) for x in SHORT]  # --dpo-steps 10
    out = run(b, other + ["--algo", "dpo"] + dtype_flag)
    assert "sft: reusing" in out and "reward_model: reusing" in out
    assert "dpo: reusing" not in out and "ppo:" not in out


@pytest.mark.slow
def test_gpu_preset_smoke_on_cpu(tmp_path):
    """The gpu preset (the big model, the big batches) runs through every stage on this CPU with
    a handful of steps each."""
    out = str(tmp_path / "gpu")
    t0 = time.time()
    run(out, ["--dtype", "fp32", "--pretrain-steps", "2", "--sft-steps", "2", "--rm-prompts", "16", "--rm-steps", "2",
              "--rl-updates", "1", "--dpo-steps", "2", "--eval-prompts", "16"], preset="gpu")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert "ppo" in summary and "dpo" in summary
    assert summary["config"]["preset"] == "gpu" and summary["config"]["n_embd"] == 384
    print(f"gpu preset smoke test: {time.time() - t0:.0f}s on {torch.get_num_threads()} threads")
