"""Tests for energy_matching.py: closed forms on Gaussians, the OT plan, the integrators, the
losses' signs and the authors'-code choices, the image pipeline (shapes, training lowers the loss,
checkpoints/resume, torchrun with gloo, NaN guard, bad input), Algorithm 3 on a Gaussian prior, LID
on a potential with a known flat subspace."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import energy_matching as em
import energy_matching_experiments as emx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "energy_matching.py")
# a < 100k-parameter UNet+ViT potential on 8x8 FakeData
TINY = ["--dataset", "fake", "--image-size", "8", "--fake-size", "32", "--batch-size", "8",
        "--model-size", "8", "--vit-depth", "1", "--res-blocks", "1", "--ch-mult", "1,2",
        "--workers", "0", "--n-langevin", "4", "--dt", "0.05", "--tau-s", "0.2", "--log-every", "0",
        "--num-samples", "0", "--warmup", "1", "--lr", "1e-3", "--device", "cpu", "--amp", "none",
        "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A folder with one TINY training step (checkpoint, logs), trained once for the tests that
    start from it; each copies it (copy_run) instead of training its own."""
    n = torch.get_num_threads()
    out = str(tmp_path_factory.mktemp("one_step"))
    em.main(TINY + ["--steps", "1", "--out-dir", out])
    torch.set_num_threads(n)
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return str(dst)


def tiny_args(*extra):
    return em.parse_args((TINY + list(extra)))


def env_1thread():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


# --------------------------------------------------------------------------------------------------
# Section 4: temperature, OT pairing, losses
# --------------------------------------------------------------------------------------------------
def test_temperature_eq3_values_and_boundaries():
    f = lambda t: em.temperature(t, 0.8, 0.1)  # noqa: E731
    assert f(0.0) == 0.0 and f(0.5) == 0.0 and f(0.7999) == 0.0
    assert f(0.8) == pytest.approx(0.0)                   # ramp starts at 0: continuous at tau*
    assert f(0.9) == pytest.approx(0.05)                  # eps_max (t - tau*) / (1 - tau*)
    assert f(1.0) == pytest.approx(0.1) and f(3.0) == pytest.approx(0.1)
    assert f(1.0 - 1e-9) == pytest.approx(0.1, abs=1e-7)  # continuous at 1
    t = torch.tensor([0.0, 0.8, 0.9, 1.0, 2.5])
    out = em.temperature(t, 0.8, 0.1)
    assert torch.is_tensor(out) and out.shape == t.shape
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.05, 0.1, 0.1]))
    # tau* = 1 (authors' code): a step at t = 1
    assert em.temperature(0.999, 1.0, 0.01) == 0.0 and em.temperature(1.0, 1.0, 0.01) == 0.01
    assert torch.equal(em.temperature(torch.tensor([0.99, 1.0]), 1.0, 0.01),
                       torch.tensor([0.0, 0.01]))


def test_ot_pair_is_a_permutation_and_beats_random_pairings():
    from scipy.optimize import linear_sum_assignment
    torch.manual_seed(0)
    x0, x1 = torch.randn(32, 3, 4, 4), torch.randn(32, 3, 4, 4) + 0.5
    x0p = em.ot_pair(x0, x1)
    # a permutation of the rows of x0
    rows = {tuple(r.tolist()) for r in x0.flatten(1)}
    assert len({tuple(r.tolist()) for r in x0p.flatten(1)}) == 32
    assert {tuple(r.tolist()) for r in x0p.flatten(1)} == rows
    cost = lambda a: (a - x1).flatten(1).pow(2).sum(1).mean().item()  # noqa: E731
    rand = [cost(x0[torch.randperm(32)]) for _ in range(50)]
    assert cost(x0p) < min(rand) and cost(x0p) < cost(x0)
    # and it is the optimum (Hungarian algorithm on the same cost)
    M = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).pow(2).numpy()
    r, c = linear_sum_assignment(M)
    assert cost(x0p) == pytest.approx(M[r, c].mean(), rel=1e-6)


def test_flow_loss_sign_reduction_and_ot_recovers_translation():
    """V(x) = -<u, x> has -grad V = u: zero loss when every pair moves by u (the OT map of a
    translation), even if x0 arrives shuffled. V = +<u, x> gives ||2u||^2 per sample (sum) and its
    mean over the d dims (mean)."""
    torch.manual_seed(1)
    u = torch.tensor([1.5, -0.5])
    x0 = torch.randn(64, 2)
    x1 = x0 + u
    shuffled = x0[torch.randperm(64)]
    good = em.EnergyMatching(lambda x: -(x * u).sum(1))
    assert good.flow_loss(x1, shuffled).item() < 1e-10
    bad_sum = em.EnergyMatching(lambda x: (x * u).sum(1))                  # the paper's ||.||^2
    bad_mean = em.EnergyMatching(lambda x: (x * u).sum(1), flow_reduction="mean")   # the code's
    u2 = u.pow(2).sum().item()
    assert bad_sum.flow_loss(x1, shuffled).item() == pytest.approx(4 * u2, rel=1e-5)
    assert bad_mean.flow_loss(x1, shuffled).item() == pytest.approx(2 * u2, rel=1e-5)
    # without OT the shuffled pairs do not all move by u: the loss is not zero
    no_ot = em.EnergyMatching(lambda x: -(x * u).sum(1), use_ot=False)
    assert no_ot.flow_loss(x1, shuffled).item() > 0.1


