"""Coursework: the project's own functions, blanked, as assignments graded
by the project's own tests, so an assignment cannot drift from the code.

    python coursework.py list                  # the assignments
    python coursework.py start gae             # a copy to write it in: ../leash-gae
    python coursework.py start gae --into DIR  # ... or in a new folder DIR
    python coursework.py check gae             # grade it: its tests, here (-x: pytest's)
"""
import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.realpath(__file__))
DOCS = "docs/coursework.md"

# name: (its functions, all of one module, the tests of that module's test
# file that grade it), in reading order. The tests fail on the blanks and
# pass on the project's code: tests/test_coursework.py checks both.
ASSIGNMENTS = {
    "kl-estimators": ("kl.k1 kl.k2 kl.k3", """
        test_gaussian_means_and_variances_match_closed_form test_k3_clamp_value
        test_categorical_exact_expectations test_signs_extremes_and_dtypes
        test_gradient_of_each_use"""),
    "kl-controller": ("kl.AdaptiveKLController.update", """
        test_adaptive_controller_by_hand test_adaptive_controller_settles_on_target
        test_adaptive_controller_unit_bug"""),
    "kl-rewards": ("kl.kl_penalized_rewards", """
        test_kl_penalized_rewards_layout
        test_rewards_need_a_response_token_and_known_estimator"""),
    "gae": ("ppo.gae", "test_gae_matches_hand_loop"),
    "ppo-loss": ("ppo.policy_loss", """
        test_policy_loss_by_hand test_bandit_converges_to_the_kl_regularised_optimum
        test_approx_kl_stop_ends_the_epochs_early"""),
    "grpo-advantages": ("grpo.group_advantages grpo.rloo_advantages", """
        test_group_advantages_by_hand test_rloo_advantages_by_hand"""),
    "grpo-loss": ("grpo.grpo_loss", """
        test_each_aggregation_by_hand test_gradient_equals_the_hand_derived_one
        test_constant_aggregation_divides_by_the_budget_so_padding_changes_nothing
        test_kl_loss_estimators_by_hand test_kl_term_gradient_is_forward_kl_by_sampling
        test_kl_term_masking test_kl_term_gives_no_gradient_to_the_reference
        test_grpo_loss_equals_trls_compute_loss"""),
    "dpo-loss": ("dpo.dpo_loss", """
        test_sigmoid_loss_and_rewards_by_hand test_label_smoothing_by_hand_and_its_finite_optimum
        test_ipo_loss_by_hand test_bad_arguments_raise test_rewards_are_detached_and_loss_is_fp32
        test_ipo_per_token_averages_the_log_ratios test_chosen_reward_falls_while_the_margin_grows
        test_population_dpo_recovers_the_kl_regularised_optimum
        test_large_beta_keeps_the_population_optimum_at_the_reference"""),
}


def fail(msg):
    """Bad input: one line naming the problem, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def assignment(name):
    """Its functions (["kl.k1", ...]) and the node ids of its tests."""
    quals, tests = ASSIGNMENTS[name]
    file = f"tests/test_{quals.split('.')[0]}.py"
    return quals.split(), [f"{file}::{test}" for test in tests.split()]


def find(tree, path):
    """The def at path (["AdaptiveKLController", "update"]) or None."""
    for name in path:
        tree = next((n for n in tree.body if getattr(n, "name", "") == name), None)
        if tree is None:
            return None
    return tree if isinstance(tree, ast.FunctionDef) else None


def blank(source, quals, name):
    """source with the body of each function of quals ("kl.k1", ...), after
    its docstring, replaced by a raise at the body's indentation."""
    lines, tree, edits = source.splitlines(keepends=True), ast.parse(source), []
    for qual in quals:
        node = find(tree, qual.split(".")[1:])
        if node is None:
            fail(f"{qual} (assignment {name}) is not a function of the code")
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        edits.append((body[0].lineno, node.end_lineno, body[0].col_offset, qual))
    for first, last, indent, qual in sorted(edits, reverse=True):  # bottom up
        msg = f"assignment {name}: write {qual} (see {DOCS})"
        lines[first - 1:last] = [f'{" " * indent}raise NotImplementedError("{msg}")\n']
    return "".join(lines)


def start(name, into):
    """Copy the tracked files into a new folder, the assignment blanked."""
    dest = os.path.realpath(into or os.path.join(ROOT, "..", f"leash-{name}"))
    if dest == ROOT or dest.startswith(ROOT + os.sep):
        fail(f"{dest} is in the working tree: start into a folder outside it")
    if os.path.exists(dest):
        fail(f"{dest} already exists: start into a new folder (--into DIR)")
    git = subprocess.run("git ls-files -z", shell=True, cwd=ROOT, capture_output=True)
    if git.returncode != 0:  # not a checkout, or no git at all
        fail("not a git checkout: start copies the files git tracks (git ls-files)")
    files = set(git.stdout.decode().split("\0")) - {""} | {"coursework.py"}  # if not yet tracked
    quals = assignment(name)[0]
    module = quals[0].split(".")[0] + ".py"
    with open(os.path.join(ROOT, module)) as f:
        blanked = blank(f.read(), quals, name)
    for file in files:
        if os.path.isfile(os.path.join(ROOT, file)):  # not deleted since the commit
            os.makedirs(os.path.dirname(os.path.join(dest, file)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, file), os.path.join(dest, file))
    with open(os.path.join(dest, module), "w") as f:
        f.write(blanked)
    print(f"{name}: write {', '.join(quals)} (see {DOCS}) in {dest}; grade it:")
    print(f"    cd {shlex.quote(dest)} && python coursework.py check {name}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage and error
        fail(message)


def main(argv=None):
    parser = Parser(description="assignments from blanks, graded by the tests")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="name the assignments")
    p = commands.add_parser("start", help="a copy of the code to write it in")
    p.add_argument("name", help="an assignment (see list)")
    p.add_argument("--into", metavar="DIR", help="a new folder (default: ../leash-NAME)")
    p = commands.add_parser("check", help="grade it: run its tests (more args: pytest's)")
    p.add_argument("name", help="an assignment (see list)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "check":
        fail(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "list":
        for name in ASSIGNMENTS:
            quals, ids = assignment(name)
            print(f"{name:16} {', '.join(quals)} (graded in {ids[0].split('::')[0]})")
    elif args.name not in ASSIGNMENTS:
        fail(f"no assignment {args.name!r} (`python coursework.py list` names them)")
    elif args.command == "start":
        start(args.name, args.into)
    else:  # check: its tests on this tree, pytest's exit code
        ids = assignment(args.name)[1] + extra
        print("python -m pytest " + " ".join(map(shlex.quote, ids)), flush=True)
        sys.exit(subprocess.run([sys.executable, "-m", "pytest", *ids], cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
