"""The commands the docs quote still run: every `python SCRIPT ...` and `torchrun ... SCRIPT ...`
in README.md and docs/*.md (code spans and code blocks) names a script of the repo that has a
command line, a subcommand it has, flags its parser lists and, where the parser lists choices
(argparse's {a,b} or train.py's "a | b:"), a value among them. Capitals are placeholders
(OUT, DIR, N, NAME). Each script's `--help` runs once, in a subprocess: nothing is imported."""
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
NUMBER = re.compile(r"-?\d[\d.,e+-]*")
SHELL_PUNCTUATION = set("();<>|&")


def placeholder(word):
    return re.fullmatch(r"[A-Z][A-Z0-9_]*|<[^>]+>", word) is not None


def is_flag(word):
    return word.startswith("-") and len(word) > 1 and not NUMBER.fullmatch(word)


def run(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="1000")
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---- what a script's --help lists


def parse_help(text):
    """argparse's --help -> flags {flag: (takes a value, takes several, choices or None)},
    positionals [choices or None], subparsers (usage shows `{a,b} ...`)."""
    flags, positionals, section = {}, [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            section = line[:-1] if line.endswith(":") else None
            continue
        entry = re.match(r"  (\S.*?)(?:\s{2,}(.*))?$", line)
        if section is None or entry is None:
            continue
        invocation, help = entry.group(1), entry.group(2)
        if help is None and i + 1 < len(lines) and lines[i + 1].startswith("   "):
            help = lines[i + 1].strip()
        listed = re.match(r"((?:[\w.+-]+ \| )+[\w.+-]+):", help or "")  # train.py's "a | b:"
        listed = set(listed.group(1).split(" | ")) if listed else None
        if not invocation.startswith("-"):
            if section == "positional arguments":
                braces = re.fullmatch(r"\{([^}]*)\}", invocation)
                positionals.append(set(braces.group(1).split(",")) if braces else None)
            continue
        for part in invocation.split(", "):
            flag, _, metavar = part.partition(" ")
            braces = re.search(r"\{([^}]*)\}", metavar)
            choices = set(braces.group(1).split(",")) if braces else listed
            flags[flag] = (bool(metavar), "..." in metavar, choices)
    usage = text.split("\n\n", 1)[0]
    return SimpleNamespace(flags=flags, positionals=positionals,
                           subparsers=re.search(r"\{[^}]*\} \.\.\.", usage) is not None)


@functools.lru_cache(maxsize=None)
def cli(script, sub=None):
    """What `python script [sub] --help` lists (parse_help), or None: no command line."""
    done = run([sys.executable, script, *([sub] if sub else []), "--help"])
    if done.returncode != 0 or not done.stdout.startswith("usage:"):
        return None
    return parse_help(done.stdout)


@functools.lru_cache(maxsize=None)
def pytest_flags():
    done = run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"])
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", done.stdout))


# ---- the commands in a markdown text


def quoted(text):
    """(line number, text) of every line of a code block and every code span."""
    out = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        out += [(first + k, line) for k, line in enumerate(block.group(1).splitlines())]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers
    for span in SPAN.finditer(prose):
        if "\n\n" not in span.group(1):  # a code span never crosses a paragraph
            out.append((prose.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())))
    return out


def commands(shell):
    """The python and torchrun commands of one line of shell, each a list of words."""
    lex = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        words = list(lex)
    except ValueError:  # an unclosed quote: prose, not shell
        words = shell.split()
    found, current = [], []
    for word in words + [";"]:
        if not set(word) <= SHELL_PUNCTUATION:
            current.append(word)
            continue
        if word[0] in "<>" and current and current[-1].isdigit():
            current.pop()  # 2>&1
        while current and (re.fullmatch(r"\w+=\S*", current[0]) or current[0] in ("time", "env")):
            current = current[1:]  # OMP_NUM_THREADS=1 python ...
        if current and current[0] in ("python", "python3", "torchrun"):
            found.append(current)
        current = []
    return found


# ---- one command's problems