def test_cd_loss_trimmed_mean_clamp_and_stop_gradient():
    """n_langevin = 0: negatives are their starting points (half data, half noise). CD = mean
    V(data) - mean of the 90 % lowest V(negatives) (authors' trim); lambda*CD is clamped below at
    -cd_neg_clamp; no gradient reaches the chain (the negatives are detached)."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.tensor([0.7, -0.3]))
    V = lambda x: (x * w).sum(1) + 0.5 * x.pow(2).sum(1)  # noqa: E731
    x1, x0 = torch.randn(20, 2) + 2, torch.randn(20, 2)
    m = em.EnergyMatching(V, n_langevin=0, cd_trim=0.1, lambda_cd=1.0, cd_neg_clamp=0.5)
    cd, logs = m.cd_loss(x1, x0)
    x_neg = torch.cat([x1[:10], x0[10:]])
    e_neg = V(x_neg).detach().sort().values[:18]                  # drop the top 2 of 20 (10 %)
    assert cd.item() == pytest.approx((V(x1).mean() - e_neg.mean()).item(), rel=1e-5)
    cd.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    # with lambda large and negatives of higher energy the clamp bites: cd_term >= -0.5
    m2 = em.EnergyMatching(V, n_langevin=0, lambda_cd=100.0, cd_neg_clamp=0.5, neg_data_frac=0.0)
    _, logs = m2.loss(x1, x1 + 5.0, phase="main", x0_cd=x1 + 5.0)
    assert logs["cd_term"] == -0.5                    # the clamp bites: exactly -cd_neg_clamp
    m2.cd_neg_clamp = 0
    _, logs_off = m2.loss(x1, x1 + 5.0, phase="main", x0_cd=x1 + 5.0)
    assert logs_off["cd_term"] < -10.0                            # unclamped, the term runs away
    # negatives carry no graph (sg in Alg. 2)
    x_neg2, at_data = em.EnergyMatching(V, n_langevin=3, dt=0.01).negatives(x1, x0)
    assert not x_neg2.requires_grad and at_data.sum().item() == 10


def test_loss_main_noise_chains_start_from_fresh_noise_or_x0_cd():
    """Alg. 2 line 5 and the authors' code: the noise-started negatives start from fresh N(0, I)
    noise, not the flow term's x0; x0_cd chooses the starts (x0_cd = x0 reuses the flow's noise,
    a non-Gaussian source in the 2-D lab). n_langevin = 0: the negatives are their starts."""
    w = torch.tensor([0.7, -0.3])
    V = lambda x: (x * w).sum(1)  # noqa: E731
    x1, x0, x0_cd = torch.randn(16, 2) + 2, torch.randn(16, 2), torch.randn(16, 2) * 3 - 4
    m = em.EnergyMatching(V, n_langevin=0, cd_trim=0.0, lambda_cd=1.0, cd_neg_clamp=0)
    starts = []
    negatives = m.negatives
    m.negatives = lambda *a: starts.append(negatives(*a)[0]) or (starts[-1], None)
    torch.manual_seed(0)
    m.loss(x1, x0, phase="main")
    fresh = starts[-1]
    assert torch.equal(fresh[:8], x1[:8])                         # half at data (B // 2)
    assert not torch.equal(fresh[8:], x0[8:])                     # not the flow term's noise
    assert (fresh[8:] - x0[8:]).abs().min() > 0                   # not one value of it
    assert fresh[8:].abs().max() < 6 and fresh[8:].std() > 0.3    # N(0, I) draws
    m.loss(x1, x0, phase="main", x0_cd=x0)                         # reuse: exactly x0's half
    assert torch.equal(starts[-1][8:], x0[8:])
    m.loss(x1, x0, phase="main", x0_cd=x0_cd)
    assert torch.equal(starts[-1][8:], x0_cd[8:])


@pytest.mark.parametrize("B", [7, 8, 9])
def test_chain_split_is_floor_of_half_as_authors(B):
    """Their code starts B // 2 chains at data and the rest at noise: odd B too (7 -> 3 + 4)."""
    x1 = torch.randn(B, 2) + 5
    x_neg, at_data = em.EnergyMatching(lambda x: x.sum(1), n_langevin=0).negatives(x1)
    assert at_data.sum().item() == B // 2
    assert torch.equal(x_neg[:B // 2], x1[:B // 2])
    assert (x_neg[B // 2:] - x1[B // 2:]).abs().min() > 0


def distinct_fraction(B, seed):
    """Share of distinct (x0, x1) pairs among the B pairs drawn from the exact plan."""
    torch.manual_seed(seed)
    x0, x1 = torch.randn(B, 3), torch.randn(B, 3)
    a, b = em.ot_draw_pairs(x0, x1)
    return len({(tuple(u.tolist()), tuple(v.tolist())) for u, v in zip(a, b)}) / B


def test_ot_pairs_with_replacement_repeat_one_in_e():
    """Authors' code (torchcfm's OTPlanSampler.sample_plan): B draws from the plan with replacement,
    so about 1 - 1/e of the pairs are distinct at large B; ot_pair uses each pair once. Every drawn
    pair is a pair of the plan (the plan is a permutation: x1_j has one partner)."""
    frac = np.mean([distinct_fraction(256, s) for s in range(4)])
    assert abs(frac - (1 - math.exp(-1))) < 0.03, frac
    torch.manual_seed(0)
    x0, x1 = torch.randn(64, 3), torch.randn(64, 3)
    perm = em.ot_pair(x0, x1)
    partner = {tuple(v.tolist()): tuple(u.tolist()) for u, v in zip(perm, x1)}
    a, b = em.ot_draw_pairs(x0, x1)
    assert all(partner[tuple(v.tolist())] == tuple(u.tolist()) for u, v in zip(a, b))
    assert len({tuple(u.tolist()) for u in perm}) == 64           # the permutation: all distinct


def test_ot_replace_keyword_reaches_the_flow_loss():
    """EnergyMatching(ot_replace=True) (AUTHORS) pairs by drawing; the bare class by the
    permutation: with V = 0 the flow loss is mean ||x1 - x0||^2 over the pairs it used."""
    torch.manual_seed(1)
    x1, x0 = torch.randn(32, 2) * 3, torch.randn(32, 2)
    V = lambda x: 0.0 * x.sum(1)  # noqa: E731
    assert em.AUTHORS["ot_replace"] is True and em.EnergyMatching(V).ot_replace is False
    perm_loss = (x1 - em.ot_pair(x0, x1)).pow(2).sum(1).mean()
    assert em.EnergyMatching(V).flow_loss(x1, x0).item() == pytest.approx(perm_loss.item(), 1e-5)
    torch.manual_seed(5)
    a, b = em.ot_draw_pairs(x0, x1)
    torch.manual_seed(5)
    drawn = em.EnergyMatching(V, ot_replace=True).flow_loss(x1, x0).item()
    assert drawn == pytest.approx((b - a).pow(2).sum(1).mean().item(), rel=1e-5)
    assert drawn != pytest.approx(perm_loss.item(), rel=1e-3)


def test_flow_weighting_phase2_only_and_exact():
    """The authors' 2-D phase 2 weights the flow residual by w(t) = 1 (t < tau*), (1 - t)/(1 - tau*)
    after. With V = 0 the residual is ||x1 - x0||^2 whatever t, so the weighted loss is mean_i
    w(t_i) ||u||^2 with the t_i the loss draws (reproduced from the seed); phase 1 ignores the
    weighting."""
    V = lambda x: (0.0 * x).sum(1)  # noqa: E731
    m = em.EnergyMatching(V, tau_star=0.8, lambda_cd=0.0, use_ot=False, flow_weighting=True,
                          flow_reduction="mean")
    t = torch.tensor([0.0, 0.5, 0.8, 0.9, 1.0])
    assert torch.allclose(m.flow_weight(t), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0]))
    x0 = torch.zeros(512, 2)
    x1 = x0 + torch.tensor([3.0, 4.0])                # u = x1 - x0, ||u||^2 / 2 dims = 12.5
    torch.manual_seed(5)
    loss_main, _ = m.loss(x1, x0, phase="main")
    torch.manual_seed(5)
    t_drawn = torch.rand(512)
    assert loss_main.item() == pytest.approx(12.5 * m.flow_weight(t_drawn).mean().item(), rel=1e-5)
    assert 0.85 < loss_main.item() / 12.5 < 0.95                  # E w(t) = 0.8 + 0.2 / 2 = 0.9
    loss_warm, _ = m.loss(x1, x0, phase="warmup")
    assert loss_warm.item() == pytest.approx(12.5, rel=1e-5)
    # tau* = 1 (the CIFAR recipe): the weight is 1 everywhere, flow_weighting changes nothing
    assert torch.equal(em.EnergyMatching(V, tau_star=1.0).flow_weight(t), torch.ones(5))


def test_negatives_data_chains_hot_noise_chains_on_schedule():
    """Alg. 2 lines 5-11: data-started chains run at eps_max from the first step; noise-started
    chains follow eps(t), which is 0 before tau* -- so on V = a/2 ||x||^2 they are the exact
    deterministic recursion x <- (1 - a dt) x for t < tau*, while data-started chains are noisy."""
    torch.manual_seed(9)
    a, dt, n = 2.0, 0.01, 50                                        # chain time 0.5 < tau* = 1
    V = lambda x: 0.5 * a * x.pow(2).sum(1)  # noqa: E731
    m = em.EnergyMatching(V, tau_star=1.0, eps_max=0.5, n_langevin=n, dt=dt)
    x1, x0 = torch.randn(400, 3), torch.randn(400, 3)
    x_neg, at_data = m.negatives(x1, x0)
    assert at_data[:200].all() and not at_data[200:].any()
    assert torch.allclose(x_neg[200:], x0[200:] * (1 - a * dt) ** n, atol=1e-5)
    # data chains: x_n = (1 - a dt)^n x1 + noise of variance
    # eps_max/a (1 - (1 - a dt)^(2n)) / (1 - a dt / 2)
    resid = x_neg[:200] - x1[:200] * (1 - a * dt) ** n
    var = 0.5 / a * (1 - (1 - a * dt) ** (2 * n)) / (1 - a * dt / 2)
    assert resid.var().item() == pytest.approx(var, rel=0.15)


def test_api_on_2d_points():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
    model = em.EnergyMatching(lambda x: net(x).squeeze(-1), tau_star=0.8, eps_max=0.1,
                              n_langevin=5, dt=0.05)
    x1, x0 = torch.randn(16, 2) + 3, torch.randn(16, 2)
    for phase in ("warmup", "main"):
        loss, logs = model.loss(x1, x0, phase=phase)
        assert loss.dim() == 0 and all(isinstance(v, float) for v in logs.values())
        loss.backward()
    x, traj = model.sample(x0, tau_s=1.5, dt=0.05, solver="euler", return_traj=True)
    assert x.shape == (16, 2) and traj.shape == (31, 16, 2) and not traj.requires_grad
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x)


# --------------------------------------------------------------------------------------------------
# Section 5: Langevin, Heun/Euler, Algorithm 3
# --------------------------------------------------------------------------------------------------
def test_langevin_reaches_boltzmann_mean_and_variance():
    """V = a/2 ||x - m||^2, p ∝ exp(-V/eps) = N(m, eps/a). ULA's exact stationary variance on this
    OU process is eps / (a (1 - a dt / 2)); the mean is unbiased."""
    torch.manual_seed(4)
    a, eps, dt = 2.0, 0.5, 0.01
    m = torch.tensor([1.0, -2.0])
    V = lambda x: 0.5 * a * (x - m).pow(2).sum(1)  # noqa: E731
    x = em.langevin(V, torch.zeros(4000, 2), 600, dt, eps)
    var_ula = eps / (a * (1 - a * dt / 2))
    assert torch.allclose(x.mean(0), m, atol=0.04)
    assert torch.allclose(x.var(0), torch.full((2,), var_ula), rtol=0.07)
    # the same with a per-sample temperature and with a schedule callable (both at eps)
    x2 = em.langevin(V, torch.zeros(4000, 2), 600, dt, lambda t: torch.full((4000,), eps))
    assert torch.allclose(x2.var(0), torch.full((2,), var_ula), rtol=0.07)


def test_heun_beats_euler_on_known_field():
    """V = 1/2 ||x||^2, eps = 0: x' = -x, exact x(t) = x0 exp(-t). Heun is 2nd order, Euler 1st."""
    V = lambda x: 0.5 * x.pow(2).sum(1)  # noqa: E731
    model = em.EnergyMatching(V, eps_max=0.0)
    x0 = torch.randn(10, 3, dtype=torch.float32)
    exact = x0 * math.exp(-1.0)
    err = {meth: (model.sample(x0, tau_s=1.0, dt=0.1, solver=meth) - exact).abs().max().item()
           for meth in ("heun", "euler")}
    assert err["euler"] > 1e-3                      # Euler's O(dt) error is visible at dt = 0.1
    assert err["heun"] < err["euler"] / 10
    # halving dt: Euler error halves, Heun error quarters
    e2 = {meth: (model.sample(x0, tau_s=1.0, dt=0.05, solver=meth) - exact).abs().max().item()
          for meth in ("heun", "euler")}
    assert 1.7 < err["euler"] / e2["euler"] < 2.3 and 3.4 < err["heun"] / e2["heun"] < 4.6


def test_inpainting_recovers_gaussian_posterior_mean():
    """Alg. 3 with interaction off on V = ||x - m||^2 / (2 s^2) (so E = V/eps_max): per observed
    pixel the posterior exp(-(y - x)^2/zeta^2 - (x - m)^2/(2 eps s^2)) has mean (m/(eps s^2) +
    2y/zeta^2) / (1/(eps s^2) + 2/zeta^2); unobserved pixels keep the prior N(m, eps s^2)."""
    torch.manual_seed(5)
    eps_max, s, zeta, d = 0.5, 1.0, 1.0, 6
    m = torch.linspace(-0.5, 0.5, d)
    V = lambda x: 0.5 * (x - m).pow(2).sum(1) / s ** 2  # noqa: E731
    A = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    x_true = torch.tensor([1.5, -1.0, 0.2, 9.0, 9.0, 9.0])
    y = (A * x_true)[None]
    eps = lambda t: em.temperature(t, 0.0, eps_max)  # noqa: E731
    x = em.inverse_langevin(V, y, A, n_chains=3000, tau_s=6.0, dt=0.02, eps=eps, zeta=zeta)
    assert x.shape == (1, 3000, d)
    prec = 1 / (eps_max * s ** 2) + 2 / zeta ** 2
    post = torch.where(A > 0, (m / (eps_max * s ** 2) + 2 * y[0] / zeta ** 2) / prec, m)
    assert torch.allclose(x[0].mean(0), post, atol=0.04)
    var = torch.where(A > 0, torch.full((d,), 1 / prec), torch.full((d,), eps_max * s ** 2))
    assert torch.allclose(x[0].var(0), var, rtol=0.1)


def test_interaction_energy_spreads_chains_inside_region_only():
    torch.manual_seed(6)
    V = lambda x: 0.5 * x.pow(2).sum(1)  # noqa: E731
    A = torch.tensor([1.0, 1.0, 0.0, 0.0])
    Bm = 1 - A
    y = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
    eps = lambda t: em.temperature(t, 0.0, 0.2)  # noqa: E731
    x_init = torch.randn(1, 400, 4)
    kw = dict(n_chains=400, tau_s=3.0, dt=0.02, eps=eps, zeta=0.3, x_init=x_init)
    plain = em.inverse_langevin(V, y, A, **kw)
    inter = em.inverse_langevin(V, y, A, sigma=4.0, Bmask=Bm, **kw)
    # repulsion: the chains spread out in B, the observed pixels stay where the data put them
    assert inter[0, :, 2:].var(0).mean() > 1.3 * plain[0, :, 2:].var(0).mean()
    assert torch.allclose(inter[0, :, :2].mean(0), plain[0, :, :2].mean(0), atol=0.05)


# --------------------------------------------------------------------------------------------------
# Section 8: LID
# --------------------------------------------------------------------------------------------------
def _quadratic_with_flat_subspace(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.zeros(k, dtype=torch.float64),
                     5 + 45 * torch.rand(d - k, generator=g, dtype=torch.float64)])
    H = (Q * lam) @ Q.T
    Hf = H.float()
    return (lambda x: 0.5 * ((x.flatten(1) @ Hf) * x.flatten(1)).sum(1)), H


