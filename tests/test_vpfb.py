"""Tests for vpfb.py: the maths of the paper on cases with closed forms, then the plumbing.

Analytic reference used throughout: 1-D (or isotropic D-dim) Gaussian data xbar ~ N(m, s^2).
With the OT-FM path x = t xbar + (1 - t) eps the marginal is rho(x, t) = N(t m, S_t^2) with
S_t^2 = t^2 s^2 + (1 - t)^2, and the marginal velocity is a gradient:
    v(x, t) = m + k(t) (x - t m),   k(t) = (t s^2 - (1 - t)) / S_t^2,
    Phi*(x, t) = m x + k(t) (x - t m)^2 / 2      (grad Phi* = v).
"""
import math
import shutil

import numpy as np
import pytest
import torch

import vpfb
import vpfb_experiments as vpx

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one intra-op thread


# ----------------------------------------------------------------------------- helpers
def gauss_phi(m, s):
    """The analytic potential Phi*(x, t) of N(m, s^2) data (summed over dims), as a phi(x, t)."""
    def phi(x, t):
        tb = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        S2 = tb ** 2 * s ** 2 + (1 - tb) ** 2
        k = (tb * s ** 2 - (1 - tb)) / S2
        return (m * x + k * (x - tb * m) ** 2 / 2).flatten(1).sum(1)
    return phi


def gauss_score(x, t, m, s):
    """grad log rho(x, t) of the marginal N(t m, S_t^2)."""
    S2 = t ** 2 * s ** 2 + (1 - t) ** 2
    return -(x - t * m) / S2


# ----------------------------------------------------------------------------- Prop. 1
@pytest.mark.parametrize("omega,nu", [(1.0, 1.0), (0.5, 2.0), (3.0, 0.1)])
def test_prop1_otfm_kernel_is_t_and_1_minus_t(omega, nu):
    """Eq. (8) with alpha = w^2/(1-t), beta = nu^2 t/(1-t)^2 gives mu = t, sigma = 1 - t for any w,
    nu. Derived twice: from the general formula (Schedule given explicit callables) and by
    normalising e^h of Eq. (6)-(7) on a grid (1-D), which checks Prop. 1 itself."""
    w2, n2 = omega ** 2, nu ** 2
    sch = vpfb.Schedule(alpha=lambda t: w2 / (1 - t), beta=lambda t: n2 * t / (1 - t) ** 2,
                        omega=omega, nu=nu)
    t = torch.linspace(0.05, 0.95, 10, dtype=DT)
    mu, sigma = sch.mu_sigma(t)
    assert torch.allclose(mu, t, atol=1e-12)
    assert torch.allclose(sigma, 1 - t, atol=1e-12)
    # numerical: rho ~ exp(alpha log q(x) + beta log p(xbar | x)) on a grid, for xbar = 0.8
    xbar = 0.8
    xs = torch.linspace(-12, 12, 200001, dtype=DT)
    for tv in [0.2, 0.5, 0.9]:
        tt = torch.tensor(tv, dtype=DT)
        logq = -xs ** 2 / (2 * w2)                       # log N(x; 0, w^2) + const
        logp = -(xbar - xs) ** 2 / (2 * n2)              # log N(xbar; x, nu^2) + const
        h = sch.alpha(tt) * logq + sch.beta(tt) * logp   # Eq. (7)
        p = torch.exp(h - h.max())
        p = p / p.sum()                                  # Eq. (6)
        mean = (p * xs).sum()
        std = ((p * (xs - mean) ** 2).sum()).sqrt()
        assert abs(mean.item() - tv * xbar) < 1e-6
        assert abs(std.item() - (1 - tv)) < 1e-6


def test_sde_coefficients_eq18_give_otfm_f_and_g():
    """Eq. (18) evaluated from the general schedule gives f = -1/t, g^2 = 2(1-t)/t (Sec. 3.5)."""
    sch = vpfb.Schedule(alpha=lambda t: 2.0 / (1 - t), beta=lambda t: 0.3 * t / (1 - t) ** 2,
                        omega=2 ** 0.5, nu=0.3 ** 0.5)
    assert not sch.is_otfm
    for tv in [0.2, 0.5, 0.9]:
        f, g2 = sch.sde_coefficients(tv)
        assert (f == pytest.approx(-1 / tv, rel=1e-9)
                and g2 == pytest.approx(2 * (1 - tv) / tv, rel=1e-9))


def test_loss_with_general_schedule_equals_otfm():
    """The loss written for a general (alpha, beta) reduces to the OT-FM fast path when they are
    OT-FM."""
    torch.manual_seed(11)
    phi = lambda x, t: (torch.sin(x) * (1 + t[:, None])).sum(1) + (x ** 2).sum(1) * t
    sch = vpfb.Schedule(alpha=lambda t: 1.0 / (1 - t), beta=lambda t: t / (1 - t) ** 2)
    xbar, eps, t = (torch.randn(64, 3, dtype=DT), torch.randn(64, 3, dtype=DT),
                    torch.rand(64, dtype=DT) * 0.9)
    la, sa = vpfb.VPFB(phi).loss(xbar, eps=eps, t=t)
    lb, sb = vpfb.VPFB(phi, schedule=sch).loss(xbar, eps=eps, t=t)
    assert torch.allclose(la, lb, rtol=1e-9) and sa["cos"] == pytest.approx(sb["cos"])


def test_prop1_non_otfm_schedule_matches_grid():
    """A schedule that is not OT-FM: Eq. (8) still gives the mean/std of the normalised e^h."""
    sch = vpfb.Schedule(alpha=lambda t: 1 + 0 * t, beta=lambda t: 4 * t ** 2, omega=1.5, nu=0.7)
    xbar, tv = -1.3, torch.tensor(0.6, dtype=DT)
    xs = torch.linspace(-10, 10, 200001, dtype=DT)
    h = (sch.alpha(tv) * (-xs ** 2 / (2 * 1.5 ** 2))
         + sch.beta(tv) * (-(xbar - xs) ** 2 / (2 * 0.7 ** 2)))
    p = torch.exp(h - h.max()); p = p / p.sum()
    mean = (p * xs).sum(); std = ((p * (xs - mean) ** 2).sum()).sqrt()
    mu, sigma = sch.mu_sigma(tv)
    assert abs(mean.item() - mu.item() * xbar) < 1e-6 and abs(std.item() - sigma.item()) < 1e-6


# ----------------------------------------------------------------------------- innovation, Eq. (12)
def test_innovation_rates_autograd_match_closed_form():
    """alpha_dot/w^2 = 1/(1-t)^2 and beta_dot/nu^2 = (1+t)/(1-t)^3 for OT-FM, via autograd."""
    sch = vpfb.Schedule(alpha=lambda t: 4.0 / (1 - t), beta=lambda t: 0.25 * t / (1 - t) ** 2,
                        omega=2.0, nu=0.5)
    t = torch.linspace(0.0, 0.95, 12, dtype=DT)
    ra, rb = sch.rates(t)
    ra0, rb0 = vpfb.Schedule().rates(t)
    assert torch.allclose(ra, ra0) and torch.allclose(rb, rb0)
    assert torch.allclose(ra0, 1 / (1 - t) ** 2) and torch.allclose(rb0, (1 + t) / (1 - t) ** 3)


def test_gamma_bar_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    sch = vpfb.Schedule()
    D, N = 3, 400_000
    xbar = torch.tensor([[0.5, -1.0, 0.2]], dtype=DT)
    for tv in [0.1, 0.5, 0.8]:
        t = torch.full((N,), tv, dtype=DT)
        x = tv * xbar + (1 - tv) * torch.randn(N, D, dtype=DT)      # x ~ N(t xbar, (1-t)^2 I)
        g = sch.gamma(x, xbar.expand(N, D), t)
        gbar = sch.gamma_bar(xbar, t[:1])
        se = g.std() / math.sqrt(N)
        assert abs(g.mean() - gbar).item() < 5 * se


