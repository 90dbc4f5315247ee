"""README's commands, as written (issue 27). Every ```bash block of README.md runs through real bash
with `python`, `pip`, `torchrun` and `cd` replaced by shell functions that only record their argv,
so bash does the variables, quoting, line continuations and globbing exactly as a user's shell.
Every recorded command of a repository script is then parsed by that script's own parser,
without doing any work or touching a file. tests/run_readme.py runs the same commands for real,
on fake data and capped step counts (not collected by pytest: minutes)."""
import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# A command as bash ran it: its README line, the folder `cd` left it in (relative to the
# repository) and its argv, e.g. ["python", "vpfb.py", "--steps", "800"].
Command = namedtuple("Command", "line cwd argv")

SHIMMED = ("python", "python3", "pip", "pip3", "torchrun", "cd")
# One line of shell functions before each block: each records its name and arguments, NUL-separated,
# then a record separator. Any other program is recorded too (command_not_found_handle: PATH is
# empty), so nothing real runs.
PRELUDE = (
    "_rec() { printf '%s\\0' \"$@\" $'\\036' >> \"$LOG\"; }; "
    + "".join(f"{n}() {{ _rec \"${{BASH_LINENO[0]}}\" {n} \"$@\"; }}; " for n in SHIMMED)
    + "command_not_found_handle() { _rec \"${BASH_LINENO[0]}\" \"$@\"; }; "
    + "PATH=/nonexistent-readme-test\n")


def bash_blocks(text):
    """[(README line of the block's first line, code)] of every ```bash block (also indented)."""
    blocks, code, start, indent = [], None, 0, ""
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if code is None and fence and fence.group(2) == "bash":
            code, start, indent = [], i + 1, fence.group(1)
        elif code is not None and fence:
            blocks.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line[len(indent):] if line.startswith(indent) else line)
    return blocks


def record(code, first_line):
    """Run one block through bash with the recording functions: ([Command], [(README line,
    bash's complaint)])."""
    bash = shutil.which("bash")
    with tempfile.TemporaryDirectory() as tmp:                # an empty folder: globs match nothing
        log = os.path.join(tmp, ".log")
        open(log, "w").close()
        r = subprocess.run([bash, "--norc", "--noprofile", "-c", PRELUDE + code], cwd=tmp,
                           env={"LOG": log, "PATH": "/nonexistent-readme-test", "LC_ALL": "C"},
                           capture_output=True, text=True, timeout=60)
        with open(log, encoding="utf-8") as f:
            fields = f.read().split("\0")
    cmds, cur, cwd = [], [], "."
    for x in fields:
        if x != "\x1e":
            cur.append(x)
            continue
        line, argv = first_line + int(cur[0]) - 2, cur[1:]        # bash line 1 is the prelude
        cur = []
        if argv[0] == "cd" and len(argv) == 2:                    # later commands run there
            cwd = os.path.normpath(os.path.join(cwd, argv[1]))
        cmds.append(Command(line, cwd, argv))
    errors = []                                 # "bash: line N: ...": README line of bash's N
    for e in r.stderr.splitlines():
        at = re.search(r"\bline (\d+): ", e)
        errors.append((first_line + int(at.group(1)) - 2, e[at.end():]) if at
                      else (first_line - 1, e))
    if r.returncode:
        errors.append((first_line - 1, f"bash exited {r.returncode}"))
    return cmds, errors


def readme_commands(text=None):
    """Every command of every bash block of README (or `text`), and the blocks bash complained
    about: ([Command], [(line, stderr)])."""
    if text is None:
        with open(README, encoding="utf-8") as f:
            text = f.read()
    cmds, errors = [], []
    for start, code in bash_blocks(text):
        c, err = record(code, start)
        cmds += c
        errors += err
    return cmds, errors


# ---- which script a command runs ----

def script_call(cmd):
    """(script path relative to the repository, its argv) of a python or torchrun command, or
    (None, None) for anything else (python -c / -m, pip, cd)."""
    name, args = cmd.argv[0], cmd.argv[1:]
    if name == "torchrun":
        from torch.distributed.run import get_args_parser
        with contextlib.redirect_stderr(io.StringIO()):
            ns = get_args_parser().parse_args(args)              # torchrun's own flags
        script, args = ns.training_script, ns.training_script_args
    elif name in ("python", "python3") and args and not args[0].startswith("-"):
        script, args = args[0], args[1:]
    else:
        return None, None
    return os.path.normpath(os.path.join(cmd.cwd, script)), list(args)