def test_lid_exact_counts_flat_directions():
    V, H = _quadratic_with_flat_subspace(24, 7, 0)
    xs = torch.randn(3, 2, 3, 4)                                    # "images" of d = 24
    lids, spectra = em.lid_exact(V, xs, tau=1.0)
    assert lids == [7, 7, 7]
    assert torch.allclose(spectra[0].sort().values, torch.linalg.eigvalsh(H).sort().values,
                          atol=1e-3)


def test_lid_slq_partial_spectrum_estimates_dimension():
    V, _ = _quadratic_with_flat_subspace(256, 100, 1)
    est = em.lid_slq(V, torch.randn(2, 256), tau=1.0, n_probe=12, n_lanczos=40, seed=0)
    assert all(abs(e - 100) < 15 for e in est), est


def _plane_data(D, k, seed):
    """Points on a random k-dim plane through 0 in R^D, plane coordinates ~ N(0, I_k)."""
    g = torch.Generator().manual_seed(seed)
    Bm = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :k]          # (D, k) orthonormal
    return lambda n: torch.randn(n, k, generator=g) @ Bm.T                   # (n, D)


def test_lid_of_a_trained_V_recovers_the_known_dimension():
    """Sec. 3.3 / App. B end to end: V trained with the method (phase 1 flow, phase 2 + CD at
    eps_max 0.01) on a 2-dim plane in R^16; at the data, |lambda| < tau = 1 counts 2 flat
    directions. The flow sets the normal curvature (~3.5 after 150 steps, ~15 after 1,500); CD sets
    the tangent one, ~eps / s^2 = 0.01 here. An untrained V is flat everywhere (LID 16)."""
    D, k, tau = 16, 2, 1.0
    data = _plane_data(D, k, 0)
    torch.manual_seed(0)
    V = torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                            torch.nn.SiLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0))
    xs = data(20)
    assert em.lid_exact(V, xs, tau)[0] == [D] * 20                  # untrained: no curvature yet
    m = em.EnergyMatching(V, tau_star=0.9, eps_max=0.01, lambda_cd=1.0, n_langevin=20, dt=0.05)
    opt = torch.optim.Adam(V.parameters(), 3e-3)
    for step in range(160):
        loss, _ = m.loss(data(64), phase="warmup" if step < 150 else "main")
        opt.zero_grad()
        loss.backward()
        opt.step()
    lids, spectra = em.lid_exact(V, xs, tau)
    S = torch.stack(spectra).abs().sort(1).values                   # (20, D) |lambda| ascending
    assert sum(abs(v - k) <= 1 for v in lids) >= 18 and sorted(lids)[10] == k, lids
    assert S[:, :k].median() < 0.2 and S[:, k:].median() > 2.0      # a gap of > 10x around tau


