"""The two method files as twins: the same engineering guarantees, tested once for both.
- The paper as a module: a bare constructor is the printed method, its functions run with their
  own defaults, presets are dicts, the top half imports only what the method needs.
- Reliability: one run per output folder, resume never goes back, faulty data and full disks are
  one line and exit 2 (no network built, no temporary file left), impossible requests refused.
- One precedence rule for every setting a mode reads: typed flag > checkpoint > recipe."""
import ast
import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import energy_matching as em
import vpfb
import vpfb_experiments as vpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EM = ["--dataset", "fake", "--image-size", "8", "--fake-size", "32", "--batch-size", "8",
      "--model-size", "8", "--vit-depth", "1", "--res-blocks", "1", "--ch-mult", "1,2",
      "--workers", "0", "--n-langevin", "2", "--dt", "0.05", "--tau-s", "0.1", "--log-every", "0",
      "--num-samples", "0", "--warmup", "1", "--lr", "1e-3", "--device", "cpu", "--amp", "none",
      "--threads", "1"]
VP = ["--recipe", "ours", "--dataset", "fake", "--image-size", "8", "--fake-size", "32",
      "--model-size", "8", "--res-blocks", "1", "--ch-mult", "1,2", "--attn-res", "",
      "--workers", "0", "--batch-size", "8", "--sample-batch", "8", "--ode-steps", "2",
      "--num-samples", "0", "--sampler", "euler", "--device", "cpu", "--threads", "1",
      "--log-every", "0"]
TWINS = [pytest.param(em, EM, "ckpt_warmup.pt", id="em"),
         pytest.param(vpfb, VP, "ckpt_main.pt", id="vpfb")]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one intra-op thread