def test_centered_innovation_identity():
    """2/(1-t) sum(eps^2 - xbar eps - 1) == gamma - gamma_bar (used by the loss to avoid
    cancellation)."""
    torch.manual_seed(1)
    xbar = torch.randn(64, 2, 3, dtype=DT)
    eps = torch.randn_like(xbar)
    t = torch.rand(64, dtype=DT) * 0.95
    x = t[:, None, None] * xbar + (1 - t[:, None, None]) * eps
    sch = vpfb.Schedule()
    ref = sch.gamma(x, xbar, t) - sch.gamma_bar(xbar, t)
    assert torch.allclose(vpfb.otfm_centered_innovation(eps, xbar, t), ref, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("dim", [1, 2])
def test_eq11_time_derivative_of_marginal(dim):
    """Eq. (11): d rho_bar / dt = -1/2 E_pdata[rho(x|xbar,t) (gamma - gamma_bar)], by finite
    differences."""
    torch.manual_seed(2)
    sch = vpfb.Schedule()
    data = torch.randn(4, dim, dtype=DT)                  # a tiny data set: 4 points
    xq = torch.randn(7, dim, dtype=DT) * 1.2              # query points x

    def rho_cond(x, t):                                   # rho(x | xbar_j, t): (n_x, n_data)
        mu, sig = t, 1 - t
        d2 = ((x[:, None, :] - mu * data[None]) ** 2).sum(-1)
        return torch.exp(-d2 / (2 * sig ** 2)) / (2 * math.pi * sig ** 2) ** (dim / 2)

    for tv in [0.2, 0.5, 0.7]:
        h = 1e-5
        drho = (rho_cond(xq, tv + h).mean(1) - rho_cond(xq, tv - h).mean(1)) / (2 * h)
        nx, nd = xq.shape[0], data.shape[0]
        X = xq[:, None, :].expand(nx, nd, dim).reshape(-1, dim)
        XB = data[None].expand(nx, nd, dim).reshape(-1, dim)
        T = torch.full((nx * nd,), tv, dtype=DT)
        innov = (sch.gamma(X, XB, T) - sch.gamma_bar(XB, T)).reshape(nx, nd)
        rhs = -0.5 * (rho_cond(xq, tv) * innov).mean(1)
        assert torch.allclose(drho, rhs, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- loss, Eq. (27)
def _ritz_scale(model, xbar, eps, t, phi_star):
    """Fit the quadratic L(lam) = lam A + lam^2 B of the loss along lam * Phi* and
    return argmin -A / 2B."""
    vals = []
    for lam in (0.0, 1.0, 2.0):
        model.phi = lambda x, tt, lam=lam: lam * phi_star(x, tt)
        vals.append(model.loss(xbar, eps=eps, t=t)[0].item())
    B = (vals[2] - 2 * vals[1] + vals[0]) / 2
    A = vals[1] - vals[0] - B
    return -A / (2 * B)


@pytest.mark.parametrize("weight_on", ["ritz", "cov"])
def test_deep_ritz_minimiser_is_the_true_potential(weight_on):
    """At fixed t the covariance + gradient-norm pair (Eq. 24) is minimised by the true potential
    Phi* (scale 1) when w(t) multiplies both halves (our default, weight_on="ritz"); with w(t) on
    gamma only (the paper as printed) the minimiser is w(t) Phi*, i.e. a flow that is w(t) times too
    slow."""
    torch.manual_seed(3)
    m, s, N, kappa = 0.7, 0.5, 400_000, 2.0
    phi_star = gauss_phi(m, s)
    model = vpfb.VPFB(phi_star, kappa=kappa, lam_cos=0.0, lam_gt=0.0, eta=0.0, weight_on=weight_on)
    for tv in [0.3, 0.7]:
        xbar = m + s * torch.randn(N, 1, dtype=DT)
        eps = torch.randn_like(xbar)
        lam = _ritz_scale(model, xbar, eps, torch.full((N,), tv, dtype=DT), phi_star)
        expect = 1.0 if weight_on == "ritz" else (1 - tv) ** kappa
        assert abs(lam - expect) < 0.03, (tv, lam, expect)


def recipe_kw(*argv):
    """The VPFB keywords a command line builds (recipe + flags)."""
    a = vpfb.parse_args(list(argv))
    return {k: getattr(a, k) for k in vpfb.METHOD_FLAGS + ("t_end", "t_max", "t_inf")}


def test_stein_cov_form_is_the_covariance_in_pathwise_form():
    """OURS' cov_form "stein": Eq. (11) and the kernel's continuity equation give, by parts,
    E[Phi (gamma - gamma_bar)] = -2 E[grad_x Phi . v]. So "stein" has the expectation of "cov" with
    a far smaller variance in D dims ("cov" left MNIST at noise), and with the w-weighted gradient
    norm it IS weighted flow matching on grad_x Phi, sample by sample:
        -2 w grad Phi . v + w |grad Phi|^2 = w |grad Phi - v|^2 - w |v|^2,
    checked on single samples against the closed-form gradient, and in the parameter gradients."""
    torch.manual_seed(21)
    phi = lambda x, t: (torch.sin(x) * (1 + t[:, None]) + 0.3 * t[:, None] * x ** 2).sum(1)
    only_cov = dict(lam_cos=0.0, lam_gx=0.0, lam_gt=0.0, eta=0.0)
    xbar = 0.5 + 0.6 * torch.randn(400_000, 2, dtype=DT)              # same expectation (SE ~0.01)
    eps, t = torch.randn_like(xbar), torch.rand(400_000, dtype=DT)
    cov, stein = (vpfb.VPFB(phi, cov_form=f, **only_cov).loss(xbar, eps=eps, t=t)[0].item()
                  for f in ("cov", "stein"))
    assert abs(cov - stein) < 0.03, (cov, stein)
    spread = {"cov": [], "stein": []}                                 # batches of 32 in D = 256
    for _ in range(50):
        xb = 0.5 + 0.6 * torch.randn(32, 256, dtype=DT)
        e, tt = torch.randn_like(xb), torch.rand(32, dtype=DT)
        for f in spread:
            spread[f].append(vpfb.VPFB(phi, cov_form=f, **only_cov).loss(xb, eps=e, t=tt)[0].item())
    assert np.std(spread["cov"]) > 10 * np.std(spread["stein"])
    # sample by sample: a batch of one is the flow-matching value of that sample, with grad_x Phi
    # from its closed form cos(x)(1 + t) + 0.6 t x (not autograd), w = 1 - t (OURS: kappa 1)
    fm = vpfb.VPFB(phi, **{**vpfb.OURS, "lam_cos": 0.0, "lam_gt": 0.0, "eta": 0.0})
    for i in range(20):
        xb, e, ti = xbar[i:i + 1], eps[i:i + 1], t[i:i + 1]
        x = ti[:, None] * xb + (1 - ti[:, None]) * e
        g = torch.cos(x) * (1 + ti[:, None]) + 0.6 * ti[:, None] * x
        v, w = xb - e, 1 - ti
        want = (w * (((g - v) ** 2).sum(1) - (v ** 2).sum(1))).item()
        assert fm.loss(xb, eps=e, t=ti)[0].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # and in the parameters: the same gradient as the weighted flow-matching loss, per sample
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net = net.double()
    phi_net = lambda x, t: net(torch.cat([x, t[:, None]], 1)).squeeze(1)
    fm = vpfb.VPFB(phi_net, **{**vpfb.OURS, "lam_cos": 0.0, "lam_gt": 0.0, "eta": 0.0})
    for i in range(5):
        xb, e, ti = xbar[i:i + 1], eps[i:i + 1], t[i:i + 1]
        ps = list(net.parameters())
        g1 = torch.autograd.grad(fm.loss(xb, eps=e, t=ti)[0], ps, allow_unused=True)
        x = (ti[:, None] * xb + (1 - ti[:, None]) * e).requires_grad_(True)
        gx = torch.autograd.grad(phi_net(x, ti).sum(), x, create_graph=True)[0]
        ref = ((1 - ti) * ((gx - (xb - e)) ** 2).sum(1)).sum()
        g2 = torch.autograd.grad(ref, ps, allow_unused=True)      # (the output bias: no gradient)
        g1, g2 = ([torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
                  for gs in (g1, g2))
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g1, g2))
        assert g1[0].abs().sum() > 0
    # the bare class is the printed covariance; --recipe ours is stein, authors the correlation
    assert vpfb.VPFB(phi).cov_form == recipe_kw("--recipe", "paper")["cov_form"] == "cov"
    assert recipe_kw("--recipe", "ours")["cov_form"] == "stein"
    assert recipe_kw()["cov_form"] == "corr"                        # the command line's default


def test_loss_terms_and_forms():
    """Every form runs, gives finite stats, and the autonomous model has no dPhi/dt term."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    phi = lambda x, t: net(torch.cat([x, t[:, None]], 1)).squeeze(1)
    xbar = torch.randn(32, 2)
    for kw in [{}, {"cov_form": "corr", "cos_form": "authors", "grad_norm": "mean"},
               {"weight_on": "cov"}]:
        loss, st = vpfb.VPFB(phi, **kw).loss(xbar)
        loss.backward()
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in st.values())
        assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
        net.zero_grad()
    auto = vpfb.VPFB(lambda x, t: net(torch.cat([x, 0 * t[:, None]], 1)).squeeze(1),
                     autonomous=True)
    assert auto.loss(xbar)[1]["grad_t2"] == 0.0
    tv = vpfb.VPFB(phi)
    assert tv.loss(xbar)[1]["grad_t2"] > 0.0
    with pytest.raises(ValueError):
        vpfb.VPFB(phi, cov_form="nope")


def test_recipes_and_flag_overrides():
    """--recipe paper / authors / ours switch every loss flag; an explicit flag still wins; the
    bare class is the paper (Boltzmann factor corrected to 2)."""
    kw = recipe_kw("--recipe", "authors")
    assert (kw["cov_form"], kw["cos_form"], kw["grad_norm"], kw["lam_gx"], kw["lam_gt"],
            kw["eta"]) == ("corr", "authors", "mean", 0.5, 0.1, 0.0)
    assert recipe_kw() == kw                                           # the default: authors
    kw = recipe_kw("--recipe", "paper", "--kappa", "3")
    assert kw["weight_on"] == "cov" and kw["bfactor"] == 2.0 and kw["kappa"] == 3.0
    assert kw["lam_gt"] == 1.0 and kw["cov_form"] == "cov"
    bare, paper = vpfb.VPFB(lambda x, t: x.sum(1)), recipe_kw("--recipe", "paper")
    assert all(getattr(bare, k) == paper[k] for k in vpfb.METHOD_FLAGS)   # paper = bare class
    kw = recipe_kw("--recipe", "ours")
    assert (kw["weight_on"] == "ritz" and kw["bfactor"] == 2.0
            and kw["t_max"] == pytest.approx(1 - 1e-5))
    assert (kw["kappa"], kw["lam_gt"], kw["cov_form"]) == (1.0, 0.01, "stein")
    vpfb.VPFB(lambda x, t: x.sum(1), **kw)                      # every key is a VPFB argument
    assert {k: getattr(vpfb.VPFB(lambda x, t: x.sum(1), **vpfb.OURS), k) for k in vpfb.OURS} == \
        vpfb.OURS


def test_loss_clamps_t_at_t_max():
    """t ~ U(0, t_end) is clamped to t_max: Phi only ever sees t <= t_max."""
    seen = []

    def phi(x, t):
        seen.append(t.detach().max().item())
        return (x ** 2).flatten(1).sum(1) * (1 + t)
    model = vpfb.VPFB(phi, t_end=2.0, t_max=0.8)
    torch.manual_seed(5)
    model.loss(torch.randn(256, 2))
    assert max(seen) == pytest.approx(0.8)


# ----------------------------------------------------------------------- Boltzmann energy, Eq. (22)
@pytest.mark.parametrize("bfactor,should_match", [(2.0, True), (4.0, False)])
def test_boltzmann_factor(bfactor, should_match):
    """Decides the factor in Phi_B = (c Phi + f ||x||^2) / g^2 on 1-D Gaussian data: grad Phi_B must
    be the score grad log rho(x, t) of the analytic marginal. c = 2 (probability-flow ODE) matches,
    the paper's printed c = 4 does not."""
    m, s = 0.7, 0.5
    x = torch.linspace(-3, 3, 41, dtype=DT)[:, None]
    for tinf in [0.3, 0.6, 0.9]:
        model = vpfb.VPFB(gauss_phi(m, s), t_max=tinf, bfactor=bfactor)
        xr = x.clone().requires_grad_(True)
        g = torch.autograd.grad(model.boltzmann_energy(xr).sum(), xr)[0]
        ok = torch.allclose(g, gauss_score(x, tinf, m, s), atol=1e-8)
        assert ok == should_match


def test_t_inf_reads_phi_b_at_an_earlier_time():
    m, s = 0.7, 0.5
    x = torch.linspace(-2, 2, 9, dtype=DT)[:, None]
    a = vpfb.VPFB(gauss_phi(m, s), t_max=0.99, t_inf=0.6).boltzmann_energy(x)
    b = vpfb.VPFB(gauss_phi(m, s), t_max=0.99).boltzmann_energy(x, t_inf=0.6)
    assert torch.allclose(a, b)
    assert recipe_kw("--t-inf", "0.9")["t_inf"] == 0.9


# ----------------------------------------------------------------------------- samplers
def test_ode_sampler_maps_prior_to_data_gaussian():
    """dx/dt = grad Phi*(x, t) carries N(0, 1) at t = 0 to N(m, s^2) at t = 1 (Euler and RK45)."""
    torch.manual_seed(6)
    m, s = 0.7, 0.5
    model = vpfb.VPFB(gauss_phi(m, s), t_max=1.0)
    x0 = torch.randn(20000, 1, dtype=DT)
    for method, kw in [("euler", {"n_steps": 200}), ("rk45", {})]:
        x1 = model.sample(x0, solver=method, t0=0.0, t1=1.0, **kw)
        assert abs(x1.mean().item() - m) < 0.02 and abs(x1.std().item() - s) < 0.02
        assert model.last_nfe > 0
    # the flow is deterministic and affine here: x1 = m + s x0 exactly (tight RK45 tolerance)
    x1 = model.sample(x0[:500], solver="rk45", rtol=1e-7, atol=1e-7)
    assert torch.allclose(x1, m + s * x0[:500], atol=1e-4)


def test_rk45_and_euler_agree_on_quadratic_potential():
    """Phi = -a(t)/2 ||x||^2 + b.x has dx/dt = -a(t) x + b; both solvers agree with each other and
    the exact solution; RK45 reports a plausible NFE and the trajectory shape is (K, B, ...)."""
    b = torch.tensor([0.3, -0.2], dtype=DT)
    phi = lambda x, t: (-(1 + t) / 2 * (x ** 2).sum(1) + (x * b).sum(1))
    model = vpfb.VPFB(phi, t_max=10.0)
    x0 = torch.tensor([[1.0, 2.0], [-0.5, 0.1]], dtype=DT)
    xe, traj = model.sample(x0, solver="euler", n_steps=4000, t0=0.0, t1=1.0, return_traj=True)
    assert traj.shape == (4001, 2, 2) and model.last_nfe == 4000
    xr, trr = model.sample(x0, solver="rk45", t0=0.0, t1=1.0, rtol=1e-8, atol=1e-10, n_steps=5,
                           return_traj=True)
    assert trr.shape == (6, 2, 2) and 6 <= model.last_nfe < 2000
    # exact: integrating factor A(t) = t + t^2/2, x(1) = e^{-A} x0 + b int_0^1 e^{-(A(1) - A(s))} ds
    s_ = torch.linspace(0, 1, 200001, dtype=DT)
    A1 = 1.5
    integral = torch.trapezoid(torch.exp(-(A1 - (s_ + s_ ** 2 / 2))), s_)
    exact = math.exp(-A1) * x0 + b * integral
    assert torch.allclose(xr, exact, atol=1e-6)
    assert torch.allclose(xe, exact, atol=1e-3)
    with pytest.raises(ValueError):
        model.sample(x0, solver="heun")


def test_sgld_reaches_boltzmann_variance():
    """SGLD on a quadratic Phi_B = -||x||^2 / (2 s^2) at temperature lambda has variance
    lambda^2 s^2."""
    torch.manual_seed(7)
    s, tinf = 0.8, 0.5
    g2, f = 2 * (1 - tinf) / tinf, -1 / tinf
    # choose Phi so that (2 Phi + f ||x||^2) / g^2 = -||x||^2 / (2 s^2)
    phi = lambda x, t: 0.5 * (g2 * (-(x ** 2).sum(1) / (2 * s ** 2)) - f * (x ** 2).sum(1))
    model = vpfb.VPFB(phi, t_max=tinf)
    xr = torch.randn(5, 2, dtype=DT).requires_grad_(True)
    assert torch.allclose(model.boltzmann_energy(xr), -(xr ** 2).sum(1) / (2 * s ** 2))
    for lam in [1.0, 0.5]:
        # the mean contracts by 1 - step / s^2 per step: after 600 steps 3.0 -> < 1e-3 (stationary)
        x = model.langevin(torch.zeros(4000, 2, dtype=DT) + 3.0, n_steps=600, step_size=0.01,
                           temperature=lam)
        var = x.var(0).mean().item()
        # the Euler-Maruyama chain has variance lam^2 s^2 / (1 - step / (2 s^2)): within 1.5 %
        assert abs(var / (lam ** 2 * s ** 2) - 1) < 0.05, (lam, var)
        assert abs(x.mean().item()) < 0.05
    assert model.last_nfe == 600


# ---------------------------------------------------------------------------- networks and training
TINY = ["--recipe", "ours", "--device", "cpu", "--dataset", "fake", "--image-size", "8",
        "--fake-size", "32", "--model-size", "8", "--res-blocks", "1", "--ch-mult", "1,2",
        "--attn-res", "4", "--workers", "0", "--batch-size", "8", "--sample-batch", "8",
        "--ode-steps", "3", "--num-samples", "4", "--log-every", "1", "--sample-every", "0",
        "--wrn-depth", "10", "--threads", "1"]


def _fake_batch(n=16, size=8, seed=0):
    args = vpfb.build_parser().parse_args(["--dataset", "fake", "--fake-size", str(n)])
    args.channels, args.image_size = 3, size
    return vpx.first_images(vpfb.build_dataset(args), n)


@pytest.mark.parametrize("kind", ["unet", "wrn"])
def test_training_steps_lower_the_loss(kind):
    """Adam on one fixed FakeData batch (fixed noise and times, no dropout: a deterministic
    objective) lowers the loss: the mean of the last 3 of 10 steps is clearly below the mean of the
    first 3."""
    torch.manual_seed(8)
    args = vpfb.parse_args((
        TINY + ["--arch", kind, "--dropout", "0", "--out-dir", "/tmp/_vpfb_unused"]))
    net = vpfb.build_net(args)
    model = vpfb.build_method(net, args)
    assert model.autonomous == (kind == "wrn")
    x = _fake_batch(16)
    eps, t = torch.randn_like(x), torch.rand(x.shape[0])
    out = net(x, t)
    assert out.shape == (x.shape[0],)
    if kind == "unet":
        assert (out >= 0).all()                                    # Phi = 1/2 |x - UNet|^2 >= 0
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss, st = model.loss(x, eps=eps, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 0.05 * (abs(first) + 1), losses


def test_bf16_trunk_and_channels_last_match_fp32():
    """The fast paths give the same loss: channels-last exactly (up to float round-off), the bf16
    trunk within bf16 precision (the scalar head and the loss stay fp32). --amp auto is bf16 on CUDA
    only; on CPU the test forces the same trunk autocast (--amp bf16) with the CPU's bf16."""
    torch.manual_seed(12)
    args = vpfb.parse_args((TINY + ["--out-dir", "/tmp/_vpfb_unused", "--dropout", "0"]))
    net = vpfb.build_net(args)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _fake_batch()
    eps, t = torch.randn_like(x), torch.rand(x.shape[0])
    model = vpfb.build_method(net, args)
    ref, st = model.loss(x, eps=eps, t=t)
    cpu = torch.device("cpu")
    vpfb.engineer(net, cpu, "none", channels_last=True)           # channels-last weights and input
    cl, _ = model.loss(x, eps=eps, t=t)
    assert abs(cl.item() - ref.item()) <= 1e-4 * (abs(ref.item()) + st["phi2"] ** 0.5)
    vpfb.engineer(net, cpu, "auto")                                 # auto on the CPU: fp32
    assert "trunk" not in vars(net)
    same, _ = model.loss(x, eps=eps, t=t)
    assert abs(same.item() - ref.item()) <= 1e-4 * (abs(ref.item()) + st["phi2"] ** 0.5)
    vpfb.engineer(net, cpu, "bf16")
    lb, sb = model.loss(x, eps=eps, t=t)
    lb.backward()
    assert math.isfinite(lb.item()) and sb["phi2"] == pytest.approx(st["phi2"], rel=0.05)
    assert abs(sb["cos"] - st["cos"]) < 0.05


@pytest.mark.parametrize("kind", ["unet", "wrn"])
def test_class_conditional_and_composition(kind):
    """Phi(x, t, c) depends on c, y=None is the null-class Phi(x, t), and the compositional
    potential is the average of the conditional energies (Sec. 4.3)."""
    torch.manual_seed(13)
    args = vpfb.parse_args((TINY + ["--out-dir", "/tmp/_vpfb_unused", "--arch", kind,
                                                                   "--class-cond"]))
    net = vpfb.build_net(args).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = _fake_batch(4), torch.rand(4)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    e0, e1, en = net(x, t, y0), net(x, t, y1), net(x, t)
    assert not torch.allclose(e0, e1) and not torch.allclose(en, e0)
    comp = vpfb.Conditioned(net, [torch.tensor(0), torch.tensor(1)])(x, t)
    assert torch.allclose(comp, (e0 + e1) / 2, atol=1e-5)
    assert torch.allclose(vpfb.Conditioned(net)(x, t), en)


def test_unet_is_time_dependent_and_wrn_is_not():
    torch.manual_seed(9)
    args = vpfb.parse_args((TINY + ["--out-dir", "/tmp/_vpfb_unused"]))
    x = _fake_batch(4)
    u = vpfb.build_net(args).eval()
    with torch.no_grad():                      # the residual branches start at zero; wake them up
        for p in u.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(u(x, torch.zeros(4)), u(x, torch.ones(4) * 0.7))
    args.arch = "wrn"
    w = vpfb.build_net(args).eval()
    assert torch.allclose(w(x, torch.zeros(4)), w(x, torch.ones(4) * 0.7))


@pytest.mark.parametrize("unet", ["ours", "authors"])
@pytest.mark.parametrize("ch,base,mult,size", [(1, 16, (1, 2), 28), (3, 32, (1, 2, 2), 32),
                                               (3, 64, (1, 2), 16)])
def test_dphi_dt_is_order_one_once_the_weights_move(unet, ch, base, mult, size):
    """E (dPhi/dt)^2, a term of Eq. (27), on a batch with every weight moved by N(0, 0.02^2) as a
    few steps would (at initialisation the zero output layer makes it 0 at any time scale). Both
    U-Nets embed the raw t: O(1) here; with the 1000 t embedding of vpfb/v1 it was ~1e6."""
    torch.manual_seed(0)
    unet_cls = vpfb.AuthorsUNetPhi if unet == "authors" else vpfb.UNetPhi
    net = unet_cls(ch, base, mult, 1, (), 0.0, size).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(8, ch, size, size), torch.rand(8).requires_grad_(True)
    dphidt = torch.autograd.grad(net(x, t).sum(), t)[0]
    assert 0 < dphidt.pow(2).mean() < 100


def test_an_x_independent_phi_meets_only_the_authors_pearson_term():
    """Phi(x, t) = t ignores x, yet at D = 784 it nearly minimises the authors' Pearson term: their
    Gamma = (1 - t) mean_i (eps_i^2 - xbar_i eps_i) is 1 - t up to O(1/sqrt(D)) noise, because the
    "- 1" that centres gamma (gamma_bar) is dropped. The printed Cov[Phi, w (gamma - gamma_bar)] and
    its pathwise form give such a Phi nothing (zero in expectation; "stein" exactly 0)."""
    torch.manual_seed(0)
    B, D = 4096, 784
    xbar, eps, t = torch.rand(B, D) * 2 - 1, torch.randn(B, D), torch.rand(B)
    x, v, zero = t[:, None] * xbar + (1 - t[:, None]) * eps, xbar - eps, torch.zeros(B, D)
    phi = t.clone()                                                        # Phi(x, t) = t

    def term(**kw):
        m = vpfb.VPFB(lambda x, t: t, **kw)
        return float(m.cov_term(phi, x, xbar, eps, t, (1 - t) ** m.kappa, zero, v))
    assert term(**vpfb.AUTHORS) < -0.98                 # ~ -0.992 (batch 32: ~ -0.962)
    G = vpfb.otfm_centered_innovation(eps, xbar, t) * (1 - t) ** 2
    assert abs(float(torch.corrcoef(torch.stack([phi, G]))[0, 1])) < 0.05   # "cov": ~ 0
    assert term(cov_form="stein") == 0.0


@pytest.mark.parametrize("grad_norm,lam", [("sum", 1.0), ("mean", 0.5)])
def test_pearson_form_sets_the_scale_of_phi_by_lambda(grad_norm, lam):
    """The Pearson term (std(Phi) detached) and the cosine are blind to the scale c of Phi = c psi,
    so gradient descent on c stops where the term's push rho / c meets the penalty's 2 lam c A:
    E||grad Phi||^2 = |rho| / (2 lam), times D for the authors' per-pixel mean. With the paper's sum
    and lam = 1 that is < 1 whatever the data's velocity (README: `paper --cov-form corr`)."""
    torch.manual_seed(0)
    B, D = 256, 64
    xbar, eps, t = torch.rand(B, D) * 2 - 1, torch.randn(B, D), torch.rand(B)
    a = torch.randn(D) / D ** 0.5
    c = torch.tensor(1.0, requires_grad=True)
    m = vpfb.VPFB(lambda x, tt: c * (x * a).sum(1), cov_form="corr", grad_norm=grad_norm,
                  lam_gx=lam, lam_cos=0.0, lam_gt=0.0, eta=0.0)
    rho = float(m.objective(xbar, eps, t)[1]["cov"].detach())   # corr(Gamma, psi), any c
    if rho > 0:
        a = -a
    rho, A = abs(rho), float(a.pow(2).sum()) / (D if grad_norm == "mean" else 1)
    for _ in range(300):                                       # d loss/dc = -rho / c + 2 lam A c
        loss = m.objective(xbar, eps, t)[0]
        g, = torch.autograd.grad(loss, c)
        with torch.no_grad():
            c -= 0.1 / (4 * lam * A) * g
    gphi2 = float(c.detach()) ** 2 * float(a.pow(2).sum())              # E||grad_x Phi||^2, summed
    want = rho / (2 * lam) * (D if grad_norm == "mean" else 1)
    assert gphi2 == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("scale", [0.5, 0.9, 1.0])
def test_velocity_scale_reads_the_length_of_grad_phi(scale):
    """README's ablation column: with the covariance by parts, E w|grad Phi|^2 / (-Cov / 2) is s
    when grad Phi = s E[v | x, t]. One data point a: E[v | x, t] = (a - x) / (1 - t), the gradient
    of Phi* = -|x - a|^2 / (2 (1 - t))."""
    torch.manual_seed(0)
    B, D = 20000, 4
    a = torch.tensor([0.5, -1.0, 0.25, 2.0])
    m = vpfb.VPFB(lambda x, t: -scale * (x - a).pow(2).sum(1) / (2 * (1 - t)), **vpfb.OURS,
                  lam_cos=0.0, eta=0.0)
    logs = m.objective(a.expand(B, D), torch.randn(B, D), torch.rand(B) * 0.9)[1]
    ratio = float(logs["grad_x2"].detach()) / (-float(logs["cov"].detach()) / 2)
    assert ratio == pytest.approx(scale, rel=0.02)

def _patterns(n, g):
    """Structured 8 x 8 data: one of four fixed images (ramps, stripes, flat) plus a little
    noise."""
    r = torch.linspace(-1, 1, 64).reshape(8, 8)
    pats = torch.stack([r, -r.T, (torch.arange(64).reshape(8, 8) % 2 * 2 - 1.0), r * 0 - 0.8])
    k = torch.randint(0, 4, (n,), generator=g)
    return (pats[k, None] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)


def test_a_short_authors_run_meets_the_pearson_term_through_x():
    """--recipe authors on our U-Net: after 60 steps on structured data, Phi correlates negatively
    with the centred innovation gamma - gamma_bar among samples at ONE time t = 0.5, where a Phi(t)
    could not: the term is met through x, not through t alone. (The printed covariance, --recipe
    paper, gives an x-independent Phi nothing in expectation, tested above; its short runs are
    noisier: README gives their numbers.)"""
    def pearson_at_fixed_t(method, t0=0.5, n=256):
        g = torch.Generator().manual_seed(1)
        xbar = _patterns(n, g)
        eps, t = torch.randn(xbar.shape, generator=g), torch.full((n,), t0)
        with torch.no_grad():
            phi = method.phi(t0 * xbar + (1 - t0) * eps, t)
        gam = vpfb.otfm_centered_innovation(eps, xbar, t)
        return float(torch.corrcoef(torch.stack([phi, gam]))[0, 1])

    torch.manual_seed(0)
    net = vpfb.UNetPhi(1, 8, (1, 2), 1, (), 0.0, 8)
    method = vpfb.VPFB(net, **vpfb.AUTHORS)
    opt, g = torch.optim.Adam(net.parameters(), 1e-3), torch.Generator().manual_seed(2)
    before = pearson_at_fixed_t(method)
    for _ in range(60):
        loss, _ = method.loss(_patterns(16, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pearson_at_fixed_t(method)
    assert after < -0.1 and after < before - 0.3, (before, after)


# ----------------------------------------------------------------------------- evaluation helpers
def test_auroc_hand_computed_and_pairwise():
    # pairs (pos > neg): 0.9>0.5, 0.9>0.1, 0.8>0.5, 0.8>0.1, 0.5=0.5 (counts 1/2),
    # 0.5>0.1 -> 5.5 / 6
    assert vpx.auroc([0.9, 0.8, 0.5], [0.5, 0.1]) == pytest.approx(5.5 / 6)
    assert vpx.auroc([1, 2], [3, 4]) == 0.0 and vpx.auroc([3, 4], [1, 2]) == 1.0
    rng = np.random.default_rng(0)
    pos, neg = (rng.integers(0, 6, 40).astype(float),
                rng.integers(0, 5, 30).astype(float))   # many ties
    pair = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (40 * 30)
    assert vpx.auroc(pos, neg) == pytest.approx(pair, abs=1e-12)


def test_slerp_keeps_norms():
    torch.manual_seed(10)
    z0 = torch.randn(5, 3, 4, 4)
    z1 = torch.randn(5, 3, 4, 4)
    z1 = (z1 / z1.flatten(1).norm(dim=1)[:, None, None, None]
          * z0.flatten(1).norm(dim=1)[:, None, None, None])
    for a in [0.0, 0.3, 0.5, 1.0]:
        z = vpfb.slerp(z0, z1, torch.full((5,), a))
        assert torch.allclose(z.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-4)
    assert torch.allclose(vpfb.slerp(z0, z1, torch.zeros(5)), z0, atol=1e-5)
    assert torch.allclose(vpfb.slerp(z0, z1, torch.ones(5)), z1, atol=1e-5)


def test_checkpoint_round_trip_and_bad_files(tmp_path, capsys):
    args = vpfb.parse_args((TINY + ["--out-dir", str(tmp_path)]))
    net = vpfb.build_net(args)
    opt = torch.optim.Adam(net.parameters())
    path = str(tmp_path / "ckpt_main.pt")
    vpfb.save_checkpoint(path, net, net, opt, 7, args)
    st = torch.load(path, weights_only=True)                        # plain types only
    assert st["format"] == vpfb.FORMAT and st["step"] == 7 and st["args"]["model_size"] == 8
    net2 = vpfb.build_net(args)
    net2.load_state_dict(vpfb.load_checkpoint(path)["ema"])
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.name.startswith("ckpt.pt.tmp")
                   for p in tmp_path.iterdir())   # atomic write cleaned up
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "energy_matching/v1"}, foreign)
    for p in (bad, foreign, tmp_path / "missing.pt"):
        with pytest.raises(SystemExit) as e:
            vpfb.load_checkpoint(str(p))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_celeba_attribute_classes(tmp_path):
    """--class-cond on celeba64: labels = a positive attribute among Male, Smiling, Young, or
    3 = none."""
    from PIL import Image
    d = tmp_path / "celeba64" / "img_align_celeba"
    d.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 24), (i * 80, 10, 10)).save(d / f"{i:06d}.jpg")
    (tmp_path / "celeba64" / "list_attr_celeba.txt").write_text(
        "3\nBald Male Smiling Young\n000000.jpg -1 1 -1 -1\n000001.jpg 1 -1 -1 -1\n"
        "000002.jpg -1 -1 1 1\n")
    args = vpfb.build_parser().parse_args(["--dataset", "celeba64", "--data-dir", str(tmp_path),
                                           "--class-cond"])
    args.channels, args.image_size = 3, 8
    ds = vpfb.build_dataset(args)
    assert vpfb.num_classes_of(ds) == 4
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert y == 0 and ds[1][1] == 3 and all(ds[2][1] in (1, 2) for _ in range(5))


