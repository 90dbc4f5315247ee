"""Tests for toy2d.py: data, network, metrics (closed forms), the authors' 2-D recipe, a short run
that must learn, smoke runs, plots with real content, bad input.

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
import vpfb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "toy2d.py")
TINY = ["--hidden", "16", "--depth", "2", "--batch-size", "32", "--n-langevin", "3",
        "--tau-s", "0.1", "--ode-steps", "10", "--n-eval", "200", "--grid-n", "30",
        "--langevin-steps", "5", "--threads", "1"]


def run_cli(args, **kw):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=kw.get("timeout", 120))


def _spy_cd_loss(m):
    """Record the (x1, x0) that EnergyMatching.cd_loss receives from an EMToy's loss."""
    seen, orig = {}, m.model.cd_loss

    def spy(x1, x0):
        seen.update(x1=x1, x0=x0)
        return orig(x1, x0)

    m.model.cd_loss = spy
    return seen


# -------------------------------------------------------------------------------------------- data
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


# ----------------------------------------------------------------------------------------- network
def test_mlp_shapes_and_time_input():
    x, t = torch.randn(7, 2), torch.rand(7)
    v = toy2d.MLP(2, 16, 2)
    assert v(x).shape == (7,)
    assert torch.equal(v(x, t), v(x))                             # time=False ignores t
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


# ----------------------------------------------------------------------------------------- metrics
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
    """A stand-in model: an unnormalised standard-normal log density (offset by a constant)."""
    has_density = True

    def log_density(self, x):
        return -0.5 * x.pow(2).sum(1) + 3.7


def test_grid_normalised_nll_matches_closed_form():
    # E[-log N(x; 0, I)] in 2-D = log(2 pi) + 1: the grid normalisation must recover it despite
    # the +3.7.
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


# ----------------------------------------------------------------------------------------- methods
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


def test_em_keeps_its_2d_setting_whatever_the_class_defaults():
    # EnergyMatching(V) alone is the paper's CIFAR-10 setting (tau* 0.9, lambda_CD 2e-4, "sum"
    # flow reduction, ...): toy2d passes every keyword it relies on, so its README numbers stay.
    m = toy2d.EMToy(_args(["--method", "em"])).model
    assert m.flow_reduction == "mean"                             # ||.||^2 / 2, the 2-D code's
    got = dict(tau_star=m.tau_star, eps_max=m.eps_max, lambda_cd=m.lambda_cd, cd_trim=m.cd_trim,
               cd_neg_clamp=m.cd_neg_clamp, n_langevin=m.n_langevin, dt=m.dt,
               neg_data_frac=m.neg_data_frac, flow_weighting=m.flow_weighting, use_ot=m.use_ot,
               same_temperature=m.same_temperature, ot_sigma=m.ot_sigma)
    assert got == dict(tau_star=0.8, eps_max=0.15, lambda_cd=0.5, cd_trim=0.0, cd_neg_clamp=0.0,
                       n_langevin=3, dt=0.03, neg_data_frac=0.5, flow_weighting=False,
                       use_ot=True, same_temperature=False, ot_sigma=0.0)


def test_em_phase2_negatives_start_at_the_source():
    # With an 8-Gaussians source toy2d hands EnergyMatching.loss fresh source points as x0_cd (the
    # EM paper's 2-D setting: negatives start at the source). Check what cd_loss receives.
    a = _args(["--method", "em", "--steps", "10", "--steps-cd", "5"])
    m = toy2d.EMToy(a)
    seen = _spy_cd_loss(m)
    g = torch.Generator().manual_seed(0)
    x1, x0 = toy2d.sample_data("moons", 256, g), toy2d.sample_data("8gauss", 256, g)
    loss, logs = m.loss(x1, x0, step=7)                           # 7 >= 5 warm-up steps: phase 2
    assert m.phase(7) == "main" and m.phase(4) == "warmup"
    assert torch.isfinite(loss) and "cd" in logs and "flow" in logs
    r = seen["x0"].norm(dim=1)
    assert abs(r.mean().item() - 5.0) < 0.3                       # 8 Gaussians, not N(0, I)
    assert not torch.equal(seen["x0"], x0)                        # fresh points, not the flow batch


