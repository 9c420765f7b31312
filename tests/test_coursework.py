"""coursework.py: every assignment's tests fail on its blanks, each with the assignment's
message, and pass on the project's code; blanking keeps signatures, docstrings and indents;
start refuses the working tree, an existing folder and a tree git does not track, with one
line; list names every assignment."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import coursework
from coursework import ASSIGNMENTS, ROOT


def run(args, cwd=ROOT, **env):
    """python coursework.py ARGS in cwd, one thread -> (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "coursework.py", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return p.returncode, p.stdout, p.stderr


def git_checkout():
    try:
        return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:
        return False


needs_git = pytest.mark.skipif(not git_checkout(), reason="start copies what git tracks")

SOURCE = '''import torch


@torch.no_grad()
def f(x):
    """Doubles x."""
    y = 2 * x
    return y


class C:
    """A class."""
    def update(self, v):
        """Adds v."""
        def helper(u):
            return u
        self.v = helper(v)  # the end

    def other(self):
        return 1
'''

BLANKED = '''import torch


@torch.no_grad()
def f(x):
    """Doubles x."""
    raise NotImplementedError("assignment demo: write m.f (see docs/coursework.md)")


class C:
    """A class."""
    def update(self, v):
        """Adds v."""
        raise NotImplementedError("assignment demo: write m.C.update (see docs/coursework.md)")

    def other(self):
        return 1
'''


def test_blank_keeps_signature_docstring_and_indentation():
    assert coursework.blank(SOURCE, ["m.f", "m.C.update"], "demo") == BLANKED
    with pytest.raises(SystemExit) as e:
        coursework.blank(SOURCE, ["m.C.missing"], "demo")
    assert e.value.code == 2


@needs_git
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_each_assignments_tests_fail_on_its_blanks(name, tmp_path):
    into = tmp_path / "copy"
    code, out, err = run(["start", name, "--into", str(into)])
    assert code == 0 and err == "", err
    assert f"cd {into} && python coursework.py check {name}" in out
    git = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    tracked = {f for f in git.stdout.split("\0") if os.path.isfile(os.path.join(ROOT, f))}
    copied = {str(f.relative_to(into)) for f in into.rglob("*") if f.is_file()}
    assert copied == tracked | {"coursework.py"}  # no checkpoints, no outputs
    for qual in coursework.assignment(name)[0]:  # the signature and docstring stay, the body goes
        module, *path = qual.split(".")
        trees = [ast.parse((folder / f"{module}.py").read_text()) for folder in (into, Path(ROOT))]
        blank, full = (coursework.find(tree, path) for tree in trees)
        assert ast.dump(blank.args) == ast.dump(full.args)
        assert ast.get_docstring(blank) == ast.get_docstring(full)
        docstring = ast.get_docstring(full) is not None
        assert len(blank.body) == 1 + docstring and isinstance(blank.body[-1], ast.Raise)
    # the grading command it printed, in the copy: every test fails, each with the message
    code, out, err = run(["check", name, "-p", "no:cacheprovider", "--tb=line", "-rN", "-q"],
                         cwd=into)
    summary = re.match(r"(\d+) failed in ", out.strip().splitlines()[-1])
    said = re.findall(rf"^\S+:\d+: NotImplementedError: assignment {name}: write ", out, re.M)
    assert code == 1 and summary, out[-3000:]
    assert int(summary[1]) == len(said) >= len(coursework.assignment(name)[1]), out[-3000:]


def test_every_assignments_tests_pass_on_the_projects_code():
    """All the selections at once (one interpreter): `check NAME` here runs one of them."""
    ids = [i for name in ASSIGNMENTS for i in coursework.assignment(name)[1]]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:]
    assert re.match(r"\d+ passed in ", p.stdout.strip().splitlines()[-1]), p.stdout[-3000:]


def refused(args, cwd=ROOT, **env):
    """The one line (error: ...) a refusal prints, after checking there is no more."""
    code, out, err = run(args, cwd, **env)
    assert code == 2 and out == "", (code, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_start_refuses_the_working_tree_an_existing_folder_and_unknown_names(tmp_path):
    assert "working tree" in refused(["start", "gae", "--into", ROOT])
    inside = os.path.join(ROOT, "tests", "leash-gae")
    assert "working tree" in refused(["start", "gae", "--into", inside])
    assert not os.path.exists(inside)
    assert "already exists" in refused(["start", "gae", "--into", str(tmp_path)])
    assert os.listdir(tmp_path) == []
    assert "no assignment 'ppo'" in refused(["start", "ppo", "--into", str(tmp_path / "new")])
    assert "no assignment 'ppo'" in refused(["check", "ppo"])
    assert not (tmp_path / "new").exists()
    refused(["start"])  # argparse's own errors: one line too
    refused(["start", "gae", "-x"])


def test_start_outside_a_git_checkout_says_so(tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(ROOT, "coursework.py"), lone)
    err = refused(["start", "gae", "--into", str(tmp_path / "copy")], cwd=lone,
                  GIT_CEILING_DIRECTORIES=str(tmp_path))
    assert "git" in err and not (tmp_path / "copy").exists()


def test_list_names_every_assignment():
    code, out, err = run(["list"])
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert names == list(ASSIGNMENTS)