# ----------------------------------------------------------------------------- the command line
def _main_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        vpfb.main(argv)
    err = capsys.readouterr().err                # warnings of flags the mode does not read aside
    err = "".join(s for s in err.splitlines(True) if not s.startswith("warning: "))
    return e.value.code, err


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    cases = [
        ["--dataset", "imagenet", "--out-dir", str(tmp_path)],
        ["--dataset", "fake", "--steps", "-1", "--out-dir", str(tmp_path)],
        ["--dataset", "fake", "--out-dir", str(f / "sub")],                       # unwritable
        ["--dataset", "folder", "--data-dir", str(tmp_path / "nope"),
         "--out-dir", str(tmp_path)],                                             # missing data
        ["--mode", "sample", "--dataset", "fake", "--ckpt", str(f),
         "--out-dir", str(tmp_path)],                                             # corrupt ckpt
        ["--mode", "dance", "--dataset", "fake", "--out-dir", str(tmp_path)],     # unknown mode
        ["--dataset", "fake", "--cov-form", "nope", "--out-dir", str(tmp_path)],  # unknown form
        # issue 11 items 3 and 5: NaN / out-of-range numbers are argparse errors, one line each
        *[TINY + [flag, val, "--out-dir", str(tmp_path)] for flag, val in [
            ("--lr", "nan"), ("--lr", "-1"), ("--ema-decay", "nan"), ("--sgld-step", "nan"),
            ("--sample-batch", "0"), ("--t-max", "inf"), ("--kappa", "nan"), ("--threads", "-1")]],
        TINY[:-2] + ["--mode", "sample", "--sampler", "sgld", "--sgld-step", "nan",
                     "--out-dir", str(tmp_path)],
        TINY + ["--image-size", "5", "--out-dir", str(tmp_path)],                 # U-Net halves it
        TINY + ["--resume", "--ckpt", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path)],
        ["--dataset", "npz", "--data-dir", str(tmp_path / "none.npz"), "--out-dir", str(tmp_path)],
        ["--dataset", "npz", "--data-dir", str(f), "--out-dir", str(tmp_path)],   # not an npz
    ]
    for argv in cases:
        code, err = _main_exit(argv, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    code, err = _main_exit(["--dataset", "folder", "--data-dir", str(tmp_path / "nope"),
                            "--out-dir", str(tmp_path)], capsys)
    assert str(tmp_path / "nope") in err                           # says where to put the data


def test_nan_guard_stops_with_one_line(tmp_path, capsys, runs):
    """A diverging run (lr 1e30) skips its non-finite steps (no update), stops after 10 in a row
    with one line and exit 3, and leaves the last good checkpoint as it was."""
    out = _copy_run(runs, 3, tmp_path / "run")
    before = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")
    code, err = _main_exit(TINY + ["--steps", "30", "--lr", "1e30", "--warmup", "1",
                                   "--grad-clip", "0", "--batch-size", "2", "--resume",
                                   "--out-dir", out], capsys)
    assert code == 3 and "non-finite" in err and err.count("\n") == 1 and "ckpt_main.pt" in err
    after = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")
    assert after["step"] == 3 and torch.equal(after["model"]["inp.weight"],
                                              before["model"]["inp.weight"])


def test_a_checkpoint_holding_t_max_1_is_one_line_unless_a_typed_t_max_overrides(tmp_path, capsys,
                                                                                 runs):
    """--t-max 1 (help allowed (0, 1]) trained with exit 0 and stored t_max = 1 in the checkpoint:
    every later Phi_B (Eq. 22) divides by g^2 = 2 (1 - t) / t = 0 (SGLD exit 3 "non-finite
    weights?"). The flag is refused at parse; a checkpoint that holds it is one line naming it, and
    a typed --t-max wins over it as over any stored setting."""
    ck = {k: v for k, v in vpfb.load_checkpoint(str(runs / "s3" / "ckpt_main.pt")).items()
          if k != "path"}
    ck["args"]["t_max"] = 1.0
    old = str(tmp_path / "old.pt")
    torch.save(ck, old)
    run = ["--mode", "sample", "--ckpt", old, "--sampler", "sgld", "--sgld-steps", "2",
           "--num-samples", "2", "--device", "cpu", "--threads", "1",
           "--out-dir", str(tmp_path / "s")]
    code, err = _main_exit(run, capsys)
    assert (code == 2 and err.count("\n") == 1
            and "--t-max 1.0 (checkpoint) must be in (0, 1)" in err), err
    vpfb.main(run + ["--t-max", "0.999"])
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (2, 8, 8, 3)


def test_cli_smoke_train_sample(tmp_path, capsys):
    """Train 2 steps (progress lines with ms/it, img/s), then sample: samples.npz (uint8 NHWC) for
    eval_fid. The real script in a subprocess runs in
    test_sigterm_saves_and_resume_reaches_the_same_weights."""
    out = str(tmp_path / "run")
    vpfb.main(TINY + ["--steps", "2", "--out-dir", out])
    log = capsys.readouterr().out
    assert "ms/it" in log and "img/s" in log and "ETA" in log
    assert vpfb.load_checkpoint(f"{out}/ckpt_main.pt")["step"] == 2
    assert len(vpfb.Logger(out).read_metrics()) == 2
    vpfb.main(TINY + ["--mode", "sample", "--sampler", "euler", "--out-dir", out])
    imgs = np.load(f"{out}/samples.npz")["images"]
    assert imgs.shape == (4, 8, 8, 3) and imgs.dtype == np.uint8


# --------------------------------------------------------------------------- reliability (issue 11)
def _weights(path, key="model"):
    return vpfb.load_checkpoint(path)[key]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(out):
    return {r["step"]: r["loss"] for r in vpfb.Logger(out).read_metrics()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two straight TINY runs shared by the tests below (read-only; copy before writing): 3 and 8
    steps."""
    d = tmp_path_factory.mktemp("vpfb_runs")
    for n in (3, 8):
        vpfb.main(TINY + ["--steps", str(n), "--out-dir", str(d / f"s{n}")])
    return d


def _copy_run(runs, n, dst):
    shutil.copytree(runs / f"s{n}", dst)
    return str(dst)


def test_resume_reads_ckpt_writes_out_dir_and_matches_a_straight_run(tmp_path, runs):
    """Items 1, 6, 12: --resume --ckpt A/ckpt_main.pt --out-dir B reads A, leaves A untouched,
    writes B; and the resumed run is bit-identical to an uninterrupted one (same losses after the
    resume, same final weights and EMA): per-step RNG from (seed, step, rank), data order from
    (seed, step)."""
    a, b, c = _copy_run(runs, 3, tmp_path / "a"), str(tmp_path / "b"), str(runs / "s8")
    src = open(f"{a}/ckpt_main.pt", "rb").read()
    vpfb.main(TINY + ["--steps", "8", "--resume", "--ckpt", f"{a}/ckpt_main.pt", "--out-dir", b])
    assert open(f"{a}/ckpt_main.pt", "rb").read() == src              # the source is not clobbered
    assert vpfb.load_checkpoint(f"{b}/ckpt_main.pt")["step"] == 8     # c: uninterrupted
    lb, lc = _losses(b), _losses(c)
    assert sorted(lb) == [4, 5, 6, 7, 8] and all(lb[s] == lc[s] for s in lb)
    for key in ("model", "ema"):
        assert _same_weights(_weights(f"{b}/ckpt_main.pt", key), _weights(f"{c}/ckpt_main.pt", key))


def test_resume_drops_stale_metrics_and_temp_files(tmp_path, runs):
    """Items 7, 8: a crash after the last save leaves metrics past the checkpoint's step and a temp
    file; the resume drops both, and the loss plot is drawn from the whole run."""
    out = _copy_run(runs, 3, tmp_path / "run")
    (tmp_path / "run" / "loss_main.png").unlink()                    # to be drawn by the resume
    with open(f"{out}/metrics.jsonl", "a") as f:                        # steps 4, 5 of a lost run
        f.write('{"step": 4, "loss": 1e9}\n{"step": 5, "loss": 1e9}\n')
    (tmp_path / "run" / "ckpt_main.pt.tmp.pt").write_bytes(b"half a checkpoint")
    vpfb.main(TINY + ["--steps", "5", "--resume", "--out-dir", out])
    recs = vpfb.Logger(out).read_metrics()
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[3]["loss"] != 1e9
    assert not any(".tmp" in p.name for p in (tmp_path / "run").iterdir())
    assert (tmp_path / "run" / "loss_main.png").stat().st_size > 0


def test_sigterm_saves_and_resume_reaches_the_same_weights(tmp_path, runs):
    """Item 4: SIGTERM to the whole process group (a preempted job; Ctrl-C reaches a terminal's
    group the same way), with DataLoader workers, finishes the step, saves, prints one line, exits
    143; resuming reaches the same final weights as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    a, c = str(tmp_path / "a"), str(tmp_path / "c")
    env = dict(vpfb.os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "vpfb.py", *TINY, "--steps", "100000",
                          "--save-every", "100000", "--workers", "2", "--out-dir", a],
                         env=env, cwd=vpfb.os.path.dirname(vpfb.__file__), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in p.stdout:
        if line.startswith("step 2/"):
            vpfb.os.killpg(p.pid, signal.SIGTERM)                 # the main process and its workers
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and "by SIGTERM" in last and "--resume" in last
    n = vpfb.load_checkpoint(f"{a}/ckpt_main.pt")["step"]
    assert last.startswith(f"stopped at step {n} ") and n >= 2
    end = 8 if n <= 6 else n + 2                       # at least 2 resumed steps; 8: the shared run
    vpfb.main(TINY + ["--steps", str(end), "--resume", "--out-dir", a])
    if end == 8:
        c = str(runs / "s8")
    else:
        vpfb.main(TINY + ["--steps", str(end), "--out-dir", c])
    assert _same_weights(_weights(f"{a}/ckpt_main.pt"), _weights(f"{c}/ckpt_main.pt"))


def test_wrong_architecture_resume_names_the_flags(tmp_path, capsys, runs):
    """Item 5: resuming with another --model-size is one line naming the flag and both values."""
    out = str(runs / "s3")
    code, err = _main_exit(TINY + ["--steps", "2", "--resume", "--ckpt", f"{out}/ckpt_main.pt",
                                   "--model-size", "16", "--out-dir", str(tmp_path / "b")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--model-size 16 (checkpoint: 8)" in err


def test_sample_refuses_non_finite_output(tmp_path, capsys, runs):
    """Item 3: a checkpoint whose weights are NaN samples garbage: exit 3, one line, nothing
    written."""
    out = str(tmp_path)
    shutil.copy(runs / "s3" / "ckpt_main.pt", tmp_path / "ckpt_main.pt")
    st = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")
    st["ema"]["inp.weight"].fill_(float("nan"))
    torch.save(st, f"{out}/ckpt_main.pt")
    code, err = _main_exit(TINY + ["--mode", "sample", "--sampler", "euler", "--out-dir", out],
                           capsys)
    assert code == 3 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "samples.npz").exists() and not (tmp_path / "samples.png").exists()
    vpfb.main(TINY + ["--mode", "sample", "--sampler", "euler", "--no-ema",
                      "--out-dir", out])   # raw weights
    assert (tmp_path / "samples.npz").exists()


def test_threads_flag(tmp_path, monkeypatch):
    """--threads N sets torch's CPU threads; 0 = the free cores: the cores this process may use less
    the 1-minute load average, at least 1 (a busy 2-core box must not spin 2 threads)."""
    vpfb.main(TINY[:-2] + ["--threads", "1", "--steps", "0", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == 1
    cores = len(vpfb.os.sched_getaffinity(0))
    monkeypatch.setattr(vpfb.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    vpfb.main(TINY[:-2] + ["--threads", "0", "--steps", "0", "--out-dir", str(tmp_path / "b")])
    assert torch.get_num_threads() == cores == vpfb.pick_threads(0)
    monkeypatch.setattr(vpfb.os, "getloadavg", lambda: (cores + 4.0, 0.0, 0.0))   # others busy
    assert vpfb.pick_threads(0) == 1 and vpfb.pick_threads(3) == 3


# --------------------------------------------------------------------- faithful defaults (issue 10)
def test_authors_corr_divides_by_a_detached_std():
    """--cov-form corr is the authors' Cov[Phi, Gamma] / (std(Gamma) std(Phi).detach()): scaling
    Phi -> c Phi still moves the term (d/dc = the correlation), where a full Pearson correlation
    would be flat in c."""
    torch.manual_seed(14)
    xbar, eps, t = (torch.randn(256, 3, dtype=DT), torch.randn(256, 3, dtype=DT),
                    torch.rand(256, dtype=DT))
    c = torch.ones((), dtype=DT, requires_grad=True)
    phi = lambda x, tt: c * (x ** 2).sum(1)
    model = vpfb.VPFB(phi, cov_form="corr", lam_cos=0, lam_gx=0, lam_gt=0, eta=0)
    loss, _ = model.loss(xbar, eps=eps, t=t)
    (dc,) = torch.autograd.grad(loss, c)
    assert abs(dc.item() - loss.item()) < 1e-9 and abs(dc.item()) > 0.05


def test_authors_recipe_puts_no_time_weight_on_the_gradient_norm():
    """The authors' std_power_norm = 0: under --recipe authors E|grad Phi|^2 (averaged over dims)
    has no (1 - t)^kappa weight; ours weights it like the covariance."""
    torch.manual_seed(15)
    xbar, eps, t = (torch.randn(64, 4, dtype=DT), torch.randn(64, 4, dtype=DT),
                    torch.rand(64, dtype=DT))
    phi = lambda x, tt: 1.5 * (x ** 2).sum(1)                       # grad = 3 x
    x = t[:, None] * xbar + (1 - t[:, None]) * eps
    g2 = (9 * x ** 2).sum(1)
    authors = recipe_kw("--recipe", "authors")
    st = vpfb.VPFB(phi, **authors).loss(xbar, eps=eps, t=t)[1]
    assert st["grad_x2"] == pytest.approx((g2 / 4).mean().item(), rel=1e-9)
    ours = recipe_kw("--recipe", "ours")
    st = vpfb.VPFB(phi, **ours).loss(xbar, eps=eps, t=t)[1]
    assert st["grad_x2"] == pytest.approx(((1 - t) * g2).mean().item(), rel=1e-9)


def test_authors_recipe_optimiser_settings():
    """--recipe authors: grad clip mode `std` with bound 3 and p_uncond 0.2 (their CIFAR-10 config);
    ours: global-norm clip 1 and p_uncond 0.1; explicit flags win over the recipe."""
    P = vpfb.build_parser()
    a = vpfb.parse_args((TINY + ["--recipe", "authors", "--unet", "ours"]))
    assert (a.clip_mode, a.grad_clip, a.p_uncond) == ("std", 3.0, 0.2)
    o = vpfb.parse_args(TINY)
    assert (o.clip_mode, o.grad_clip, o.p_uncond) == ("norm", 1.0, 0.1)
    e = vpfb.parse_args((TINY + ["--recipe", "authors", "--unet", "ours", "--grad-clip", "0"]))
    assert (e.clip_mode, e.grad_clip) == ("std", 0.0)


def test_clip_std_is_elementwise_at_bound_times_adam_rms():
    """The authors' clip mode `std`: each gradient element is clipped to +-(3 sqrt(v_hat) + 0.1),
    v_hat Adam's bias-corrected second moment from the earlier steps; nothing is clipped before the
    first step."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    p.grad = torch.tensor([100.0, -100.0, 0.5, 0.0])
    vpfb.clip_std_(opt, 3.0)                                          # no Adam state yet: unchanged
    assert p.grad.tolist() == [100.0, -100.0, 0.5, 0.0]
    p.grad = torch.tensor([1.0, 2.0, -0.5, 0.0])
    opt.step()                                                        # v_hat = g^2 after one step
    p.grad = torch.tensor([100.0, -100.0, 0.5, -50.0])
    vpfb.clip_std_(opt, 3.0)
    assert torch.allclose(p.grad, torch.tensor([3.1, -6.1, 0.5, -0.1]), atol=1e-5)


def test_ema_warmup_follows_the_trained_weights(tmp_path):
    """After 200 steps on FakeData the (warmed-up) EMA is nearer the trained weights than the
    initialisation; the constant decay 0.9999 (authors, --no-ema-warmup) would still be
    98 % init."""
    out = str(tmp_path)
    small = TINY + ["--arch", "wrn", "--model-size", "4",
                    "--image-size", "4"]   # the cheapest network
    vpfb.main(small + ["--steps", "200", "--batch-size", "2", "--log-every", "100", "--lr", "1e-3",
                       "--warmup", "10", "--out-dir", out])
    args = vpfb.parse_args((small + ["--out-dir", f"{out}/fresh"]))   # same flags, fresh folder
    torch.manual_seed(args.seed)
    init = vpfb.build_net(args).state_dict()                    # cmd_train()'s initialisation
    st = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")
    dist = lambda a, b: sum((a[k].float() - b[k].float()).pow(2).sum() for k in a).sqrt().item()
    assert dist(st["ema"], st["model"]) < dist(st["ema"], init) and st["ema_n"] == 200
    # the update rule itself: after n updates min(decay, (2 + n) / (11 + n)), else decay
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for warm, n, expect in [(True, 0, 2 / 11), (True, 10**6, 0.9999), (False, 0, 0.9999)]:
        net.weight.data.fill_(1.0)
        ema.weight.data.fill_(0.0)
        vpfb.ema_update(ema, net, vpfb.ema_decay_at(0.9999, n, warmup=warm))
        assert ema.weight.item() == pytest.approx(1 - expect, rel=1e-6)


def test_npz_dataset_round_trip(tmp_path):
    """--dataset npz trains on any uint8 N x H x W x C array (channels and size from the file) and
    its samples.npz has the same layout, so it can be trained on again."""
    rng = np.random.default_rng(0)
    f = tmp_path / "digits.npz"
    np.savez(f, images=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8),
             labels=np.arange(20) % 3)
    args = list(TINY)
    for flag in ("--dataset", "--image-size"):                       # the file gives them
        i = args.index(flag)
        del args[i:i + 2]
    out = str(tmp_path / "run")
    vpfb.main(args + ["--dataset", "npz", "--data-dir", str(f), "--steps", "2", "--out-dir", out])
    saved = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")["args"]
    assert (saved["channels"], saved["image_size"]) == (1, 8)
    vpfb.main(args + ["--dataset", "npz", "--data-dir", str(f), "--mode", "sample",
                      "--sampler", "euler", "--out-dir", out])
    imgs = np.load(f"{out}/samples.npz")["images"]
    assert imgs.shape == (4, 8, 8, 1) and imgs.dtype == np.uint8
    ds = vpfb.load_npz(f"{out}/samples.npz")
    assert ds[0][0].shape == (1, 8, 8) and -1 <= ds[0][0].min() and ds[0][0].max() <= 1


# ----------------------------------------------------------------------------- layout (issue 9)
def test_file_layout_follows_the_spec():
    """Method first: the banners in order, class VPFB in the first 300 lines, a short docstring,
    lines of at most 100 characters, no ';'-joined statements, no reference to files outside the
    repository."""
    import io
    import tokenize
    src = open(vpfb.__file__).read()
    lines = src.splitlines()
    banners = ["# ==== 1. The method ====", "# ==== 2. Networks ====",
               "# ==== ENGINEERING: nothing below this line is in the paper ====",
               "# ==== 3. Data ====", "# ==== 4. Training loop ====", "# ==== 5. Checkpoints ====",
               "# ==== 6. Sampling ====", "# ==== 7. Arguments and main ===="]
    at = [lines.index(b) for b in banners]
    assert at == sorted(at)
    assert lines.index(next(ln for ln in lines if ln.startswith("class VPFB"))) < 300
    assert lines.index(next(ln for ln in lines[1:] if ln.startswith('"""'))) <= 26     # docstring
    assert max(len(ln) for ln in lines) <= 100
    toks = tokenize.generate_tokens(io.StringIO(src).readline)
    assert not any(t.type == tokenize.OP and t.string == ";" for t in toks)
    for ref in ("REFERENCE_NOTES", "API.md", "papers/"):
        assert ref not in src
    P = vpfb.build_parser()
    for flag in ("--workers", "--ch-mult", "--res-blocks", "--sample-batch", "--threads", "--amp"):
        assert flag in P._option_string_actions
    assert P.parse_args([]).amp == "auto"


def test_checkpoint_of_the_old_flag_names_still_loads(tmp_path):
    """Checkpoints written before the twin renames (channel_mult, num_res_blocks, no channels) still
    sample: load_checkpoint maps the old names."""
    out = str(tmp_path)
    vpfb.main(TINY + ["--steps", "1", "--out-dir", out])
    st = vpfb.load_checkpoint(f"{out}/ckpt_main.pt")
    a = st["args"]
    a["channel_mult"], a["num_res_blocks"] = a.pop("ch_mult"), a.pop("res_blocks")
    del a["channels"]
    torch.save(st, f"{out}/ckpt_main.pt")
    vpfb.main(["--mode", "sample", "--dataset", "fake", "--sampler", "euler", "--ode-steps", "2",
               "--num-samples", "2", "--threads", "1", "--out-dir", out])
    assert np.load(f"{out}/samples.npz")["images"].shape == (2, 8, 8, 3)