# ----------------------------------------------------------------------------------------- authors
def test_recipe_authors_is_the_authors_2d_notebook():
    # The EM authors' 2-D run (experiments/toy2d of https://github.com/m1balcerak/EnergyMatching):
    # 20000 + 2000 steps, batch 128, Adam 1e-4, MLP 2->256x4->1 with a ReLU first, 200-step chains
    # of step 0.01 on the clock t = (m+1)/200, lambda_CD 2, tau* 0.8, eps_max 0.15, flow weighting,
    # sigma 0.1 in the OT matcher, no trim/clamp, fresh CD batches, Euler sampler stopped at path
    # length 500.
    a = toy2d.parse_args(["--recipe", "authors"])
    want = dict(steps=22000, batch_size=128, lr=1e-4, hidden=256, depth=4,
                first_act="relu", n_langevin=200, chain_dt=0.01, chain_clock="authors",
                lambda_cd=2.0, tau_star=0.8, eps_max=0.15, cd_trim=0.0, cd_neg_clamp=0.0,
                flow_weighting=True, sigma=0.1, fresh_cd_batch=True, em_sampler="euler", dt=0.01,
                max_length=500.0)
    assert {k: getattr(a, k) for k in want} == want
    b = toy2d.parse_args(["--recipe", "authors", "--steps", "2200"])   # flags win; phase 2 keeps
    b.source = "8gauss"                                                 # its share of the steps
    assert b.steps == 2200 and toy2d.EMToy(b).steps_cd == 200
    ours = toy2d.parse_args([])
    assert ours.recipe == "ours" and ours.steps == 3000 and ours.chain_clock == "alg2"
    a.source = "8gauss"
    m = toy2d.EMToy(a)
    assert m.steps_warmup == 20000 and m.steps_cd == 2000
    assert m.model.ot_sigma == 0.1 and m.model.flow_weighting and m.model.lambda_cd == 2.0
    acts = [type(x).__name__ for x in m.net.net if not isinstance(x, torch.nn.Linear)]
    assert acts == ["ReLU", "SiLU", "SiLU", "SiLU"]               # the authors' PotentialModel


