"""End to end: `python train.py --preset tiny` runs every stage, writes its outputs, is
deterministic on the CPU, and a re-run resumes: finished stages are reused, a corrupt or
missing one is redone, and the results come out the same."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, flags):
    """flags: more train.py arguments (here --dtype, from `pytest --dtype`; see conftest.py)."""
    r = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--device", "cpu", "--out", out, *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def figures(out):
    """Every policy's figures from summary.json (times left out: they vary run to run)."""
    s = json.load(open(os.path.join(out, "summary.json")))
    return {k: {m: v for m, v in s[k].items() if m != "seconds"} for k in ("sft", "ppo", "dpo")}


def test_tiny_pipeline_end_to_end_deterministic_and_resumable(tmp_path, dtype_flag):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(a, dtype_flag)
    summary = json.load(open(os.path.join(a, "summary.json")))
    for key in ("val_loss", "valid_rate", "gold_reward", "distinct_2"):
        assert key in summary["sft"]
    for key in ("val_accuracy", "gold_label_accuracy"):
        assert key in summary["reward_model"]
    for key in ("gold_reward", "proxy_reward", "kl", "kl_target", "beta_final", "valid_rate", "distinct_2", "seconds"):
        assert key in summary["ppo"]
    for key in ("gold_reward", "proxy_reward", "kl", "valid_rate", "distinct_2", "implicit_accuracy", "seconds"):
        assert key in summary["dpo"]
    assert summary["ppo"]["kl"] > 0 and -1 <= summary["ppo"]["gold_reward"] <= 1
    stages = {json.loads(line)["stage"] for line in open(os.path.join(a, "metrics.jsonl"))}
    assert {"pretrain", "sft", "reward_model", "ppo", "dpo"} <= stages
    for f in ("samples.md", "plots/ppo.png", "plots/reward_model.png", "preferences.json"):
        assert os.path.exists(os.path.join(a, f)), f
    # Same seed, same config, CPU: the same figures.
    run(b, dtype_flag)
    assert figures(a) == figures(b)
    # A stage killed mid-write left garbage, another never finished: the re-run reuses the
    # earlier stages, redoes those two, and lands on the same figures.
    with open(os.path.join(b, "ppo.pt"), "wb") as f:
        f.write(b"half a checkpoint")
    os.remove(os.path.join(b, "dpo.pt"))
    out = run(b, dtype_flag)
    assert "pretrain: reusing" in out and "sft: reusing" in out and "reward_model: reusing" in out
    assert "ppo: reusing" not in out and "dpo: reusing" not in out
    assert figures(a) == figures(b)
    # the two runs into b each opened their part of the (appended) metrics file with a marker
    records = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [r["stage"] for r in records].count("run") == 2 and records[0]["stage"] == "run"