def test_lid_counts_abs_eigenvalues_of_V_itself():
    """App. B's conventions, on V = eps (-log p) of a Gaussian on a 2-plane in R^6 (tangent std 1,
    normal std 0.01): Hess V = eps diag(1, 1, 1e4, ...), so tau is compared with eps (-Hess log p),
    not with -Hess log p (no division by eps): a direction is flat iff its std > sqrt(eps / tau).
    And |lambda|, not lambda: a saddle direction (lambda = -50) is curved, not flat."""
    def quad(diag):
        h = torch.tensor(diag)
        return lambda x: 0.5 * (h * x.flatten(1) ** 2).sum(1)
    xs = torch.zeros(2, 6)
    for eps, want in ((0.01, 2), (1e-5, 6), (1e3, 0)):   # tau = 10: std 1 and 0.01 vs sqrt(eps/10)
        V = quad([eps * 1.0] * 2 + [eps * 1e4] * 4)
        assert em.lid_exact(V, xs, 10.0)[0] == [want, want], eps
    V = quad([0.01, 0.01, -50.0, 50.0, 50.0, 50.0])
    assert em.lid_exact(V, xs, 10.0)[0] == [2, 2]                   # lambda < tau would say 3
    assert all(abs(e - 2) < 0.5 for e in em.lid_slq(V, xs, 10.0, n_probe=16, n_lanczos=6))


# --------------------------------------------------------------------------------------------------
# Networks and the image pipeline
# --------------------------------------------------------------------------------------------------
def test_potential_shapes_and_gradients():
    torch.manual_seed(7)
    a = tiny_args("--image-size", "16")
    net = em.build_net(a)                             # attention at 16x16 is active here
    assert em.count_params(net) < 100_000
    assert any(isinstance(mod, em.SelfAttention2d) for mod in net.modules())
    x = torch.randn(4, 3, 16, 16)
    assert net(x).shape == (4,)
    g = em.grad_V(net, x)
    assert g.shape == x.shape and not g.requires_grad
    # the flow loss differentiates grad V again (double backward through attention: math kernel)
    for p in net.parameters():                          # make grad V non-zero from the start
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    model = em.EnergyMatching(net)
    loss = model.flow_loss(x, torch.randn_like(x))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(net.parameters()))
    assert all(torch.isfinite(q).all() for q in grads)
    # the bf16 trunk is engineering (engineer wraps net.trunk), not a keyword of the method
    em.engineer(net, torch.device("cpu"), "bf16")
    assert em.EnergyMatching(net).energy(x).dtype == torch.float32
    cnn = em.CNNPotential((1, 28, 28), ch=4)
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2,)
    full = em.CNNPotential((1, 28, 28), ch=32)
    assert 1.5e6 < em.count_params(full) < 2.5e6                      # "2M parameters" (Appendix C)


