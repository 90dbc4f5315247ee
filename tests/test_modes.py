"""The experiment modes end to end, in-process through main([...]), on one tiny checkpoint per
method trained once per module: vpfb's interp, nn, hist, ood, longrun, compose, sample with
--sampler sgld / rk45, benchmark's promised keys; energy_matching's sample (euler, uneven batches,
zero samples), inpaint (grid and numbers), lid (exact route, both "all equal" hints). Each test
checks what the mode writes (shapes, counts, ordering, ranges), not only that a file exists, and
one bad input per family (exit 2, one line)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import energy_matching as em
import energy_matching_experiments as emx
import vpfb
import vpfb_experiments as vpx

PAD = 2                                        # torchvision.utils.make_grid's default padding

# an 8x8 class-conditional U-Net Phi (10 FakeData classes), cheap samplers
VP = ["--recipe", "ours", "--dataset", "fake", "--image-size", "8", "--fake-size", "32",
      "--model-size", "8", "--res-blocks", "1", "--ch-mult", "1,2", "--attn-res", "4",
      "--workers", "0", "--batch-size", "8", "--sample-batch", "8", "--ode-steps", "2",
      "--num-samples", "4", "--sampler", "euler", "--device", "cpu", "--threads", "1",
      "--log-every", "1"]
# a < 100k-parameter UNet+ViT potential on 8x8 FakeData (as tests/test_energy_matching.py)
EM = ["--dataset", "fake", "--image-size", "8", "--fake-size", "32", "--batch-size", "8",
      "--model-size", "8", "--vit-depth", "1", "--res-blocks", "1", "--ch-mult", "1,2",
      "--workers", "0", "--n-langevin", "2", "--dt", "0.05", "--tau-s", "0.1", "--log-every", "0",
      "--num-samples", "0", "--warmup", "1", "--lr", "1e-3", "--device", "cpu", "--amp", "none",
      "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def vp_ckpt(tmp_path_factory):
    """A 2-step class-conditional VPFB checkpoint (and a 1-step unconditional one, for compose)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("vp")
    vpfb.main(VP + ["--class-cond", "--steps", "2", "--sample-every", "0",
                    "--out-dir", str(out / "cond")])
    vpfb.main(VP + ["--steps", "1", "--out-dir", str(out / "uncond")])
    torch.set_num_threads(n)
    return str(out / "cond" / "ckpt_main.pt"), str(out / "uncond" / "ckpt_main.pt")


@pytest.fixture(scope="module")
def em_ckpt(tmp_path_factory):
    """A 2-step phase-1 Energy Matching run folder."""
    n = torch.get_num_threads()
    out = str(tmp_path_factory.mktemp("em"))
    em.main(EM + ["--steps", "2", "--out-dir", out])
    torch.set_num_threads(n)
    return os.path.join(out, "ckpt_warmup.pt")


def _vp(ckpt, out, *extra):
    """vpfb.py's modes, or vpfb_experiments.py's when --mode names one of them."""
    main = vpx.main if any(m in extra for m in vpx.MODES) else vpfb.main
    return main(VP + ["--ckpt", ckpt, "--out-dir", str(out)] + list(extra))


def _json(path):
    with open(path) as f:
        return json.load(f)


def _grid_size(path, rows, cols, side=8):
    """(width, height) that make_grid gives rows x cols images of side x side."""
    with Image.open(path) as im:
        assert im.size == (cols * (side + PAD) + PAD, rows * (side + PAD) + PAD), im.size


def _exit(fn, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err                # warnings of flags the mode does not read aside
    err = "".join(s for s in err.splitlines(True) if not s.startswith("warning: "))
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return e.value.code, err


def _finite(d):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in d.values())


# ----------------------------------------------------------------------------- vpfb: sample
@pytest.mark.parametrize("sampler,extra", [("sgld", ["--sgld-steps", "3", "--sgld-step", "1e-4"]),
                                           ("rk45", ["--rtol", "0.5", "--atol", "0.5"])])
