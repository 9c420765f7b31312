"""Bad input is refused with one line naming the problem, before any work is done."""
import os

import pytest

import train


def refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("argv, words", [
    (["--beta", "-0.1"], "--beta"),
    (["--beta", "abc"], "--beta"),
    (["--beta", "nan"], "--beta"),
    (["--kl-target", "-1"], "--kl-target"),
    (["--kl-target", "0"], "--kl-target 0"),
    (["--dpo-beta", "0"], "--dpo-beta"),
    (["--preset", "huge"], "--preset huge"),
    (["--algo", "trpo"], "--algo trpo"),
    (["--algo", "ppo,trpo"], "--algo trpo"),
    (["--grpo-variant", "grpo2"], "grpo2"),
    (["--kl-in", "both"], "--kl-in both"),
    (["--reward", "human"], "--reward human"),
    (["--reward", "verifiable", "--data", "README.md"], "--reward verifiable"),
    (["--ptx-coef", "-1"], "--ptx-coef"),
    (["--kl-estimator", "k4"], "k4"),
    (["--kl-loss-estimator", "k5"], "--kl-loss-estimator k5"),
    (["--device", "cuda"], "cuda"),
    (["--device", "tpu"], "tpu"),
    (["--dtype", "fp8"], "fp8"),
    (["--n-layer", "0"], "--n-layer"),
    (["--eval-prompts", "0"], "--eval-prompts"),
    (["--rm-prompts", "-5"], "--rm-prompts"),
    (["--annotator-bias", "-1"], "--annotator-bias"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags(argv, words, capsys, tmp_path):
    if argv == ["--device", "cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    err = refused(argv + ["--out", str(tmp_path / "o")], capsys)
    assert words in err
    assert not os.path.exists(tmp_path / "o" / "pretrain.pt")


def test_bad_data_files(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    short = tmp_path / "short.txt"
    short.write_text("a few words only.")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    cases = [(tmp_path / "missing.txt", "no such file"), (empty, "empty"), (binary, "binary"),
             (short, "characters"), (latin, "UTF-8")]
    for path, words in cases:
        err = refused(["--data", str(path), "--out", str(tmp_path / "o")], capsys)
        assert str(path) in err and words in err, err


def test_algo_lists():
    parse = lambda *argv: train.parse_args(list(argv)).algos
    assert parse() == parse("--algo", "all") == ["ppo", "grpo", "dpo", "dpo-online"]
    assert parse("--algo", "both") == ["ppo", "dpo"]
    assert parse("--algo", "grpo,dpo-online") == ["grpo", "dpo-online"]
    # the default run is the lesson: PPO with the leash, then without it, then the others
    stages = lambda *argv: train.parse_args(list(argv)).stages
    assert stages() == ["ppo", "ppo_beta0", "grpo", "dpo", "dpo_online"]
    assert stages("--skip-beta0") == ["ppo", "grpo", "dpo", "dpo_online"]
    assert stages("--algo", "grpo") == ["grpo"]  # no PPO, no PPO with beta = 0


def test_stage_configs_is_the_one_place_where_flags_become_configs():
    """Every rename and override in one function: --rl-updates -> updates, --beta -> a fixed
    controller, ppo_beta0 -> beta 0, the preset's warmups and SFT's lr / 2, online DPO's plain DPO
    (sft_coef 0) unless --dpo-sft-coef says otherwise, the fixed response budget everywhere."""
    from cli import PRESETS, stage_configs
    args = train.parse_args(["--rl-updates", "3", "--beta", "0.05", "--dpo-steps", "7",
                             "--grpo-variant", "rloo", "--kl-estimator", "k3"])
    P = PRESETS["tiny"]
    c = stage_configs(args, "tiny", P, budget=41)
    assert c["pretrain"].warmup == 50 and c["sft"].warmup == 20 and c["sft"].lr == P["lr"] / 2
    assert c["ppo"].updates == c["grpo"].updates == 3 and c["ppo"].rollouts == 32  # flag, preset
    assert c["ppo"].kl_controller == c["grpo"].kl_controller == "fixed" and c["ppo"].beta == 0.05
    assert c["ppo_beta0"].beta == 0.0 and c["ppo_beta0"].kl_controller == "fixed"
    assert c["ppo"].kl_estimator == "k3" and c["grpo"].kl_loss_estimator == "k3"
    plus = stage_configs(train.parse_args(["--kl-loss-estimator", "k3+"]), "tiny", P, 41)
    assert plus["grpo"].kl_loss_estimator == "k3+" and train.parse_args(
        ["--kl-loss-estimator", "k3+"]).labels["grpo"] == "GRPO (k3+ in the loss)"
    assert (c["grpo"].advantage, c["grpo"].aggregation, c["grpo"].kl_in) == ("rloo", "constant", "reward")
    assert c["dpo"].steps == c["dpo_online"].steps == 7
    assert c["dpo"].sft_coef == 1.0 and c["dpo_online"].sft_coef == 0.0
    assert {c[k].max_new_tokens for k in ("ppo", "grpo", "dpo_online")} == {41}
    default = stage_configs(train.parse_args([]), "cpu", PRESETS["cpu"], budget=41)
    assert default["ppo"].kl_controller == "adaptive" and default["dpo_online"].steps == 80
    assert stage_configs(train.parse_args(["--dpo-sft-coef", "0.5"]), "cpu", PRESETS["cpu"],
                         41)["dpo_online"].sft_coef == 0.5
    assert default["ppo"].ptx_coef == default["grpo"].ptx_coef == 0.0


def test_grpo_variants_and_their_overrides():
    """--grpo-variant dapo is DAPO as published (clip 0.2 / 0.28, token-level mean, dynamic sampling,
    unended answers masked and shaped, beta 0); a flag given still wins (--beta, --kl-in); gspo's one ratio
    per answer; --ptx-coef reaches PPO and GRPO."""
    from cli import PRESETS, stage_configs
    configs = lambda argv: stage_configs(train.parse_args(argv), "cpu", PRESETS["cpu"], budget=41)
    dapo = configs(["--grpo-variant", "dapo"])["grpo"]
    assert (dapo.clip_eps, dapo.clip_eps_high, dapo.aggregation, dapo.advantage) == (0.2, 0.28, "token", "group")
    assert dapo.dynamic_sampling and dapo.mask_unended and dapo.overlong_share == 0.25
    assert dapo.kl_controller == "fixed" and dapo.beta == 0.0
    leashed = configs(["--grpo-variant", "dapo", "--beta", "0.1", "--kl-in", "reward"])["grpo"]
    assert (leashed.beta, leashed.kl_in, leashed.clip_eps_high) == (0.1, "reward", 0.28)
    gspo = configs(["--grpo-variant", "gspo"])["grpo"]
    assert gspo.ratio_level == "sequence" and (gspo.clip_eps, gspo.clip_eps_high) == (0.01, 0.015)
    assert gspo.kl_controller == "adaptive" and not gspo.dynamic_sampling
    ptx = configs(["--ptx-coef", "0.5"])
    assert ptx["ppo"].ptx_coef == ptx["grpo"].ptx_coef == ptx["ppo_beta0"].ptx_coef == 0.5


def test_too_few_preference_pairs_is_one_line_not_a_traceback(capsys, tmp_path):
    """An SFT model too weak to end its answers leaves no pairs to fit a reward model on: the run
    stops with one line that says so (and what to raise), after keeping the finished stages."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    err = refused(["--data", readme, "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
                   "--pretrain-steps", "20", "--sft-steps", "10", "--rm-prompts", "20",
                   "--eval-prompts", "16", "--out", str(tmp_path / "o")], capsys)
    assert "preference pairs" in err and "--sft-steps" in err
    assert os.path.exists(tmp_path / "o" / "sft.pt")