def _loss_at_seed(model, x1, phase, seed=11):
    torch.manual_seed(seed)
    return model.loss(x1, torch.randn_like(x1), phase=phase)[0].item()


@pytest.mark.parametrize("phase", ["warmup", "main"])
def test_training_steps_lower_the_loss_on_fakedata(phase):
    """A few Adam steps on one FakeData batch, with the randomness (x0, t, Langevin noise) held
    fixed by a seed, so the objective is one deterministic function of theta: it must go down
    clearly."""
    a = tiny_args("--lr", "1e-3")
    torch.manual_seed(8)
    data = em.build_dataset(a)
    x1 = torch.stack([data[i][0] for i in range(8)])
    net = em.build_net(a)
    opt = torch.optim.Adam(net.parameters())
    model = em.build_method(net, a)
    before = _loss_at_seed(model, x1, phase)
    for _ in range(8):
        torch.manual_seed(11)
        logs, applied, _ = em.train_step(model, net, opt, dict(x1=x1, phase=phase), 1e-3, 1.0)
        assert applied
        assert math.isfinite(logs["loss"]) and (("cd" in logs) == (phase == "main"))
    after = _loss_at_seed(model, x1, phase)
    assert after < 0.9 * before, (before, after)


def test_checkpoint_round_trip_and_resume_give_same_next_loss(tmp_path, capsys):
    common = TINY + ["--steps", "3", "--save-every", "2"]
    straight = em.main(common + ["--out-dir", str(tmp_path / "a")])
    ck = em.load_checkpoint(str(tmp_path / "a" / "ckpt_warmup.pt"))
    assert ck["format"] == "energy_matching/v1" and ck["step"] == 3
    assert ck["args"]["dataset"] == "fake"
    assert set(ck) >= {"model", "ema", "opt", "step", "args"}
    em.main(TINY + ["--steps", "2", "--out-dir", str(tmp_path / "b")])    # stop after 2 steps
    resumed = em.main(TINY + ["--steps", "3", "--resume", "--out-dir", str(tmp_path / "b")])
    assert len(resumed) == 1 and resumed[0]["step"] == 3
    assert resumed[0]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-6, abs=1e-7)
    # the round trip keeps every tensor
    ck_b = em.load_checkpoint(str(tmp_path / "b" / "ckpt_warmup.pt"))
    for k, v in ck["model"].items():
        assert torch.allclose(v, ck_b["model"][k], atol=1e-6)
    # phase 2 from the phase-1 checkpoint, then sampling writes uint8 NHWC
    rec = em.main(TINY + ["--phase", "main", "--steps", "1", "--out-dir", str(tmp_path / "a")])
    assert rec[0]["step"] == 4 and "cd" in rec[0]
    imgs = em.main(TINY + ["--mode", "sample", "--num-samples", "5", "--sample-batch", "5",
                           "--out-dir", str(tmp_path / "a")])
    z = np.load(tmp_path / "a" / "samples.npz")["images"]
    assert z.shape == (5, 8, 8, 3) and z.dtype == np.uint8 and np.array_equal(z, imgs)
    # the evaluation commands run on the same checkpoint: Alg. 3 figure, and LID (tau = huge: every
    # direction counts as flat, so SLQ must return d = 192 exactly: its quadrature weights sum to 1)
    res = emx.main(TINY + ["--mode", "inpaint", "--num-images", "2",
                          "--out-dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "inpaint.png").exists() and res["spread_with"] >= 0
    lid = emx.main(TINY + ["--mode", "lid", "--num-images", "3", "--lid-method", "slq",
                          "--lid-lanczos", "5", "--lid-probes", "1", "--lid-tau", "1e12",
                          "--out-dir", str(tmp_path / "a")])
    assert lid["d"] == 192 and all(abs(v - 192) < 1e-6 for v in lid["lid"])
    assert len(lid["png_bytes"]) == 3
    # every LID equal: no "Spearman = nan" but one line that says so (and which way to move tau)
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert lid["spearman_lid_vs_png"] is None and "nan" not in said and "all LIDs equal 192" in said
    assert said.endswith("try a lower --lid-tau")


def test_folder_dataset_in_minus_one_one(tmp_path):
    from PIL import Image
    os.makedirs(tmp_path / "imgs" / "any")
    for i in range(3):
        img = Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8))
        img.save(tmp_path / "imgs" / "any" / f"{i}.png")
    a = tiny_args("--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "16")
    data = em.build_dataset(a, train=False)
    x = torch.stack([data[i][0] for i in range(3)])
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0))
    assert torch.allclose(x[2], torch.full_like(x[2], 120 / 127.5 - 1), atol=1e-2)


REAL_FLOW_LOSS = em.EnergyMatching.flow_loss


def _nan_flow_on(calls):
    """A flow_loss that is NaN on the listed call numbers (1-based), the real loss otherwise."""
    real = REAL_FLOW_LOSS
    count = [0]

    def flow_loss(self, x1, x0, weighted=False):
        count[0] += 1
        out = real(self, x1, x0, weighted)
        return out * float("nan") if count[0] in calls else out
    return flow_loss