# ---- each script's parser, without work ----

class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once the parse succeeded."""


def _module(rel):
    """The script as a module (repository files by name, tests/*.py by path)."""
    name = rel[:-3].replace(os.sep, ".")
    if os.sep not in rel:
        return importlib.import_module(name)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def _fake_npz(path):
    """What load_npz gives for README's .npz (MNIST digits): the shape and labels, no file."""
    return torch.utils.data.TensorDataset(torch.zeros(10, 1, 28, 28), torch.arange(10))


def _parse_method(rel, argv):
    """The method files and their experiments: their whole parse_args (the recipe's and the
    dataset's defaults, then resolve_args: the mode's checks and its "has no effect" warnings),
    with no checkpoint found and load_npz answering with MNIST's shape, so no file is read."""
    mod = _module(rel)
    base = importlib.import_module("energy_matching" if rel.startswith("energy") else "vpfb")
    with mock.patch.object(base, "find_checkpoint", lambda args: (None, ())), \
            mock.patch.object(base, "load_npz", _fake_npz):
        mod.parse_args(argv)


def _parse_toy2d(rel, argv):
    _module(rel).parse_args(argv)                                   # parse + check_args


def _parse_main(rel, argv):
    """Scripts that build their parser inside main(): main() runs until its first parse_args,
    which parses and then stops it."""
    mod, real = _module(rel), argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), \
            mock.patch.object(sys, "argv", [rel, *argv]):
        try:
            mod.main()
        except _Parsed:
            return
    raise AssertionError(f"{rel}: main() returned without parsing its flags")


CHECKERS = {
    "energy_matching.py": _parse_method, "vpfb.py": _parse_method,
    "energy_matching_experiments.py": _parse_method, "vpfb_experiments.py": _parse_method,
    "toy2d.py": _parse_toy2d, "eval_fid.py": _parse_main,
    "energy_matching_convert.py": _parse_main, "vpfb_convert.py": _parse_main,
    os.path.join("tests", "side_by_side_em.py"): _parse_main,
    os.path.join("tests", "side_by_side_vpfb.py"): _parse_main,
    os.path.join("tests", "bench_speed.py"): _parse_main,
}


def check_script(rel, argv):
    """None if the script's parser accepts argv (and its checks pass), else the reason."""
    if not os.path.isfile(os.path.join(ROOT, rel)):
        return f"{rel} is not a file of the repository"
    if rel not in CHECKERS:
        return f"{rel}: this test has no parser check for it (add one to CHECKERS)"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            CHECKERS[rel](rel, argv)
    except SystemExit as e:                    # argparse's usage lines, then its one-line error
        said = err.getvalue().strip().splitlines()
        return f"exit {e.code}: {said[-1] if said else 'no message'}"
    warnings = [w for w in err.getvalue().splitlines() if w.startswith("warning:")]
    return "; ".join(warnings) or None


def _check_python_c(code):
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"python -c: {e}"
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    missing = [m for m in mods if importlib.util.find_spec(m.split(".")[0]) is None]
    return f"python -c imports {missing}, not installed" if missing else None


def check_command(cmd):
    """None if the command is fine as written, else the reason."""
    name, args = cmd.argv[0], cmd.argv[1:]
    here = os.path.join(ROOT, cmd.cwd)
    if name in ("python", "python3") and args[:1] == ["-c"]:
        return _check_python_c(args[1]) if len(args) > 1 else "python -c without code"
    if name in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        takes_value = {"-k", "-m", "-p", "-o", "-c", "--rootdir", "--deselect"}
        paths = [a for i, a in enumerate(args[2:]) if not a.startswith("-")
                 and (i == 0 or args[1 + i] not in takes_value)]
        missing = [p for p in paths if not os.path.exists(os.path.join(here, p.split("::")[0]))]
        return f"pytest: no such test file {missing}" if missing else None
    if name in ("pip", "pip3"):
        reqs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-r", "--requirement")]
        missing = [r for r in reqs if not os.path.isfile(os.path.join(here, r))]
        return f"pip: no file {missing}" if missing else None
    if name == "cd":
        return None if len(args) == 1 and os.path.isdir(here) else f"cd {args}: no such folder"
    if name in ("python", "python3", "torchrun"):
        try:
            rel, argv = script_call(cmd)
        except SystemExit:
            return "torchrun does not accept these flags"
        if rel is None:
            return f"{name} {args[:2]}: this test does not know this form"
        return check_script(rel, argv)
    return f"README runs {name!r}, which this test does not know"


def readme_problems(text=None):
    """[(line, argv or None, reason)] of everything wrong with README's (or text's) commands."""
    cmds, errors = readme_commands(text)
    out = [(line, None, f"bash: {err}") for line, err in errors]
    for c in cmds:
        why = check_command(c)
        if why:
            out.append((c.line, c.argv, why))
    return out


def _report(problems):
    return "\n".join(f"README:{line}: {shlex.join(argv) if argv else '(block)'}\n    {why}"
                     for line, argv, why in problems)


# ---- the tests ----

# Counted at the commit that added this test; a broken extractor finds far fewer.
EXPECTED_COMMANDS = 63


def test_every_readme_command_is_accepted_by_its_script():
    problems = readme_problems()
    assert not problems, "README commands that fail as written:\n" + _report(problems)


def test_the_extractor_finds_readme_s_commands():
    cmds, _ = readme_commands()
    scripts = [script_call(c)[0] for c in cmds]
    assert len(cmds) >= EXPECTED_COMMANDS - 6, f"only {len(cmds)} commands found in README"
    for s in ["toy2d.py", "energy_matching.py", "vpfb.py", "eval_fid.py", "vpfb_experiments.py",
              "energy_matching_experiments.py", os.path.join("tests", "bench_speed.py")]:
        assert s in scripts, f"no README command runs {s}"
    # bash did the expansion: $V2 became its flags, and --attn-res= stayed one word
    v2 = [c.argv for c in cmds if "runs/vp_authors_uauthors_s0" in c.argv and "npz" in c.argv]
    assert v2 and "--attn-res=" in v2[0] and "--threads" in v2[0], v2
    # the line of a continued command is its first line
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for c in cmds:
        assert re.search(rf"\b{re.escape(c.argv[0])}\b", lines[c.line - 1]), (c.line, c.argv)


def test_scripts_named_in_readme_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    # the authors' files and harness, and a pattern, that README names but this repo has not
    elsewhere = {"configs/homotopy/cifar10.py", "vapo_npz.py", "<method>_experiments.py"}
    names = set(re.findall(r"[\w/<>.-]*\.py\b", text)) - elsewhere
    assert len(names) >= 15, names
    missing = [n for n in sorted(names) if not any(os.path.isfile(os.path.join(ROOT, d, n))
                                                  for d in ("", "tests"))]
    assert not missing, f"README names files that do not exist: {missing}"


SYNTHETIC = """\
Text.

```bash
V="--model-size 16 --attn-res '' --steps 2"
python vpfb.py $V --out-dir runs/x                 # line 5: the old bug, a literal ''
python vpfb.py --model-size 16 --attn-res= \\
    --steps 2 --out-dir runs/x                     # line 6: fine
python vpfb.py --stepz 2                           # line 8: no such flag
python toy2d.py --steps 10 --steps-cd 20           # line 9: toy2d's check_args
python energy_matching.py --mode sample --lr 1e-3  # line 10: a flag sample does not read
python eval_fid.py selfcheck --num-images 65       # line 11: out of range
python tests/side_by_side_em.py /p [--folded]      # line 12: a usage line, not a command
python vpfb_convert.py theirs/checkpoint_<step>.pth out.pt   # line 13: < is a redirection
python nope.py                                     # line 14: no such script
```
"""


def test_a_planted_bad_command_is_caught_with_its_line():
    problems = readme_problems(SYNTHETIC)
    by_line = {line: why for line, _, why in problems}
    assert sorted(by_line) == [5, 8, 9, 10, 11, 12, 13, 14], _report(problems)
    assert "attn-res" in by_line[5] and "''" in by_line[5]
    assert "--stepz" in by_line[8]
    assert "steps-cd" in by_line[9]
    assert "--lr has no effect" in by_line[10]
    assert "step" in by_line[13] and "bash" in by_line[13]