def one_error(capsys, e, code=2):
    """The single "error:" line of a refused run (warnings of unread flags aside)."""
    assert e.value.code == code
    err = [s for s in capsys.readouterr().err.splitlines() if not s.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def files(d):
    return {p: open(os.path.join(d, p), "rb").read() for p in sorted(os.listdir(d))}


def no_network(mod, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network was built")
    monkeypatch.setattr(mod, "build_net", refuse)


# ---------------------------------------------------------------------------- the paper as a module
def test_bare_classes_are_the_printed_method_and_presets_are_dicts():
    """EnergyMatching(V): Alg. 1-2 with App. C's CIFAR-10 numbers; VPFB(phi): Eq. (27) with the
    printed covariance; AUTHORS / OURS are dicts that the constructors take and the command
    lines' recipes are built from; both command lines default to --recipe authors."""
    V = em.EnergyMatching(lambda x: x.sum(1))
    assert (V.tau_star, V.eps_max, V.lambda_cd, V.cd_trim,
            V.cd_neg_clamp) == (0.9, 0.01, 2e-4, 0, 0)
    assert (V.flow_weighting, V.same_temperature, V.flow_reduction) == (False, False, "sum")
    P = vpfb.VPFB(lambda x, t: x.sum(1))
    assert (P.cov_form, P.kappa, P.lam_gt, P.weight_on, P.bfactor) == ("cov", 2.0, 1.0, "cov", 2.0)
    A = em.EnergyMatching(lambda x: x.sum(1), **em.AUTHORS)
    assert all(getattr(A, k) == v for k, v in em.AUTHORS.items())
    for mod, presets in ((em, {"authors": em.AUTHORS}),
                         (vpfb, {"authors": vpfb.AUTHORS, "ours": vpfb.OURS})):
        for name, preset in presets.items():
            assert isinstance(preset, dict)
            row = mod.RECIPES[name]
            assert all(row[k] == (v if k != "clamp_negatives" else True) for k, v in preset.items()
                       if k in row), name
        assert mod.build_parser().get_default("recipe") == "authors"
    assert vpfb.VPFB(lambda x, t: x.sum(1), **vpfb.OURS).cov_form == "stein"


@pytest.mark.parametrize("mod,cls", [(em, "EnergyMatching"), (vpfb, "VPFB")], ids=["em", "vpfb"])
def test_recipes_are_plain_dicts_and_help_shows_their_values(mod, cls, capsys):
    """--recipe paper's method flags are the bare class's own defaults (the parser states them,
    read back here); --help shows the default recipe's (authors') real values, never None."""
    import inspect
    sig = inspect.signature(getattr(mod, cls)).parameters
    flags = mod.build_parser("paper").parse_args([])
    as_flag = {"clamp_negatives": False}                     # EM: None (no clamp) as a flag
    for k in mod.METHOD_FLAGS:
        assert getattr(flags, k) == as_flag.get(k, sig[k].default), k
    with pytest.raises(SystemExit):
        mod.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    for k, v in mod.AUTHORS.items():
        if k in mod.METHOD_FLAGS and not isinstance(v, tuple):
            assert mod.build_parser().get_default(k) == v, k


@pytest.mark.parametrize("name", ["energy_matching_experiments", "vpfb_experiments"])
def test_the_experiments_help_gives_no_default_for_the_required_mode(name, capsys):
    """--mode is required in an experiments file: --help must not print "(default: train)", a
    mode that file does not have."""
    import importlib
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "what to do" in out and "(default: train)" not in out

def test_bare_functions_run_with_their_own_defaults():
    """Every function above the divider works with its own defaults (VPFB.langevin's step used to
    give NaN within 30 steps) on a small example, and gives finite output."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
    phi = lambda x, t: net(torch.cat([x, t[:, None]], 1)).squeeze(1)   # noqa: E731
    V = lambda x: net(torch.cat([x, torch.zeros_like(x[:, :1])], 1)).squeeze(1)   # noqa: E731
    x1, x0 = torch.randn(16, 2) + 2, torch.randn(16, 2)
    m = em.EnergyMatching(V)
    outs = [m.loss(x1)[0], m.loss(x1, phase="main")[0], m.sample(x0), em.ot_pair(x0, x1),
            em.langevin(V, x0, 10, 0.01, 0.1), em.temperature(torch.rand(5), 0.9, 0.01),
            torch.tensor(em.lid_slq(V, x1[:2], 1.0)), torch.stack(em.lid_exact(V, x1[:2], 1.0)[1])]
    p = vpfb.VPFB(phi)
    outs += [p.loss(x1)[0], p.sample(x0), p.sample(x0, solver="rk45"), p.langevin(x0),
             p.boltzmann_energy(x0), vpfb.sgld(p.grad_boltzmann, x0)[0],
             vpfb.ode_solve(p.grad_phi, x0)[0], vpfb.slerp(x0, x1, 0.3),
             vpfb.Schedule().gamma_bar(x1, torch.rand(16))]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", ["energy_matching.py", "vpfb.py"])
def test_the_method_half_imports_only_what_the_method_needs(name):
    """argparse, signal, shlex, torch.distributed and the like are imported below the divider."""
    src = open(os.path.join(ROOT, name), encoding="utf-8").read()
    top = src[:src.index("# ==== ENGINEERING")]
    mods = set()
    for node in ast.walk(ast.parse(top)):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module)
    assert mods <= {"contextlib", "math", "numpy", "torch", "torch.nn", "torch.nn.functional",
                    "ot", "scipy.integrate", "torch.nn.attention"}, mods
    assert "benchmark" not in em.MODES and "benchmark" not in vpfb.MODES


@pytest.mark.parametrize("name", ["energy_matching.py", "vpfb.py"])
def test_sections_1_2_copied_alone_train_and_sample(name):
    """Everything above the ENGINEERING divider, copied into a fresh module (no engineering, no
    argparse, no file I/O): the paper's network and bare method train a few steps (the loss goes
    down on a fixed batch) and sample finite images."""
    import types
    src = open(os.path.join(ROOT, name), encoding="utf-8").read()
    mod = types.ModuleType("paper_only")
    exec(compile(src[:src.index("# ==== ENGINEERING")], name, "exec"), mod.__dict__)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    if name == "energy_matching.py":
        net = mod.CNNPotential((1, 8, 8), 4)
        method = mod.EnergyMatching(net, n_langevin=2, dt=0.05, tau_s=0.1)
        noise = torch.randn_like(x)
        loss = lambda: method.loss(x, noise)[0]                                # noqa: E731
    else:
        net = mod.UNetPhi(1, 8, (1, 2), 1, (4,), 0.0, 8)
        method = mod.VPFB(net, **mod.OURS)                      # a preset, from the copy too
        eps, tt = torch.randn_like(x), torch.rand(8)
        loss = lambda: method.loss(x, eps, tt)[0]                              # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first
    out = method.sample(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- reliability
@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_resume_never_goes_backwards(mod, tiny, ckpt, tmp_path, capsys):
    """--resume with --steps at or below the checkpoint's step: one line, exit 0, no file changes
    (the same text in both files)."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "3", "--out-dir", out])
    before = files(out)
    capsys.readouterr()
    for steps in (["--steps", "2"], []):                   # without --steps: the checkpoint's 3
        assert mod.main(tiny + ["--resume", "--out-dir", out] + steps) in ([], None)
        want = f"checkpoint is at step 3 >= --steps {steps[1] if steps else 3}: nothing to do"
        assert capsys.readouterr().out.strip().splitlines()[-1] == want
    assert files(out) == before


def unlocked(out):
    """True when no process holds the run lock of folder `out` (flock on <out>/.lock)."""
    import fcntl
    with open(os.path.join(out, ".lock")) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_one_run_per_output_folder(mod, tiny, ckpt, tmp_path, capsys):
    """A second run on a folder a live run holds: one line naming the lock file and the holder's
    pid, exit 2, nothing touched; the kernel frees the lock of a run killed by SIGKILL, and ours
    is freed at exit."""
    out = str(tmp_path)
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import {mod.__name__} as m; "
            f"lock = m.run_lock({out!r}); lock.__enter__(); print('held', flush=True); "
            f"time.sleep(60)")
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--steps", "1", "--out-dir", out])
        err = one_error(capsys, e)
        assert os.path.join(out, ".lock") in err and f"pid {live.pid}" in err, err
        assert os.listdir(out) == [".lock"] and not unlocked(out)
    finally:
        live.kill()                                     # SIGKILL: no handler, no clean-up
        live.wait()
    mod.main(tiny + ["--steps", "1", "--out-dir", out])
    assert os.path.exists(os.path.join(out, ckpt)) and unlocked(out)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_start_up_removes_only_our_temporary_files(mod, tiny, ckpt, tmp_path, capsys):
    """A killed write leaves X.ext.tmp.ext (atomic()) or .write_test_<pid>: removed at the next
    start, by that exact name. A user's notes.tmp.txt, foo.tmp or folder eval.tmp/ stay (the
    first was deleted, the last crashed the run with IsADirectoryError)."""
    out = tmp_path
    mod.main(tiny + ["--steps", "1", "--out-dir", str(out)])
    ours = [f"{ckpt}.tmp.pt", f"{ckpt}.tmp", "metrics.jsonl.tmp.jsonl", "summary_x.json.tmp.json",
            "samples_ema_0000001.png.tmp.png", "samples.npz.tmp.npz", ".write_test_4242"]
    # X.ext.tmp: the name of earlier versions' temporary files
    users = ["notes.tmp.txt", "foo.tmp", "a.tmp.pt", "x.png.tmp.jpg", "eval.tmp/keep.json",
             "run.json.tmp.json/keep.txt"]
    for name in ours + users:
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("x")
    mod.main(tiny + ["--steps", "2", "--resume", "--out-dir", str(out)])
    assert [n for n in ours if (out / n).exists()] == []
    assert [n for n in users if not (out / n).exists()] == []
    assert mod.load_checkpoint(str(out / ckpt))["step"] == 2


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_resume_after_a_partial_metrics_line(mod, tiny, ckpt, tmp_path, capsys):
    """metrics.jsonl ending in half a line (kill -9 or a full disk mid-append) made --resume a
    traceback: the line is dropped with one printed line, the other records are kept."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "2", "--out-dir", out])
    path = os.path.join(out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "phase": "x", "lo')
    capsys.readouterr()
    mod.main(tiny + ["--steps", "3", "--resume", "--out-dir", out])
    said = [s for s in capsys.readouterr().out.splitlines() if "dropped" in s]
    assert said == [f"{path}: dropped unreadable line 3 (a write cut short by kill -9 or a full "
                    f"disk?); kept the other 2 records"]
    recs = [strict_load(s) for s in open(path)]
    assert [r["step"] for r in recs] == [1, 2, 3]


def _npz(path, images, **extra):
    np.savez(path, images=images, **extra)
    return str(path)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_faulty_data_is_one_line_before_any_network(mod, tiny, ckpt, tmp_path, capsys,
                                                    monkeypatch):
    from PIL import Image
    good = _npz(tmp_path / "good.npz", np.zeros((4, 8, 8, 1), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(good, "rb").read()[:300])
    folder = tmp_path / "imgs" / "any"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"\x89PNG not really")
    cases = [("npz", str(truncated), "cannot read"),
             ("npz", _npz(tmp_path / "zero.npz", np.zeros((0, 8, 8, 1), np.uint8)), "0 images"),
             ("npz", _npz(tmp_path / "wide.npz", np.zeros((4, 8, 12, 1), np.uint8)), "8 x 12"),
             ("npz", _npz(tmp_path / "tiny.npz", np.zeros((4, 4, 4, 1), np.uint8)), "4 x 4"),
             ("folder", str(tmp_path / "imgs"), "bad.png")]
    no_network(mod, monkeypatch)
    for dataset, path, says in cases:
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--dataset", dataset, "--data-dir", path, "--steps", "1",
                             "--out-dir", str(tmp_path / "o")])
        assert says in one_error(capsys, e), (path, says)
    if mod is vpfb:                       # --class-cond needs labels 0..K-1
        bad = _npz(tmp_path / "neg.npz", np.zeros((4, 8, 8, 1), np.uint8), labels=-np.ones(4, int))
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--dataset", "npz", "--data-dir", bad, "--class-cond",
                             "--out-dir", str(tmp_path / "o")])
        assert "labels 0..K-1" in one_error(capsys, e)


def bad_image_folders(root):
    """Folders of 4 good 8 x 8 images plus one fault each: {name: (path, the file to name)}."""
    from PIL import Image
    out = {}
    for name in ("png16", "cut_jpeg", "bad_crc", "loop"):
        d = root / name / "a"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(d / f"{i}.png")
        out[name] = (str(root / name), None)
    grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000          # white as RGB
    Image.fromarray(grey16).save(root / "png16" / "a" / "deep.png")
    out["png16"] = (out["png16"][0], "deep.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        root / "cut_jpeg" / "a" / "cut.jpg", quality=95)
    jpeg = (root / "cut_jpeg" / "a" / "cut.jpg").read_bytes()
    (root / "cut_jpeg" / "a" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])   # a partial copy
    png = bytearray((root / "bad_crc" / "a" / "0.png").read_bytes())
    png[40] ^= 0xFF                                                        # a flipped byte
    (root / "bad_crc" / "a" / "crc.png").write_bytes(bytes(png))
    out["cut_jpeg"] = (out["cut_jpeg"][0], "cut.jpg")
    out["bad_crc"] = (out["bad_crc"][0], "crc.png")
    os.symlink("..", root / "loop" / "a" / "up")                           # a/up -> .. : a loop
    os.symlink(".", root / "loop" / "a" / "self")
    return out


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_image_folders_get_eval_fid_s_checks_at_load(mod, tiny, ckpt, tmp_path, capsys,
                                                     monkeypatch):
    """--dataset folder: a 16-bit PNG (it trained as white), a truncated JPEG (it stopped the run
    at the first batch holding it, naming no file) and a PNG with a bad CRC are one line naming
    the file, exit 2, before any network; eval_fid.py refuses the same files. A folder whose links
    loop (a/up -> ..) lists each image once, and the training banner says how many."""
    import eval_fid
    folders = bad_image_folders(tmp_path)
    no_network(mod, monkeypatch)
    for name, (path, culprit) in folders.items():
        if culprit is None:
            continue
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--dataset", "folder", "--data-dir", path, "--batch-size", "2",
                             "--steps", "1", "--out-dir", str(tmp_path / "o")])
        err = one_error(capsys, e)
        assert culprit in err and "Traceback" not in err, (name, err)
        with pytest.raises(eval_fid.FIDError, match=culprit):
            eval_fid.check_images(path)
    monkeypatch.undo()
    samples, classes = mod.list_images(folders["loop"][0])
    assert classes == ["a"] and sorted(os.path.basename(p) for p, _ in samples) == [
        f"{i}.png" for i in range(4)]
    mod.main(tiny + ["--dataset", "folder", "--data-dir", folders["loop"][0], "--batch-size", "2",
                     "--steps", "1", "--out-dir", str(tmp_path / "loop_run")])
    assert "| folder: 4 images (3, 8, 8) |" in capsys.readouterr().out


def test_the_image_folder_code_is_one_text_in_both_twins():
    """One implementation of the folder reader, the out-dir clean-up and strict JSON, the same
    text in both method files (strict_json also in eval_fid.py, which cannot import them)."""
    import inspect

    import eval_fid
    for name in ("IMAGE_EXTS", "list_images", "check_image", "ImageFiles", "image_folder",
                 "TEMP_EXTS", "remove_temp_files", "strict_json"):
        a, b = getattr(em, name), getattr(vpfb, name)
        assert (a == b) if isinstance(a, tuple) else inspect.getsource(a) == inspect.getsource(b)
    assert inspect.getsource(eval_fid.strict_json) == inspect.getsource(em.strict_json)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_full_disk_is_one_line_and_leaves_no_temporary_file(mod, tiny, ckpt, tmp_path, capsys,
                                                            monkeypatch):
    """Every write path goes through atomic(): a checkpoint, samples or a log that cannot be
    written (ENOSPC) is one line, exit 2, and no temporary file stays behind."""
    out = str(tmp_path / "run")
    mod.main(tiny + ["--steps", "1", "--out-dir", out])

    def full(path):                            # half a file, then the disk is full
        with open(path, "wb") as h:
            h.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    for obj, name, argv, says in [
            (mod.torch, "save", tiny + ["--steps", "2", "--resume"], ckpt),
            (mod.np, "savez", ["--mode", "sample", "--num-samples", "2", "--device", "cpu"],
             "samples.npz")]:
        monkeypatch.setattr(obj, name, (lambda o, f: full(f)) if name == "save" else
                            (lambda f, **k: full(f)))
        with pytest.raises(SystemExit) as e:
            mod.main(argv + ["--out-dir", out])
        monkeypatch.undo()
        err = one_error(capsys, e)
        assert says in err and "No space left on device" in err
        assert not [p for p in os.listdir(out) if ".tmp" in p or p.startswith(".write_test")]
        assert unlocked(out)                                        # the lock is freed too
    assert mod.load_checkpoint(os.path.join(out, ckpt))["step"] == 1   # the old one is intact


def strict_load(text):
    """json.loads that refuses the bare NaN / Infinity that Python's json writes by default."""
    def refuse(c):
        raise ValueError(f"not strict JSON: bare {c}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_every_json_written_is_strict(mod, tiny, ckpt, tmp_path, capsys, monkeypatch):
    """A NaN-guarded step's NaN loss, a NaN in a mode's result: null in strict JSON, its key path
    under "non_finite"; metrics.jsonl reads back as NaN (also after a resume rewrites it). Step 1
    is a real one: a run with no finite step exits 3
    (test_a_run_that_trained_nothing_usable_...)."""
    real, calls = mod.train_step, []

    def nan_step(*a, **k):
        logs, ok, signum = real(*a, **k)
        calls.append(1)
        return ({**logs, "loss": float("nan")}, False, signum) if len(calls) > 1 else (logs, ok,
                                                                                        signum)

    out = str(tmp_path)
    monkeypatch.setattr(mod, "train_step", nan_step)
    mod.main(tiny + ["--steps", "2", "--out-dir", out])
    monkeypatch.undo()
    summary = strict_load(open(os.path.join(out, f"summary_{ckpt[5:-3]}.json")).read())
    assert summary["final"]["loss"] is None and summary["non_finite"] == {"final.loss": "nan"}
    mod.main(tiny + ["--steps", "3", "--resume", "--out-dir", out])      # rewrites metrics.jsonl
    recs = [strict_load(s) for s in open(os.path.join(out, "metrics.jsonl"))]
    assert np.isfinite(recs[0]["loss"]) and recs[1]["loss"] is None
    assert recs[1]["non_finite"] == {"loss": "nan"} and "non_finite" not in recs[0]
    assert np.isfinite(recs[2]["loss"]) and "non_finite" not in recs[2]
    back = mod.Logger(out).read_metrics()
    assert np.isnan(back[1]["loss"]) and "non_finite" not in back[1]
    capsys.readouterr()
    mod.report(out, "r.json", {"auroc": {"svhn": float("nan")}, "v": [float("-inf"), 1.0]})
    for text in (capsys.readouterr().out, open(os.path.join(out, "r.json")).read()):
        r = strict_load(text)
        assert r["auroc"]["svhn"] is None and r["v"] == [None, 1.0]
        assert r["non_finite"] == {"auroc.svhn": "nan", "v[0]": "-inf"}
    for name in os.listdir(out):
        if name.endswith(".json"):
            strict_load(open(os.path.join(out, name)).read())


def test_a_real_file_size_limit_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """The real thing once, in a subprocess: RLIMIT_FSIZE below a checkpoint's size."""
    import resource
    out = str(tmp_path / "run")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    r = subprocess.run([sys.executable, os.path.join(ROOT, "energy_matching.py"), *EM,
                        "--steps", "1", "--out-dir", out], capture_output=True, text=True,
                       preexec_fn=limit, timeout=180, cwd=str(tmp_path),
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert (len(err) == 1 and err[0].startswith("error: cannot write ")
            and "Traceback" not in r.stderr)
    assert not [p for p in os.listdir(out) if ".tmp" in p]


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_requests_that_can_only_fail_are_refused_first(mod, tiny, ckpt, tmp_path, capsys,
                                                      monkeypatch):
    """An image size whose activations cannot fit: one line before the network is built. VPFB:
    an ODE time range that runs backwards. --steps 0 still writes a checkpoint."""
    no_network(mod, monkeypatch)
    with pytest.raises(SystemExit) as e:
        mod.main(tiny + ["--image-size", "4096", "--out-dir", str(tmp_path)])
    assert "GiB" in one_error(capsys, e)
    if mod is vpfb:
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--t0", "0.6", "--t1", "0.5", "--out-dir", str(tmp_path)])
        assert "--t1 0.5 must be after --t0 0.6" in one_error(capsys, e)
    monkeypatch.undo()
    mod.main(tiny + ["--steps", "0", "--out-dir", str(tmp_path / "zero")])
    assert mod.load_checkpoint(str(tmp_path / "zero" / ckpt))["step"] == 0


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_seeds_outside_what_the_generators_take_are_one_line(mod, tiny, ckpt, tmp_path, capsys,
                                                             monkeypatch):
    """--seed 2**64 was a ValueError traceback (torch.manual_seed overflows); the range is numpy's
    and eval_fid.py's, [0, 2**32), in every script."""
    no_network(mod, monkeypatch)
    for seed in (str(2 ** 64), str(2 ** 32), "-1", "1e3"):
        with pytest.raises(SystemExit) as e:
            mod.main(tiny + ["--seed", seed, "--steps", "1", "--out-dir", str(tmp_path)])
        err = one_error(capsys, e)
        assert "--seed" in err and "[0, 2**32)" in err, err
    assert mod.parse_args(tiny + ["--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1


@pytest.mark.parametrize("mod", [em, vpfb])
def test_threads_default_leaves_busy_cores_alone(mod, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(mod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert mod.pick_threads(0) == cores and mod.pick_threads(3) == 3
    monkeypatch.setattr(mod.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert mod.pick_threads(0) == 1


# ----------------------------------------------------------------------------- one precedence rule
def test_em_sampling_uses_what_the_model_was_trained_with(tmp_path, capsys, monkeypatch):
    """A checkpoint trained with dt 0.05 and eps_max 0.2 samples with them unless --dt / --eps-max
    are typed; each setting is printed once with its source and written into samples.json."""
    out = str(tmp_path)
    em.main(EM + ["--eps-max", "0.2", "--steps", "1", "--out-dir", out])
    seen = []
    real = em.EnergyMatching.sample

    def spy(self, x0, **kw):
        seen.append((self.dt, self.eps_max, self.tau_s))
        return real(self, x0, **kw)

    monkeypatch.setattr(em.EnergyMatching, "sample", spy)
    capsys.readouterr()
    em.main(["--mode", "sample", "--num-samples", "2", "--out-dir", out, "--device", "cpu"])
    said = capsys.readouterr().out
    meta = em.json.load(open(os.path.join(out, "samples.json")))
    assert seen[-1] == (0.05, 0.2, 0.1) and meta["steps"] == 2
    assert meta["settings"]["dt"] == 0.05 and meta["from"]["dt"] == "checkpoint"
    assert "dt 0.05 (checkpoint)" in said and "eps_max 0.2 (checkpoint)" in said
    assert "sampler heun (checkpoint)" in said
    em.main(["--mode", "sample", "--num-samples", "2", "--dt", "0.02", "--eps-max", "0.5",
             "--out-dir", out, "--device", "cpu"])
    meta = em.json.load(open(os.path.join(out, "samples.json")))
    assert seen[-1] == (0.02, 0.5, 0.1) and meta["steps"] == 5
    assert (meta["from"]["dt"], meta["from"]["eps_max"], meta["from"]["tau_s"]) == (
        "flag", "flag", "checkpoint")


def test_vpfb_sampling_uses_what_the_model_was_trained_with(tmp_path, capsys):
    """The same rule in vpfb.py: ODE steps, time range, sampler and Phi_B's time."""
    out = str(tmp_path)
    vpfb.main(VP + ["--ode-steps", "3", "--t0", "0.01", "--t-inf", "0.9", "--steps", "1",
                    "--out-dir", out])
    capsys.readouterr()
    vpfb.main(["--mode", "sample", "--num-samples", "2", "--out-dir", out, "--device", "cpu"])
    meta = vpfb.json.load(open(os.path.join(out, "samples.json")))
    assert meta["nfe_mean"] == 3 and meta["settings"]["t0"] == 0.01
    assert {meta["from"][k] for k in ("ode_steps", "t0", "sampler", "t_inf")} == {"checkpoint"}
    assert "ode_steps 3 (checkpoint)" in capsys.readouterr().out
    vpfb.main(["--mode", "sample", "--num-samples", "2", "--ode-steps", "5", "--out-dir", out,
               "--device", "cpu"])
    meta = vpfb.json.load(open(os.path.join(out, "samples.json")))
    assert meta["nfe_mean"] == 5 and meta["from"]["ode_steps"] == "flag"
    vpx.main(["--mode", "hist", "--ood-max", "4", "--out-dir", out, "--device", "cpu"])
    hist = vpfb.json.load(open(os.path.join(out, "hist.json")))
    assert hist["settings"]["t_inf"] == 0.9 and hist["from"]["t_inf"] == "checkpoint"


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_no_flag_is_silently_ignored(mod, tiny, ckpt, tmp_path, capsys):
    """A typed flag the mode does not read is a one-line warning; a network flag that differs from
    the checkpoint's is an error (one line, exit 2)."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "1", "--out-dir", out])
    capsys.readouterr()
    mod.main(["--mode", "sample", "--num-samples", "2", "--lr", "1", "--out-dir", out,
              "--device", "cpu"])
    assert "warning: --lr has no effect in --mode sample" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mod.main(["--mode", "sample", "--model-size", "16", "--out-dir", out, "--device", "cpu"])
    assert "--model-size 16 (checkpoint: 8)" in one_error(capsys, e)


@pytest.mark.parametrize("mod", [em, vpfb])
def test_dataset_in_an_eval_mode_warns_only_beside_out_dir(mod, capsys, monkeypatch):
    """Without --out-dir, --dataset names the run folder (runs/<method>_<dataset>): no warning."""
    monkeypatch.setattr(mod, "find_checkpoint", lambda args: (None, ()))
    a = mod.parse_args(["--mode", "sample", "--dataset", "mnist", "--device", "cpu"])
    assert a.out_dir.endswith("_mnist") and "has no effect" not in capsys.readouterr().err
    mod.parse_args(["--mode", "sample", "--dataset", "mnist", "--out-dir", "x", "--device", "cpu"])
    assert "--dataset has no effect in --mode sample" in capsys.readouterr().err


def test_em_npz_of_mnist_images_takes_the_mnist_numbers(tmp_path):
    """--dataset npz of 28 x 28 grey images gets App. C's MNIST row and the CNN, as --dataset
    mnist."""
    data = _npz(tmp_path / "digits.npz", np.zeros((4, 28, 28, 1), np.uint8))
    a = em.parse_args(["--dataset", "npz", "--data-dir", data, "--phase", "main",
                       "--from-scratch", "--out-dir", str(tmp_path)])
    m = em.parse_args(["--dataset", "mnist", "--phase", "main", "--from-scratch",
                       "--out-dir", str(tmp_path)])
    keys = ("lambda_cd", "dt", "n_langevin", "lr", "arch", "model_size")
    assert [getattr(a, k) for k in keys] == [getattr(m, k) for k in keys] == [
        0.25, 0.05, 50, 1e-4, "cnn", 32]
    assert em.like_mnist(a) and em.like_mnist(m)             # and so LID's tau 10 (experiments)
    assert a.sources_["lambda_cd"] == "recipe"


# ----------------------------------------------------------------------------- speed (issue 21)
# torch.compile's default backend (inductor) generates and compiles C++ for minutes on a CPU; the
# tests use "aot_eager": the same graph capture and aot_autograd (where autograd.grad's double
# backward fails), without code generation. README's "Speed" has the inductor figures.
def test_compiled_losses_and_gradients_equal_eager():
    torch.manual_seed(0)
    net = em.CNNPotential((1, 8, 8), ch=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m = em.EnergyMatching(net, **em.AUTHORS)
    w = vpfb.UNetPhi(1, 8, (1, 2), 1, (), 0.0, 8, 0)
    for p in w.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    v = vpfb.VPFB(w, **vpfb.OURS)
    x, u, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4)
    runs = [(m, "flow_residual", lambda: m.flow_residual(x, u).sum(), net),
            (v, "objective", lambda: v.objective(x, u, t)[0], w)]
    for method, name, loss, model in runs:
        ps = list(model.parameters())

        def value_and_grads():
            out = loss()
            gs = torch.autograd.grad(out, ps, allow_unused=True)
            return out, [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]

        eager = value_and_grads()
        (em if method is m else vpfb).use_torch_func(method)   # the torch.func route alone
        func = value_and_grads()
        (em if method is m else vpfb).compile_method(method, "aot_eager")
        comp = value_and_grads()
        for other in (func, comp):
            assert torch.allclose(other[0], eager[0], rtol=1e-6, atol=1e-7), name
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8)
                       for a, b in zip(other[1], eager[1]))


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_a_compiled_run_trains_and_resumes_like_an_eager_one(mod, tiny, ckpt, tmp_path,
                                                            monkeypatch):
    import functools
    small = tiny + (["--arch", "cnn", "--model-size", "4"] if mod is em else
                    ["--arch", "wrn", "--model-size", "4", "--wrn-depth", "10"])
    monkeypatch.setattr(mod, "compile_method", functools.partial(mod.compile_method,
                                                                 backend="aot_eager"))
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = mod.main(small + extra + ["--steps", "3", "--out-dir", str(tmp_path / name)])
    mod.main(small + ["--compile", "--steps", "2", "--out-dir", str(tmp_path / "cut")])
    mod.main(small + ["--compile", "--steps", "3", "--resume", "--out-dir", str(tmp_path / "cut")])
    losses = {k: [r["loss"] for r in v] for k, v in runs.items()}
    assert np.allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    a, b = (mod.load_checkpoint(str(tmp_path / d / ckpt)) for d in ("compiled", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_grouped_optimiser_and_clipping_give_the_loop_s_numbers():
    """Fewer ops, the same numbers: foreach Adam equals the per-parameter loop, and the authors'
    element-wise clipping in grouped ops equals its per-parameter form, bit for bit."""
    torch.manual_seed(3)
    shapes = [(10,), (3, 4), (5, 5, 3)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    args = vpfb.parse_args(["--recipe", "authors", "--unet", "ours"])
    a = torch.optim.Adam(ps, lr=args.lr, betas=(0.9, 0.999))       # the per-parameter loop
    b = vpfb.build_optimizer(torch.nn.ParameterList(qs), args)     # foreach + the clip hook
    for i in range(6):
        g = [torch.randn_like(p) * (1 + 10 * (i % 2)) for p in ps]
        for p, q, gg in zip(ps, qs, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        if i:                                                      # the authors' rule, by hand
            for p in ps:
                st = a.state[p]
                lim = 3.0 * torch.sqrt(st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))) + 0.1
                p.grad.copy_(torch.maximum(torch.minimum(p.grad, lim), -lim))
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs)), i


def test_bench_speed_prints_one_json_line_per_measurement(tmp_path, monkeypatch):
    """Also where README's cifar10 runs exist: the benchmark parses into no run folder."""
    import importlib.util
    monkeypatch.chdir(tmp_path)
    for run in ("runs/em_cifar10/ckpt_warmup.pt", "runs/vpfb_cifar10/ckpt_main.pt"):
        os.makedirs(os.path.dirname(run))
        open(run, "w").close()
    spec = importlib.util.spec_from_file_location("bench_speed",
                                                  os.path.join(ROOT, "tests", "bench_speed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--size", "tiny", "--batch", "2", "--steps", "1",
                       "--warmup", "0", "--forms", "eager,bf16"])
    assert [r["what"] for r in rows] == ["em_phase1", "em_sampler", "em_phase2", "vpfb_train",
                                         "vpfb_ode"]
    for r in rows:
        assert {"what", "form", "device", "batch", "ms_per_step", "img_per_s", "ops_per_step",
                "peak_mem_gib"} <= set(r) and r["ms_per_step"] > 0 and r["batch"] == 2
    ops = {r["what"]: r["ops_per_step"] for r in rows}
    assert ops["em_phase1"] > ops["em_sampler"] > 0 and ops["vpfb_train"] > ops["vpfb_ode"] > 0


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_warmup_starts_at_lr_zero_and_metrics_keep_tiny_learning_rates(mod, tiny, ckpt, tmp_path):
    """The authors' warm-up (both papers' code): lr min(1, step / warmup), so the first step runs at
    lr 0; metrics.jsonl keeps 7 significant digits, so lr 1e-3 / 10,000 is not rounded to 0."""
    assert mod.warmup_lr(1e-3, 0, 10) == 0.0 and mod.warmup_lr(1e-3, 5, 10) == 5e-4
    assert mod.warmup_lr(1e-3, 20, 10) == 1e-3 and mod.warmup_lr(1e-3, 0, 0) == 1e-3
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "2", "--warmup", "10000", "--lr", "1e-3", "--out-dir", out])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lrs = [json.loads(s)["lr"] for s in f]
    assert lrs == [0.0, 1e-7]


def _stop_at(mod, monkeypatch, step):
    """A real SIGTERM to this process once `step`'s metrics are written (as a preempted job)."""
    import signal
    real = mod.Logger.metrics

    def metrics_then_kill(self, rec):
        real(self, rec)
        if rec["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(mod.Logger, "metrics", metrics_then_kill)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_the_printed_resume_command_continues_a_run_started_from_ckpt(mod, tiny, ckpt, tmp_path,
                                                                       capsys, monkeypatch):
    """A run started from another run's --ckpt, stopped by SIGTERM, prints a command that still
    holds that --ckpt; run as printed it continues THIS run from its own checkpoint (before: it went
    back to the --ckpt file and overwrote the run's checkpoint)."""
    import shlex
    first, run = str(tmp_path / "first"), str(tmp_path / "run")
    mod.main(tiny + ["--steps", "2", "--out-dir", first])
    _stop_at(mod, monkeypatch, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main(tiny + ["--resume", "--ckpt", f"{first}/{ckpt}", "--steps", "6", "--out-dir", run])
    monkeypatch.undo()
    assert e.value.code == 143
    line = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(line.split("resume: ", 1)[1])[2:]          # drop "python <file>"
    assert f"{first}/{ckpt}" in argv and argv[-1] == "--resume"
    stopped = mod.load_checkpoint(f"{run}/{ckpt}")["step"]
    assert 4 <= stopped < 6
    mod.main(argv)
    out = capsys.readouterr().out
    assert f"resumed from {run}/{ckpt} at step {stopped}" in out, out
    assert mod.load_checkpoint(f"{run}/{ckpt}")["step"] == 6
    steps = [json.loads(s)["step"] for s in open(f"{run}/metrics.jsonl")]
    assert steps == [3, 4, 5, 6], steps                           # nothing cut back or repeated


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_the_same_command_again_never_replaces_a_run(mod, tiny, ckpt, tmp_path, capsys):
    """Training again into a folder that holds a run, without --resume: one line naming --resume
    and --out-dir, exit 2, no file touched (before: the checkpoint was silently replaced)."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "2", "--out-dir", out])
    before = files(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main(tiny + ["--steps", "2", "--out-dir", out])
    err = one_error(capsys, e)
    assert ckpt in err and "--resume" in err and "--out-dir" in err
    assert files(out) == before


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_ctrl_c_while_sampling_is_one_line_and_keeps_old_outputs(mod, tiny, ckpt, tmp_path,
                                                                 capsys, monkeypatch):
    """Ctrl-C during --mode sample: exit 130 and one line (before: an 82-line traceback), the
    folder as it was."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "1", "--out-dir", out])
    before = files(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(mod, "generate", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main(["--mode", "sample", "--num-samples", "2", "--device", "cpu", "--threads", "1",
                  "--out-dir", out])
    assert "interrupted" in one_error(capsys, e, code=130)
    assert files(out) == {k: v for k, v in before.items()}


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_flags_that_give_no_work_are_one_line_before_the_network(mod, tiny, ckpt, tmp_path,
                                                                 capsys, monkeypatch):
    """A chain of zero steps (VPFB's SGLD sampler and long run, EM's sampler at tau_s / dt -> 0 and
    its phase-2 CD chains), an inpainting hole that hides every pixel (it wrote a bare NaN into
    JSON), an LID run on fewer than 3 images (no Spearman correlation), a compose string with no
    group: one line, exit 2, before any network is built."""
    import energy_matching_experiments as emx
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "1", "--out-dir", out])
    no_network(mod, monkeypatch)
    run = ["--device", "cpu", "--threads", "1", "--out-dir", out]
    if mod is vpfb:
        cases = [(vpfb.main, ["--mode", "sample", "--sampler", "sgld", "--sgld-steps", "0",
                              "--num-samples", "2"], "--sgld-steps 0"),
                 (vpx.main, ["--mode", "longrun", "--sgld-steps", "0"], "--sgld-steps 0"),
                 (vpx.main, ["--mode", "compose", "--compose", ";"], "names no group")]
    else:
        cases = [(em.main, ["--mode", "sample", "--tau-s", "0.01", "--dt", "0.05",
                            "--num-samples", "2"], "0 sampler steps"),
                 (em.main, tiny + ["--phase", "main", "--ckpt", f"{out}/{ckpt}", "--n-langevin",
                                   "0", "--steps", "1", "--out-dir", str(tmp_path / "p2")],
                  "--n-langevin 0"),
                 (emx.main, ["--mode", "inpaint", "--hole", "1.0"], "no visible pixel"),
                 (emx.main, ["--mode", "lid", "--num-images", "2"], "at least 3 images")]
    for main, argv, want in cases:
        argv = argv if "--out-dir" in argv else argv + run
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert want in one_error(capsys, e), argv


def refused(mod, argv, capsys, code=2):
    """The one error line of mod.main(argv) (exit `code`)."""
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    return one_error(capsys, e, code)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_float_flags_beyond_float32_or_outside_the_method_are_refused_at_parse(
        mod, tiny, ckpt, tmp_path, capsys, monkeypatch):
    """A float flag beyond float32's range (3.4e38) is inf in the tensors it scales: the run
    trained nothing or sampled garbage, late. VPFB: kappa < 0 (w = (1 - t)^kappa >= 0 grows
    without bound), --t-max / --t-inf 1 (g^2 = 0: Phi_B inf), --rtol below scipy's least
    (100 eps: scipy raised it silently and ran for minutes). One line, exit 2, no network."""
    no_network(mod, monkeypatch)
    run = ["--steps", "1", "--out-dir", str(tmp_path)]
    big = [(["--lr", "1e39"], "--lr"), (["--lr=-1e300"], "--lr")]
    if mod is vpfb:
        big += [([f, "1e300"], f) for f in ("--sgld-step", "--sgld-temp", "--bfactor", "--eta")]
        other = [(["--kappa", "-1000"], "argument --kappa: expected a finite number >= 0"),
                 (["--t-inf", "1"], "argument --t-inf: expected a number in (0, 1)"),
                 (["--t-max", "1"], "argument --t-max: expected a number in (0, 1)"),
                 (["--rtol", "1e-300"], "argument --rtol: expected a number >= 2.22e-14")]
        ok = [["--kappa", "0"], ["--t-end", "1"], ["--t-max", "0.999"], ["--rtol", "2.3e-14"],
              ["--bfactor", "3e38"]]
    else:
        big += [([f, "1e300"], f) for f in ("--output-scale", "--eps-max", "--dt", "--tau-s")]
        other, ok = [], [["--output-scale", "3e38"], ["--eps-max", "0"]]
    for argv, want in big:
        err = refused(mod, tiny + argv + run, capsys)
        assert f"argument {want}: " in err and "float32's range" in err, (argv, err)
    for argv, want in other:
        assert want in refused(mod, tiny + argv + run, capsys), argv
    for argv in ok:
        mod.parse_args(tiny + argv + run)


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_only_the_devices_the_runs_are_written_for(mod, tiny, ckpt, tmp_path, capsys,
                                                   monkeypatch):
    """--device meta / mps (valid torch device strings) were tracebacks deep in a run: only auto,
    cpu, cuda and cuda:N pass, and a CUDA device this machine lacks is one line before the
    network."""
    no_network(mod, monkeypatch)
    run = ["--steps", "1", "--out-dir", str(tmp_path)]
    for dev in ("meta", "mps", "xpu", "cuda:x", "cuda:-1", "CPU", ""):
        err = refused(mod, tiny + ["--device", dev] + run, capsys)
        assert "expected auto, cpu, cuda or cuda:N" in err, (dev, err)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    err = refused(mod, tiny + ["--device", f"cuda:{n}"] + run, capsys)
    assert ("CUDA device(s)" if n else "CUDA is not available") in err, err


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_ch_mult_and_attn_res_are_lists_of_positive_integers_the_unet_has(
        mod, tiny, ckpt, tmp_path, capsys, monkeypatch):
    """--ch-mult with 0 or a negative entry was a traceback, --ch-mult= a U-Net with no levels
    (exit 0), 1,,2 read as 1,2; VPFB's --attn-res=-4 or a resolution no level has silently gave
    no attention. Now one line each, exit 2, before the network; --attn-res= (no attention, the
    README's) and the levels' own resolutions still work, and a default that is no level (16 at
    28 x 28) says "" (the same network: none)."""
    no_network(mod, monkeypatch)
    run = ["--steps", "1", "--out-dir", str(tmp_path)]
    cases = [([f"--ch-mult={v}"], "--ch-mult must be a non-empty comma list of integers >= 1")
             for v in ("0,2", "-1,2", "", "1,,2", "1,x", ",")]
    if mod is vpfb:
        cases += [([f"--attn-res={v}"], "--attn-res must be a comma list of integers >= 1")
                  for v in ("-4", "0", "4,,8", "four")]
        cases += [(["--attn-res", v], "is no resolution of the U-Net (8, 4 at --image-size 8")
                  for v in ("16", "2", "8,3")]
    for argv, want in cases:
        err = refused(mod, tiny + argv + run, capsys)
        assert want in err, (argv, err)
    if mod is vpfb:
        for v in ("", "4", "8,4"):
            assert mod.parse_args(tiny + ["--attn-res", v] + run).attn_res == v
        args = mod.parse_args(tiny + ["--image-size", "28", "--ch-mult", "2,2,2", "--attn-res",
                                      "28,7"] + run)
        assert args.attn_res == "28,7"
        argv = [a for a in tiny if a not in ("--attn-res", "")]
        args = mod.parse_args(argv + ["--image-size", "28", "--ch-mult", "2,2,2"] + run)
        assert args.attn_res == "" and args.sources_.get("attn_res") is None
        args = mod.parse_args(argv + ["--image-size", "32", "--ch-mult", "2,2,2"] + run)
        assert args.attn_res == "16"


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_network_sizes_the_layers_cannot_take_are_one_line_before_the_network(
        mod, tiny, ckpt, tmp_path, capsys, monkeypatch):
    """An odd --model-size (VPFB's sinusoidal time embedding), 6 (a GroupNorm of 18 channels), a
    WideResNet of width 1 (a conv of 0 channels), EM's CNN on images under 4 pixels (a 4 x 4
    kernel): tracebacks from inside torch. Now one line naming the flags, exit 2, no network
    built (the check builds it on the meta device); sizes that work still work."""
    no_network(mod, monkeypatch)
    run = ["--steps", "1", "--out-dir", str(tmp_path)]
    if mod is vpfb:
        cases = [(["--model-size", n], f"--model-size={n}") for n in ("1", "3", "5", "6", "7")]
        cases += [(["--unet", "authors", "--model-size", "5"], "--unet=authors --model-size=5"),
                  (["--arch", "wrn", "--wrn-depth", "10", "--model-size", "1"], "--arch=wrn")]
        want_all = "the network cannot be built with "
        fine = [["--model-size", "4"], ["--arch", "wrn", "--model-size", "2", "--wrn-depth", "10"]]
    else:
        cases = [(["--arch", "cnn", "--image-size", n], f"image side >= 4 (") for n in "123"]
        want_all = "CNN potential"
        fine = [["--arch", "cnn", "--image-size", "4"], ["--model-size", "1"],
                ["--model-size", "3"]]
    for argv, want in cases:
        err = refused(mod, tiny + argv + run, capsys)
        assert want in err and want_all in err and "Traceback" not in err, (argv, err)
    monkeypatch.undo()
    for argv in fine:
        args = mod.parse_args(tiny + argv + run)
        net = mod.build_net(args).eval()
        x = torch.randn(2, args.channels, args.image_size, args.image_size)
        assert torch.isfinite(net(x, torch.rand(2)) if mod is vpfb else net(x)).all(), argv


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_non_finite_samples_name_the_sampler_settings_too(mod, tiny, ckpt, tmp_path, capsys):
    """Sampler settings that overflow (VPFB --sgld-step 1e30, EM --dt 1e30 --tau-s 1e30) were
    reported after sampling as "(non-finite weights?)": the line names the sampler's flags."""
    out = str(tmp_path)
    mod.main(tiny + ["--steps", "2", "--out-dir", out])         # step 1 runs at lr 0 (warm-up)
    run = ["--mode", "sample", "--device", "cpu", "--threads", "1", "--num-samples", "2",
           "--out-dir", out]
    if mod is vpfb:
        argv, want = ["--sampler", "sgld", "--sgld-step", "1e30", "--sgld-steps", "2"], \
            "the weights, or sampler settings that overflow (--sgld-step, --sgld-temp, --bfactor"
    else:
        argv, want = ["--dt", "1e30", "--tau-s", "1e30"], \
            "the weights, or sampler settings that overflow (--dt, --tau-s, --eps-max"
    err = refused(mod, run + argv, capsys, code=3)
    assert "non-finite values" in err and want in err, err
    assert not os.path.exists(os.path.join(out, "samples.npz"))


@pytest.mark.parametrize("mod,tiny,ckpt", TWINS)
def test_a_run_that_trained_nothing_usable_exits_3_without_a_checkpoint(mod, tiny, ckpt,
                                                                        tmp_path, capsys):
    """Fewer than 10 steps (the in-a-row guard never fires), all non-finite, or an update that
    overflowed the weights (--lr 1e30): the run exited 0 with an untrained or garbage
    checkpoint. Now one line naming the likely flags, exit 3, no checkpoint written."""
    huge = ["--lam-gx", "3e38"] if mod is vpfb else ["--output-scale", "3e38"]
    for argv, want in ((huge, "no step was finite"),
                       (["--lr", "1e30", "--warmup", "1"], "non-finite outputs")):
        out = str(tmp_path / argv[0][2:])
        err = refused(mod, tiny + argv + ["--steps", "2", "--out-dir", out], capsys, code=3)
        assert want in err and "steps 1-2" in err and "check --lr, --grad-clip, " in err
        assert huge[0] in err.split("check ")[1], err
        assert not os.path.exists(os.path.join(out, ckpt)), err
    mod.main(tiny + ["--steps", "2", "--out-dir", str(tmp_path / "fine")])   # a normal run: 0
    assert mod.load_checkpoint(str(tmp_path / "fine" / ckpt))["step"] == 2


# --------------------------------------------------------------------------- engineering (issue 28)
def _tiny_nets():
    """(name, network, inputs) for every network of both files, weights moved off their init."""
    torch.manual_seed(0)
    nets = [("em_cnn", em.CNNPotential((1, 8, 8), 4), (torch.randn(4, 1, 8, 8),)),
            ("em_unetvit", em.UNetViTPotential((3, 8, 8), 8, 1, 1, 0.0, 1000.0, (1, 2),
                                               attn_res=(4,), patch=2), (torch.randn(4, 3, 8, 8),)),
            ("em_unetvit_time", em.UNetViTPotential((3, 8, 8), 8, 1, 1, 0.0, 1000.0, (1, 2),
                                                    attn_res=(4,), patch=2, time_layers=True),
             (torch.randn(4, 3, 8, 8),)),
            ("vpfb_unet", vpfb.UNetPhi(3, 16, (1, 2), 1, (4,), 0.0, 8, 3),
             (torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 0]))),
            ("vpfb_authors", vpfb.AuthorsUNetPhi(3, 32, (1, 2), 1, (4,), 0.0, 8),
             (torch.randn(4, 3, 8, 8), torch.rand(4))),
            ("vpfb_wrn", vpfb.WRNPhi(3, 8, 10, 0.0, 3),
             (torch.randn(4, 3, 8, 8), None, torch.tensor([0, 1, 2, 0])))]
    for _, net, _ in nets:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        net.eval()
    return nets


@pytest.mark.parametrize("mod", [em, vpfb], ids=["em", "vpfb"])
def test_engineer_bf16_trunk_fp32_head_same_keys(mod):
    """engineer() (--amp bf16, --channels-last) on every network: the same state_dict keys in the
    same order, V / Phi in float32 from a float32 head and within bf16 precision of fp32 (forced on
    the CPU: --amp auto leaves it fp32 there); a deepcopy (the EMA) runs its own weights, and
    engineering twice wraps section 2's trunk once."""
    import copy
    import functools
    cpu = torch.device("cpu")
    for name, net, inputs in _tiny_nets():
        ref, keys = net(*inputs), list(net.state_dict())
        assert mod.engineer(net, cpu, "auto") is net and "trunk" not in vars(net)   # CPU: fp32
        fast = mod.engineer(copy.deepcopy(net), cpu, "bf16", channels_last=True)
        assert list(fast.state_dict()) == keys, name
        heads = []
        head = getattr(fast, "mlp", None) or getattr(fast, "head", None)
        if head is not None:                    # the read-out layer itself runs in float32
            head.register_forward_hook(lambda m, i, o: heads.append((i[0].dtype, o.dtype)))
        out = fast(*inputs)
        assert out.dtype == torch.float32 and all(d == (torch.float32,) * 2 for d in heads), name
        n_in = 2 if name.startswith(("vpfb_unet", "vpfb_authors")) else 1    # (x, t) or x
        assert fast.trunk(*inputs[:n_in]).dtype == torch.float32
        err = (out - ref).abs().max() / ref.abs().max()
        assert 0 < err < 2e-2, (name, err)                  # bf16 ran, and to bf16's precision
        again = mod.engineer(fast, cpu, "bf16")
        assert not isinstance(vars(again)["trunk"].args[0], functools.partial)
        ema = copy.deepcopy(fast)
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(0.5)
        assert not torch.equal(ema(*inputs), out) and torch.equal(fast(*inputs), out), name


def test_engineered_bf16_keeps_double_backward_torch_func_and_hessians():
    """The bf16 trunk under the paths that differentiate grad V / grad Phi again: EM's flow loss
    (autograd and torch.func), the Hessian of LID, VPFB's loss (grad_x Phi and dPhi/dt, then the
    weights; autograd and torch.func): finite, and the same as fp32 to bf16 precision."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    V = em.CNNPotential((1, 8, 8), 4)
    for p in V.parameters():
        torch.nn.init.normal_(p, std=0.1)
    phi = vpfb.UNetPhi(1, 8, (1, 2), 1, (4,), 0.0, 8)
    with torch.no_grad():
        for p in phi.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, u, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4)
    ems, vps = em.EnergyMatching(V), vpfb.VPFB(phi, **vpfb.OURS)
    runs = {"em": lambda: ems.flow_residual(x, u).sum(),
            "vpfb": lambda: vps.objective(x, u, t)[0]}

    def value_and_grads(loss, net):
        out = loss()
        gs = torch.autograd.grad(out, list(net.parameters()), allow_unused=True)
        return out.item(), torch.cat([g.flatten() for g in gs if g is not None])   # V: no bias

    ref = {k: value_and_grads(f, V if k == "em" else phi) for k, f in runs.items()}
    lid_ref = em.lid_exact(V, x[:1], 1.0)
    em.engineer(V, cpu, "bf16")
    vpfb.engineer(phi, cpu, "bf16")
    for form in ("autograd", "torch.func"):
        if form == "torch.func":
            em.use_torch_func(ems)
            vpfb.use_torch_func(vps)
        for k, f in runs.items():
            (value, g), (value_ref, g_ref) = value_and_grads(f, V if k == "em" else phi), ref[k]
            assert torch.isfinite(g).all() and value == pytest.approx(value_ref, rel=2e-2)
            assert torch.cosine_similarity(g, g_ref, 0) > 0.99, (form, k)
            assert g.norm() == pytest.approx(g_ref.norm(), rel=5e-2), (form, k)
    lid = em.lid_exact(V, x[:1], 1.0)
    ev, ev_ref = torch.stack(lid[1]), torch.stack(lid_ref[1])
    assert torch.isfinite(ev).all() and (ev - ev_ref).abs().max() <= 5e-2 * ev_ref.abs().max()
