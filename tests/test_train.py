"""End to end: `python train.py --preset tiny` runs every stage and writes its outputs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_pipeline_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--out", out],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("val_loss", "valid_rate", "gold_reward", "distinct_2"):
        assert key in summary["sft"]
    assert 0 <= summary["sft"]["valid_rate"] <= 1 and -1 <= summary["sft"]["gold_reward"] <= 1
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"pretrain", "sft"} <= {r["stage"] for r in records}
    # a second run reuses the finished stages
    again = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--out", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing" in again.stdout