def _chain_noise_variance(m, B=20000):
    """Per-coordinate variance that the negative chains add, (data-started, noise-started), with a
    flat V (last layer zeroed: grad V = 0), so each chain is pure noise: var = 2 dt sum_m eps_m."""
    last = [x for x in m.net.net if isinstance(x, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
    out = m.model.negatives(torch.zeros(B, 2), torch.zeros(B, 2))
    x_neg = out[0] if isinstance(out, tuple) else out
    return x_neg[:B // 2].var().item(), x_neg[B // 2:].var().item()


def test_authors_chain_clock_heats_only_the_last_steps():
    # Authors' 2-D code: noise-started negative m runs at eps(t), t = (m + 1) / n: eps > 0 only in
    # the last (1 - tau*) share (here steps 8, 9 at 0.075, 0.15); data-started ones stay at
    # eps_max. Alg. 2's clock t = m * chain_dt with 10 x 0.03 never passes tau* = 0.8: no noise.
    a = _args(["--method", "em", "--n-langevin", "10", "--chain-dt", "0.03", "--chain-clock",
               "authors"])
    data, noise = _chain_noise_variance(toy2d.EMToy(a))
    assert data == pytest.approx(2 * 0.03 * 10 * 0.15, rel=0.05)
    assert noise == pytest.approx(2 * 0.03 * (0.075 + 0.15), rel=0.05)
    a = _args(["--method", "em", "--n-langevin", "10", "--chain-dt", "0.03"])
    data, noise = _chain_noise_variance(toy2d.EMToy(a))
    assert data == pytest.approx(2 * 0.03 * 10 * 0.15, rel=0.05) and noise == 0.0


def test_sigma_defaults_otcfm_tube_and_em():
    assert toy2d.OTCFM(_args(["--method", "otcfm"])).sigma == 0.1   # Tong et al.'s 2-D sigma
    assert toy2d.EMToy(_args(["--method", "em"])).model.ot_sigma == 0.0   # Alg. 1: no tube
    assert toy2d.EMToy(_args(["--method", "em", "--sigma", "0.1"])).model.ot_sigma == 0.1
    m = toy2d.OTCFM(_args(["--method", "otcfm"]))
    seen = {}

    def net(x, t):
        seen["x"] = x
        return torch.zeros_like(x)

    m.net = net
    x = torch.zeros(1000, 2)                                      # x0 = x1: x_t = sigma * noise
    m.loss(x, x.clone(), 0)
    assert seen["x"].std().item() == pytest.approx(0.1, rel=0.05)


def test_cd_baseline_samples_with_its_training_chain():
    # The CD-EBM is a short-run EBM: it samples with the chain it was trained with
    # (n_langevin steps of chain_dt), not with another step count and size.
    a = _args(["--method", "cd", "--n-langevin", "6", "--chain-dt", "0.05", "--eps-max", "1e-12"])
    m = toy2d.CDEBM(a)
    m.net = lambda x: 0.5 * x.pow(2).sum(1)                        # grad E = x: x <- x (1 - dt)
    x0 = torch.randn(5, 2)
    x, traj = m.sample(x0)
    assert traj.shape == (7, 5, 2)
    assert torch.allclose(x, x0 * 0.95 ** 6, atol=1e-5)


def test_path_length_stop_of_the_authors_sampler():
    # Steps of Frobenius length 1 each (over the first 1024 chains): length 3.5 is passed after 4.
    traj = torch.zeros(11, 2000, 2)
    for k in range(1, 11):
        traj[k] = traj[k - 1]
        traj[k, :1024, 0] += 1 / 32                               # sqrt(1024) / 32 = 1
    assert toy2d.path_length_stop(traj, 3.5) == 4
    assert toy2d.path_length_stop(traj, 3.0) == 3
    assert toy2d.path_length_stop(traj, 11.0) is None
    # EMToy cuts the trajectory there, and the sample is its last state
    a = _args(["--method", "em", "--recipe", "authors", "--max-length", "40", "--tau-s", "2",
               "--hidden", "16", "--depth", "2"])
    a.source = "8gauss"
    m = toy2d.EMToy(a)
    x0 = toy2d.sample_data("8gauss", 1200, torch.Generator().manual_seed(0))
    x, traj = m.sample(x0)
    K = traj.shape[0] - 1
    assert m.last_stop == K and 0 < K < 200 and torch.equal(x, traj[-1])
    steps = (traj[1:, :1024] - traj[:-1, :1024]).flatten(1).norm(dim=1)
    assert steps[:K - 1].sum() < 40 <= steps.sum()


def test_fresh_cd_batch_draws_new_data_for_cd():
    a = _args(["--method", "em", "--steps", "10", "--steps-cd", "5", "--fresh-cd-batch"])
    m = toy2d.EMToy(a)
    seen = _spy_cd_loss(m)
    g = torch.Generator().manual_seed(0)
    x1, x0 = toy2d.sample_data("moons", 64, g), toy2d.sample_data("8gauss", 64, g)
    m.loss(x1, x0, step=7)
    assert seen["x1"].shape == x1.shape and not torch.equal(seen["x1"], x1)


# --------------------------------------------------------------------------------------------- NLL
def test_nll_baselines_and_temperature_scan_closed_forms():
    a = toy2d.parse_args(["--grid-lim", "7", "--grid-n", "200"])
    assert toy2d.nll_flat(a) == pytest.approx(math.log(196))     # ln of the box area, 5.28

    class Flat:
        def log_density(self, x):
            return torch.zeros(len(x))

    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    _, _, log_z = toy2d.grid_density(Flat(), a, "cpu")
    assert toy2d.nll_heldout(Flat(), a, x, log_z)[0] == pytest.approx(toy2d.nll_flat(a), abs=1e-9)
    # exp(log N(x; 0, I) / c) normalised is N(0, c I): E[-log] = log(2 pi c) + 1 / c for x ~ N(0, I)
    scan = toy2d.nll_by_temperature(_GaussDensity(), a, x, "cpu", factors=(0.5, 1.0, 2.0))
    for c, v in scan.items():
        assert v == pytest.approx(math.log(2 * math.pi * c) + 1 / c, abs=0.03), c


def test_short_em_run_learns(tmp_path):
    # Trained W2 must beat the untrained model's W2 by a wide margin (same seed, same eval points).
    # 200 steps learn as much as 400 here (W2 / untrained W2 = 0.26-0.30 at seeds 0-2, vs 0.24-0.30
    # at 400 steps; the bound is 0.5), at half the time.
    common = ["--method", "em", "--hidden", "64", "--depth", "2", "--batch-size", "128",
              "--n-langevin", "10", "--chain-dt", "0.15", "--dt", "0.03", "--tau-s", "1.5",
              "--n-eval", "1000", "--no-plots",
              "--grid-n", "60"]
    toy2d.main(common + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    toy2d.main(common + ["--steps", "200", "--steps-cd", "20",
                         "--out-dir", str(tmp_path / "trained")])
    w_untrained = json.load(open(tmp_path / "untrained" / "metrics.json"))["w2"]
    w_trained = json.load(open(tmp_path / "trained" / "metrics.json"))["w2"]
    assert w_untrained > 2.0                                      # samples still near the source
    assert w_trained < 0.5 * w_untrained, (w_trained, w_untrained)


# --------------------------------------------------------------------------------------------- CLI
def test_smoke_all_methods_subprocess(tmp_path):
    # CleanRL-style: the real script, every method (--method all), a tiny budget, outputs on disk.
    # (Plots are checked in-process below: one interpreter start less, and PNGs are the slow part.)
    r = run_cli(["--method", "all", "--steps", "6", "--steps-cd", "2", "--no-plots",
                 "--out-dir", str(tmp_path)]
                + TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| method |" in r.stdout and "ms/iter" in r.stdout
    for tag, src in [("em", "8gauss"), ("otcfm", "8gauss"), ("cd", "8gauss"), ("vpfb", "gauss"),
                     ("vpfb-autonomous", "gauss")]:
        d = tmp_path / f"{tag}_{src}_moons"
        m = json.load(open(d / "metrics.json"))
        assert m["steps"] == 6 and m["n_eval"] == 200
        assert math.isfinite(m["w2"]) and math.isfinite(m["mmd2"])
        assert (m["nll"] is None) == (tag == "otcfm")             # OT-CFM: no energy, NLL null
        assert m["nll_flat"] == pytest.approx(math.log(14 ** 2))   # beside every NLL: flat box
        assert (m["nll_untrained"] is None) == (tag == "otcfm")   # and the untrained model
        if tag.startswith("vpfb"):                                # the VPFB preset is recorded
            assert m["vpfb_recipe"] == "ours" and m["vpfb_preset"] == vpfb.OURS
            assert m["vpfb_hparams_used"]["cov_form"] == "stein"
        assert np.load(d / "samples.npy").shape == (200, 2)
        ck = torch.load(d / "model.pt", weights_only=True)
        assert ck["format"] == "toy2d/v1" and ck["step"] == 6
    table = (tmp_path / "table.md").read_text()
    assert sum(line.startswith("|") for line in table.splitlines()) == 7   # header, rule, 5 rows
    assert "best baseline" in table                                         # the EM verdict
    assert "| NLL untrained | NLL flat |" in table and "| 5.278 |" in table


# ------------------------------------------------------------------------------------------- plots
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
    """Every image panel is drawn: a NaN field leaves its axes white, a constant one one colour.
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


BAD_INPUT = [
    (["--method", "nope"], "invalid choice"),
    (["--target", "spirals"], "invalid choice"),
    (["--steps", "-5"], "--steps must be >= 0"),
    (["--steps", "10", "--steps-cd", "20"], "cannot exceed"),
    (["--out-dir", "__FILE__/sub"], "cannot write"),
    (["--method", "vpfb", "--t-inf", "1.5"], "--t-inf must be in (0, 1)"),
    (["--recipe", "paper"], "invalid choice"),
    (["--sigma", "-0.1"], "--sigma must be >= 0"),
    # every float flag is finite and in range, checked by argparse before any training (these
    # three used to train fully and then fail with a traceback in the evaluation)
    (["--tau-s", "inf"], "--tau-s must be > 0 and finite, got 'inf'"),
    (["--grid-lim", "nan"], "--grid-lim must be > 0 and finite, got 'nan'"),
    (["--lambda-cd", "inf"], "--lambda-cd must be >= 0 and finite, got 'inf'"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--eps-max", "0"], "--eps-max must be > 0"),
    (["--tau-star", "1.5"], "--tau-star must be in [0, 1]"),
    (["--cd-trim=-inf"], "--cd-trim must be in [0, 1)"),
    (["--method", "vpfb", "--kappa", "nan"], "--kappa must be >= 0"),
    (["--method", "vpfb", "--t-end", "2"], "--t-end must be in (0, 1]"),
    (["--method", "vpfb", "--langevin-step-size", "inf"], "--langevin-step-size must be > 0"),
    (["--mmd-bandwidths", "0.5,inf"], "--mmd-bandwidths must be"),
    (["--n-eval", "1"], "--n-eval must be >= 2"),                 # was MMD^2 nan with exit 0
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--method", "vpfb", "--vpfb-recipe", "mine"], "invalid choice"),
    (["--seed", str(2 ** 64)], "--seed must be an integer in [0, 2**32)"),   # was a traceback
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got '-1'"),
    # flag values that ran and reported garbage with exit 0, or a traceback (round 4)
    (["--grid-lim", "1"], "1872 of the 2000 held-out moons points lie outside the grid"),  # NLL of
    (["--grid-lim", "0.01", "--n-eval", "20"], "20 of the 20 held-out"),     # a few, or NaN
    (["--grid-n", "1"], "--grid-n must be >= 2"),
    (["--grid-n", str(10 ** 8)], "--grid-n 100000000 needs about"),          # was a traceback
    (["--n-eval", str(10 ** 7)], "--n-eval 10000000 needs about"),
    (["--batch-size", str(10 ** 7)], "--batch-size 10000000 needs about"),
    (["--tau-s", "0.001"], "--tau-s 0.001 with --dt 0.01 gives a sampler of 0 steps"),
    (["--method", "cd", "--n-langevin", "0"], "the CD baseline would use negative chains of 0"),
    (["--steps", "10", "--n-langevin", "0"], "EM's phase 2 would use negative chains of 0 steps"),
    # float flags beyond float32's range (the tensors they enter overflow): a traceback
    # (--grid-lim, --eps-max) or exit 0 with all samples NaN (--sigma, --dt, the Langevin step)
    (["--grid-lim", "1e300"], "--grid-lim must be at most 3.4e+38 in size (float32"),
    (["--eps-max", "1e300"], "--eps-max must be at most 3.4e+38"),
    (["--method", "otcfm", "--sigma", "1e300"], "--sigma must be at most 3.4e+38"),
    (["--dt", "1e300", "--tau-s", "1e300"], "--dt must be at most 3.4e+38"),
    (["--method", "vpfb", "--langevin-step-size", "1e300"], "--langevin-step-size must be at most"),
    (["--mmd-bandwidths", "1,1e300"], "--mmd-bandwidths must be"),
    # devices other than auto, cpu, cuda, cuda:N (meta ran into a traceback)
    (["--device", "meta"], "unknown --device 'meta' (use auto, cpu, cuda or cuda:N)"),
    (["--device", "cuda:x"], "unknown --device 'cuda:x'"),
]


def _bad_argv(tmp_path, args):
    f = tmp_path / "a_file"
    f.write_text("x")
    args = [s.replace("__FILE__", str(f)) for s in args]
    return args + ["--steps", "1"] if "--steps" not in args else args


def _check_one_line_error(stderr, needle):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, needle", BAD_INPUT)
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, args, needle):
    # In-process through toy2d.main (no interpreter start per case); the real command line is
    # checked by the subprocess test below. cwd = tmp_path: a check that failed to fire would
    # train into tmp_path/runs, not into the repository. Any exception other than SystemExit (a
    # traceback) fails pytest.raises.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        toy2d.main(_bad_argv(tmp_path, args))
    assert e.value.code == 2
    _check_one_line_error(capsys.readouterr().err, needle)


@pytest.mark.parametrize("case", [0, 8])      # a bad choice; a bad float (--tau-s inf)
def test_bad_input_one_line_exit_2_subprocess(tmp_path, case):
    # One real process: the exit status and stderr of `python toy2d.py` itself.
    args, needle = BAD_INPUT[case]
    r = run_cli(_bad_argv(tmp_path, args), timeout=60, cwd=str(tmp_path))
    assert r.returncode == 2
    _check_one_line_error(r.stderr, needle)


@pytest.mark.parametrize("args, needle", [
    (["--method", "em", "--lr", "1e30"], "em: the training loss at step"),   # multinomial error
    (["--method", "cd", "--lr", "1e30"], "cd: the training loss at step"),
    (["--method", "vpfb", "--lr", "1e30"], "vpfb: the training loss at step"),
    (["--method", "otcfm", "--lr", "1e30"], "otcfm: the training loss at step"),   # exit 0, null
    (["--method", "otcfm", "--sigma", "1e38"], "otcfm: the training loss at step 1"),
    (["--method", "vpfb", "--langevin-step-size", "3e38"], "vpfb: the Langevin samples on Phi_B"),
    (["--grid-lim", "3e38"], "em: the log density on the grid"),                 # multinomial
])
def test_nan_guard_one_line_exit_3_nothing_written(tmp_path, capsys, args, needle):
    """A run whose loss, samples or density go NaN / inf ends with one line and exit 3 (it was a
    traceback, or exit 0 with null W2 / MMD and a model.pt): no model, samples or metrics."""
    with pytest.raises(SystemExit) as e:
        toy2d.main(args + ["--steps", "3", "--no-plots", "--out-dir", str(tmp_path)] + TINY)
    err = capsys.readouterr().err
    assert e.value.code == 3 and "NaN or inf" in err and "nothing written" in err
    _check_one_line_error(err, needle)
    assert os.listdir(tmp_path) == []


def test_metrics_json_is_strict_a_nan_is_null_with_its_reason(tmp_path, monkeypatch):
    """metrics.json is strict JSON: a NaN metric is null, listed under "non_finite" (the same
    rule as every JSON of the project, energy_matching.strict_json)."""
    monkeypatch.setattr(toy2d, "mmd2_rbf", lambda *a, **k: float("nan"))

    def refuse(c):
        raise ValueError(f"not strict JSON: bare {c}")
    toy2d.main(["--method", "otcfm", "--steps", "2", "--no-plots", "--out-dir", str(tmp_path)]
               + TINY)
    m = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert m["mmd2"] is None and m["non_finite"]["mmd2"] == "nan"


def test_vpfb_t_inf_reaches_the_boltzmann_energy():
    # --t-inf is handed to vpfb.VPFB, and Phi_B then reads Phi at that time (not at t_max)
    a = _args(["--method", "vpfb", "--t-inf", "0.9"])
    m = toy2d.VPFBToy(a)
    assert m.model.t_inf == 0.9 and m.used()["t_inf"] == 0.9
    x = torch.randn(8, 2)
    assert torch.allclose(m.log_density(x), m.model.boltzmann_energy(x, t_inf=0.9))
    assert not torch.allclose(m.log_density(x), m.model.boltzmann_energy(x, t_inf=m.model.t_max))


@pytest.mark.parametrize("recipe, want", [
    (None, dict(cov_form="stein", kappa=1.0, lam_gt=0.01, weight_on="ritz")),       # default: ours
    ("ours", dict(cov_form="stein", kappa=1.0, lam_gt=0.01, weight_on="ritz")),
    ("paper", dict(cov_form="cov", kappa=2.0, lam_gt=1.0, weight_on="cov", bfactor=2.0)),
    ("authors", dict(cov_form="corr", kappa=2.0, lam_gx=0.5, cos_form="authors", bfactor=4.0)),
])
def test_vpfb_recipe_builds_the_preset(recipe, want):
    # --vpfb-recipe ours = vpfb.OURS (the old defaults, with which README's VPFB rows were made),
    # paper = the bare vpfb.VPFB (Eq. 27 as printed), authors = vpfb.AUTHORS
    a = _args(["--method", "vpfb"] + (["--vpfb-recipe", recipe] if recipe else []))
    m = toy2d.VPFBToy(a)
    assert {k: getattr(m.model, k) for k in want} == want
    assert m.preset == {"ours": vpfb.OURS, "paper": {}, "authors": vpfb.AUTHORS}[recipe or "ours"]
    assert {k: m.used()[k] for k in want} == want                 # what metrics.json records


def test_vpfb_flags_override_the_preset():
    # a knob typed on the command line wins over the preset (no "multiple values" TypeError)
    m = toy2d.VPFBToy(_args(["--method", "vpfb", "--kappa", "3", "--cov-form", "cov"])).model
    assert (m.kappa, m.cov_form, m.weight_on, m.lam_gt) == (3.0, "cov", "ritz", 0.01)
    m = toy2d.VPFBToy(_args(["--method", "vpfb", "--vpfb-recipe", "paper", "--cov-form",
                             "stein"])).model
    assert (m.kappa, m.cov_form, m.weight_on) == (2.0, "stein", "cov")


# ----------------------------------------------------------------------------------------- threads
def test_threads_auto_leaves_the_busy_cores_alone(monkeypatch):
    # --threads 0 (default): the cores available less the 1-minute load, at least 1; a busy 2-core
    # machine gets 1 thread (spinning OpenMP threads made the tiny MLPs 10-50x slower)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert toy2d.em.pick_threads(3) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert toy2d.em.pick_threads(0) == 1
    assert toy2d.parse_args([]).threads == 1                      # the default is auto
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert toy2d.em.pick_threads(0) == cores
    assert toy2d.parse_args(["--threads", "2"]).threads == 2


# ------------------------------------------------------------------------------------------ layout
BANNERS = ["# ==== 1. Data ====", "# ==== 2. Network ====", "# ==== 3. Methods ====",
           "# ==== 4. Metrics ====", "# ==== 5. Training loop ====", "# ==== 6. Checkpoint ====",
           "# ==== 7. Plots ====", "# ==== 8. Experiment: train, evaluate, write ====",
           "# ==== 9. Arguments, recipes and main ===="]


def test_reads_method_first():
    # Like the method files: data, network and the methods first, arguments and main() last
    with open(SCRIPT, encoding="utf-8") as f:
        lines = f.read().splitlines()
    at = [lines.index(b) if b in lines else -1 for b in BANNERS]
    assert -1 not in at and at == sorted(at), at
    first = {name: next(i for i, s in enumerate(lines) if s.startswith(name))
             for name in ["def sample_data", "class MLP", "class EMToy", "class VPFBToy",
                          "class OTCFM", "class CDEBM", "def w2_exact", "def train(",
                          "def save_checkpoint", "def plot_trajectories", "def run_one",
                          "def build_parser", "def main"]}
    assert list(first.values()) == sorted(first.values()), first
    assert first["class EMToy"] < 200 and first["class EMToy"] > at[2]


def test_help_lists_defaults(monkeypatch, capsys):
    # In-process: argparse prints the help and exits 0. COLUMNS=80 is the width a subprocess with
    # piped output gets, so the wrapping (and "default: em" on one line) is the command line's.
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        toy2d.main(["--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    for flag in ["--method", "--steps", "--tau-star", "--eps-max", "--kappa", "--autonomous",
                 "--n-eval", "--recipe", "--sigma", "--vpfb-recipe", "--threads"]:
        assert flag in out
    assert "default: em" in out