def test_vp_sample_sgld_and_rk45(vp_ckpt, tmp_path, capsys, sampler, extra):
    """samples.npz: --num-samples uint8 NHWC images over uneven batches; samples.json names the
    sampler, its NFE (SGLD: exactly --sgld-steps), finite speeds and the settings with their
    sources; the same JSON on stdout."""
    _vp(vp_ckpt[0], tmp_path, "--mode", "sample", "--sampler", sampler, "--num-samples", "5",
        "--sample-batch", "3", *extra)
    imgs = np.load(tmp_path / "samples.npz")["images"]
    assert imgs.shape == (5, 8, 8, 3) and imgs.dtype == np.uint8
    st = _json(tmp_path / "samples.json")
    assert set(st) == {"ckpt", "settings", "from", "n", "sampler", "nfe_mean", "images_per_s",
                       "seconds"}
    assert st["sampler"] == st["settings"]["sampler"] == sampler and st["from"]["sampler"] == "flag"
    assert st["from"]["t1"] == "checkpoint" and st["n"] == 5
    assert _finite({k: st[k] for k in ("nfe_mean", "images_per_s", "seconds")})
    assert st["images_per_s"] > 0
    assert st["nfe_mean"] == 3 if sampler == "sgld" else st["nfe_mean"] >= 6   # RK45: >= 1 step
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == st
    _grid_size(tmp_path / "samples.png", 1, 5)


