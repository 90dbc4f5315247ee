"""Tests for toy2d.py: data, network, metrics (closed forms), a short run that must learn, smoke runs, bad input.

Tiny networks and step budgets: the whole file runs in well under a minute on 2 busy CPU cores.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "toy2d.py")
TINY = ["--hidden", "16", "--depth", "2", "--batch-size", "32", "--n-langevin", "3", "--tau-s", "0.1",
        "--ode-steps", "10", "--n-eval", "200", "--grid-n", "30", "--langevin-steps", "5"]


def run_cli(args, **kw):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=kw.get("timeout", 120))


# ------------------------------------------------------------------------------------------------ data
def test_data_moments():
    g = torch.Generator().manual_seed(0)
    moons = toy2d.sample_data("moons", 20000, g)
    # make_moons geometry scaled x*3 - 1: E[x] = 3 * 0.5 - 1 = 0.5, E[y] = 3 * 0.25 - 1 = -0.25
    assert moons.shape == (20000, 2)
    assert torch.allclose(moons.mean(0), torch.tensor([0.5, -0.25]), atol=0.05)
    eight = toy2d.sample_data("8gauss", 20000, g)
    r = eight.norm(dim=1)
    assert abs(r.mean().item() - 5.0) < 0.1                       # radius 5
    ang = torch.atan2(eight[:, 1], eight[:, 0])
    resid = eight - 5 * torch.stack([torch.cos(torch.round(ang / (math.pi / 4)) * math.pi / 4),
                                     torch.sin(torch.round(ang / (math.pi / 4)) * math.pi / 4)], 1)
    assert abs(resid.std().item() - 0.1 ** 0.25) < 0.03           # per-mode std 0.1**0.25 ~ 0.56
    gauss = toy2d.sample_data("gauss", 20000, g)
    assert torch.allclose(gauss.std(0), torch.ones(2), atol=0.03)
    for name in ["circles", "checkerboard"]:
        x = toy2d.sample_data(name, 1000, g)
        assert x.shape == (1000, 2) and torch.isfinite(x).all() and x.abs().max() < 5


def test_data_streams_are_reproducible_and_distinct():
    a = toy2d.sample_data("moons", 100, torch.Generator().manual_seed(1))
    b = toy2d.sample_data("moons", 100, torch.Generator().manual_seed(1))
    c = toy2d.sample_data("moons", 100, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ network
def test_mlp_shapes_and_time_input():
    x, t = torch.randn(7, 2), torch.rand(7)
    v = toy2d.MLP(2, 16, 2)
    assert v(x).shape == (7,)
    assert torch.equal(v(x, t), v(x))                             # time=False ignores t (autonomous Phi)
    phi = toy2d.MLP(2, 16, 2, time=True)
    assert phi(x, t).shape == (7,)
    assert not torch.allclose(phi(x, t), phi(x, t + 0.5))         # time=True: t is an input
    assert torch.equal(phi(x, 0.3), phi(x, torch.full((7,), 0.3)))  # a float t is broadcast
    vel = toy2d.MLP(2, 16, 2, time=True, out_dim=2)
    assert vel(x, t).shape == (7, 2)
    # smooth activation: the Hessian of a SiLU MLP is not identically zero (a ReLU net's would be)
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(v(xr).sum(), xr, create_graph=True)[0]
    h = torch.autograd.grad(g[:, 0].sum(), xr)[0]
    assert h.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ metrics
def test_w2_of_a_translation_is_the_shift():
    # For a cloud and its translate by c, the identity coupling is optimal, so W2 = |c| exactly.
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0.3, -0.4])
    assert toy2d.w2_exact(x, x + c) == pytest.approx(0.5, abs=1e-6)
    assert toy2d.w2_exact(x, x) == pytest.approx(0.0, abs=1e-6)


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    bw = [0.1, 0.5, 1, 2]
    same = toy2d.mmd2_rbf(x, y, bw)
    shifted = toy2d.mmd2_rbf(x, y + 1.0, bw)
    assert abs(same) < 0.01 and shifted > 0.2


class _GaussDensity:
    """A stand-in model with an unnormalised standard-normal log density (offset by an arbitrary constant)."""
    has_density = True

    def log_density(self, x):
        return -0.5 * x.pow(2).sum(1) + 3.7


def test_grid_normalised_nll_matches_closed_form():
    # E[-log N(x; 0, I)] in 2-D = log(2 pi) + 1: the grid normalisation must recover it despite the +3.7.
    a = toy2d.parse_args(["--grid-lim", "7", "--grid-n", "200"])
    m = _GaussDensity()
    _, logp, log_z = toy2d.grid_density(m, a, "cpu")
    assert float(logp.exp().sum() * (14 / 200) ** 2) == pytest.approx(1.0, abs=1e-9)   # normalised
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    nll, outside = toy2d.nll_heldout(m, a, x, log_z)
    assert outside == 0
    assert nll == pytest.approx(math.log(2 * math.pi) + 1, abs=0.03)
    # sampling from the grid density gives back a standard normal
    s = toy2d.sample_from_grid(logp, a, 20000, torch.Generator().manual_seed(1))
    assert torch.allclose(s.std(0), torch.ones(2, dtype=s.dtype), atol=0.03)


# ------------------------------------------------------------------------------------------------ methods
def _args(extra):
    a = toy2d.parse_args(TINY + extra)
    if a.source == "auto":
        a.source = toy2d.DEFAULT_SOURCE[a.method]
    return a


def test_otcfm_heun_integrates_a_constant_field_exactly():
    a = _args(["--method", "otcfm", "--ode-steps", "7"])
    m = toy2d.OTCFM(a)
    c = torch.tensor([1.5, -2.0])
    m.net = lambda x, t: c.expand_as(x)                           # v(x, t) = c  ->  x(1) = x(0) + c
    x0 = torch.randn(5, 2)
    x1, traj = m.sample(x0)
    assert traj.shape == (8, 5, 2)
    assert torch.allclose(x1, x0 + c, atol=1e-6)


def test_em_phase2_negatives_start_at_the_source():
    # With an 8-Gaussians source toy2d hands EnergyMatching.loss fresh source points as x0_cd (the EM paper's
    # 2-D setting: negatives start at the source). Check what cd_loss receives.
    a = _args(["--method", "em", "--steps", "10", "--steps-cd", "5"])
    m = toy2d.EMToy(a)
    seen = {}
    orig = m.model.cd_loss

    def spy(x1, x0):
        seen["x0"] = x0
        return orig(x1, x0)

    m.model.cd_loss = spy
    g = torch.Generator().manual_seed(0)
    x1, x0 = toy2d.sample_data("moons", 256, g), toy2d.sample_data("8gauss", 256, g)
    loss, logs = m.loss(x1, x0, step=7)                           # step 7 >= 5 warm-up steps: phase 2
    assert m.phase(7) == "main" and m.phase(4) == "warmup"
    assert torch.isfinite(loss) and "cd" in logs and "flow" in logs
    r = seen["x0"].norm(dim=1)
    assert abs(r.mean().item() - 5.0) < 0.3                       # 8 Gaussians (radius 5), not N(0, I)
    assert not torch.equal(seen["x0"], x0)                        # fresh points, not the flow batch


def test_short_em_run_learns(tmp_path):
    # Trained W2 must beat the untrained model's W2 by a wide margin (same seed, same evaluation points).
    common = ["--method", "em", "--hidden", "64", "--depth", "2", "--batch-size", "128", "--n-langevin", "10",
              "--chain-dt", "0.15", "--dt", "0.03", "--tau-s", "1.5", "--n-eval", "1000", "--no-plots",
              "--grid-n", "60"]
    toy2d.main(common + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    toy2d.main(common + ["--steps", "400", "--steps-cd", "40", "--out-dir", str(tmp_path / "trained")])
    w_untrained = json.load(open(tmp_path / "untrained" / "metrics.json"))["w2"]
    w_trained = json.load(open(tmp_path / "trained" / "metrics.json"))["w2"]
    assert w_untrained > 2.0                                      # samples still sit near the 8 Gaussians
    assert w_trained < 0.5 * w_untrained, (w_trained, w_untrained)


# ------------------------------------------------------------------------------------------------ CLI
def test_smoke_all_methods_subprocess(tmp_path):
    # CleanRL-style: the real script, every method (--method all), a tiny budget, outputs on disk.
    # (Plots are checked in-process below: one interpreter start less, and PNGs are the slow part.)
    r = run_cli(["--method", "all", "--steps", "6", "--steps-cd", "2", "--no-plots", "--out-dir", str(tmp_path)]
                + TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| method |" in r.stdout and "ms/iter" in r.stdout
    for tag, src in [("em", "8gauss"), ("otcfm", "8gauss"), ("cd", "8gauss"), ("vpfb", "gauss"),
                     ("vpfb-autonomous", "gauss")]:
        d = tmp_path / f"{tag}_{src}_moons"
        m = json.load(open(d / "metrics.json"))
        assert m["steps"] == 6 and m["n_eval"] == 200 and math.isfinite(m["w2"]) and math.isfinite(m["mmd2"])
        assert (m["nll"] is None) == (tag == "otcfm")             # OT-CFM has no energy -> NLL n/a (null)
        assert np.load(d / "samples.npy").shape == (200, 2)
        ck = torch.load(d / "model.pt", weights_only=True)
        assert ck["format"] == "toy2d/v1" and ck["step"] == 6
    table = (tmp_path / "table.md").read_text()
    assert sum(line.startswith("|") for line in table.splitlines()) == 7   # header, rule, 5 rows
    assert "best baseline" in table                                         # the EM-vs-baselines verdict


# ------------------------------------------------------------------------------------------------ plots
TAB_BLUE = (0.122, 0.467, 0.706)


def _png(path):
    import matplotlib.image as mpimg
    return mpimg.imread(str(path))[..., :3]                       # (H, W, 3) floats in [0, 1]


def _pixels(img, rgb, tol=0.1):
    """How many pixels have (about) this colour."""
    return int((np.abs(img - np.asarray(rgb)).max(-1) < tol).sum())


def _colours(img):
    return len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def _bluish(img):
    """Pixels of the blue sample dots, opaque or half transparent (blue channel well above red)."""
    return int(((img[..., 2] - img[..., 0] > 0.2) & (img[..., 2] > img[..., 1])).sum())


def _check_trajectories(img):
    """Both panels show the blue samples (the legend alone has ~70 blue pixels; NaN samples, or
    samples thrown out of the box, draw none)."""
    w = img.shape[1] // 2
    assert _pixels(img[:, :w], TAB_BLUE) > 200 and _bluish(img[:, w:]) > 200


def _check_panels(img, n_panels):
    """Every image panel is drawn: a NaN field leaves its axes white, a constant one a single colour.
    Looks at the middle of each panel (inside the axes, left of the colour bar)."""
    h, w = img.shape[0], img.shape[1] // n_panels
    for i in range(n_panels):
        crop = img[int(0.3 * h):int(0.7 * h), i * w + int(0.2 * w):i * w + int(0.55 * w)]
        white = (crop > 0.95).all(-1).mean()
        assert white < 0.5 and _colours(crop) >= 3, f"panel {i} is blank ({white:.0%} white)"


def test_png_checks_reject_blank_and_nan_figures(tmp_path):
    # The checks below must be able to fail: a trajectory plot whose samples are NaN, and a density
    # plot of a NaN density, are drawn by the real plot functions and rejected.
    a = toy2d.parse_args(TINY)
    traj = torch.randn(5, 300, 2)
    traj[-1] = float("nan")                                       # the samples

    toy2d.plot_trajectories(tmp_path / "t.png", traj, torch.randn(300, 2), "nan", 7.0)
    with pytest.raises(AssertionError):
        _check_trajectories(_png(tmp_path / "t.png"))
    logp = torch.full((a.grid_n ** 2,), float("nan"), dtype=torch.float64)
    toy2d.plot_density(tmp_path / "d.png", logp, a, torch.randn(300, 2), "nan")
    with pytest.raises(AssertionError):
        _check_panels(_png(tmp_path / "d.png"), 3)


@pytest.mark.parametrize("method", ["em", "vpfb", "otcfm"])
def test_plots_show_their_content(tmp_path, method):
    out = tmp_path / method
    # VPFB: Phi_B read at t = 0.5; at t_max = 1 - 1e-5 its density is a one-cell spike (README)
    extra = ["--t-inf", "0.5"] if method == "vpfb" else []
    toy2d.main(["--method", method, "--steps", "4", "--steps-cd", "2", "--out-dir", str(out)] + TINY
               + extra)
    _check_trajectories(_png(out / "trajectories.png"))
    n_fields = {"em": 1, "vpfb": 5, "otcfm": 3}[method]
    _check_panels(_png(out / "energy.png"), n_fields)
    loss = _png(out / "loss.png")
    assert _pixels(loss, TAB_BLUE) > 50                           # the loss curve is drawn
    if method == "otcfm":
        assert not (out / "density.png").exists()                # no energy, no density
    else:
        _check_panels(_png(out / "density.png"), 3)               # density, its log, histogram
    if method == "vpfb":
        lang = _png(out / "langevin.png")                       # Phi_B's chains may leave the box:
        assert (lang < 0.9).any(-1).mean() > 0.01                 # only ask for a drawn figure


@pytest.mark.parametrize("args, needle", [
    (["--method", "nope"], "invalid choice"),
    (["--target", "spirals"], "invalid choice"),
    (["--steps", "-5"], "--steps must be >= 0"),
    (["--steps", "10", "--steps-cd", "20"], "cannot exceed"),
    (["--out-dir", "__FILE__/sub"], "cannot write"),
    (["--method", "vpfb", "--t-inf", "1.5"], "--t-inf must be in (0, 1)"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    f = tmp_path / "a_file"
    f.write_text("x")
    args = [s.replace("__FILE__", str(f)) for s in args]
    r = run_cli(args + ["--steps", "1"] if "--steps" not in args else args, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_vpfb_t_inf_reaches_the_boltzmann_energy():
    # --t-inf is handed to vpfb.VPFB, and Phi_B then reads Phi at that time (not at t_max)
    a = _args(["--method", "vpfb", "--t-inf", "0.9"])
    m = toy2d.VPFBToy(a)
    assert m.model.t_inf == 0.9 and m.used()["t_inf"] == 0.9
    x = torch.randn(8, 2)
    assert torch.allclose(m.log_density(x), m.model.boltzmann_energy(x, t_inf=0.9))
    assert not torch.allclose(m.log_density(x), m.model.boltzmann_energy(x, t_inf=m.model.t_max))


def test_help_lists_defaults():
    r = run_cli(["--help"], timeout=60)
    assert r.returncode == 0
    for flag in ["--method", "--steps", "--tau-star", "--eps-max", "--kappa", "--autonomous", "--n-eval"]:
        assert flag in r.stdout
    assert "default: em" in r.stdout