def check_command(words):
    """Problems with one command (its words), [] if none."""
    if words[0] == "torchrun":  # torchrun's own flags come before the script
        at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if at is None:
            return ["torchrun names no script"]
        return check_script(words[at], words[at + 1:])
    if len(words) == 1 or words[1] == "-c":
        return []
    if words[1] == "-m":
        return check_module(words[2] if len(words) > 2 else "", words[3:])
    if is_flag(words[1]):  # python -V and the like
        return []
    return check_script(words[1], words[2:])


def check_module(module, args):
    if (ROOT / f"{module}.py").is_file():
        return check_script(f"{module}.py", args)
    if module != "pytest":
        return [] if importlib.util.find_spec(module) else [f"no module {module}"]
    problems = []
    for word in args:
        if is_flag(word) and word.split("=")[0] not in pytest_flags():
            problems.append(f"pytest has no flag {word.split('=')[0]}")
        elif not is_flag(word) and ("/" in word or word.endswith(".py")):
            if not (ROOT / word.split("::")[0]).exists():
                problems.append(f"pytest: no such path {word}")
    return problems


def check_script(script, args):
    """Problems with `python script args`: the script, its subcommand, flags and values."""
    if not (ROOT / script).is_file():
        return [f"{script}: no such script"]
    info = cli(script)
    if info is None:
        return [f"{script} has no command line (`python {script} --help` prints no usage)"]
    flags, expected, problems, bare, i = dict(info.flags), list(info.positionals), [], [], 0
    while i < len(args):
        word = args[i].strip("[]")  # an optional part written [--json]
        i += 1
        if not word or word == "...":
            continue
        if not is_flag(word):
            bare.append(word)
            if len(bare) == 1 and info.subparsers:  # the subcommand's own flags
                subs = info.positionals[0] or set()
                named = sorted(subs if placeholder(word) else subs & {word})
                for sub in named:  # NAME: any subcommand's
                    flags.update(cli(script, sub).flags)
                if named:
                    rest = [cli(script, sub).positionals for sub in named]
                    expected = expected[:1] + (rest[0] if len(rest) == 1
                                               else [None] * max(map(len, rest)))
            continue
        name, eq, value = word.partition("=")
        if name not in flags:
            problems.append(f"{script} has no flag {name}")
            while i < len(args) and not is_flag(args[i]):
                i += 1  # its values, whatever they were
            continue
        takes, several, choices = flags[name]
        values = [value] if eq else []
        while takes and not eq and i < len(args) and not is_flag(args[i]) and (
                not values or several):
            values.append(args[i])
            i += 1
        if takes and not values:
            problems.append(f"{script} {name} needs a value")
        if not takes and eq:
            problems.append(f"{script} {name} takes no value")
        for v in values:
            if choices and not placeholder(v) and v not in choices:
                problems.append(f"{script} {name} {v}: not one of {', '.join(sorted(choices))}")
    lost = info.subparsers and bare and not placeholder(bare[0]) and (
        bare[0] not in (info.positionals[0] or set()))  # its arguments are unknown
    for k, word in enumerate(bare):
        if k >= len(expected):
            if not lost:
                problems.append(f"{script}: unexpected argument {word}")
        elif expected[k] and not placeholder(word) and word not in expected[k]:
            problems.append(f"{script} has no subcommand {word} "
                            f"(it has {', '.join(sorted(expected[k]))})")
    return problems


def check_text(text, name="text"):
    """Every problem of every command quoted in a markdown text, as 'name:line: ...'."""
    found = [(line, words) for line, shell in quoted(text) for words in commands(shell)]
    scripts = {w[1] for _, w in found if len(w) > 1 and w[1].endswith(".py")}
    with ThreadPoolExecutor(2) as pool:  # each --help imports torch: two at a time
        list(pool.map(cli, sorted(s for s in scripts if (ROOT / s).is_file())))
    return [f"{name}:{line}: `{shlex.join(words)}`: {problem}"
            for line, words in sorted(found, key=lambda f: f[0])
            for problem in check_command(words)]


# ---- the tests