def test_vp_modes_missing_ckpt_exit_2(tmp_path, capsys):
    for mode in ("sample", "interp", "nn", "hist", "ood", "longrun", "compose"):
        main = vpfb.main if mode == "sample" else vpx.main
        code, err = _exit(main, VP + ["--mode", mode, "--ckpt", str(tmp_path / "no.pt"),
                                           "--out-dir", str(tmp_path)], capsys)
        assert code == 2 and "checkpoint not found" in err and "no.pt" in err, mode
    # no --ckpt: <out-dir>/ckpt_main.pt, absent in an empty folder
    code, err = _exit(vpx.main, VP + ["--mode", "interp", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "no checkpoint in " + str(tmp_path) in err


# ----------------------------------------------------------------------------- vpfb: interp, nn
def test_vp_interp_grid_rows_by_steps(vp_ckpt, tmp_path, monkeypatch):
    """8 rows x 10 slerp points, each row from its own noise pair: the generator gets 80 starting
    noises, row by row, each row the slerp path between its first and last point; interp.png is
    that 8 x 10 grid; the stats name the sampler and its NFE (Euler: --ode-steps)."""
    seen = {}
    real = vpfb.generate

    def spy(method, n, shape, device, batch, solver, x0, *a, **kw):
        seen["n"], seen["x0"] = n, x0
        return real(method, n, shape, device, batch, solver, x0, *a, **kw)

    monkeypatch.setattr(vpfb, "generate", spy)
    _vp(vp_ckpt[0], tmp_path, "--mode", "interp")
    z = seen["x0"].reshape(8, 10, 3, 8, 8)
    assert seen["n"] == 80 and z.shape[0] * z.shape[1] == 80
    for k in range(10):                 # row-major: column k is slerp(first, last column, k / 9)
        assert torch.allclose(z[:, k], vpfb.slerp(z[:, 0], z[:, -1], k / 9), atol=1e-4), k
    assert not torch.allclose(z[:, 0], z[:, -1]) and not torch.allclose(z[0, 0], z[1, 0])
    st = _json(tmp_path / "interp.json")
    assert st["sampler"] == "euler" and st["nfe_mean"] == 2 and _finite(
        {k: st[k] for k in ("nfe_mean", "images_per_s", "seconds")})
    _grid_size(tmp_path / "interp.png", 8, 10)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    z1 = z1 / z1.flatten(1).norm(dim=1)[:, None, None, None] * z0.flatten(1).norm(dim=1)[
        :, None, None, None]                                         # |z0| = |z1| per sample
    assert torch.allclose(vpfb.slerp(z0, z1, 0.0), z0, atol=1e-5)
    assert torch.allclose(vpfb.slerp(z0, z1, 1.0), z1, atol=1e-5)
    mid = vpfb.slerp(z0, z1, 0.3)
    assert mid.shape == z0.shape
    assert torch.allclose(mid.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-4)


def test_vp_nn_more_neighbours_than_images_is_one_line(vp_ckpt, tmp_path, capsys):
    """k above the 32 training images would leave inf in nn.json: one line, exit 2, no file."""
    code, err = _exit(lambda argv: _vp(vp_ckpt[0], tmp_path, *argv),
                      ["--mode", "nn", "--nn-k", "40"], capsys)
    assert code == 2 and "--nn-k 40 is more than the 32 training images" in err
    assert not (tmp_path / "nn.json").exists()

def test_vp_nn_distances_are_the_true_nearest_sorted(vp_ckpt, tmp_path, monkeypatch):
    """nn.json: 8 samples x --nn-k distances, non-negative, ascending per sample, and equal to a
    brute-force search over every training image; nn.png has one row per sample, k + 1 columns."""
    seen = {}
    real = vpfb.generate

    def spy(*a, **kw):
        x, st = real(*a, **kw)
        seen["x"] = x
        return x, st

    monkeypatch.setattr(vpfb, "generate", spy)
    _vp(vp_ckpt[0], tmp_path, "--mode", "nn", "--nn-k", "3")
    d = np.array(_json(tmp_path / "nn.json")["nearest_pixel_l2"])
    assert d.shape == (8, 3) and np.all(d >= 0) and np.all(np.diff(d, axis=1) >= 0)
    args = vpfb.parse_args((VP + ["--out-dir", str(tmp_path)]))
    train = vpx.first_images(vpfb.build_dataset(args, train=True), 10 ** 6)
    assert train.shape[0] == 32
    full = torch.cdist(seen["x"].flatten(1), train.flatten(1))
    ref = full.sort(dim=1).values[:, :3].numpy()
    assert np.allclose(d, ref, rtol=1e-4, atol=1e-4)
    _grid_size(tmp_path / "nn.png", 8, 4)


# ----------------------------------------------------------------------------- vpfb: hist, ood
def test_vp_hist_counts_and_moments(vp_ckpt, tmp_path):
    """hist.json: train and test, each --ood-max images (capped by the dataset), finite mean and
    std equal to those of Phi_B on the same images (energies())."""
    _vp(vp_ckpt[0], tmp_path, "--mode", "hist", "--ood-max", "6")
    res = _json(tmp_path / "hist.json")
    assert set(res) == {"ckpt", "settings", "from", "train", "test"}
    for split in ("train", "test"):
        assert res[split]["n"] == 6 and _finite(res[split]) and res[split]["std"] >= 0
    assert res["train"]["mean"] != res["test"]["mean"]               # different images
    assert os.path.getsize(tmp_path / "hist.png") > 0
    # the numbers are Phi_B's: recompute on the train split with the EMA network
    a = vpx.parse_args(["--mode", "hist", "--ckpt", vp_ckpt[0], "--device", "cpu"])
    net = vpfb.net_from_checkpoint(a.ck_, a, torch.device("cpu"))
    method = vpfb.build_method(vpfb.Conditioned(net), a)
    e, _ = vpx.energies(method, vpfb.build_dataset(a, train=True), torch.device("cpu"), 6, 8)
    assert res["train"]["mean"] == pytest.approx(float(e.mean()), rel=1e-5, abs=1e-6)
    _vp(vp_ckpt[0], tmp_path / "big", "--mode", "hist", "--ood-max", "1000")
    assert _json(tmp_path / "big" / "hist.json")["test"]["n"] == 32  # all of a 32-image set


def test_vp_ood_table(vp_ckpt, tmp_path, capsys):
    """ood.json: one entry per requested set, both AUROCs in [0, 1], n_in / n_ood = --ood-max."""
    _vp(vp_ckpt[0], tmp_path, "--mode", "ood", "--ood-max", "5", "--ood-sets", "svhn, interp")
    full = _json(tmp_path / "ood.json")
    t = full["auroc"]
    assert list(t) == ["svhn", "interp"]
    for row in t.values():
        assert set(row) == {"auroc_phi_b", "auroc_authors_score", "n_in", "n_ood"}
        assert 0 <= row["auroc_phi_b"] <= 1 and 0 <= row["auroc_authors_score"] <= 1
        assert row["n_in"] == 5 and row["n_ood"] == 5
        assert row["auroc_phi_b"] * 50 == pytest.approx(round(row["auroc_phi_b"] * 50))  # 2U / 50
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == full
    import matplotlib.image as mpimg
    img = mpimg.imread(str(tmp_path / "ood_hist.png"))[..., :3]          # the energy histograms
    assert np.isfinite(img).all() and (img.std(-1) > 0.05).sum() > 200   # coloured bars drawn
    code, err = _exit(vpx.main, VP + ["--mode", "ood", "--ckpt", vp_ckpt[0], "--ood-max", "2",
                                       "--ood-sets", "svhn,mnist", "--out-dir", str(tmp_path)],
                      capsys)
    assert code == 2 and "'mnist'" in err


def test_vp_ood_folder_faults_are_one_line_naming_the_file(vp_ckpt, tmp_path, capsys):
    """An OOD image folder gets the training folders' checks: a truncated JPEG (a traceback before)
    or a 16-bit PNG is one line naming the file, exit 2, before any score is computed."""
    from test_twins import bad_image_folders
    for name, (path, culprit) in bad_image_folders(tmp_path).items():
        if culprit is not None:
            code, err = _exit(vpx.main, VP + ["--mode", "ood", "--ckpt", vp_ckpt[1], "--ood-max",
                                              "2", "--ood-sets", f"interp,{path}", "--out-dir",
                                              str(tmp_path / "o")], capsys)
            assert code == 2 and culprit in err, err
    assert not os.path.exists(tmp_path / "o" / "ood.json")


def test_vp_ood_sets_from_paths(vp_ckpt, tmp_path):
    """--ood-sets also takes an image folder or a .npz of either colour (README's MNIST vs CIFAR-10
    JPEGs): each set is brought to the model's channels and size before Phi_B scores it, colour to
    grey by the ITU-R 601 weights in both routes, grey to colour by repeating the channel."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.zeros(16, np.int64))
    red = np.zeros((4, 12, 12, 3), np.uint8)
    red[..., 0] = 255
    np.savez(tmp_path / "red.npz", images=red)
    os.makedirs(tmp_path / "red" / "a")
    for i in range(3):
        Image.fromarray(red[i]).save(tmp_path / "red" / "a" / f"{i}.png")
    drop = {VP.index(k) + j for k in ("--dataset", "--fake-size", "--image-size") for j in (0, 1)}
    flags = [a for i, a in enumerate(VP) if i not in drop] + ["--dataset", "npz"]
    run = tmp_path / "grey_run"
    vpfb.main(flags + ["--data-dir", str(tmp_path / "grey.npz"), "--steps", "1",
                       "--sample-every", "0", "--out-dir", str(run)])
    sets = f"{tmp_path / 'red'},{tmp_path / 'red.npz'}"
    vpx.main(flags + ["--mode", "ood", "--ckpt", str(run / "ckpt_main.pt"), "--ood-max", "5",
                       "--ood-sets", sets, "--out-dir", str(tmp_path / "ood")])
    t = _json(tmp_path / "ood" / "ood.json")["auroc"]
    assert [r["n_ood"] for r in t.values()] == [3, 4] and all(r["n_in"] == 5 for r in t.values())
    a = vpx.parse_args(["--mode", "ood", "--ckpt", str(run / "ckpt_main.pt"), "--device", "cpu"])
    want = 0.299 - 0.587 - 0.114                                 # red (1, -1, -1) in [-1, 1]
    for name in sets.split(","):
        x = vpx.first_images(vpx.ood_set(a, name, None), 10)
        assert x.shape[1:] == (1, 8, 8) and x.sub(want).abs().max() < 0.01   # PIL rounds to uint8
    a = vpx.parse_args(["--mode", "ood", "--ckpt", vp_ckpt[1], "--device", "cpu"])   # colour Phi
    x = vpx.first_images(vpx.ood_set(a, str(tmp_path / "grey.npz"), None), 16)
    assert x.shape == (16, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2])
    assert torch.allclose(x[:, 0], torch.from_numpy(grey[..., 0]).float() / 127.5 - 1)


def test_auroc_against_pair_counting():
    assert vpx.auroc([2, 3], [0, 1]) == 1.0 and vpx.auroc([0, 1], [2, 3]) == 0.0
    assert vpx.auroc([1, 1], [1, 1]) == 0.5                         # ties count a half
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 13), rng.integers(0, 5, 9)       # many ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert vpx.auroc(pos, neg) == pytest.approx(pairs)


# ----------------------------------------------------------------------------- vpfb: longrun
def test_vp_longrun_curves(vp_ckpt, tmp_path):
    """longrun_curves.json: the ODE logged once per Euler step (ode_steps * t1 of them, times
    0, dt, ... < t1) and SGLD once per step (0 .. sgld_steps - 1); norms finite and >= 0;
    longrun.json holds the last value of each curve; the two image strips are written."""
    _vp(vp_ckpt[0], tmp_path, "--mode", "longrun", "--longrun-t1", "1.5", "--sgld-steps", "4",
        "--sgld-step", "1e-4", "--num-samples", "3")
    c = _json(tmp_path / "longrun_curves.json")
    n_ode = int(2 * 1.5)
    assert set(c) == {"ode", "sgld"}
    assert all(len(c["ode"][k]) == n_ode for k in ("t", "grad2", "phi2"))
    assert np.allclose(c["ode"]["t"], np.arange(n_ode) * 1.5 / n_ode)
    assert all(len(c["sgld"][k]) == 4 for k in ("t", "grad2", "phi2"))
    assert c["sgld"]["t"] == [0, 1, 2, 3]
    for curve in c.values():
        v = np.array(curve["grad2"] + curve["phi2"])
        assert np.all(np.isfinite(v)) and np.all(v >= 0)
    last = _json(tmp_path / "longrun.json")
    assert {k: last[k] for k in c} == {k: {kk: vv[-1] for kk, vv in v.items()}
                                       for k, v in c.items()}
    # the strips: 3 samples per frame; ODE frames at t = 0.5, 1, 1.5; SGLD at 6 steps
    _grid_size(tmp_path / "longrun_ode.png", 2, 8)                  # 9 images, 8 a row
    _grid_size(tmp_path / "longrun_sgld.png", 3, 8)                 # 18 images
    assert os.path.getsize(tmp_path / "longrun_norms.png") > 0


# ----------------------------------------------------------------------------- vpfb: no work
def _no_network(*a, **k):
    raise AssertionError("the network was loaded before the flags were checked")


@pytest.mark.parametrize("extra,needle", [
    (["--mode", "longrun", "--num-samples", "0"], "--num-samples 0"),           # ZeroDivisionError
    (["--mode", "longrun", "--longrun-t1", "1e30"], "--longrun-t1 1e+30"),        # memory
    (["--mode", "longrun", "--sgld-steps", "100000000000"], "--sgld-steps 100000000000"),
    (["--mode", "longrun", "--longrun-t1", "1e-300"], "--longrun-t1 1e-300: an ODE step"),
    (["--mode", "hist", "--ood-max", "1"], "--ood-max 1"),                 # "Too many bins"
    (["--mode", "ood", "--ood-max", "1", "--ood-sets", "svhn"], "--ood-max 1"),
    (["--mode", "ood", "--ood-sets", ","], "--ood-sets ',' names no set"),   # exit 0, "auroc": {}
    (["--mode", "ood", "--ood-sets="], "--ood-sets '' names no set"),
    (["--mode", "ood", "--ood-sets", "svhn,mnist"], "'mnist'"),         # after the scores before
])
def test_vp_counts_that_give_no_work_are_one_line_before_the_network(vp_ckpt, tmp_path, capsys,
                                                                      monkeypatch, extra, needle):
    """Every sampling mode's count flags: no chain, one image for a histogram or an AUROC, no OOD
    set, a trajectory that overflows or cannot fit: one line, exit 2, before the network loads."""
    monkeypatch.setattr(vpx, "eval_setup", _no_network)
    code, err = _exit(lambda argv: _vp(vp_ckpt[0], tmp_path, *argv), extra, capsys)
    assert code == 2 and needle in err, err
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".json", ".png"))]


def test_vp_one_image_sets_are_one_line(vp_ckpt, tmp_path, capsys, monkeypatch):
    """A set of one image (an OOD .npz, or --dataset npz for hist) is refused as --ood-max 1 is."""
    monkeypatch.setattr(vpx, "eval_setup", _no_network)
    one = tmp_path / "one.npz"
    np.savez(one, images=np.zeros((1, 8, 8, 3), np.uint8))
    code, err = _exit(vpx.main, VP + ["--mode", "ood", "--ckpt", vp_ckpt[1], "--ood-max", "5",
                                      "--ood-sets", f"interp,{one}", "--out-dir", str(tmp_path)],
                      capsys)
    assert code == 2 and f"OOD set {one} holds 1 image(s)" in err, err
    code, err = _exit(vpx.main, VP + ["--mode", "hist", "--ckpt", vp_ckpt[1], "--dataset", "npz",
                                      "--data-dir", str(one), "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "split holds 1 image(s)" in err, err
    assert not (tmp_path / "ood.json").exists() and not (tmp_path / "hist.json").exists()


def test_vp_hist_of_close_large_energies_and_of_nan(vp_ckpt, tmp_path, capsys, monkeypatch):
    """Energies 3e7 apart by 4 have float32 bin edges that collapse ("Too many bins", a traceback):
    binned in float64 they draw; a NaN energy is exit 3 and no hist.json, not a traceback."""
    big = np.array([3e7, 3e7 + 4, 3e7 + 2], np.float32)
    monkeypatch.setattr(vpx, "energies", lambda *a: (big, big))
    _vp(vp_ckpt[0], tmp_path, "--mode", "hist", "--ood-max", "3")
    assert _json(tmp_path / "hist.json")["test"]["n"] == 3
    nan = np.array([1.0, np.nan], np.float32)
    monkeypatch.setattr(vpx, "energies", lambda *a: (nan, nan))
    code, err = _exit(lambda argv: _vp(vp_ckpt[0], tmp_path / "nan", *argv),
                      ["--mode", "hist", "--ood-max", "2"], capsys)
    assert code == 3 and "Phi_B is NaN or inf on 1 of the 2 train images" in err, err
    assert not (tmp_path / "nan" / "hist.json").exists()


def test_vp_longrun_that_blows_up_is_exit_3_not_null_curves(vp_ckpt, tmp_path, capsys):
    """SGLD with a step of 1e38 leaves the float32 range: exit 3 and nothing written (it wrote
    NaN strips and null curves with exit 0)."""
    code, err = _exit(lambda argv: _vp(vp_ckpt[0], tmp_path, *argv),
                      ["--mode", "longrun", "--longrun-t1", "1", "--sgld-steps", "3",
                       "--sgld-step", "1e38", "--num-samples", "2"], capsys)
    assert code == 3 and "SGLD chains went NaN or inf" in err, err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("longrun")]


# ----------------------------------------------------------------------------- vpfb: compose
def test_vp_compose_rows_and_keys(vp_ckpt, tmp_path):
    """'0,1;2,3': per group one row per class and one for the averaged energy, 8 samples a row;
    compose.json has one sampler record per single class and per composite."""
    _vp(vp_ckpt[0], tmp_path, "--mode", "compose", "--compose", "0,1;2,3")
    info = _json(tmp_path / "compose.json")
    assert list(info) == ["ckpt", "settings", "from", "0", "1", "0+1", "2", "3", "2+3"]
    for st in list(info.values())[3:]:
        assert st["sampler"] == "euler" and st["nfe_mean"] == 2 and st["images_per_s"] > 0
    _grid_size(tmp_path / "compose.png", 6, 8)


def test_vp_compose_bad_input_exit_2(vp_ckpt, tmp_path, capsys):
    cond, uncond = vp_ckpt
    for ckpt, spec, needle in [(uncond, "0,1", "--class-cond"), (cond, "a,b", "--compose must"),
                               (cond, "0,10", "[0, 10)")]:
        code, err = _exit(vpx.main, VP + ["--mode", "compose", "--ckpt", ckpt, "--compose", spec,
                                           "--out-dir", str(tmp_path)], capsys)
        assert code == 2 and needle in err, err
    assert not (tmp_path / "compose.json").exists()


# ----------------------------------------------------------------------------- energy_matching
def test_em_sample_euler_uneven_batches_and_zero(em_ckpt, tmp_path, capsys):
    """5 samples in batches of 2 with --sampler euler: uint8 NHWC, returned == written;
    samples.json records the run and where each setting came from; --num-samples 0 would write an
    empty array: one line, exit 2, no file."""
    imgs = em.main(EM + ["--mode", "sample", "--ckpt", em_ckpt, "--num-samples", "5",
                         "--sample-batch", "2", "--sampler", "euler", "--out-dir", str(tmp_path)])
    z = np.load(tmp_path / "samples.npz")["images"]
    assert z.shape == (5, 8, 8, 3) and z.dtype == np.uint8 and np.array_equal(z, imgs)
    out = capsys.readouterr().out
    assert out.count("sampled ") == 3 and "sampled 5/5" in out
    meta = _json(tmp_path / "samples.json")
    st = meta["settings"]
    assert (meta["ckpt"], meta["n"]) == (em_ckpt, 5)
    assert {k: st[k] for k in ("tau_s", "dt", "sampler", "weights")} == {
        "tau_s": 0.1, "dt": 0.05, "sampler": "euler", "weights": "ema"}
    _grid_size(tmp_path / "samples.png", 1, 5)
    code, err = _exit(em.main, ["--mode", "sample", "--ckpt", em_ckpt, "--num-samples", "0",
                                "--out-dir", str(tmp_path / "zero")], capsys)
    assert code == 2 and "--num-samples 0" in err
    assert not (tmp_path / "zero" / "samples.npz").exists()


def test_sample_mode_follows_seed_in_both_twins(em_ckpt, vp_ckpt, tmp_path):
    """--seed fixes --mode sample: the same seed gives byte-identical samples, another seed not."""
    def em_run(seed, d):
        return em.main(EM + ["--mode", "sample", "--ckpt", em_ckpt, "--num-samples", "4",
                             "--seed", seed, "--out-dir", str(tmp_path / d)])

    def vp_run(seed, d):
        _vp(vp_ckpt[0], tmp_path / d, "--mode", "sample", "--num-samples", "4", "--seed", seed)
        return np.load(tmp_path / d / "samples.npz")["images"]

    for run in (em_run, vp_run):
        a, b, c = run("1", "a"), run("1", "b"), run("2", "c")
        assert np.array_equal(a, b) and not np.array_equal(a, c), run.__name__

def test_vp_zero_means_off_or_at_the_end_as_in_em(tmp_path, vp_ckpt):
    """The twins read 0 alike: --log-every 0 logs nothing, --save-every 0 saves only at the end,
    --num-samples 0 draws no grid, and --mode sample refuses to write an empty array."""
    out = tmp_path / "run"
    vpfb.main(VP + ["--steps", "3", "--log-every", "0", "--save-every", "0", "--num-samples", "0",
                    "--out-dir", str(out)])
    assert torch.load(out / "ckpt_main.pt", weights_only=True)["step"] == 3
    assert not list(out.glob("samples_*.png"))
    with pytest.raises(SystemExit) as e:
        _vp(vp_ckpt[0], tmp_path / "zero", "--mode", "sample", "--num-samples", "0")
    assert e.value.code == 2 and not (tmp_path / "zero" / "samples.npz").exists()

def test_em_modes_without_checkpoint_exit_2(tmp_path, capsys):
    for mode in ("sample", "inpaint", "lid"):
        main = em.main if mode == "sample" else emx.main
        code, err = _exit(main, EM + ["--mode", mode, "--out-dir", str(tmp_path)], capsys)
        assert code == 2 and "no checkpoint in" in err, mode
        code, err = _exit(main, EM + ["--mode", mode, "--ckpt", str(tmp_path / "no.pt"),
                                         "--out-dir", str(tmp_path)], capsys)
        assert code == 2 and "checkpoint not found" in err, mode


def test_em_inpaint_grid_and_numbers(em_ckpt, tmp_path, capsys):
    """inpaint.png: one row per image, original + masked + M chains without and M with the
    interaction; inpaint.json: spreads and RMS fidelities finite and >= 0, the settings used."""
    res = emx.main(EM + ["--mode", "inpaint", "--ckpt", em_ckpt, "--num-images", "3", "--chains",
                        "3", "--sigma-int", "0.5", "--zeta", "0.2", "--out-dir", str(tmp_path)])
    assert _json(tmp_path / "inpaint.json") == res
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    for k in ("spread_without", "spread_with", "fidelity_rmse_without", "fidelity_rmse_with"):
        assert math.isfinite(res[k]) and res[k] >= 0, k
    assert res["spread_without"] > 0                  # 3 chains from different noise differ
    st = res["settings"]
    assert (st["zeta"], st["sigma_int"], st["tau_s"], st["dt"]) == (0.2, 0.5, 0.1, 0.05)
    assert res["ckpt"] == em_ckpt
    _grid_size(tmp_path / "inpaint.png", 3, 2 + 2 * 3)


@pytest.mark.parametrize("extra,needle", [
    (["--zeta", "1e-300"], "--zeta: expected a number in [1.1e-19, 1.8e+19]"),  # ZeroDivisionError
    (["--zeta", "1e300"], "--zeta: expected a number in"),                         # OverflowError
    (["--sigma-int", "1e-300"], "--sigma-int: expected a number in"),          # ZeroDivisionError
    (["--hole", "0"], "--hole 0.0 masks 0 pixels"),          # exit 0, a 1-pixel hole, "hole": 0.0
    (["--hole", "0.05"], "--hole 0.05 masks 0 pixels"),
    (["--hole", "1"], "masks all of the 8-pixel side"),
    (["--chains", "1"], "--chains 1: the spread with vs without"),      # exit 0, both spreads 0.0
    (["--num-images", "1000"], "--num-images 1000 is more than the 32 held-out images"),
    (["--mode", "lid", "--num-images", "33"], "--num-images 33 is more than the 32"),
])
def test_em_experiment_flags_without_work_are_one_line(em_ckpt, tmp_path, capsys, monkeypatch,
                                                       extra, needle):
    """Flags that gave a traceback, or exit 0 with numbers of another run than inpaint.json /
    lid.json records (a 1-pixel hole for --hole 0, 32 images for --num-images 1000, spreads of 0
    from 1 chain): one line, exit 2, before the network loads."""
    monkeypatch.setattr(emx, "eval_setup", _no_network)
    code, err = _exit(emx.main, EM + ["--mode", "inpaint", "--ckpt", em_ckpt, "--out-dir",
                                      str(tmp_path)] + extra, capsys)
    assert code == 2 and needle in err, err
    assert not list(tmp_path.glob("*.json"))


def test_em_inpaint_zeta_and_sigma_at_the_float32_bounds_run(em_ckpt, tmp_path):
    """The ends of the range are accepted and give finite numbers or exit 3, never a traceback."""
    lo, hi = emx.SQUARE_RANGE
    assert lo * lo > 0 and math.isfinite(hi * hi) and hi * hi <= torch.finfo(torch.float32).max
    res = emx.main(EM + ["--mode", "inpaint", "--ckpt", em_ckpt, "--num-images", "1",
                         "--zeta", repr(hi), "--sigma-int", repr(hi), "--out-dir", str(tmp_path)])
    assert math.isfinite(res["spread_with"]) and res["settings"]["zeta"] == hi


def test_em_inpaint_wrong_image_shape_exit_2(em_ckpt, tmp_path, capsys):
    code, err = _exit(emx.main, EM + ["--mode", "inpaint", "--ckpt", em_ckpt, "--image-size", "16",
                                     "--num-images", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "--image-size 16 (checkpoint: 8)" in err
    assert not (tmp_path / "inpaint.json").exists()
    data = str(tmp_path / "d16.npz")                    # data of another shape than the network's
    np.savez(data, images=np.zeros((2, 16, 16, 3), np.uint8))
    code, err = _exit(emx.main, ["--mode", "inpaint", "--ckpt", em_ckpt, "--dataset", "npz",
                                "--data-dir", data, "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "(3, 16, 16)" in err and "(3, 8, 8)" in err


def test_em_lid_exact_route_and_hints(em_ckpt, tmp_path, capsys):
    """d = 192 <= 1024: --lid-method auto takes the exact Hessian. tau below every |eigenvalue|:
    LID 0 for every image, no Spearman, the hint says a higher tau; tau above all: LID = d and the
    hint says a lower one."""
    lo = emx.main(EM + ["--mode", "lid", "--ckpt", em_ckpt, "--num-images", "3", "--lid-tau",
                       "1e-30", "--out-dir", str(tmp_path)])
    assert lo["method"] == "exact" and lo["d"] == 192 and lo["n"] == 3 and lo["lid"] == [0.0] * 3
    assert lo["spearman_lid_vs_png"] is None and len(lo["png_bytes"]) == 3
    assert all(b > 0 for b in lo["png_bytes"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("try a higher --lid-tau")
    assert _json(tmp_path / "lid.json") == lo
    hi = emx.main(EM + ["--mode", "lid", "--ckpt", em_ckpt, "--num-images", "3", "--lid-tau",
                       "1e30", "--out-dir", str(tmp_path)])
    assert hi["method"] == "exact" and hi["lid"] == [192.0] * 3 and hi["n"] == 3
    assert hi["png_bytes"] == lo["png_bytes"]                       # the same images
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("try a lower --lid-tau")
