"""The KL-gradient lab (experiments.py klgrad): which gradient each way of putting the KL in has,
stated as exact equalities. Every expectation is a sum over all V^T answers weighted by their
probability (experiments.expected_gradient), so "equal" means to ~1e-6 (float32 inside kl.py),
with no sampling noise. pi = policy, pi_ref = reference, pi_old = the policy a step ago."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from experiments import (KLGRAD_METHODS, expected_gradient, future_kl_term,  # noqa: E402
                         lab_sequences, lab_tables, true_gradients, answer_gradients,
                         batch_weights, sampling_std)

torch.set_num_threads(1)
TABLES = lab_tables(seed=0, max_len=4)
EXACT = 1e-6


def method_gradient(name, T, tables=TABLES):
    """(P * V,) the exact expected gradient of one of the lab's methods."""
    sampler, surrogate = KLGRAD_METHODS[name]
    return expected_gradient(tables, T, surrogate, sampler)


def rel_err(g, truth):
    return ((g - truth).norm() / truth.norm()).item()


def test_the_lab_is_not_trivial():
    """The KLs are O(0.1-1) nats and the two directions' gradients differ, so an equality below
    can tell them apart."""
    for T in (1, 4):
        truth, kls = true_gradients(TABLES, T)
        assert 0.05 < kls["reverse"] < 1.0 and 0.05 < kls["forward"] < 1.0
        assert rel_err(truth["forward"], truth["reverse"]) > 0.1


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_k1_in_the_reward_with_reward_to_go_is_the_sequence_kl_gradient(T):
    """E[sum_t grad log pi(x_t) * sum_{u>=t} k1_u] = grad KL(pi || pi_ref) of the whole answer:
    REINFORCE on the reward -k1 per token with gamma = 1 (policy-gradient theorem)."""
    truth, _ = true_gradients(TABLES, T)
    assert rel_err(method_gradient("k1-reward-togo", T), truth["reverse"]) < EXACT


def kl_to_go(tables, T):
    """(P,) for each prefix row of length < T: the exact KL(pi || pi_ref) of the rest of the
    answer, V(p) = sum_x pi(x | p) (log pi(x | p) / pi_ref(x | p) + V(p x)), V = 0 at length T
    (a recursion over the table, independent of the lab's sampled-return surrogates)."""
    vocab = tables["ref"].shape[1]
    logp = torch.log_softmax(tables["policy"], -1)
    ref_logp = torch.log_softmax(tables["ref"], -1)
    value = torch.zeros(len(tables["ref"]), dtype=torch.float64)
    offset = lambda t: (vocab ** t - 1) // (vocab - 1)
    for t in reversed(range(T)):
        rows = torch.arange(offset(t), offset(t + 1))
        nxt = torch.zeros(len(rows), vocab, dtype=torch.float64)
        if t + 1 < T:  # the rows of the children p x, in order
            nxt = value[offset(t + 1):offset(t + 2)].view(len(rows), vocab)
        value[rows] = (logp[rows].exp() * (logp[rows] - ref_logp[rows] + nxt)).sum(-1)
    return value


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_k2_loss_misses_the_future_kl_term(T):
    """A k2 loss has E[grad k2_t] = E[k1_t grad log pi(x_t)]: the reward-to-go gradient without
    sum_{u>t} k1_u, the KL that token t causes later (Tang & Munos 2025). So it equals grad
    KL(pi || pi_ref) at T = 1 and misses, for T >= 2, exactly E[sum_t grad log pi(x_t) *
    sum_{u>t} k1_u] = E[sum_t grad log pi(x_t) * KL-to-go after x_<=t], nonzero."""
    truth, _ = true_gradients(TABLES, T)
    g_k2 = method_gradient("k2-loss", T)
    gap = method_gradient("k1-reward-togo", T) - g_k2
    future = expected_gradient(TABLES, T, future_kl_term)
    value = kl_to_go(TABLES, T)
    _, rows = lab_sequences(T)
    after = torch.cat([value[rows[:, 1:]], torch.zeros(len(rows), 1, dtype=torch.float64)], 1)
    by_recursion = expected_gradient(TABLES, T, lambda b: (b["lp"] * after).sum(-1))
    scale = truth["reverse"].norm()
    assert (gap - future).norm() < EXACT * scale
    assert (future - by_recursion).norm() < EXACT * scale
    if T == 1:  # no later tokens: no future term
        assert future.norm() == 0 and rel_err(g_k2, truth["reverse"]) < EXACT
    else:
        assert future.norm() > 0.03 * scale and rel_err(g_k2, truth["reverse"]) > 0.03