def test_quoted_commands_are_real():
    problems = [p for doc in DOCS for p in check_text(doc.read_text(), doc.relative_to(ROOT))]
    assert not problems, "stale commands in the docs:\n" + "\n".join(problems)


@pytest.mark.parametrize("text, caught", [
    ("`python train.py --presett tiny --out out-tiny`", "has no flag --presett"),
    ("`python train.py --kl-estimator k4`", "--kl-estimator k4: not one of"),
    ("`python experiments.py klgard --out out`", "has no subcommand klgard"),
    ("`python experiments.py\n  klgard`", "has no subcommand klgard"),  # a span over two lines
    ("`python experiments.py kl --thread 1`", "has no flag --thread"),
    ("`python bench.py --dtype fp16`", "--dtype fp16: not one of"),
    ("`python bench.py --only`", "--only needs a value"),
    ("`python train.py tiny`", "unexpected argument tiny"),
    ("```bash\npip install -r requirements.txt && python trian.py   # all\n```", "no such script"),
    ("```bash\nOMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py --algoo ppo\n"
     "```", "has no flag --algoo"),
    ("`python tests/conftest.py --out out`", "has no command line"),
    ("`python -m pytest tests/test_nothing.py`", "no such path"),
])
def test_drift_is_caught(text, caught):
    problems = check_text(text)
    assert len(problems) == 1 and caught in problems[0], problems


def test_a_misspelt_readme_command_is_caught():
    readme = (ROOT / "README.md").read_text()
    assert "--preset tiny" in readme
    problems = check_text(readme.replace("--preset tiny", "--presett tiny", 1), "README.md")
    assert any("has no flag --presett" in p for p in problems), problems


@pytest.mark.parametrize("text", [
    "`python experiments.py NAME --out OUT`",
    "`python experiments.py controller --out OUT --kl-target 2 4 --seed S`",
    "`python train.py --algo ppo,grpo --beta=0.05 --skip-beta0`",
    "`python sample.py --out out -n 4 --prompt 'the film was'`",
    "```bash\ntorchrun --standalone --nproc_per_node N train.py       # N GPUs\n"
    "python -m pytest -x tests/test_kl.py\n```",
    "`python`, `python -c 'print(1)'` and `pip install torch` are not commands of the repo",
])
def test_good_commands_pass(text):
    assert check_text(text) == []


SUBPARSERS = """import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--quiet", action="store_true")
subs = parser.add_subparsers(dest="command", required=True)
start = subs.add_parser("start")
start.add_argument("name", choices=["kl", "ppo"])
start.add_argument("--into", default=".")
subs.add_parser("check").add_argument("name")
parser.parse_args()
"""


@pytest.mark.parametrize("command, caught", [
    ("start kl --into DIR", None),
    ("--quiet check NAME", None),
    ("NAME kl", None),
    ("start dpo", "has no subcommand dpo"),
    ("strat kl", "has no subcommand strat"),
    ("check kl --into DIR", "has no flag --into"),
    ("check kl extra", "unexpected argument extra"),
])
def test_subparsers(tmp_path, command, caught):
    """A script with argparse subcommands (coursework.py's kind): each one's own flags."""
    script = tmp_path / "cw.py"
    script.write_text(SUBPARSERS)
    problems = check_text(f"`python {script} {command}`")
    assert problems == [] if caught is None else len(problems) == 1 and caught in problems[0], \
        problems


def test_quoted_flags_exist():
    """A flag quoted on its own (`--kl-estimator k3`) is one some command line of the repo has."""
    scripts, spans = set(), []
    for doc in DOCS:
        for line, shell in quoted(doc.read_text()):
            scripts |= {w[1] for w in commands(shell) if len(w) > 1 and w[1].endswith(".py")}
            if shell.startswith("--"):
                spans.append((f"{doc.relative_to(ROOT)}:{line}", shell))
    known = set()
    for script in scripts:
        if (ROOT / script).is_file() and cli(script):
            known |= set(cli(script).flags)
    problems = [f"{where}: `{shell}`: no command line has {word}"
                for where, shell in spans for word in shell.split()
                if word.startswith("--") and word not in known | pytest_flags()]
    assert not problems, "\n".join(problems)