def test_nan_guard_skips_steps_and_stops_after_ten(tmp_path, capsys, monkeypatch, one_step_run):
    """SPEC NaN guard: a non-finite step is skipped (no update); 10 in a row -> one line, exit 3,
    the last good checkpoint kept. A stale <ckpt>.tmp of an interrupted save is removed at start."""
    out = copy_run(one_step_run, tmp_path / "n")
    before = em.load_checkpoint(os.path.join(out, "ckpt_warmup.pt"))
    stale = os.path.join(out, "ckpt_warmup.pt.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    monkeypatch.setattr(em.EnergyMatching, "flow_loss", _nan_flow_on(range(1, 100)))
    with pytest.raises(SystemExit) as e:
        em.main(TINY + ["--steps", "12", "--resume", "--out-dir", out])
    assert e.value.code == 3 and not os.path.exists(stale)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10 non-finite steps in a row" in err[0] and "ckpt_warmup.pt" in err[0]
    after = em.load_checkpoint(os.path.join(out, "ckpt_warmup.pt"))
    assert after["step"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # one bad step in the middle: skipped (weights unchanged by it), the run goes on, ends normally
    monkeypatch.setattr(em.EnergyMatching, "flow_loss", _nan_flow_on({2}))
    rec = em.main(TINY + ["--steps", "3", "--out-dir", str(tmp_path / "one")])
    assert [r["step"] for r in rec] == [1, 2, 3]
    assert not math.isfinite(rec[1]["loss"]) and math.isfinite(rec[2]["loss"])
    ck = em.load_checkpoint(str(tmp_path / "one" / "ckpt_warmup.pt"))
    assert ck["ema_n"] == 2 and ck["opt"]["state"][0]["step"].item() == 2   # two updates, not three


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = [(["--mode", "sample", "--ckpt", str(bad)], "corrupt"),
             (["--mode", "sample", "--ckpt", str(foreign)], "not an Energy Matching checkpoint"),
             (["--steps", "-1"], "expected an integer >= 0"),
             (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
             (["--ema-decay", "nan"], "--ema-decay"), (["--tau-s", "-1"], "--tau-s"),
             (["--mode", "sample", "--sample-batch", "0"], "--sample-batch"),
             (["--dataset", "npz", "--data-dir", str(tmp_path / "none.npz")], "none.npz"),
             (["--phase", "main", "--out-dir", str(tmp_path / "empty")], "phase-1 checkpoint"),
             (["--dataset", "celeba64", "--data-dir", str(tmp_path / "nodata"), "--out-dir",
               str(tmp_path / "o")], os.path.join("nodata", "celeba64"))]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            em.main(TINY + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        em.main(["--dataset", "imagenet"])
    # the real CLI: one stderr line, exit 2, no traceback
    r = subprocess.run([sys.executable, SCRIPT, "--mode", "sample", "--device", "cpu", "--ckpt",
                        str(bad)], capture_output=True, text=True, env=env_1thread(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_recipe_defaults_follow_authors_or_paper():
    code = em.parse_args(([]))
    paper = em.parse_args((["--recipe", "paper"]))
    assert (code.tau_star, code.lambda_cd, code.lr, code.steps) == (1.0, 1e-3, 1.2e-3, 145_000)
    assert (paper.tau_star, paper.lambda_cd, paper.lr, paper.steps) == (0.9, 2e-4, 8e-4, 200_000)
    mnist = em.parse_args((["--dataset", "mnist", "--phase", "main", "--from-scratch"]))
    assert (mnist.lambda_cd, mnist.dt, mnist.n_langevin) == (0.25, 0.05, 50)
    argv = ["--recipe", "paper", "--tau-star", "0.5"]
    assert em.parse_args((argv)).tau_star == 0.5


def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    # an npz dataset and --no-ot: each rank skips importing torchvision and POT (~5 s of CPU a
    # rank), neither of which is what is tested here
    data = str(tmp_path / "data.npz")
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), np.uint8))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           SCRIPT] + TINY + ["--dataset", "npz", "--data-dir", data, "--no-ot", "--steps", "2",
                             "--log-every", "1", "--out-dir", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_1thread(), timeout=180,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x 2" in r.stdout
    ck = em.load_checkpoint(os.path.join(out, "ckpt_warmup.pt"))
    assert ck["step"] == 2
    lines = [json.loads(s) for s in open(os.path.join(out, "metrics.jsonl"))]
    assert [r_["step"] for r_ in lines] == [1, 2] and all(math.isfinite(r_["loss"]) for r_ in lines)


# --------------------------------------------------------------------------------------------------
# Cross-helper keywords (same_temperature, chain_clock, ot_sigma) and the authors' recipe (issue 10)
# --------------------------------------------------------------------------------------------------
def _quadratic_chains(**kw):
    torch.manual_seed(9)
    a, dt, n = 2.0, 0.01, 50
    V = lambda x: 0.5 * a * x.pow(2).sum(1)  # noqa: E731
    m = em.EnergyMatching(V, tau_star=1.0, eps_max=0.5, n_langevin=n, dt=dt, **kw)
    x1, x0 = torch.randn(400, 3), torch.randn(400, 3)
    x_neg, _ = m.negatives(x1, x0)
    shrink = (1 - a * dt) ** n
    return x_neg, x1 * shrink, x0 * shrink, 0.5 / a * (1 - shrink ** 2) / (1 - a * dt / 2)


def test_same_temperature_data_chains_follow_the_schedule():
    """Authors' --same_temperature_scheduler: data-started chains also follow eps(t) (= 0 before
    tau* = 1), so on V = a/2 ||x||^2 with chain time 0.5 they are the noiseless recursion, like the
    noise chains."""
    x_neg, x1s, x0s, _ = _quadratic_chains(same_temperature=True)
    assert torch.allclose(x_neg[:200], x1s[:200], atol=1e-5)
    assert torch.allclose(x_neg[200:], x0s[200:], atol=1e-5)


def test_chain_clock_sets_the_chain_time():
    """chain_clock m -> t: a clock past t = 1 makes the noise-started chains hot from the first step
    (their residual has the ULA variance), a clock stuck at 0 keeps even data chains cold with
    same_temperature."""
    x_neg, _, x0s, var = _quadratic_chains(chain_clock=lambda m: 1.0 + m)
    assert (x_neg[200:] - x0s[200:]).var().item() == pytest.approx(var, rel=0.15)
    x_cold, x1s, _, _ = _quadratic_chains(chain_clock=lambda m: 0.0, same_temperature=True)
    assert torch.allclose(x_cold[:200], x1s[:200], atol=1e-5)


def test_ot_sigma_adds_gaussian_noise_around_the_path():
    """V = 1/2 ||x||^2 and x0 = x1 = 0: the residual is grad V(x_t) = x_t = sigma * N(0, I), so the
    flow loss (summed over dims, the paper's) is d sigma^2 on average, exactly 0 without sigma."""
    V = lambda x: 0.5 * x.pow(2).sum(1)  # noqa: E731
    z = torch.zeros(4096, 2)
    torch.manual_seed(0)
    assert em.EnergyMatching(V, use_ot=False).flow_loss(z, z).item() == 0.0
    loss = em.EnergyMatching(V, use_ot=False, ot_sigma=0.1).flow_loss(z, z).item()
    assert loss == pytest.approx(2 * 0.01, rel=0.1)                   # summed over the 2 dims


def test_flow_weighting_both_phases_as_the_authors_cifar_code():
    """flow_weighting_warmup (authors' CIFAR-10 code) fades the flow loss in phase 1 too;
    flow_weighting alone (authors' 2-D code) only in phase 2."""
    V = lambda x: (0.0 * x).sum(1)  # noqa: E731
    x0 = torch.zeros(512, 2)
    x1 = x0 + torch.tensor([3.0, 4.0])
    kw = dict(tau_star=0.8, use_ot=False, flow_reduction="mean")            # mean: ||u||^2 / 2
    both = em.EnergyMatching(V, flow_weighting=True, flow_weighting_warmup=True, **kw)
    main_only = em.EnergyMatching(V, flow_weighting=True, **kw)
    torch.manual_seed(5)
    l_both = both.loss(x1, x0, phase="warmup")[0].item()
    torch.manual_seed(5)
    t = torch.rand(512)
    assert l_both == pytest.approx(12.5 * both.flow_weight(t).mean().item(), rel=1e-5)
    assert main_only.loss(x1, x0, phase="warmup")[0].item() == pytest.approx(12.5, rel=1e-5)


def test_vit_blocks_drop_attention_probabilities():
    """nn.TransformerEncoderLayer(dropout=0.1) of the authors also drops attention weights: with
    every other dropout off, two train-mode passes differ only through attn_dropout; eval mode is
    deterministic."""
    torch.manual_seed(0)
    blk = em.TransformerBlock(16, 4, dropout=0.0, attn_dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(blk(x), blk(x))
    blk.eval()
    assert torch.equal(blk(x), blk(x))
    assert not torch.allclose(em.TransformerBlock(16, 4, 0.0, 0.0).train()(x), blk.train()(x))
    net = em.build_net(tiny_args())                   # --attn-dropout defaults to --dropout
    assert all(b.attn_dropout == 0.1 for b in net.blocks)


def test_recipe_authors_phase2_settings_and_paper():
    """Under --recipe authors phase 2 runs as the authors' README command: EMA 0.99 (0.9999 in phase
    1), CD clamp 0.02, same temperature schedule for all negatives, flow fade in both phases."""
    p = em.build_parser()
    w = em.parse_args(([]))
    m = em.parse_args((["--phase", "main", "--from-scratch"]))
    assert (w.ema_decay, m.ema_decay) == (0.9999, 0.99)
    assert (m.cd_neg_clamp, m.cd_trim, m.same_temperature, m.flow_weighting,
            m.flow_weighting_warmup) == (0.02, 0.1, True, True, True)
    assert m.cd_separate_batch                                      # their x_real_cd batch
    model = em.build_method(lambda x: x.flatten(1).sum(1), m)
    assert model.cd_neg_clamp == 0.02 and model.same_temperature and model.flow_weighting_warmup
    pm = em.parse_args((["--phase", "main", "--recipe", "paper", "--from-scratch"]))
    assert (pm.ema_decay, pm.cd_neg_clamp, pm.cd_trim, pm.same_temperature, pm.flow_weighting,
            pm.flow_weighting_warmup) == (0.9999, 0.0, 0.0, False, False, False)
    assert pm.cd_separate_batch is False
    argv = ["--phase", "main", "--no-same-temperature", "--from-scratch"]
    assert em.parse_args((argv)).same_temperature is False
    assert em.parse_args((["--phase", "main", "--ema-decay", "0.5", "--from-scratch"])
                         ).ema_decay == 0.5


def test_ema_warmup_follows_training_after_200_steps(tmp_path):
    """decay_n = min(decay, (1 + n)/(10 + n)): after 200 FakeData steps the EMA is nearer the
    trained weights than the initialisation (with a constant 0.9999 it would still be 99 %
    initialisation)."""
    assert em.ema_decay_at(0.9999, 0) == 2 / 11 and em.ema_decay_at(0.9999, 10 ** 6) == 0.9999
    assert em.ema_decay_at(0.9999, 0, warmup=False) == 0.9999
    argv = ["--dataset", "fake", "--image-size", "4", "--fake-size", "4", "--batch-size", "2",
            "--arch", "cnn", "--model-size", "4", "--workers", "0", "--log-every", "0",
            "--num-samples", "0", "--warmup", "1", "--lr", "1e-3", "--device", "cpu",
            "--threads", "1", "--steps", "200", "--save-every", "0", "--out-dir", str(tmp_path)]
    em.main(argv)
    a = em.parse_args(argv[:-1] + [str(tmp_path / "fresh")])     # the same flags, a fresh folder
    torch.manual_seed(a.seed)
    init = em.build_net(a).state_dict()
    ck = em.load_checkpoint(str(tmp_path / "ckpt_warmup.pt"))
    dist = lambda p, q: sum((p[k] - q[k]).pow(2).sum() for k in p).sqrt().item()  # noqa: E731
    assert ck["ema_n"] == 200
    assert dist(ck["ema"], ck["model"]) < 0.5 * dist(ck["ema"], init)


def test_phase1_sampling_defaults_to_tau_1_and_says_so(tmp_path, capsys):
    """After phase 1 alone grad V has no well at the data: grids and --mode sample default to tau_s
    = 1 and say so; after phase 2 the default is the paper's 3. Grid names say which weights they
    show."""
    tiny = [v for v in TINY if v not in ("--tau-s", "0.2")]
    out = str(tmp_path)
    em.main(tiny + ["--steps", "1", "--num-samples", "4", "--sample-batch", "4", "--out-dir", out])
    log = capsys.readouterr().out
    assert "grids use tau_s = 1.0" in log
    assert os.path.exists(os.path.join(out, "samples_ema_0000001.png"))
    em.main(["--mode", "sample", "--num-samples", "2", "--out-dir", out, "--device", "cpu"])
    said = capsys.readouterr().out
    assert "tau_s 1.0 (checkpoint)" in said and "tau_s = 1 from a phase-1 checkpoint" in said
    assert json.load(open(os.path.join(out, "samples.json")))["settings"]["tau_s"] == 1.0


def test_npz_dataset_round_trip(tmp_path):
    """--dataset npz reads uint8 N x H x W x C (the layout --mode sample writes); channels and size
    come from the file; a sample run's samples.npz can be trained on again."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "digits.npz")
    np.savez(path, images=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), labels=np.arange(16))
    a = tiny_args("--dataset", "npz", "--data-dir", path)
    assert (a.channels, a.image_size) == (1, 8)
    x, y = em.build_dataset(a)[3]
    assert x.shape == (1, 8, 8) and -1 <= x.min() and x.max() <= 1 and int(y) == 3
    out = str(tmp_path / "o")
    em.main(TINY + ["--dataset", "npz", "--data-dir", path, "--steps", "1", "--out-dir", out])
    imgs = em.main(TINY + ["--mode", "sample", "--num-samples", "8", "--sample-batch", "8",
                           "--out-dir", out])
    assert imgs.shape == (8, 8, 8, 1) and imgs.dtype == np.uint8
    em.main(TINY + ["--dataset", "npz", "--data-dir", os.path.join(out, "samples.npz"),
                    "--steps", "1", "--out-dir", str(tmp_path / "again")])


# --------------------------------------------------------------------------------------------------
# Reliability (issue 11)
# --------------------------------------------------------------------------------------------------
def test_resume_reads_its_own_checkpoint_before_ckpt_and_writes_out_dir(tmp_path, capsys):
    """--resume continues the run in --out-dir when it has a checkpoint, even with --ckpt A (the
    printed resume command of a run started from A must not go back to A); --ckpt A starts a run
    that has none. The run writes to --out-dir, never A."""
    A, B, C = (str(tmp_path / n) for n in "ABC")
    em.main(TINY + ["--steps", "2", "--out-dir", A])
    em.main(TINY + ["--steps", "3", "--out-dir", B])
    capsys.readouterr()
    a_ckpt = os.path.join(A, "ckpt_warmup.pt")
    rec = em.main(TINY + ["--steps", "4", "--resume", "--ckpt", a_ckpt, "--out-dir", B])
    assert [r["step"] for r in rec] == [4]                # B's own step 3, not A's 2
    assert "resumed from " + os.path.join(B, "ckpt_warmup.pt") in capsys.readouterr().out
    rec = em.main(TINY + ["--steps", "4", "--resume", "--ckpt", a_ckpt, "--out-dir", C])
    assert [r["step"] for r in rec] == [3, 4]             # C has none: from A's step 2
    assert "resumed from " + a_ckpt in capsys.readouterr().out
    assert em.load_checkpoint(a_ckpt)["step"] == 2
    assert em.load_checkpoint(os.path.join(B, "ckpt_warmup.pt"))["step"] == 4
    assert em.load_checkpoint(os.path.join(C, "ckpt_warmup.pt"))["step"] == 4


def test_metrics_deduplicated_on_resume_and_plot_covers_whole_run(tmp_path, monkeypatch):
    out = str(tmp_path)
    em.main(TINY + ["--steps", "2", "--out-dir", out])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # a step logged, killed before save
        f.write(json.dumps({"step": 3, "phase": "warmup", "flow": 1.0, "loss": 1.0}) + "\n")
    plotted = []
    monkeypatch.setattr(em, "plot_losses", lambda recs, path, title: plotted.append(recs))
    em.main(TINY + ["--steps", "4", "--resume", "--out-dir", out])
    steps = [json.loads(s)["step"] for s in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in plotted[0]] == [1, 2, 3, 4]


def test_threads_flag_sets_torch_threads(tmp_path):
    em.main(TINY + ["--threads", "2", "--steps", "0", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == 2


def test_wrong_architecture_names_the_differing_flags(tmp_path, capsys, one_step_run):
    out = copy_run(one_step_run, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        em.main(TINY + ["--steps", "2", "--resume", "--model-size", "16", "--out-dir", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--model-size 16 (checkpoint: 8)" in err


def test_sample_modes_refuse_non_finite_weights(tmp_path, capsys, one_step_run):
    """A NaN EMA must not become an all-zero samples.npz with exit 0: one line, exit 3, no file."""
    out = copy_run(one_step_run, tmp_path)
    path = os.path.join(out, "ckpt_warmup.pt")
    ck = torch.load(path, weights_only=True)
    ck["ema"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ck["ema"].items()}
    torch.save(ck, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        em.main(["--mode", "sample", "--num-samples", "4", "--out-dir", out, "--device", "cpu"])
    assert e.value.code == 3 and not os.path.exists(os.path.join(out, "samples.npz"))
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """SIGTERM during training: the step finishes, the checkpoint is saved, one line, exit 143;
    resuming reaches bit-identical final weights (and EMA) to an uninterrupted run. The signal is
    a real SIGTERM (os.kill) sent to this process once step 2's metrics are written: the handler
    path of a separate process without its ~10 s of imports, and at a known step."""
    import signal
    n = 6
    args = TINY + ["--steps", str(n), "--log-every", "1", "--save-every", "0"]
    straight = str(tmp_path / "straight")
    em.main(args + ["--out-dir", straight])
    cut = str(tmp_path / "cut")
    real_metrics = em.Logger.metrics

    def metrics_then_kill(self, rec):
        real_metrics(self, rec)
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(em.Logger, "metrics", metrics_then_kill)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        em.main(args + ["--out-dir", cut])
    monkeypatch.undo()
    assert e.value.code == 143
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and "by SIGTERM" in last
    assert last.endswith("--resume")
    assert signal.getsignal(signal.SIGTERM) == handler             # the handler is given back
    stopped = em.load_checkpoint(os.path.join(cut, "ckpt_warmup.pt"))["step"]
    assert 2 <= stopped < n
    em.main(args + ["--out-dir", cut, "--resume"])
    a = em.load_checkpoint(os.path.join(straight, "ckpt_warmup.pt"))
    b = em.load_checkpoint(os.path.join(cut, "ckpt_warmup.pt"))
    assert b["step"] == n
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_crash_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, one_step_run):
    """A save killed half-way (here: torch.save writes half a file, then the process dies) leaves
    the previous checkpoint intact (write to a temporary name, then os.replace); the next start
    removes the stale temporary file."""
    out = copy_run(one_step_run, tmp_path)
    path = os.path.join(out, "ckpt_warmup.pt")
    ck = em.load_checkpoint(path)

    class Killed(BaseException):                   # not an OSError: nothing cleans up after it
        pass

    def dying_save(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise Killed()

    monkeypatch.setattr(em.torch, "save", dying_save)
    with pytest.raises(Killed):
        em.save_checkpoint(path, em.build_net(tiny_args()), em.build_net(tiny_args()), None, 99,
                           tiny_args())
    monkeypatch.undo()
    assert em.load_checkpoint(path)["step"] == 1 and os.path.exists(path + ".tmp.pt")
    kept = em.load_checkpoint(path)["model"]                      # one load, not one per tensor
    assert all(torch.equal(ck["model"][k], kept[k]) for k in ck["model"])
    em.main(TINY + ["--steps", "2", "--resume", "--out-dir", out])
    assert not os.path.exists(path + ".tmp.pt") and em.load_checkpoint(path)["step"] == 2


def test_a_checkpoint_of_the_old_flow_weighting_loads_as_the_two_booleans(tmp_path):
    """--flow-weighting off|main|both (before the two booleans) reads as flow_weighting (phase 2)
    and flow_weighting_warmup (phase 1)."""
    out = str(tmp_path)
    em.main(TINY + ["--steps", "1", "--out-dir", out])
    path = os.path.join(out, "ckpt_warmup.pt")
    ck = torch.load(path, weights_only=True)
    for old, new in (("off", (False, False)), ("main", (True, False)), ("both", (True, True))):
        ck["args"]["flow_weighting"] = old
        ck["args"].pop("flow_weighting_warmup", None)
        torch.save(ck, path)
        a = em.load_checkpoint(path)["args"]
        assert (a["flow_weighting"], a["flow_weighting_warmup"]) == new, old