def test_k3_loss_at_one_token_is_the_forward_kl_gradient():
    """E_pi[grad k3] = sum_x (pi - pi_ref)(x) grad log pi(x) = grad KL(pi_ref || pi), the other
    direction, though k3's value estimates KL(pi || pi_ref); over a sequence it is neither."""
    truth, _ = true_gradients(TABLES, 1)
    g = method_gradient("k3-loss", 1)
    assert rel_err(g, truth["forward"]) < EXACT and rel_err(g, truth["reverse"]) > 0.1
    truth, _ = true_gradients(TABLES, 3)
    assert min(rel_err(method_gradient("k3-loss", 3), t) for t in truth.values()) > 0.1


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["k1-loss", "seq-k1-loss"])
def test_k1_as_a_loss_has_expected_gradient_zero(name, T):
    """grad k1 = grad log pi(x_t), and E[grad log pi] = grad sum_x pi(x) = 0."""
    truth, _ = true_gradients(TABLES, T)
    assert method_gradient(name, T).norm() < EXACT * truth["reverse"].norm()


def test_k3_times_the_importance_ratio_is_the_reverse_kl_gradient_per_position():
    """grad(pi/pi_s * k3) averaged over x ~ pi_s: sum_x grad(pi k3) = grad sum_x (pi_ref - pi +
    pi log pi/pi_ref) = grad KL(pi || pi_ref), whoever sampled (DeepSeek-V3.2). Plain k3 on
    pi_old's samples: sum_x pi_old (1 - pi_ref/pi) grad log pi, neither direction."""
    truth, _ = true_gradients(TABLES, 1)
    assert rel_err(method_gradient("k3-ratio-loss", 1), truth["reverse"]) < EXACT
    assert rel_err(method_gradient("old-k3-ratio-loss", 1), truth["reverse"]) < EXACT
    plain = method_gradient("old-k3-loss", 1)
    assert rel_err(plain, truth["reverse"]) > 0.05 and rel_err(plain, truth["forward"]) > 0.05


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_sequence_level_estimators_are_exact(T):
    """One answer as one sample of a distribution over answers: the answer's k1 as every token's
    return and its k2 as a loss give grad KL(pi || pi_ref), its k3 as a loss grad KL(pi_ref ||
    pi), at every T: the per-position table of kl.py, applied to the sequence."""
    truth, _ = true_gradients(TABLES, T)
    assert rel_err(method_gradient("seq-k1-reward", T), truth["reverse"]) < EXACT
    assert rel_err(method_gradient("seq-k2-loss", T), truth["reverse"]) < EXACT
    assert rel_err(method_gradient("seq-k3-loss", T), truth["forward"]) < EXACT


def test_simulated_std_matches_its_closed_form():
    """The batches' RMS deviation from the exact mean is sqrt(E||G(x) - mean||^2 / n)."""
    G, w = answer_gradients(TABLES, 3, KLGRAD_METHODS["k1-reward-togo"][1])
    shares = batch_weights(w, 16, 2000, torch.Generator().manual_seed(0))
    simulated, exact = sampling_std(G, w, shares, 16)
    assert simulated == pytest.approx(exact, rel=0.05) and exact > 0


def test_klgrad_json_is_one_array_of_rows(tmp_path):
    """`experiments.py klgrad --json`: stdout is exactly one JSON array, one row per method and T;
    the table and progress go to stderr; the plot is written."""
    plot = tmp_path / "klgrad.png"
    cmd = [sys.executable, os.path.join(ROOT, "experiments.py"), "klgrad", "--json", "--max-len",
           "2", "--n", "8", "--batches", "10", "--threads", "1", "--out-plot", str(plot)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert isinstance(rows, list) and len(rows) == 2 * len(KLGRAD_METHODS)
    keys = {"method", "T", "rel_err_reverse", "rel_err_forward", "cos_reverse", "cos_forward",
            "std", "n"}
    assert all(keys <= set(r) for r in rows) and {r["T"] for r in rows} == {1, 2}
    assert all(r["n"] == 8 for r in rows)
    assert "k1-reward-togo" in run.stderr and plot.stat().st_size > 10_000
