"""vpfb.py -- Variational Potential Flow Bayes (VPFB) on images, in one self-contained file.

Paper: "Learning Energy-Based Generative Models via Potential Flow: A Variational Principle Approach
to Probability Density Homotopy Matching" (Loo et al., TMLR 2025, arXiv:2504.16262). Authors' code:
https://github.com/ljun0004/VAPO. One scalar potential Phi(x, t) is learned so that the potential
flow dx/dt = +grad_x Phi (Eq. 13) carries N(0, I) noise at t = 0 to the data at t = 1; the loss
(Eq. 27) is a Deep Ritz form of the density-weighted Poisson equation (16). At the stationary end
t_max the same potential gives a Boltzmann energy Phi_B (Eq. 22) for SGLD sampling and OOD scores.
VPFB(phi) is Eq. (27) as printed (c = 2 in Eq. 22, tested); VPFB(phi, **AUTHORS) the authors' code,
the command line's default (--recipe authors | paper | ours); OURS estimates the covariance by parts
("stein"): the same expectation and minimiser Phi* by a low-variance estimator (see OURS).

Where the equations live (section 1): Schedule = Prop. 1 kernel (Eq. 8), innovation (Eq. 12) and
SDE coefficients (Eq. 18); VPFB.loss = Eq. (27), one method per term; VPFB.sample = the ODE (13);
VPFB.boltzmann_energy = Eq. (22); sgld = Sec. 4.6. Section 2: the networks Phi(x, t) and Phi(x).

How to run (every mode writes into --out-dir, default runs/vpfb_<dataset>):
    python vpfb.py --dataset cifar10                        # train the time-varying U-Net
    python vpfb.py --dataset cifar10 --resume               # continue from <out-dir>/ckpt_main.pt
    torchrun --nproc_per_node 4 vpfb.py --dataset cifar10   # multi-GPU
    python vpfb.py --mode sample --num-samples 50000        # samples.npz (uint8 NHWC), eval_fid.py
    python vpfb.py --dataset npz --data-dir digits.npz --recipe ours --model-size 32 --ch-mult 1,2
The paper's experiments: python vpfb_experiments.py --mode interp|nn|hist|ood|longrun|compose.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== 1. The method ====
# Notation of the paper (Section 3):
#   xbar          a data point (the paper's \bar x), flattened to D numbers
#   x             a generative sample at pseudo-time t in [0, 1]
#   q(x)          = N(0, w^2 I)           Gaussian prior          (w = omega)
#   p(xbar | x)   = N(xbar; x, nu^2 I)    Gaussian data likelihood
#   h             = alpha(t) log q(x) + beta(t) log p(xbar | x)          Eq. (7)
#   rho(x|xbar,t) = e^h / int e^h = N(x; mu(t) xbar, sigma(t)^2 I)     Eq. (6), Prop. 1
# Everything works on tensors of any shape (B, ...), reducing over x.flatten(1), so the same code
# runs on (B, 2) toy points and (B, C, H, W) images.

def _bdim(t, x):
    """Reshape a per-sample (B,) time so it broadcasts against x of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))

def _sqnorm(x):
    """Squared Euclidean norm of every sample: ||x||^2 summed over all non-batch dims -> (B,)."""
    return x.flatten(1).pow(2).sum(1)

class Schedule:
    """A log-homotopy schedule alpha(t), beta(t) (Eq. 7) with prior / likelihood scales omega, nu.
    Default: OT flow matching (Sec. 3.5); any other monotone pair of callables works, their time
    derivatives (for the innovation, Eq. 12) then come from autograd."""

    def __init__(self, alpha=None, beta=None, omega=1.0, nu=1.0):
        self.omega, self.nu = float(omega), float(nu)
        w2, n2 = self.omega ** 2, self.nu ** 2
        self.is_otfm = alpha is None and beta is None
        self.alpha = alpha if alpha is not None else (lambda t: w2 / (1 - t))          # Sec. 3.5
        self.beta = beta if beta is not None else (lambda t: n2 * t / (1 - t) ** 2)    # Sec. 3.5

    def mu_sigma(self, t):
        """Eq. (8): mu = sigmoid(log(beta w^2 / (alpha nu^2))), sigma = sqrt(nu^2 mu / beta)"""
        a, b = self.alpha(t), self.beta(t)
        mu = torch.sigmoid(torch.log(b * self.omega ** 2 / (a * self.nu ** 2)))   # Eq. (8), left
        sigma = torch.sqrt(self.nu ** 2 * mu / b)                                 # Eq. (8), right
        return mu, sigma

    def kernel_and_rates(self, t):
        """mu, sigma (Eq. 8) and mu_dot, sigma_dot (OT-FM: t, 1 - t, 1, -1; else autograd), for
        x = mu xbar + sigma eps and the conditional velocity v = mu_dot xbar + sigma_dot eps (20)"""
        if self.is_otfm:
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            mu, sigma = self.mu_sigma(tt)
            dmu = torch.autograd.grad(mu.sum(), tt, retain_graph=True)[0]
            dsig = torch.autograd.grad(sigma.sum(), tt)[0]
        return mu.detach(), sigma.detach(), dmu, dsig

    def sde_coefficients(self, t):
        """Drift and diffusion of the equivalent SDE, Eq. (18), in the paper's reversed time:
        f = -mu_dot / mu, g^2 = -2 sigma (sigma_dot + f sigma) (OT-FM: f = -1/t, g^2 = 2 (1-t)/t).
        Eq. (18) prints g = -sqrt(...); the radicand is negative in this time direction, so the
        sign belongs inside: g^2 must be positive."""
        t = torch.as_tensor(t, dtype=torch.float64)
        mu, sigma, dmu, dsig = self.kernel_and_rates(t.reshape(1))
        f = -dmu / mu                                                     # Eq. (18), f
        g2 = -2 * sigma * (dsig + f * sigma)                              # Eq. (18), g^2
        return float(f), float(g2)

    def rates(self, t):
        """(alpha_dot / omega^2, beta_dot / nu^2), the coefficients of the innovation, Eq. (12).
        OT-FM: 1 / (1-t)^2 and (1+t) / (1-t)^3; otherwise by autograd through alpha, beta."""
        if self.is_otfm:
            return 1.0 / (1 - t) ** 2, (1 + t) / (1 - t) ** 3
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            ad = torch.autograd.grad(self.alpha(tt).sum(), tt)[0]
            bd = torch.autograd.grad(self.beta(tt).sum(), tt)[0]
        return ad / self.omega ** 2, bd / self.nu ** 2

    def gamma(self, x, xbar, t):
        """Innovation, Eq. (12): alpha_dot/w^2 ||x||^2 + beta_dot/nu^2 ||x - xbar||^2  -> (B,)."""
        ra, rb = self.rates(t)
        return ra * _sqnorm(x) + rb * _sqnorm(x - xbar)

    def gamma_bar(self, xbar, t):
        """gamma_bar = E_{x ~ N(mu xbar, sigma^2 I)}[gamma] (Eq. 11) -> (B,), by Gaussian moments:
        E||x||^2 = mu^2 ||xbar||^2 + D sigma^2, E||x-xbar||^2 = (1 - mu)^2 ||xbar||^2 + D sigma^2"""
        ra, rb = self.rates(t)
        mu, sigma = self.mu_sigma(t)
        D, n2 = xbar[0].numel(), _sqnorm(xbar)
        return ra * (mu ** 2 * n2 + D * sigma ** 2) + rb * ((1 - mu) ** 2 * n2 + D * sigma ** 2)

def otfm_centered_innovation(eps, xbar, t):
    """gamma - gamma_bar for OT-FM in the noise eps of x = t xbar + (1 - t) eps  -> (B,):
        gamma - gamma_bar = 2 / (1 - t) * sum_i (eps_i^2 - xbar_i eps_i - 1)   (Eq. 12 - its mean)
    = Schedule().gamma - Schedule().gamma_bar (tested), without cancelling two huge numbers near
    t = 1. The authors' mean_i (eps_i^2 - xbar_i eps_i) (1 - t) is this times (1 - t)^2 / (2D)
    with the "-1" dropped."""
    s = (eps * eps - xbar * eps - 1.0).flatten(1).sum(1)
    return 2.0 / (1.0 - t) * s

class VPFB:
    """The method: a scalar potential Phi(x, t) whose gradient is the velocity dx/dt = grad_x Phi,
    Eq. (13). phi(x, t) takes x (B, ...) and t (B,) and returns (B,); an autonomous Phi(x) ignores
    t. VPFB(phi) is Eq. (27) as printed, with one correction, the Boltzmann factor c = 2 of Eq. (22)
    (tested); AUTHORS and OURS below are the authors' code and our variant:
      kappa      w(t) = (1 - t)^kappa, Sec. 3.5 (kappa > 1: 2)
      t_end      t ~ U(0, t_end) (Eq. 26); t_max: t is clamped to t_max (stationarity) [1, 1-1e-5]
      eta        Poincare term eta E[Phi^2] of Eq. (27) (a small eta: 1e-4)
      lam_cos, lam_gx, lam_gt   weights of -cos, E||grad_x Phi||^2, E(dPhi/dt)^2 (1, 1, 1)
      cov_form   "cov": Cov[Phi, w gamma] as printed; "corr": the authors'; "stein": by parts
      cos_form, weight_on, grad_norm   the term's paper / authors' form (its method)
      bfactor    c in Phi_B = (c Phi + f ||x||^2) / g^2, Eq. (22): 2 from the ODE (19); printed 4
      t_inf      where Phi_B is read off [None = t_max]"""

    def __init__(self, phi, autonomous=False, kappa=2.0, t_end=1.0, t_max=1.0 - 1e-5, eta=1e-4,
                 lam_cos=1.0, lam_gx=1.0, lam_gt=1.0, cov_form="cov", cos_form="paper",
                 weight_on="cov", grad_norm="sum", bfactor=2.0, schedule=None, t_inf=None):
        self.cov_form, self.cos_form = cov_form, cos_form
        self.weight_on, self.grad_norm = weight_on, grad_norm
        for name, ok in (("cov_form", ("cov", "corr", "stein")), ("cos_form", ("paper", "authors")),
                         ("weight_on", ("ritz", "cov")), ("grad_norm", ("sum", "mean"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {getattr(self, name)!r}")
        self.phi, self.autonomous = phi, bool(autonomous)
        self.t_inf = None if t_inf is None else float(t_inf)
        self.kappa, self.t_end, self.t_max, self.eta, self.bfactor = map(
            float, (kappa, t_end, t_max, eta, bfactor))
        self.lam_cos, self.lam_gx, self.lam_gt = float(lam_cos), float(lam_gx), float(lam_gt)
        self.schedule = schedule or Schedule()  # OT-FM: mu = t, sigma = 1 - t (Prop. 1, tested)
        self.last_nfe = 0

    def _phi(self, x, t):
        """Phi at (x, t); t is clamped to t_max (the stationary regime beyond t_max, Sec. 3.5)."""
        return self.phi(x, t.clamp(max=self.t_max)).reshape(-1)

    def grad_phi(self, x, t):
        """grad_x Phi(x, t) with no graph kept (for samplers). t: float or (B,) tensor."""
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            g = torch.autograd.grad(self._phi(xr, t).sum(), xr)[0]
        return g.detach()

    # ---------------------------------------------------------------- Eq. (27), term by term
    def loss(self, xbar, eps=None, t=None):
        """VPFB loss, Eq. (27), on one batch; t ~ U(0, t_end) as in Eq. (26) unless given.
        xbar: data (B, ...); eps: prior noise N(0, I). Returns (loss, dict of floats to log)."""
        eps = torch.randn_like(xbar) if eps is None else eps
        if t is None:
            t = torch.rand(xbar.shape[0], device=xbar.device, dtype=xbar.dtype) * self.t_end
        loss, logs = self.objective(xbar, eps, t.to(xbar.dtype))
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def objective(self, xbar, eps, t):
        """Eq. (27) at given noise and times -> (loss, dict of 0-d tensors)."""
        t = t.clamp(max=self.t_max)                          # stationarity beyond t_max, Sec. 3.5
        mu, sig, dmu, dsig = (_bdim(c, xbar) for c in self.schedule.kernel_and_rates(t))
        x = (mu * xbar + sig * eps).detach().requires_grad_(True)   # x ~ rho(x|xbar, t), Prop. 1
        v = dmu * xbar + dsig * eps                          # Eq. (20): v = xbar - eps for OT-FM
        tl = t.detach().clone().requires_grad_(not self.autonomous)   # dPhi/dt at fixed x
        phi, gx, gt = self.potential(x, tl)                  # Phi (B,), grad_x Phi, dPhi/dt (B,)
        w = (1 - t) ** self.kappa                            # w(t) = (1 - t)^kappa, Sec. 3.5
        cov = self.cov_term(phi, x, xbar, eps, t, w, gx, v)  # Cov[Phi, w gamma]
        cos = self.cos_term(gx, v, t)                        # cos(grad_x Phi, v)
        ritz = self.ritz_term(gx, w)                         # E ||grad_x Phi||^2
        dphidt2 = gt.pow(2).mean()                           # E (dPhi/dt)^2
        phi2 = phi.pow(2).mean()                             # E Phi^2 (Poincare)
        lam_cos, lam_gx, lam_gt, eta = self.lam_cos, self.lam_gx, self.lam_gt, self.eta
        loss = cov - lam_cos * cos + lam_gx * ritz + lam_gt * dphidt2 + eta * phi2   # Eq. (27)
        return loss, dict(loss=loss, cov=cov, cos=cos, grad_x2=ritz, grad_t2=dphidt2, phi2=phi2,
                          poincare_ratio=_sqnorm(gx).mean() / (phi2 + 1e-12))   # Fig. 10 monitor

    def potential(self, x, tl):
        """Phi(x, t), grad_x Phi and dPhi/dt, graphs kept: the loss differentiates them again."""
        phi = self.phi(x, tl).reshape(-1)
        inputs = [x] if self.autonomous else [x, tl]
        grads = torch.autograd.grad(phi.sum(), inputs, create_graph=True, allow_unused=True)
        gt = grads[1] if len(grads) > 1 and grads[1] is not None else torch.zeros_like(phi)
        return phi, grads[0], gt

    def cov_term(self, phi, x, xbar, eps, t, w, gx, v):
        """Cov_{rho p_data}[Phi, w(t) gamma] of Eq. (27) (from Eq. 24 with gamma of Eq. 12).
        "cov": gamma centred by its closed-form conditional mean gamma_bar (Eq. 11 / 23), then the
        batch mean of Phi removed too (same expectation, lower variance). "corr" (authors): the
        covariance of Phi with Gamma = mean_pixels((eps^2 - xbar eps)(1 - t)), divided by
        std(Gamma) std(Phi) with std(Phi) DETACHED: the term keeps a gradient along Phi -> c Phi.
        "stein": the same expectation as "cov", pathwise. The kernel rho(x|xbar, t) obeys both
        Eq. (11), d rho/dt = -1/2 rho (gamma - gamma_bar), and d rho/dt = -div(rho v), so by parts
            E[Phi (gamma - gamma_bar)] = -2 E[grad_x Phi . v].
        "cov" weighs Phi by a sum of D noise terms, a score-function estimate whose variance grows
        with D; "stein" differentiates Phi instead (the flow-matching gradient, tested)."""
        if self.cov_form == "stein":
            return -2 * (w * (gx * v).flatten(1).sum(1)).mean()   # = Cov[Phi, w gamma] in mean
        if self.cov_form == "corr":
            gam = (eps * eps - xbar * eps).flatten(1).mean(1) * (1 - t)   # authors' Gamma
            gam = gam - gam.mean()
            return (gam * phi).mean() / (gam.std() * phi.detach().std() + 1e-8)
        if self.schedule.is_otfm:                            # gamma - gamma_bar, no cancellation
            G = otfm_centered_innovation(eps, xbar, t)
        else:
            G = self.schedule.gamma(x.detach(), xbar, t) - self.schedule.gamma_bar(xbar, t)
        wG = w * G
        return ((phi - phi.mean()) * (wG - wG.mean())).mean()   # Cov[Phi, w (gamma - gamma_bar)]

    def cos_term(self, gx, v, t):
        """cos(grad_x Phi, v) with the conditional velocity v of Eq. (20), Eq. (27).
        "authors": (grad Phi . v) / (|grad Phi||v|)^t / D, a dot product near t = 0."""
        dot = (gx.flatten(1) * v.flatten(1)).sum(1)
        nrm = gx.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1) + 1e-8
        if self.cos_form == "paper":
            return (dot / nrm).mean()                        # cos(grad Phi, v)
        return (dot / nrm.pow(t) / gx[0].numel()).mean()     # authors' normaliser^t / D

    def ritz_term(self, gx, w):
        """E ||grad_x Phi||^2 of the Deep Ritz pair (Eq. 24, 27). "ritz": weighted by w(t) like the
        covariance, so the minimiser stays the true potential; "cov": unweighted (paper as printed;
        the authors' std_power_norm = 0). grad_norm "mean": averaged over the D dims (authors)."""
        gx2 = _sqnorm(gx) / (gx[0].numel() if self.grad_norm == "mean" else 1)
        return (w * gx2).mean() if self.weight_on == "ritz" else gx2.mean()

    # ---------------------------------------------------------------- sampling and Eq. (22)
    def sample(self, x0, solver="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
               return_traj=False):
        """Potential-flow ODE dx/dt = +grad_x Phi(x, t) (Eq. 13) from prior noise x0 at t0 to t1,
        "euler" or "rk45" (ode_solve). Past t_max Phi(x, t_max) acts, so t1 > 1 is long-run
        sampling (Sec. 4.6). NFE in self.last_nfe. Returns x, or (x, traj (K, B, ...))."""
        x, traj, self.last_nfe = ode_solve(self.grad_phi, x0, solver, n_steps, t0, t1, rtol, atol,
                                           return_traj)
        return (x, traj) if return_traj else x

    def boltzmann_energy(self, x, t_inf=None):
        """Boltzmann energy Phi_B(x) = (c Phi_inf(x) + f_inf ||x||^2) / g_inf^2, Eq. (22)  -> (B,).
        log p_B = Phi_B + const. OT-FM at t_inf: f = -1/t, g^2 = 2 (1 - t) / t (Eq. 18).
        The paper prints c = 4; the probability-flow ODE (19) with dx/dt = grad Phi gives
            grad Phi = -f x + g^2/2 grad log rho   =>   log rho = (2 Phi + f ||x||^2) / g^2 + const,
        and on 1-D Gaussian data only c = 2 reproduces the analytic score (test_boltzmann_factor).
        At t_inf = 1 - 1e-5, 1/g^2 = 5e4 magnifies any error of Phi; t_inf 0.9-0.99 is smoother."""
        t = self.t_inf if t_inf is None else float(t_inf)
        t = self.t_max if t is None else t
        if self.schedule.is_otfm:
            f, g2 = -1.0 / t, 2.0 * (1.0 - t) / t              # f(t) = -1/t, g(t)^2 = 2 (1 - t) / t
        else:
            f, g2 = self.schedule.sde_coefficients(t)          # Eq. (18) for a general schedule
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return (self.bfactor * self._phi(x, tt) + f * _sqnorm(x)) / g2   # Eq. (22), c = bfactor

    def grad_boltzmann(self, x):
        """grad_x Phi_B(x), no graph kept."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.boltzmann_energy(xr).sum(), xr)[0].detach()

    def langevin(self, x0, n_steps=100, step_size=1e-5, temperature=1.0, return_traj=False):
        """SGLD ascent on the Boltzmann energy Phi_B (Sec. 4.6); stationary law exp(Phi_B / T^2)."""
        x, traj, self.last_nfe = sgld(self.grad_boltzmann, x0, n_steps, step_size, temperature,
                                      return_traj)
        return (x, traj) if return_traj else x

# The authors' code (https://github.com/ljun0004/VAPO: losses.py, configs/homotopy/*.py):
# VPFB(phi, **AUTHORS). Their network and optimiser are section 2's AuthorsUNetPhi and section 7.
AUTHORS = dict(eta=0.0, lam_gx=0.5, lam_gt=0.1, cov_form="corr", cos_form="authors",
               grad_norm="mean", bfactor=4.0)
# Ours: VPFB(phi, **OURS). With "stein" and the weighted gradient norm, Cov + E w|grad Phi|^2 IS
# weighted flow matching on grad_x Phi, sample by sample: -2 w grad Phi . v + w |grad Phi|^2 =
# w |grad Phi - v|^2 - w |v|^2 (tested). It is still VPFB: the same expectation, so the same
# minimiser Phi*, by a low-variance estimator (the printed covariance weighs Phi by D noise terms).
# kappa 1 weighs both terms by w = 1 - t, so the minimiser is Phi* at every t. How it scores:
# README, "Each recipe side by side".
OURS = dict(kappa=1.0, lam_gt=0.01, cov_form="stein", weight_on="ritz")

# ---- samplers: plain functions of a gradient field (tests feed analytic fields)
def ode_solve(velocity, x0, solver="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
              return_traj=False):
    """Integrate dx/dt = velocity(x, t) from t0 to t1 -> (x, traj or None, nfe). "euler": n_steps
    steps; "rk45": scipy's adaptive Dormand-Prince 5(4) on the flat batch in float64."""
    if solver not in ("euler", "rk45"):
        raise ValueError(f"solver must be euler|rk45, got {solver!r}")
    x = x0.detach()
    if solver == "euler":
        dt = (t1 - t0) / n_steps
        traj = [x]
        for k in range(n_steps):
            x = x + dt * velocity(x, t0 + k * dt)            # x_{k+1} = x_k + dt grad Phi(x_k, t_k)
            if return_traj:
                traj.append(x)
        return x, (torch.stack(traj) if return_traj else None), n_steps

    from scipy.integrate import solve_ivp
    shape, dev, dtype = x.shape, x.device, x.dtype
    nfe = [0]

    def f(t, y):                                               # scipy wants flat float64 numpy
        nfe[0] += 1
        xt = torch.from_numpy(y).to(dev, dtype).reshape(shape)
        return velocity(xt, float(t)).reshape(-1).double().cpu().numpy()

    t_eval = np.linspace(t0, t1, n_steps + 1) if return_traj else None
    sol = solve_ivp(f, (t0, t1), x.reshape(-1).double().cpu().numpy(), method="RK45",
                    rtol=rtol, atol=atol, t_eval=t_eval)
    xs = torch.from_numpy(sol.y).to(dev, dtype)                # (B * D, K)
    x = xs[:, -1].reshape(shape)
    traj = xs.T.reshape(-1, *shape) if return_traj else None
    return x, traj, nfe[0]

def sgld(grad_energy, x0, n_steps=100, step_size=1e-5, temperature=1.0, return_traj=False):
    """Stochastic gradient Langevin dynamics ascending an energy E (Sec. 4.6):
        x_{k+1} = x_k + Delta grad E(x_k) + sqrt(2 Delta) e,   e ~ N(0, lambda^2 I)
    with step Delta = step_size and temperature scale lambda = temperature (a standard deviation).
    For small Delta its stationary law is p ~ exp(E / lambda^2). Returns (x, traj or None, K)."""
    x = x0.detach()
    traj = [x]
    for _ in range(n_steps):
        noise = math.sqrt(2 * step_size) * temperature * torch.randn_like(x)  # sqrt(2D) lam N(0,I)
        x = x + step_size * grad_energy(x) + noise
        if return_traj:
            traj.append(x)
    return x, (torch.stack(traj) if return_traj else None), n_steps

def slerp(z0, z1, alpha):
    """Spherical interpolation between noises (Sec. 4.3), per sample on the flattened vectors:
    slerp = (sin((1-a) theta) z0 + sin(a theta) z1) / sin(theta), cos(theta) = <z0, z1>/(|z0||z1|).
    Keeps the norm when |z0| = |z1|, so every point still looks like prior noise."""
    a0, a1 = z0.flatten(1), z1.flatten(1)
    cos = (a0 * a1).sum(1) / (a0.norm(dim=1) * a1.norm(dim=1))
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))[:, None]
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, 1)
    out = (torch.sin((1 - alpha) * theta) * a0 + torch.sin(alpha * theta) * a1) / torch.sin(theta)
    return out.reshape(z0.shape)

# ==== 2. Networks ====
# Both networks return ONE number per image, Phi (B,). The authors' time-varying Phi is a U-Net
# read as a scalar through Phi(x, t) = 1/2 ||x - UNet(x, t)||^2 (>= 0); we use the same head. The
# autonomous Phi(x) is a WideResNet with a linear read-out of its pooled features. Both use SiLU
# (smooth: the loss differentiates grad_x Phi once more w.r.t. the weights) and GroupNorm, never
# BatchNorm, which would couple the images of a batch and make Phi_i depend on x_j. Each network
# is two pieces: `trunk` (the U-Net's image, the WideResNet's pooled features), then a scalar head.

def _norm(ch):
    """GroupNorm: 32 groups as usual, but at least 4 channels per group. With one channel per group
    the norm would remove the per-channel time embedding added just before it (tiny test nets)."""
    return nn.GroupNorm(math.gcd(32, max(1, ch // 4)), ch)

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the raw t in [0, 1], (B,) -> (B, dim), as the authors' U-Net.
    Not the diffusion habit of 1000 t: Eq. (27) penalises E (dPhi/dt)^2 in the paper's t, and a
    1000 t input lets dPhi/dt be up to 1000 times steeper for the same weights (tested)."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], 1)

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + the time (+ class) embedding, GroupNorm-SiLU-dropout-conv, plus a
    skip. The embedding shifts each channel before the second norm; norm(ch) makes the norms."""
    emb_per_channel = 1                                  # FiLMResBlock: 2, a scale and a shift

    def __init__(self, cin, cout, emb_dim, dropout, norm):
        super().__init__()
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, self.emb_per_channel * cout)
        self.n2, self.c2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, emb):                         # emb: SiLU(time (+ class) embedding)
        h = self.c1(F.silu(self.n1(x)))
        h = self.n2(h + self.emb(emb)[:, :, None, None])
        return self.skip(x) + self.c2(self.drop(F.silu(h)))

class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels, written out with softmax: it has a double backward
    (the flash / memory-efficient SDPA kernels do not), which the loss needs. The qkv channels
    split as q | k | v, then heads (guided-diffusion's QKVAttention, as the authors' net)."""

    def __init__(self, ch, heads, norm):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        n, c = self.heads, C // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, n, c, H * W).unbind(1)   # (B, n, c, HW)
        att = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bhnm,bhcm->bhcn", att, v).reshape(B, C, H, W)
        return x + self.proj(out)

class UNetPhi(nn.Module):
    """Time-varying potential Phi(x, t [, y]) = 1/2 ||x - UNet(x, t [, y])||^2 (authors' head).
    A guided-diffusion U-Net (defaults: the paper's size) on the raw t: per resolution `num_res`
    ResBlocks (attention at `attn_res`, heads of head_dim channels), a ResBlock-Attention-ResBlock
    middle, the mirror image up with skips; a strided conv halves the resolution, nearest + conv
    doubles it. The layers come from the methods after __init__; AuthorsUNetPhi has the authors'."""
    wide_stem = False                                    # AuthorsUNetPhi: base * mult[0] channels

    def __init__(self, in_ch=3, base=128, mult=(2, 2, 2), num_res=4, attn_res=(16,), dropout=0.3,
                 image_size=32, num_classes=0, *, head_dim=64):
        super().__init__()
        emb = base * 4
        self.base, self.emb_dim, self.dropout, self.head_dim = base, emb, dropout, head_dim
        self.temb = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        # class embedding with one extra "null" class (index num_classes): y=None -> Phi(x, t)
        self.num_classes = num_classes
        self.cemb = nn.Embedding(num_classes + 1, emb) if num_classes else None
        ch = base * mult[0] if self.wide_stem else base               # the stem's width
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, res_px = nn.ModuleList(), [ch], image_size
        for i, m in enumerate(mult):
            for _ in range(num_res):
                blk = nn.ModuleList([self.res(ch, base * m)])
                ch = base * m
                if res_px in attn_res:
                    blk.append(self.attn(ch))
                self.down.append(blk)
                chans.append(ch)
            if i < len(mult) - 1:                                    # halve the resolution
                self.down.append(nn.ModuleList([self.downsample(ch)]))
                chans.append(ch)
                res_px //= 2
        self.mid = nn.ModuleList([self.res(ch, ch), self.attn(ch), self.res(ch, ch)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for j in range(num_res + 1):
                blk = nn.ModuleList([self.res(ch + chans.pop(), base * m)])
                ch = base * m
                if res_px in attn_res:
                    blk.append(self.attn(ch))
                if i > 0 and j == num_res:                           # double the resolution
                    blk.extend(self.upsample(ch))
                    res_px *= 2
                self.up.append(blk)
        self.out = nn.Sequential(self.norm(ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1))

    def norm(self, ch):
        return _norm(ch)

    def res(self, cin, cout):
        return ResBlock(cin, cout, self.emb_dim, self.dropout, self.norm)

    def attn(self, ch):
        return AttnBlock(ch, max(1, ch // self.head_dim), self.norm)

    def downsample(self, ch):
        return nn.Conv2d(ch, ch, 3, 2, 1)

    def upsample(self, ch):
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]

    def _run(self, blk, h, emb):
        for layer in blk:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def trunk(self, x, t, y=None):
        """UNet(x, t [, y]), an image like x."""
        emb = self.temb(timestep_embedding(t, self.base))
        if self.cemb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.cemb(y)
        emb = F.silu(emb)          # every ResBlock's embedding layer starts with it: once here
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blk in self.up:
            h = self._run(blk, torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)

    def forward(self, x, t, y=None):
        return 0.5 * (x - self.trunk(x, t, y)).flatten(1).pow(2).sum(1)   # 1/2 ||x - UNet(x, t)||^2

class FiLMResBlock(ResBlock):
    """The authors' ResBlock (guided-diffusion's scale-shift norm): the embedding gives a scale and
    a shift per channel, applied after the second norm: norm(h) * (1 + scale) + shift."""
    emb_per_channel = 2

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(self.drop(F.silu(h)))

class AuthorsUNetPhi(UNetPhi):
    """The authors' U-Net (configs/homotopy/cifar10.py, celeba.py of their repository; --unet
    authors): FiLMResBlocks, one attention head, GroupNorm(32), a stem of base * mult[0] channels,
    average pooling down and nearest up without convs, the output conv zero (Phi = 1/2 |x|^2 at
    the start). Their config's options that vpfb_convert.py reads from a file: conv_resample
    (their resamp_with_conv: our strided conv and nearest + conv), scale_shift=False (additive
    ResBlocks). AuthorsUNetPhi(3, 128, (2, 2, 2), 4, (16,)) has their 55,676,419 parameters."""
    wide_stem = True

    def __init__(self, *args, scale_shift=True, conv_resample=False, **kw):
        self.scale_shift, self.conv_resample = scale_shift, conv_resample   # read while building
        super().__init__(*args, **kw)
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def norm(self, ch):
        return nn.GroupNorm(math.gcd(32, ch), ch)  # theirs wherever theirs exists, and below 32

    def res(self, cin, cout):
        block = FiLMResBlock if self.scale_shift else ResBlock
        return block(cin, cout, self.emb_dim, self.dropout, self.norm)

    def attn(self, ch):
        return AttnBlock(ch, 1, self.norm)

    def downsample(self, ch):
        return super().downsample(ch) if self.conv_resample else nn.AvgPool2d(2)

    def upsample(self, ch):
        return super().upsample(ch) if self.conv_resample else [nn.Upsample(scale_factor=2)]

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, stride, 1)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.drop = nn.Dropout(dropout)
        self.skip = (nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1)
                     else nn.Identity())

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(self.drop(F.silu(self.n2(h))))

class WRNPhi(nn.Module):
    """Autonomous potential Phi(x [, y]) (Sec. 4.2): a WideResNet, three groups of (depth-4)/6
    blocks of widths (w, 2w, 4w), average pooling, a linear read-out per class (+ "null"); no t."""

    def __init__(self, in_ch=3, width=128, depth=16, dropout=0.0, num_classes=0):
        super().__init__()
        n = (depth - 4) // 6
        layers, ch = [nn.Conv2d(in_ch, width // 2, 3, padding=1)], width // 2
        for i, w in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                layers.append(WideBlock(ch, w, 2 if (j == 0 and i > 0) else 1, dropout))
                ch = w
        self.body = nn.Sequential(*layers, _norm(ch), nn.SiLU())
        self.num_classes = num_classes
        self.head = nn.Linear(ch, num_classes + 1 if num_classes else 1)   # + a "null" read-out

    def trunk(self, x):
        return self.body(x).mean((2, 3))                                 # pooled features (B, ch)

    def forward(self, x, t=None, y=None):
        out = self.head(self.trunk(x))                                  # (B, classes + 1) or (B, 1)
        if out.shape[1] == 1:
            return out[:, 0]
        return out[:, -1] if y is None else out.gather(1, y[:, None])[:, 0]

class Conditioned(nn.Module):
    """phi(x, t) with the labels fixed (VPFB calls phi(x, t)); y=None -> unconditional.
    A list of labels gives the compositional energy: the mean of the conditional ones (Sec. 4.3)."""

    def __init__(self, net, y=None):
        super().__init__()
        self.net, self.y = net, y

    def forward(self, x, t):
        if self.y is None:
            return self.net(x, t)
        ys = self.y if isinstance(self.y, (list, tuple)) else [self.y]
        out = [self.net(x, t, y.expand(x.shape[0]) if y.dim() == 0 else y) for y in ys]
        return sum(out) / len(ys)

# ==== ENGINEERING: nothing below this line is in the paper ====
# The engineering's own imports (flags, signals, processes, files): sections 1-2 need none of them.
import argparse
import contextlib
import copy
import functools
import fcntl
import json
import os
import shlex
import signal
import sys
import time
import warnings

import torch.distributed as dist

# ==== 3. Data ====
# Images live in [-1, 1] as float NCHW; files on disk are uint8 NHWC (samples.npz, --dataset npz).
# A fault of the data is one line and exit 2 when it is loaded, before a network is built.
FLIP_SETS = ("cifar10", "celeba64", "folder")                         # random horizontal flips
CELEBA_ATTRS = ("Male", "Smiling", "Young")             # classes 0, 1, 2 of --class-cond (3 = none)

def die(msg, code=2):
    """One line "error: ..." on stderr, no traceback; exit 2: bad input, 3: non-finite numbers,
    130: interrupted (Ctrl-C)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

def load_npz(path):
    """--dataset npz (`images` uint8 NHWC, optional integer `labels`) as float [-1, 1] NCHW."""
    if not os.path.isfile(path):
        die(f"--dataset npz: --data-dir must be a .npz file; {os.path.abspath(path)} is not one")
    st = os.stat(path)
    return _read_npz(os.path.abspath(path), st.st_mtime_ns, st.st_size)

@functools.lru_cache(maxsize=2)    # resolve_args reads the shape, build_dataset the images: once
def _read_npz(path, mtime, size):
    try:
        with np.load(path) as z:
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else np.zeros(len(images), np.int64)
    except Exception as e:                  # a truncated zip, a bad stream, no key 'images', ...
        die(f"cannot read {path}: need a complete .npz with key 'images' ({type(e).__name__})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        die(f"{path}: 'images' must be uint8 N x H x W x C, C = 1 or 3, got {images.dtype} "
            f"{images.shape}")
    n, h, w, _ = images.shape
    if n == 0 or h != w or h < 8:
        die(f"{path}: need square images of side >= 8, got {n} images of {h} x {w}")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        die(f"{path}: 'labels' must be {n} integers, got {labels.dtype} {labels.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return torch.utils.data.TensorDataset(x, torch.as_tensor(labels).long())

def face_crop(im):
    """CelebA's usual 140 x 140 face crop of the aligned 178 x 218 photos (not of smaller ones)."""
    import torchvision.transforms.functional as TF
    return TF.center_crop(im, 140) if min(im.size) >= 178 else im

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

def list_images(root):
    """ImageFolder's listing (class k = the k-th sub-folder of root, images sorted as it sorts
    them), with each folder walked once: a link back into a folder already walked (a/up -> ..)
    is not followed, so no image is listed twice. An unreadable folder is one line, exit 2."""
    def unreadable(e):
        die(f"cannot list folder {e.filename} ({e.strerror or e})")
    seen, samples = {os.path.realpath(root)}, []
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    for k, c in enumerate(classes):
        found = []
        for d, dirs, fs in os.walk(os.path.join(root, c), onerror=unreadable, followlinks=True):
            if os.path.realpath(d) in seen:
                dirs.clear()
                continue
            seen.add(os.path.realpath(d))
            found += [(d, f) for f in fs if f.lower().endswith(IMAGE_EXTS)]
        samples += [(os.path.join(d, f), k) for d, f in sorted(found)]
    return samples, classes

def check_image(path):
    """eval_fid.py's test of an image, at load time: it opens, verifies (PNG: each chunk's CRC),
    decodes to the end (a truncated JPEG fails only there) and is 8-bit (a 16-bit PNG would
    become white when made RGB). A fault is one line naming the file, exit 2."""
    from PIL import Image, ImageMode
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:                      # verify() leaves `im` unusable
            mode = im.mode
            im.load()
    except Exception as e:
        why = " ".join(str(e).split())[:200]
        die(f"cannot read image {path} ({type(e).__name__}: {why}); remove or replace it")
    if ImageMode.getmode(mode).typestr not in ("|u1", "|b1"):
        die(f"image {path} has mode {mode}, not 8-bit; save 8-bit images (convert or remove it)")

class ImageFiles(torch.utils.data.Dataset):
    """(transformed RGB image, class) of a list_images() listing, as ImageFolder gives them."""

    def __init__(self, samples, classes, transform):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.target_transform = None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, y = self.samples[i]
        with Image.open(path) as im:
            x = self.transform(im.convert("RGB"))
        return x, (y if self.target_transform is None else self.target_transform(y))

def image_folder(path, tf, name):
    """The images of root/<class>/..., each checked once here (check_image), not mid-training."""
    what = ("CelebA images (e.g. img_align_celeba/*.jpg) in a sub-folder"
            if name != "folder" else "images in at least one sub-folder")
    try:
        samples, classes = list_images(path)
    except OSError as e:
        die(f"no image folder at {os.path.abspath(path)} ({type(e).__name__}); put {what} there")
    if not samples:
        die(f"no images ({', '.join(IMAGE_EXTS)}) in the sub-folders of {os.path.abspath(path)}; "
            f"put {what} there")
    for p, _ in samples:
        check_image(p)
    return ImageFiles(samples, classes, tf)

def build_dataset(args, train=True, name=None):
    """(image in [-1, 1], label) pairs of --dataset (or `name`); a missing set is one line, exit 2.
    Training flips are drawn in the loop, per step: a resumed run sees the same images."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    name, root, c, s = name or args.dataset, args.data_dir, args.channels, args.image_size
    if name == "npz":
        return load_npz(root)                                         # one file: no test split
    if name == "noise":                                               # uniform noise in [-1, 1]
        g = torch.Generator().manual_seed(10_000)
        x = torch.rand(args.fake_size, c, s, s, generator=g) * 2 - 1
        return torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    norm = [T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)]          # [0, 1] -> [-1, 1]
    gray = [T.Grayscale(c)] if name == "mnist" or c == 1 else []
    tf = T.Compose([T.Resize(s), T.CenterCrop(s)] + gray + norm)
    if name == "fake":
        return D.FakeData(size=args.fake_size, image_size=(c, s, s), num_classes=10,
                          transform=T.Compose(norm), random_offset=0 if train else 10_000)
    if name in ("celeba64", "celeba", "folder"):
        crop = [face_crop] if name != "folder" else []
        ds = image_folder(os.path.join(root, "celeba64") if name != "folder" else root,
                          T.Compose(crop + tf.transforms), name)
        if name == "celeba64" and args.class_cond:                   # Sec. 4.3's attributes
            celeba_attributes(ds, os.path.join(root, "celeba64", "list_attr_celeba.txt"))
        return ds
    what = {"cifar10": "cifar-10-batches-py/ (from cifar-10-python.tar.gz)",
            "cifar100": "cifar-100-python/ (from cifar-100-python.tar.gz)",
            "svhn": "svhn/train_32x32.mat and svhn/test_32x32.mat", "mnist": "MNIST/raw/"}[name]
    try:
        if name == "svhn":
            return D.SVHN(os.path.join(root, "svhn"), split="train" if train else "test",
                          download=True, transform=tf)
        kind = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "mnist": D.MNIST}[name]
        return kind(root, train=train, download=True, transform=tf)
    except Exception as e:  # no internet, bad archive, ...
        first = str(e).splitlines()[0] if str(e) else ""
        die(f"could not load {name} ({type(e).__name__}: {first}); put {what} under "
            f"{os.path.abspath(root)}, allow the download, or use --dataset npz")

def celeba_attributes(ds, attr_file):
    """Labels of --class-cond on CelebA: a random positive attribute among Male, Smiling, Young
    (0, 1, 2), or 3 if none (Sec. 4.3), from CelebA's list_attr_celeba.txt."""
    if not os.path.isfile(attr_file):
        die(f"--class-cond on celeba64 needs CelebA's attributes at {os.path.abspath(attr_file)}")
    with open(attr_file) as fh:
        lines = fh.read().splitlines()
    cols = [lines[1].split().index(a) for a in CELEBA_ATTRS]
    attrs = {r[0]: [int(r[1 + c]) for c in cols] for r in map(str.split, lines[2:]) if r}
    ds.samples = [(p, attrs.get(os.path.basename(p), [-1] * 3)) for p, _ in ds.samples]
    ds.target_transform, ds.classes = celeba_label, list(CELEBA_ATTRS) + ["none"]

def celeba_label(attr):
    pos = [i for i, a in enumerate(attr) if a == 1]
    return pos[int(torch.randint(len(pos), ()))] if pos else 3

def num_classes_of(ds):
    """Classes of a training set for --class-cond; labels outside 0..K-1 are one line, exit 2."""
    if isinstance(ds, torch.utils.data.TensorDataset):                 # npz: labels 0 .. max
        y = ds.tensors[1]
        if len(y) and int(y.min()) < 0:
            die(f"--class-cond needs labels 0..K-1; the npz has label {int(y.min())}")
        return int(y.max()) + 1 if len(y) else 1
    return max(1, len(getattr(ds, "classes", [])) or 10)

class StepBatches(torch.utils.data.Sampler):
    """Index batches as a pure function of (seed, rank, step): epoch e is a permutation seeded by
    seed + e, split between ranks. From any step: the batches a straight run saw (exact resume)."""

    def __init__(self, n, batch, seed, rank=0, world=1, start_step=0):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.start = start_step
        self.per_epoch = (n // world) // batch
        if self.per_epoch == 0:
            die(f"dataset of {n} images is smaller than one batch ({batch} x {world} processes)")

    def __iter__(self):
        step, cached = self.start, (None, None)
        while True:
            epoch, i = divmod(step, self.per_epoch)
            if cached[0] != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                cached = (epoch, torch.randperm(self.n, generator=g)[self.rank::self.world])
            yield cached[1][i * self.batch:(i + 1) * self.batch].tolist()
            step += 1

def quiet_worker(_):    # workers ignore a group's Ctrl-C / SIGTERM: the main process saves first
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)

def batch_iterator(ds, batch, seed, workers, rank=0, world=1, start_step=0):
    """(x, y) batches from `start_step` on; the same batches on resume (StepBatches)."""
    sampler = StepBatches(len(ds), batch, seed, rank, world, start_step)
    # own generator: making the iterator must not consume the global RNG (resume would shift noise)
    return iter(torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, worker_init_fn=quiet_worker,
        generator=torch.Generator().manual_seed(seed + rank)))

def next_batch(batches, device, flip):
    """The next (x, y) on `device`, x flipped at random when `flip`; unreadable data: exit 2."""
    try:
        x, y = next(batches)
    except (OSError, RuntimeError, ValueError) as e:     # e.g. a truncated image file
        die(f"cannot load a training batch ({type(e).__name__}: {str(e).strip().splitlines()[-1]})")
    x = x.to(device, non_blocking=True).float()
    if flip:                                          # drawn from the step's seed: exact resume
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
    return x, y.to(device)

# ==== 4. Training loop ====
# bf16 (--amp): the network trunk runs under autocast on CUDA (engineer); Phi's head, the loss, the
# samplers, parameters, Adam and EMA stay fp32; no GradScaler (bf16 has fp32's exponent range).
# DDP does not support torch.autograd.grad (the loss differentiates grad_x Phi again): each process
# keeps a plain module and allreduce_grads averages the gradients after backward.
def net_of(args):
    """Phi of --arch: the time-varying U-Net Phi(x, t) (--unet authors: their variant) or the
    autonomous WideResNet Phi(x); class-conditional with --class-cond."""
    nc = args.num_classes if args.class_cond else 0
    if args.arch == "unet":
        unet = AuthorsUNetPhi if args.unet == "authors" else UNetPhi
        return unet(args.channels, args.model_size, ints(args.ch_mult, "--ch-mult"),
                    args.res_blocks, ints(args.attn_res, "--attn-res", empty=True), args.dropout,
                    args.image_size, nc)
    return WRNPhi(args.channels, args.model_size, args.wrn_depth, 0.0, nc)

def build_net(args, device=None):
    """The network of the flags (net_of), engineered for `device` (--amp, --channels-last)."""
    net = net_of(args)
    return net if device is None else engineer(net, device, args.amp, args.channels_last)

def build_method(phi, args):
    """VPFB(phi, ...) with the method's flags (section 7 filled them from the recipe)."""
    return VPFB(phi, autonomous=args.arch == "wrn", t_end=args.t_end, t_max=args.t_max,
                t_inf=args.t_inf, **{k: getattr(args, k) for k in METHOD_FLAGS})

def build_optimizer(net, args):
    """Adam with grouped (foreach) kernels, on the CPU too (the same numbers as the loop)."""
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=tuple(args.betas), foreach=True)
    if args.clip_mode == "std" and args.grad_clip > 0:   # the authors': before each Adam step
        opt.register_step_pre_hook(lambda o, *_: clip_std_(o, args.grad_clip))
    return opt

def bf16_trunk(amp, device):
    """--amp: the trunk under bf16 autocast (auto: on CUDA only)."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")

def engineer(net, device, amp, channels_last=False):
    """net on `device`, its trunk (section 2's net.trunk) under bf16 autocast (bf16_trunk) and/or on
    channels-last input; the head after it stays fp32. Only this instance's `trunk` method is
    wrapped: the state_dict keys do not change, and a deepcopy (the EMA) wraps its own trunk."""
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    vars(net).pop("trunk", None)                      # engineered again: from section 2's trunk
    bf16 = bf16_trunk(amp, device)
    if bf16 or channels_last:
        net.trunk = functools.partial(fast_trunk, net.trunk, bf16, channels_last)
    return net

def fast_trunk(trunk, bf16, channels_last, x, *cond):
    """trunk(x, *cond) in bf16 autocast on x's device and/or on channels-last x; output in fp32."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        return trunk(x, *cond).float()

def use_torch_func(method):
    """VPFB.potential by torch.func: the same numbers, in a form torch.compile can differentiate
    again (aot_autograd compiles no double backward of autograd.grad)."""
    def potential(x, tl):
        def f(x, t):
            p = method.phi(x, t).reshape(-1)
            return p.sum(), p
        grads, (_, phi) = torch.func.grad_and_value(
            f, argnums=0 if method.autonomous else (0, 1), has_aux=True)(x, tl)
        return (phi, grads, torch.zeros_like(phi)) if method.autonomous else (phi, *grads)
    method.potential = potential
    return method

def compile_method(method, backend="inductor"):
    """--compile: the potential's gradient through torch.func, then the loss's network part
    compiled once: minutes of compilation at full size, worth it for long runs (README, "Speed");
    eager's numbers to round-off."""
    use_torch_func(method)
    method.objective = torch.compile(method.objective, backend=backend)
    return method

class StopSignals:
    """SIGINT / SIGTERM only set a flag; the loop finishes its step, saves and exits 130 / 143."""

    def __init__(self):
        self.signum, self.old = None, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self.handle)
            except ValueError:                      # not the main thread: no handler
                pass

    def handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)

def pick_device(spec):
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)                    # a valid name: --device's type checked it
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"device {spec} requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        die(f"device {spec} requested but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0 is the first)")
    return dev

def pick_threads(n):
    """--threads 0: the cores this process may use, less the load the other processes put on them
    (1-minute load average), at least 1: on a busy machine, spinning threads cost 10-50x."""
    if n:
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores or 1, int((cores or 1) - busy + 0.5)))

def setup_distributed(device_spec):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(device_spec)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device

def all_max(values, device, world):
    """The max over all ranks of each number in `values`, in one all-reduce (all agree on skip and
    stop)."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()

def count_params(net):
    return sum(p.numel() for p in net.parameters())

def ema_decay_at(decay, n, warmup=True):
    """Decay of the EMA update after n earlier ones: with warm-up min(decay, (1 + k) / (10 + k)),
    k = n + 1 counting this one (the authors' score_sde EMA), else constant."""
    return min(decay, (2.0 + n) / (11.0 + n)) if warmup else decay

@torch.no_grad()
def ema_update(ema, net, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta (one fused foreach op)."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)
    for b_e, b in zip(ema.buffers(), net.buffers()):
        b_e.copy_(b)

def allreduce_grads(params, world):
    """Average the gradients of all ranks (what DDP does) in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]   # None: the same on every rank
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))

@torch.no_grad()
def clip_std_(opt, bound):
    """The authors' clip mode `std`: each gradient element is clipped to +-(bound * RMS + 0.1), the
    RMS being Adam's bias-corrected running sqrt(v_hat) from the steps before (none at step 1).
    Grouped (foreach) ops: a few kernels for all parameters, not a few per parameter."""
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        ps = [p for p in group["params"] if p.grad is not None
              and float(opt.state.get(p, {}).get("step", 0)) >= 1]
        if not ps:
            continue
        corr = [1 - beta2 ** float(opt.state[p]["step"]) for p in ps]
        lim = torch._foreach_div([opt.state[p]["exp_avg_sq"] for p in ps], corr)
        torch._foreach_sqrt_(lim)
        torch._foreach_mul_(lim, bound)
        torch._foreach_add_(lim, 0.1)                               # bound * sqrt(v_hat) + 0.1
        grads = [p.grad for p in ps]
        torch._foreach_minimum_(grads, lim)
        torch._foreach_maximum_(grads, torch._foreach_neg(lim))     # clamp to [-lim, lim]

def warmup_lr(lr, step, warmup):
    """Linear warm-up from 0 at step 0 (the authors' schedule: their first step runs at lr 0)."""
    return lr * min(1.0, step / warmup) if warmup else lr

def step_seed(seed, step, rank):
    """Every (step, rank) has its own seed: a resumed run draws the numbers a straight run draws."""
    return (seed * 1_000_003 + step * 4099 + rank * 7) % (2 ** 62)

def train_step(method, net, opt, batch, lr, clip, world=1, signum=0):
    """One optimiser step on method.loss(**batch) -> (logs, ok, signum). A step whose loss or
    gradient norm is non-finite on any rank is skipped (ok False); the same all-reduce gives every
    rank the largest stop-signal number of any rank."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss, logs = method.loss(**batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()                      # even when NaN: every rank must join the all-reduce
    allreduce_grads(net.parameters(), world)
    gn = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip > 0 else math.inf)
    logs.update(lr=lr, grad_norm=float(gn))
    bad = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
    bad, signum = all_max([bad, signum], loss.device, world)        # the step's one all-reduce
    if not bad:
        opt.step()
    return logs, not bad, int(signum)

@contextlib.contextmanager
def run_lock(out_dir, active=True):
    """One run per output folder: an exclusive flock on <out-dir>/.lock (which holds the run's pid
    for the reader). The kernel frees it when the process ends, however it ends; a second run
    exits 2 naming the lock file. DDP: rank 0 holds it (active) for all."""
    if not active:
        yield
        return
    prepare_out_dir(out_dir)
    path = os.path.join(out_dir, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            die(f"{path} is held by another run (pid {f.read().strip() or '?'}); wait for it to "
                f"end or choose another --out-dir")
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield                                   # closing the file releases the lock

def prepare_out_dir(path):
    probe = os.path.join(path, f".write_test_{os.getpid()}")            # one per DDP rank
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as e:
        die(f"cannot write to output folder {os.path.abspath(path)} ({e.strerror or e})")
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)

@contextlib.contextmanager
def atomic(path):
    """Write through a temporary name, then os.replace it onto `path`: a crash never leaves half a
    file. A full disk or a file-size limit: the temporary file removed, one line, exit 2."""
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"   # keeps the extension (np.savez, savefig)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:          # torch.save reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:120]
        die(f"cannot write {path} ({why}); disk full or a file-size limit?")

TEMP_EXTS = (".pt", ".json", ".jsonl", ".png", ".npz")       # what atomic() writes here

def remove_temp_files(out_dir):
    """Remove what an interrupted write of ours left in out_dir, by its exact name: atomic()'s
    X.ext.tmp.ext (X.ext.tmp before it kept the extension), ext in TEMP_EXTS, and
    prepare_out_dir's .write_test_<pid>. Plain files only; anything else (a user's notes.tmp.txt,
    a folder eval.tmp/) stays."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        ours = any(name.endswith(tail) and len(name) > len(tail)
                   for e in TEMP_EXTS for tail in (f"{e}.tmp{e}", f"{e}.tmp"))
        probe = name.startswith(".write_test_") and name[len(".write_test_"):].isdigit()
        if (ours or probe) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.remove(path)

def strict_json(obj, **kw):
    """json.dumps that writes strict JSON: a NaN or infinity becomes null, and its key path and
    value are listed under "non_finite" ({"loss": null, "non_finite": {"loss": "nan"}})."""
    bad = {}

    def clean(v, at):
        if isinstance(v, float) and not math.isfinite(v):
            bad[at] = str(float(v))                                   # 'nan', 'inf', '-inf'
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{at}[{i}]") for i, x in enumerate(v)]
        return v
    obj = clean(obj, "")
    if bad and isinstance(obj, dict):
        obj = {**obj, "non_finite": {**obj.get("non_finite", {}), **bad}}
    return json.dumps(obj, allow_nan=False, **kw)

def write_json(out_dir, name, obj):
    with atomic(os.path.join(out_dir, name)) as tmp, open(tmp, "w") as f:
        f.write(strict_json(obj, indent=1))

def sig(v, digits=7):
    """A float to `digits` significant digits for metrics.jsonl (a warm-up lr of 1e-8 stays)."""
    return float(f"{v:.{digits}g}")

def report(out_dir, name, obj):
    """A mode's result: <out-dir>/<name> and the same JSON on stdout."""
    write_json(out_dir, name, obj)
    print(strict_json(obj))

class Logger:
    """Plain-text log (stdout + <out>/train.log) and JSON-lines metrics, rank 0 only."""

    def __init__(self, out_dir, active=True):
        self.active, self.out_dir = active, out_dir
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def append(self, path, text):
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as e:
            die(f"cannot write {path} ({e.strerror or e}); disk full or a file-size limit?")

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            self.append(os.path.join(self.out_dir, "train.log"), msg + "\n")

    def metrics(self, rec):
        if self.active:
            self.append(self.metrics_path, strict_json(rec) + "\n")

    def truncate_metrics(self, upto):
        """On (re)start at step `upto`: drop records past it (no duplicate steps on resume)."""
        if self.active and os.path.exists(self.metrics_path):
            keep = [r for r in self.read_metrics() if r.get("step", 0) <= upto]
            with atomic(self.metrics_path) as tmp, open(tmp, "w") as f:
                f.writelines(strict_json(r) + "\n" for r in keep)

    def read_metrics(self, phase=None):
        """The records of `phase` (all of them when phase is None or a record has no phase)."""
        if not os.path.exists(self.metrics_path):
            return []
        recs, bad = [], []
        with open(self.metrics_path, errors="replace") as f:
            for i, line in enumerate(f, 1):
                try:
                    r = json.loads(line) if line.strip() else {}
                except ValueError:                  # kill -9 or a full disk mid-append
                    r = None
                if isinstance(r, dict):
                    recs += [r] if r else []
                else:
                    bad.append(str(i))
        if bad:
            print(f"{self.metrics_path}: dropped unreadable line {', '.join(bad[:5])} (a write cut "
                  f"short by kill -9 or a full disk?); kept the other {len(recs)} records")
        for r in recs:                                      # strict_json's nulls: NaN, inf again
            r.update((k, float(v)) for k, v in r.pop("non_finite", {}).items() if k in r)
        return [r for r in recs if phase is None or r.get("phase", phase) == phase]

def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC (the .npz layout eval_fid.py reads)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()

def save_grid(x, path, nrow=8):
    import torchvision.utils as vu
    with atomic(path) as tmp:
        vu.save_image((x.float().clamp(-1, 1) + 1) / 2, tmp, nrow=nrow)

def pyplot():
    """matplotlib.pyplot without a display, imported on first use (the method needs none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def save_figure(fig, path):
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    pyplot().close(fig)

def plot_losses(records, path, title, keys=("loss", "cov", "cos", "grad_x2", "poincare_ratio")):
    """The loss terms of the whole run against the step (symlog scale: they change sign)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set(xlabel="step", title=title)
    ax.set_yscale("symlog", linthresh=1e-3)
    if ax.lines:
        ax.legend()
    save_figure(fig, path)

def generate(method, n, shape, device, batch, solver="rk45", x0=None, strict=True,
             progress=False, n_classes=0, **kw):
    """n images from N(0, I) (or x0) by the ODE (13) (euler / rk45, NFE counted) or by SGLD on
    Phi_B (kw: the sampler flags); a conditional Phi without labels draws random classes ->
    (images on the CPU, stats). Non-finite images: exit 3 (strict) or a warning (grids)."""
    phi = method.phi
    random_classes = isinstance(phi, Conditioned) and n_classes and phi.y is None
    outs, nfes, t_start = [], [], time.time()
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = (x0[i:i + b] if x0 is not None else torch.randn(b, *shape)).to(device)
        if random_classes:
            phi.y = torch.randint(n_classes, (b,), device=device)
        if solver == "sgld":
            x = method.langevin(z, kw["sgld_steps"], kw["sgld_step"], kw["sgld_temp"])
        else:
            x = method.sample(z, solver, kw["ode_steps"], kw["t0"], kw["t1"], kw["rtol"],
                              kw["atol"])
        nfes.append(method.last_nfe)
        outs.append((x.clamp(-1, 1) if kw["clamp"] else x).cpu())
        if progress:
            done, el = i + b, time.time() - t_start
            print(f"sampled {done}/{n} | {done / el:.1f} img/s | ETA "
                  f"{(n - done) * el / done / 60:.1f} min", flush=True)
    if random_classes:
        phi.y = None
    dt, x = time.time() - t_start, torch.cat(outs) if outs else torch.empty(0, *shape)
    n_bad = int((~torch.isfinite(x)).sum())
    msg = f"the {solver} sampler produced non-finite values ({n_bad} of {x.numel()})"
    if n_bad and strict:                   # never hand garbage on (FID would take it as valid)
        die(f"{msg}: the weights, or sampler settings that overflow "
            f"({OVERFLOW_FLAGS.get(solver, 'its flags')}); nothing written", 3)
    if n_bad:
        print("warning: " + msg, file=sys.stderr)
    return x, {"sampler": solver, "nfe_mean": float(np.mean(nfes)) if nfes else 0.0,
               "images_per_s": n / max(dt, 1e-9), "seconds": dt}

def cmd_train(args):
    """Eq. (27) on --dataset: resumable, NaN-guarded, signal-safe, DDP under torchrun."""
    rank, world, device = setup_distributed(args.device)
    main_rank, phase, ck = rank == 0, args.phase, args.ck_
    ckpt_path = os.path.join(args.out_dir, f"ckpt_{phase}.pt")        # always WRITE into --out-dir
    resumed = ck is not None and ck.get("phase") == phase
    start = int(ck["step"]) if ck is not None else 0
    phase_start = int(ck.get("phase_start", 0)) if resumed else start
    end = phase_start + args.steps
    if resumed and start >= end:                     # resume never goes back and changes nothing
        print(f"checkpoint is at step {start - phase_start} >= --steps {args.steps}: nothing to do")
        return []
    stop, log, batches = StopSignals(), Logger(args.out_dir, main_rank), None
    try:
        if main_rank:                          # temporary files of an interrupted write: garbage
            remove_temp_files(args.out_dir)
        ds = build_dataset(args, train=True)           # data first: a fault costs no network
        if args.class_cond and (args.num_classes or 0) < num_classes_of(ds):
            if args.num_classes is not None:
                die(f"--num-classes {args.num_classes}: the data has {num_classes_of(ds)} classes")
            args.num_classes = num_classes_of(ds)      # an image folder: its sub-folders
        torch.manual_seed(args.seed)                   # the same initial weights on every process
        if device.type == "cuda":                                     # TF32: safe for this loss
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        net = build_net(args, device)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = build_optimizer(net, args)
        ema_n = 0
        if ck is not None:                     # our run, or a converted file (a fresh Adam)
            load_states(ck, net, ema, opt)
            ema_n = int(ck.get("ema_n", start))
            log(f"{'resumed' if resumed else 'starting'} from {ck['path']} at step {start}")
        elif args.resume:
            log(f"--resume: no {ckpt_path}; starting afresh")
        if world > 1:                                  # rank 0's weights everywhere
            for t in list(net.state_dict().values()) + list(ema.state_dict().values()):
                dist.broadcast(t, 0)
        log.truncate_metrics(start)
        cond = Conditioned(net)                        # phi(x, t) with this batch's labels
        method = build_method(cond, args)              # the method, built once for the loop
        if args.compile:
            compile_method(method)
        grid_net = net if args.no_ema else ema         # the grids: EMA weights unless --no-ema
        grid_method = build_method(Conditioned(grid_net), args)
        batches = batch_iterator(ds, args.batch_size, args.seed, args.workers, rank, world, start)
        shape, flip = (args.channels, args.image_size, args.image_size), args.dataset in FLIP_SETS
        lr, warmup = args.lr, args.warmup
        clip = args.grad_clip if args.clip_mode == "norm" else 0.0   # std: build_optimizer
        decay, ema_warmup, which = args.ema_decay, args.ema_warmup, "raw" if args.no_ema else "ema"
        ncls, p_uncond = (args.num_classes, args.p_uncond) if args.class_cond else (0, 0.0)
        log(f"vpfb | recipe {args.recipe} | {args.dataset}: {len(ds)} images {shape} | "
            f"{args.arch} {count_params(net) / 1e6:.2f}M params | device {device} x {world} | "
            f"{'bf16 trunk' if bf16_trunk(args.amp, device) else 'fp32'} | threads "
            f"{torch.get_num_threads()} | steps {start}->{end} | batch {args.batch_size}/rank | "
            f"lr {lr} | loss { {k: getattr(args, k) for k in METHOD_FLAGS} } | EMA {decay}"
            f"{' with warm-up' if ema_warmup else ''}")

        def save(step):
            save_checkpoint(ckpt_path, net, ema, opt, step, args, phase=phase,
                            phase_start=phase_start, ema_n=ema_n)

        def grid(step):
            grid_net.eval()
            x, _ = generate(grid_method, min(64, args.num_samples), shape, device,
                            args.sample_batch, args.sampler, strict=False, n_classes=ncls,
                            **sampler_kwargs(args))
            net.train()
            path = os.path.join(args.out_dir, f"samples_{which}_{step:07d}.png")
            save_grid(x, path)
            log(f"grid at step {step}: {which} weights ({ema_n} EMA updates), {args.sampler} "
                f"-> {path}")

        n_bad, n_good, t_last, s_last = 0, 0, time.time(), start
        net.train()
        for step in range(start, end):
            torch.manual_seed(step_seed(args.seed, step, rank))   # noise, t, dropout, flips
            x, y = next_batch(batches, device, flip)
            # ---- the algorithm: one step of Eq. (27) ----
            if ncls:                                   # labels, a share replaced by the null class
                cond.y = torch.where(torch.rand(y.shape[0], device=device) < p_uncond, ncls, y)
            lr_now = warmup_lr(lr, step, warmup)                       # linear warm-up from step 0
            logs, ok, signum = train_step(method, net, opt, dict(xbar=x), lr_now, clip, world,
                                          stop.signum or 0)
            if ok:
                ema_update(ema, net, ema_decay_at(decay, ema_n, ema_warmup))
                ema_n, n_good = ema_n + 1, n_good + 1
            # ---- engineering: NaN guard, logs, checkpoints, signals, grids ----
            done = step + 1
            n_bad = 0 if ok else n_bad + 1
            if not ok:
                log(f"step {done}: non-finite loss or gradient ({logs['loss']:.4g}, "
                    f"{logs['grad_norm']:.4g}); skipped ({n_bad} in a row)")
            if n_bad >= 10:
                kept = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
                die(f"{n_bad} non-finite steps in a row at step {done}; stopped; last good "
                    f"checkpoint: {kept}", 3)
            rec = {"step": done, "phase": phase, **{k: sig(v) for k, v in logs.items()}}
            if args.log_every and (done % args.log_every == 0 or done == end):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall, n = time.time() - t_last, max(done - s_last, 1)
                ms, ips = 1000 * wall / n, n * args.batch_size * world / max(wall, 1e-9)
                rec.update(ms_per_iter=round(ms, 2), images_per_s=round(ips, 1))
                log(f"step {done}/{end} | " + " ".join(f"{k} {v:.4g}" for k, v in logs.items())
                    + f" | {ms:.1f} ms/it | {ips:.1f} img/s | ETA "
                    f"{(end - done) * wall / n / 60:.1f} min")
                t_last, s_last = time.time(), done
            log.metrics(rec)
            if signum:
                if main_rank:
                    save(done)
                    cmd = shlex.join(["python", os.path.basename(__file__)]
                                     + [a for a in args.argv_ if a != "--resume"])
                    log(f"stopped at step {done} by {signal.Signals(signum).name}; checkpoint "
                        f"{ckpt_path}; resume: {cmd} --resume")
                sys.exit(128 + signum)
            if main_rank and args.save_every and done % args.save_every == 0 and done < end:
                save(done)
            if main_rank and args.sample_every and done % args.sample_every == 0 < end - done:
                grid(done)
        if end > start:        # no finite step, or weights whose output is not finite: exit 3
            net.eval()                           # no dropout: the check draws no random numbers
            with torch.no_grad():
                t = torch.full((x.shape[0],), 0.5, device=device)
                outs = [Conditioned(m, cond.y)(x, t) for m in (net, ema)]
            net.train()
            no_good, inf_out = all_max([n_good == 0, not all(o.isfinite().all() for o in outs)],
                                       device, world)
            if no_good or inf_out:
                why = ("no step was finite (every loss or gradient NaN / inf)" if no_good else
                       "the trained weights give non-finite outputs (an update overflowed)")
                kept = ckpt_path if os.path.exists(ckpt_path) else "none written"
                die(f"{why} in steps {start + 1}-{end}; no final checkpoint (last: {kept}); "
                    f"check {OVERFLOW_FLAGS['train']}", 3)
        records = log.read_metrics(phase) if main_rank else []
        if main_rank:
            save(end)
            if records:
                plot_losses(records, os.path.join(args.out_dir, f"loss_{phase}.png"),
                            "VPFB, Eq. (27)")
            if args.num_samples and end > start:
                grid(end)
            summary = {"phase": phase, "steps": end, "params": count_params(net),
                       "final": records[-1] if records else None}
            if device.type == "cuda":
                summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            write_json(args.out_dir, f"summary_{phase}.json", summary)
            log(f"saved {ckpt_path}")
        if world > 1:
            dist.barrier()
    finally:
        stop.restore()
        getattr(batches, "_shutdown_workers", lambda: None)()   # workers ignore SIGTERM: stop them
        if dist.is_initialized():
            dist.destroy_process_group()
    return records[start - end:] if records and end > start else []

# ==== 5. Checkpoints ====
# A plain dict for torch.load(weights_only=True): {"format", "model", "ema", "opt", "step", "phase",
# "phase_start", "ema_n", "args"}, the weights of the network `net` under "model". ckpt_<phase>.pt,
# written through a temporary name (atomic): a crash never leaves half a checkpoint.
FORMAT = "vpfb/v2"      # v2: our U-Net embeds t (v1: 1000 t; those files are refused)

def save_checkpoint(path, net, ema, opt, step, args, **extra):
    state = {"format": FORMAT, "model": net.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict() if opt is not None else None, "step": int(step),
             "args": args_to_dict(args), **extra}
    with atomic(path) as tmp:
        torch.save(state, tmp)

def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True); a missing or corrupt file is one line and exit code 2."""
    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({type(e).__name__})")

def load_checkpoint(path):
    """Our checkpoint dict (+ "path"), older flag names mapped; an authors' file: one line."""
    ck = read_checkpoint(path)
    if is_authors_checkpoint(ck):
        die(f"{path} is an authors' checkpoint: convert it once with "
            f"python vpfb_convert.py {shlex.quote(path)} OUT.pt, then pass --ckpt OUT.pt")
    if not isinstance(ck, dict) or ck.get("format") not in (FORMAT, "vpfb/v1"):
        fmt = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        die(f"{path} is not a VPFB checkpoint (format {fmt!r}, not {FORMAT!r})")
    saved = ck.setdefault("args", {})                     # files written before the renames
    for old, new in (("channel_mult", "ch_mult"), ("num_res_blocks", "res_blocks"),
                     ("net", "unet"), ("model", "arch")):
        if old in saved:
            saved.setdefault(new, saved.pop(old))
    saved.setdefault("unet", "ours")
    if ck["format"] == "vpfb/v1" and saved.get("arch") == "unet" and saved["unet"] == "ours":
        die(f"{path}: a vpfb/v1 checkpoint of our U-Net, which then embedded 1000 t; it embeds t "
            f"now, so these weights mean another Phi: train again")
    saved.setdefault("channels", 1 if saved.get("dataset") == "mnist" else 3)
    if saved.get("image_size") is None:
        saved["image_size"] = 64 if saved.get("dataset") == "celeba64" else 32
    if saved.get("class_cond") and saved.get("num_classes") is None:   # rows - the null class
        head = "cemb.weight" if saved["arch"] == "unet" else "head.weight"
        saved["num_classes"] = ck["ema"][head].shape[0] - 1
    row = recipe_row(saved["recipe"], saved.get("dataset"), "main") if saved.get(
        "recipe") in RECIPES else {}
    for k, v in row.items():                                           # recipe keys left at None
        if saved.get(k, 0) is None:
            saved[k] = v
    ck.setdefault("ema_n", ck.pop("ema_updates", ck.get("step", 0)))
    ck.setdefault("phase", "main")
    ck["path"] = path
    return ck

def load_states(ck, net, ema=None, opt=None):
    """Weights (and EMA, optimiser state where the file has one) into the built modules."""
    try:
        net.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if opt is not None and ck.get("opt"):
            opt.load_state_dict(ck["opt"])
    except (RuntimeError, KeyError, ValueError) as e:
        die(f"{ck.get('path')} does not fit the network its flags describe "
            f"({type(e).__name__}: {str(e).splitlines()[0][:150]})")

def net_from_checkpoint(ck, args, device):
    """The checkpoint's network (args hold its architecture), EMA weights unless --no-ema."""
    net = build_net(args)
    load_states({"model": ck["model" if args.no_ema else "ema"], "path": ck["path"]}, net)
    return engineer(net, device, args.amp, args.channels_last).eval().requires_grad_(False)

# An authors' file (https://github.com/ljun0004/VAPO, README "Checkpoints": score_sde-style dicts)
# is converted once into ours by vpfb_convert.py; --ckpt refuses it with that command.
def is_authors_checkpoint(ck):
    """True for a dict as the authors' code writes it (score_sde style), False for ours."""
    return (isinstance(ck, dict) and "format" not in ck and isinstance(ck.get("model"), dict)
            and isinstance(ck.get("ema"), dict)
            and isinstance(ck["ema"].get("shadow_params"), (list, tuple)) and "step" in ck)

# ==== 6. Sampling ====
def eval_setup(args):
    """Device, the checkpoint's network (EMA unless --no-ema) and the method with the settings this
    mode reads, each printed once with where it came from (flag / checkpoint / recipe)."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)                          # --seed: the same samples every run
    net = net_from_checkpoint(args.ck_, args, device)
    method = build_method(Conditioned(torch.compile(net) if args.compile else net), args)
    settings = {k: getattr(args, k) for k in args.reads_}
    settings["weights"] = "raw" if args.no_ema else "ema"
    src = {k: args.sources_.get(k, "default") for k in args.reads_}
    print(f"{args.mode} with {args.ck_['path']}: " + ", ".join(
        f"{k} {v} ({src[k]})" if k in src else f"{k} {v}" for k, v in settings.items()), flush=True)
    return device, net, method, {"ckpt": args.ck_["path"], "settings": settings, "from": src}

def draw(method, args, device, n, x0=None, progress=False):
    """n samples with the mode's sampler settings (random classes for a conditional Phi)."""
    return generate(method, n, (args.channels, args.image_size, args.image_size), device,
                    args.sample_batch, args.sampler, x0, True, progress, args.num_classes or 0,
                    **sampler_kwargs(args))

def cmd_sample(args):
    """--num-samples ODE / SGLD samples -> samples.npz ("images" uint8 NHWC, eval_fid.py), .png."""
    device, net, method, info = eval_setup(args)
    x, st = draw(method, args, device, args.num_samples, progress=True)
    out = os.path.join(args.out_dir, "samples.npz")
    with atomic(out) as tmp:
        np.savez(tmp, images=to_uint8(x))
    save_grid(x[:64], os.path.join(args.out_dir, "samples.png"))
    report(args.out_dir, "samples.json", {**info, "n": len(x), **st})
    return to_uint8(x)

# ==== 7. Arguments and main ====
DATASETS = ("cifar10", "celeba64", "mnist", "folder", "npz", "fake", "svhn", "cifar100")
MODES = {"train": cmd_train, "sample": cmd_sample}     # vpfb_experiments.py: the paper's others

# --recipe sets these flags (a typed flag, then a checkpoint's value, wins); steps and EMA decay
# per phase (VPFB has one: main). The parser's own defaults of the method's flags are VPFB's
# (section 1; a test checks that they agree). "paper": our training numbers (the paper gives
# none); "authors": AUTHORS, their U-Net and their configs/homotopy/cifar10.py (batch 64, warm-up
# 5k, element-wise clipping, 2M iterations); "ours": OURS, trained as "paper".
RECIPES = {"paper": dict(lr=1e-4, warmup=5000, batch_size=128, steps_main=400_000,
                         ema_decay_main=0.9999, grad_clip=1.0, clip_mode="norm", p_uncond=0.1,
                         unet="ours"),
           "authors": dict(AUTHORS, batch_size=64, steps_main=2_000_000, grad_clip=3.0,
                           clip_mode="std", p_uncond=0.2, unet="authors"),
           "ours": dict(OURS)}
DATASET_ROWS = {}
METHOD_FLAGS = ("kappa", "eta", "lam_cos", "lam_gx", "lam_gt", "cov_form", "cos_form", "weight_on",
                "grad_norm", "bfactor")
# The flags whose values can overflow the numbers: the one line of a non-finite run names them.
OVERFLOW_FLAGS = {"train": "--lr, --grad-clip, --kappa, --eta, --lam-cos, --lam-gx, --lam-gt",
                  "sgld": "--sgld-step, --sgld-temp, --bfactor, --t-inf, --t-max",
                  "euler": "--ode-steps, --t0, --t1", "rk45": "--rtol, --atol, --t0, --t1"}

def recipe_row(recipe, dataset, phase):
    """The flags --recipe sets for --dataset's row and --phase."""
    row = {**RECIPES["paper"], **RECIPES[recipe], **DATASET_ROWS.get(dataset, {})}
    return {**{k: v for k, v in row.items() if not k.startswith(("steps_", "ema_decay_"))},
            "steps": row[f"steps_{phase}"], "ema_decay": row[f"ema_decay_{phase}"]}

# Which flags a mode reads. The network's flags always come from the checkpoint (a typed
# one that differs is an error); a typed flag the mode does not read is a one-line warning.
RUN_FLAGS = {"mode", "out_dir", "device", "threads", "ckpt", "resume", "amp", "compile",
             "channels_last", "workers", "no_ema", "log_every", "save_every", "sample_every",
             "num_samples", "sample_batch"}              # this run's own: never from a checkpoint
ARCH_KEYS = ("arch", "unet", "model_size", "ch_mult", "res_blocks", "attn_res", "dropout",
             "wrn_depth", "class_cond", "num_classes", "image_size", "channels")
DATA_KEYS = ("dataset", "data_dir", "fake_size")
SAMPLER_KEYS = ("sampler", "ode_steps", "t0", "t1", "rtol", "atol", "sgld_steps", "sgld_step",
                "sgld_temp", "clamp")
PHI_B = ("t_max", "t_inf", "bfactor")                  # where and how Phi_B is read (Eq. 22)
MODE_SETTINGS = {          # what a mode reads (and prints) beyond the run flags and the network's
    "sample": SAMPLER_KEYS + PHI_B + ("num_samples", "sample_batch")}
PHASE_KEYS = set()                                     # VPFB has one phase: "main"
EVAL_READS = {"mode", "out_dir", "device", "threads", "seed", "ckpt", "amp", "compile",
              "channels_last", "workers", "no_ema", "sample_batch", *ARCH_KEYS}

def sampler_kwargs(args):
    """The sampler flags that generate() reads besides the sampler's name."""
    return {k: getattr(args, k) for k in SAMPLER_KEYS[1:]}

FLOAT32_MAX = float(torch.finfo(torch.float32).max)     # 3.4e38: beyond it, a float flag is inf

def _number(kind, ok, what):
    """An argparse type: parse with `kind`, reject NaN / inf, floats beyond float32's range (the
    tensors they scale would be inf) and values failing `ok`."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if kind is float and math.isfinite(v) and abs(v) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"expected {what} within float32's range (|x| <= "
                                             f"{FLOAT32_MAX:.4g}: the tensors'), got {s!r}")
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse

pos_int = _number(int, lambda v: v > 0, "an integer > 0")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")  # as numpy
pos_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_time_float = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")   # 1: g^2 = 0
rtol_float = _number(float, lambda v: v >= 100 * sys.float_info.epsilon,
                     "a number >= 2.22e-14 (100 x float64's eps: scipy's RK45 takes no less)")

def ints(s, flag, empty=False):
    """'1,2,2' -> (1, 2, 2) ('' -> () where `empty` allows it); --ch-mult and --attn-res stay
    strings, as checkpoints store them. An item that is not an integer >= 1, or an empty item
    ('1,,2' was read as 1,2; '' as a U-Net with no levels): one line, exit 2."""
    items = str(s).split(",") if str(s).strip() else []
    try:
        out = tuple(int(c) for c in items)
    except ValueError:
        out = (0,)
    if min(out, default=1) < 1 or not (out or empty):
        die(f"{flag} must be a {'' if empty else 'non-empty '}comma list of integers >= 1, "
            f"got {str(s)!r}")
    return out

def device_spec(s):
    """--device: auto, cpu, cuda or cuda:N, the devices the runs are written for (torch's others,
    meta, mps, xpu, ..., were tracebacks deep in a run)."""
    if s in ("auto", "cpu", "cuda") or (s[:5] == "cuda:" and s[5:].isascii() and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        die(f"{message} (see --help)")

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default; a flag whose default is derived says so in its help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

def build_parser(recipe="authors", modes=MODES):
    """The flags, with `recipe`'s values as defaults (--help shows the default recipe's)."""
    p = Parser(description="VPFB: Variational Potential Flow Bayes (Loo et al., arXiv:2504.16262): "
               f"{', '.join(modes)}. [r] = set by --recipe (shown: {recipe}'s).",
               formatter_class=Help, allow_abbrev=False)
    a, bool_opt = p.add_argument, argparse.BooleanOptionalAction
    a("--mode", default="train" if "train" in modes else None, required="train" not in modes,
      choices=modes, help="what to do")
    a("--recipe", default="authors", choices=RECIPES, help="authors' code, the paper, or ours")
    a("--dataset", default="cifar10", choices=DATASETS, help="training / evaluation images")
    a("--data-dir", default="data", help="dataset folder (npz: the .npz file, uint8 NHWC)")
    a("--image-size", type=pos_int, help="image side (celeba64 64; npz: the file's)")
    a("--channels", type=pos_int, help="channels (mnist 1; npz: the file's)")
    a("--fake-size", type=pos_int, default=512, help="number of FakeData images")
    a("--workers", type=nonneg_int, default=4, help="DataLoader processes (0 = main process)")
    a("--out-dir", help="output folder (default runs/vpfb_<dataset>); always written to")
    a("--device", type=device_spec, default="auto",
      help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a("--threads", type=nonneg_int, default=0,
      help="CPU threads (0: the free cores, i.e. the cores less the load average, at least 1)")
    a("--seed", type=seed_int, default=0, help="random seed (each step and rank derives its own)")
    a("--batch-size", type=pos_int, help="[r] per-process batch size (authors 64, ours 128)")
    a("--steps", type=nonneg_int, help="[r] training steps (authors 2M, ours 400k)")
    a("--lr", type=pos_float, help="[r] Adam learning rate")
    a("--betas", type=unit_float, nargs=2, default=(0.9, 0.999), help="Adam betas")
    a("--warmup", type=nonneg_int, help="[r] linear learning-rate warm-up steps")
    a("--grad-clip", type=nonneg_float, help="[r] gradient clipping (0 = off; authors 3, ours 1)")
    a("--clip-mode", choices=["norm", "std"], help="[r] norm; std (authors): +-(clip RMS + 0.1)")
    a("--ema-decay", type=unit_float, help="[r] EMA decay")
    a("--ema-warmup", action=bool_opt, default=True, help="min(decay, (1+n)/(10+n)); no: const")
    a("--no-ema", action="store_true", help="grids / sampling with the raw weights, not the EMA")
    a("--arch", default="unet", choices=["unet", "wrn"],
      help="network: time-varying U-Net Phi(x, t) or autonomous WideResNet Phi(x) (Sec. 4.2)")
    a("--unet", choices=["ours", "authors"], help="[r] U-Net variant (authors: their layers)")
    a("--model-size", type=pos_int, default=128, help="base channels (128 = the paper's U-Net)")
    a("--ch-mult", default="2,2,2", help="UNet channel multipliers per resolution level")
    a("--res-blocks", type=pos_int, default=4, help="UNet residual blocks per level")
    a("--attn-res", help="UNet attention resolutions (16; --unet authors: image size // 2)")
    a("--dropout", type=unit_float, default=0.3, help="dropout in the res blocks (authors 0.3)")
    a("--wrn-depth", type=pos_int, default=16, help="WideResNet depth (6n + 4)")
    a("--class-cond", action="store_true", help="class-conditional Phi(x, c) (for --mode compose)")
    a("--num-classes", type=pos_int, help="classes of --class-cond (default: the dataset's)")
    a("--p-uncond", type=unit_float, help="[r] share of null labels (authors 0.2, ours 0.1)")
    a("--kappa", type=nonneg_float, default=2.0, help="[r] w(t) = (1 - t)^kappa (paper 2, ours 1)")
    a("--t-end", type=pos_float, default=1.0, help="t ~ U(0, t_end)")
    a("--t-max", type=open_time_float, default=1.0 - 1e-5, help="stationarity: t clamped to t_max")
    a("--t-inf", type=open_time_float, help="time Phi_B (Eq. 22) is read at (default t_max)")
    a("--eta", type=nonneg_float, default=1e-4, help="[r] Poincare weight eta (paper 1e-4)")
    a("--lam-cos", type=nonneg_float, default=1.0, help="[r] weight of the cosine term")
    a("--lam-gx", type=nonneg_float, default=1.0, help="[r] weight of E||grad_x Phi||^2 (paper 1)")
    a("--lam-gt", type=nonneg_float, default=1.0, help="[r] weight of E(dPhi/dt)^2 (paper 1)")
    a("--cov-form", default="cov", choices=["cov", "corr", "stein"],
      help="[r] cov (paper), corr (authors), stein: cov by parts (ours)")
    a("--cos-form", default="paper", choices=["paper", "authors"],
      help="[r] cos or cos^t / D (authors)")
    a("--weight-on", default="cov", choices=["ritz", "cov"],
      help="[r] w(t) on cov + |grad|^2 (ours) or gamma (paper)")
    a("--grad-norm", default="sum", choices=["sum", "mean"],
      help="[r] |grad Phi|^2 summed (paper) or averaged (authors)")
    a("--bfactor", type=pos_float, default=2.0, help="[r] c in Phi_B, Eq. (22) (authors 4)")
    a("--sampler", default="rk45", choices=["euler", "rk45", "sgld"], help="sampler of the modes")
    a("--ode-steps", type=pos_int, default=100, help="Euler steps (and rk45 trajectory frames)")
    a("--rtol", type=rtol_float, default=1e-3, help="RK45 relative tolerance (authors 1e-3)")
    a("--atol", type=pos_float, default=1e-3, help="RK45 absolute tolerance (authors 1e-3)")
    a("--t0", type=nonneg_float, default=1e-5, help="ODE start time (authors 1e-5)")
    a("--t1", type=pos_float, default=1.0 - 1e-5, help="ODE end time (authors 1 - 1e-5)")
    a("--sgld-steps", type=nonneg_int, default=1000, help="SGLD steps on Phi_B")
    a("--sgld-step", type=pos_float, default=1e-5, help="SGLD step Delta (Sec. 4.6)")
    a("--sgld-temp", type=nonneg_float, default=1.0, help="SGLD temperature lambda (noise std)")
    a("--clamp", action="store_true", help="clamp samples to [-1, 1] at the end")
    a("--amp", default="auto", choices=("auto", "bf16", "none"), help="bf16 trunk (auto: on CUDA)")
    a("--compile", action="store_true",
      help="torch.compile the loss (via torch.func) and the potential for sampling")
    a("--channels-last", action="store_true", help="channels_last memory (faster convs on GPU)")
    a("--resume", action="store_true", help="resume from --ckpt, else <out-dir>/ckpt_<phase>.pt")
    a("--ckpt", help="checkpoint to read (authors' files: vpfb_convert.py); outputs: --out-dir")
    a("--log-every", type=nonneg_int, default=100, help="log every N steps (0 = off)")
    a("--save-every", type=nonneg_int, default=5000, help="checkpoint every N steps (0 = at end)")
    a("--sample-every", type=nonneg_int, default=5000,
      help="sample grid every N steps (0 = only at the end)")
    a("--num-samples", type=nonneg_int, default=64, help="samples to draw (50000 for FID)")
    a("--sample-batch", type=pos_int, default=256, help="batch size when sampling")
    p.set_defaults(**recipe_row(recipe, "cifar10", "main"), image_size=32, channels=3,
                   phase="main")                       # VPFB trains in one phase: "main"
    return p

def refuse_to_replace(args, phases):
    """A training run never replaces a run: without --resume, a folder that holds this phase's
    checkpoint, or a later phase's, is one line and exit 2, before any work."""
    for ph in phases[phases.index(args.phase):]:
        path = os.path.join(args.out_dir, f"ckpt_{ph}.pt")
        if os.path.isfile(path):
            die(f"{path} holds a run: --resume continues it, another --out-dir starts a new one")

def find_checkpoint(args):
    """The checkpoint a mode starts from and the flags it hands on, or (None, ()) for a fresh run:
    train --resume: the run's own ckpt_main.pt (it continues this run), else --ckpt (all its
    training flags); the other modes: --ckpt, else the run's ckpt_main.pt."""
    own = os.path.join(args.out_dir, f"ckpt_{args.phase}.pt")
    if args.mode == "train":
        if not args.resume:
            refuse_to_replace(args, ("main",))
        if not (args.resume and (args.ckpt or os.path.isfile(own))):
            return None, ()
        ck = load_checkpoint(own if os.path.isfile(own) else args.ckpt)
        skip = RUN_FLAGS | (set() if ck.get("phase") == args.phase else PHASE_KEYS)
        return ck, [k for k in ck["args"] if k not in skip]
    if not (args.ckpt or os.path.isfile(own)):
        die(f"no checkpoint in {args.out_dir} (train first or pass --ckpt)")
    ck = load_checkpoint(args.ckpt or own)
    return ck, [k for k in ck["args"] if k in ARCH_KEYS + DATA_KEYS + METHOD_FLAGS + SAMPLER_KEYS
                + ("recipe", "t_end", "t_max", "t_inf")]

def typed_flags(p, argv):
    """The flags argv types: what argparse returns with every default suppressed."""
    p._defaults.clear()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))

def parse_args(argv=None, parser=build_parser, settings=MODE_SETTINGS):
    """Flags -> args. Every setting follows one rule: a flag the user typed > the value
    stored in the checkpoint the mode reads > the recipe's, by argparse's own defaults: the recipe's
    values, then the checkpoint's, then one parse (args.sources_ says which gave each)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, typed = parser().parse_args(argv), typed_flags(parser(), argv)
    args.out_dir = args.out_dir or os.path.join("runs", f"vpfb_{args.dataset}")
    ck, keys = find_checkpoint(args)
    saved = {k: ck["args"][k] for k in keys if k not in typed and hasattr(args, k)}
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {ck['args'][k]})"
             for k in ARCH_KEYS if k in typed and k in keys and ck["args"][k] != getattr(args, k)
             and getattr(args, k) != "auto"]
    if clash:
        die(f"{ck['path']} holds another network; flags that differ from the checkpoint's: "
            f"{', '.join(clash)}")
    first = argparse.Namespace(**{**vars(args), **saved})
    p = parser(first.recipe)                                    # 1. the recipe's values
    row = dataset_row(first, saved)
    p.set_defaults(**row)
    p.set_defaults(**saved)                                     # 2. the checkpoint's
    args = p.parse_args(argv)                                   # 3. the typed flags
    args.out_dir, args.ck_, args.argv_ = first.out_dir, ck, argv
    args.sources_ = {**dict.fromkeys([*row, *METHOD_FLAGS], "recipe"),
                     **dict.fromkeys(saved, "checkpoint"), **dict.fromkeys(typed, "flag")}
    return resolve_args(args, typed, settings)

def dataset_row(args, saved):
    """The recipe's flags for --dataset and --phase and the image shape (npz: the file's, unless a
    checkpoint gives it)."""
    shape = dict(channels=1 if args.dataset == "mnist" else 3,
                 image_size=64 if args.dataset == "celeba64" else 32)
    if args.dataset == "npz" and "image_size" not in saved:
        c, s = load_npz(args.data_dir).tensors[0].shape[1:3]
        shape = dict(channels=c, image_size=s)
    return {**recipe_row(args.recipe, args.dataset, args.phase), **shape}

def resolve_args(args, typed=(), settings=MODE_SETTINGS):
    """The settings derived from others; bad combinations: exit 2; warnings of typed flags the mode
    does not read."""
    if args.dataset == "npz" and args.sources_.get("image_size") == "flag":
        s = load_npz(args.data_dir).tensors[0].shape[2]
        if args.image_size != s:
            die(f"--image-size {args.image_size}: the images of {args.data_dir} are {s} x {s}")
    halvings = len(ints(args.ch_mult, "--ch-mult")) - 1     # a bad list: one line, not later
    levels = [args.image_size >> k for k in range(halvings + 1)]     # the U-Net's resolutions
    if args.attn_res is None:              # a default that is no level here: no attention, said
        r = args.image_size // 2 if args.unet == "authors" else 16
        args.attn_res = str(r) if r in levels else ""
    if args.class_cond and args.num_classes is None:         # labels 0..K-1, K + 1 = "null"
        args.num_classes = (num_classes_of(load_npz(args.data_dir)) if args.dataset == "npz"
                            else {"cifar100": 100, "celeba64": 4, "folder": None}.get(args.dataset,
                                                                                      10))
    if args.arch == "unet" and args.image_size % 2 ** halvings:
        die(f"--image-size {args.image_size} must be a multiple of {2 ** halvings} (the U-Net "
            f"halves it {halvings} times for --ch-mult {args.ch_mult})")
    stray = [r for r in ints(args.attn_res, "--attn-res", empty=True) if r not in levels]
    if args.arch == "unet" and stray and args.sources_.get("attn_res") != "checkpoint":
        die(f"--attn-res {args.attn_res}: {', '.join(map(str, stray))} is no resolution of the "
            f"U-Net ({', '.join(map(str, levels))} at --image-size {args.image_size} and --ch-mult "
            f"{args.ch_mult}): it would get no attention; --attn-res= for none")
    for k in ("t_max", "t_inf"):                      # a checkpoint may hold t_max 1 too
        v = getattr(args, k)
        if v is not None and not 0 < v < 1:
            die(f"--{k.replace('_', '-')} {v} ({args.sources_.get(k, 'default')}) must be in "
                f"(0, 1): at t = 1, g^2 = 2 (1 - t) / t is 0 and Phi_B (Eq. 22) divides by it")
    if args.arch == "wrn" and (args.wrn_depth - 4) % 6:
        die(f"--wrn-depth must be 6n + 4 (10, 16, 22, 28 ...), got {args.wrn_depth}")
    if args.t1 <= args.t0:
        die(f"--t1 {args.t1} must be after --t0 {args.t0}: the ODE runs forward in time")
    if args.mode == "sample" and args.num_samples == 0:
        die("--num-samples 0 in --mode sample would write an empty samples.npz")
    if args.sgld_steps == 0 and (args.sampler == "sgld" or args.mode == "longrun"):
        die("--sgld-steps 0: the SGLD chains would hand back their noise starts as samples")
    pick_device(args.device)                      # an unusable device: one line before any work
    check_memory(args)
    check_network(args)
    reads = set(vars(args)) if args.mode == "train" else EVAL_READS | set(settings[args.mode])
    if args.mode == "train" and args.ck_ is None and not args.resume:
        reads.discard("ckpt")                               # training reads --ckpt only to resume
    if "out_dir" not in typed:
        reads.add("dataset")                    # it names the default --out-dir, runs/<x>_<dataset>
    for k in sorted(set(typed) - reads):
        print(f"warning: --{k.replace('_', '-')} has no effect in --mode {args.mode}"
              + (" without --resume" if k == "ckpt" else ""), file=sys.stderr)
    args.reads_ = settings.get(args.mode, ())
    return args

def check_network(args):
    """The network of the flags built and run on one image: sizes its layers cannot take (an odd
    --model-size, a zero width, an image smaller than a kernel, ...) are one line naming the flags,
    exit 2, before any work; they were tracebacks from inside torch. Above 2M parameters on the
    meta device (shapes only: no memory, no arithmetic), below for real on the CPU. An image
    folder's classes are counted later: 1 stands in."""
    nc = getattr(args, "num_classes", 0) or 1
    flags = argparse.Namespace(**{**vars(args), "num_classes": nc})
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")             # torch's on a layer of 0 channels: no line
            small = count_params(net_of(flags)) < 2_000_000
        # a small network runs faster for real on the CPU than through meta's Python kernels (0.3 s
        # a parse); its random initial weights must not move the run's random numbers
        with torch.device("cpu" if small else "meta"), torch.random.fork_rng(devices=[]), \
                torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, x = net_of(flags), torch.zeros(1, args.channels, args.image_size, args.image_size)
            net(x, torch.zeros(1))
    except NotImplementedError:                 # an op without a meta kernel: the run will tell
        return
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        named = " ".join(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ARCH_KEYS
                         if type(getattr(args, k)) in (int, str))          # the sizes and kinds
        die(f"the network cannot be built with {named} (torch: {str(e).splitlines()[0][:160]})")

def machine_memory(device):
    """Bytes the run can hold: the GPU's memory on CUDA, else the machine's RAM."""
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_properties(0).total_memory
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if hasattr(os, "sysconf") else float("inf"))

def check_memory(args, error=None):
    """The one memory check, one line and exit 2: before the network is built, a size whose
    activations cannot fit (a lower bound of one step: 4 bytes x base channels x pixels x batch x
    16 layers, over the machine's memory); during the run, the allocator's error."""
    batch = args.batch_size if args.mode == "train" else args.sample_batch
    need = 4 * args.model_size * args.image_size ** 2 * batch * 16
    have = machine_memory(args.device)
    if error is not None:
        why = f"out of memory on {args.device} ({str(error).splitlines()[0][:120]})"
    elif need > have:
        why = (f"--image-size {args.image_size} with --model-size {args.model_size} and batch "
               f"{batch} needs at least {need / 2**30:.0f} GiB of activations; this machine has "
               f"{have / 2**30:.0f} GiB")
    else:
        return
    die(f"{why}; try a smaller --batch-size / --sample-batch / --model-size")

def args_to_dict(args):
    """A plain dict of str/int/float/bool/None/list for the checkpoint (weights_only loads it)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if not k.endswith("_")}

def main(argv=None, parser=build_parser, modes=MODES, settings=MODE_SETTINGS):
    args = parse_args(argv, parser, settings)
    torch.set_num_threads(pick_threads(args.threads))
    try:
        with run_lock(args.out_dir, int(os.environ.get("RANK", "0")) == 0):
            return modes[args.mode](args)
    except KeyboardInterrupt:          # training saves on its own; other modes write at the end
        die(f"--mode {args.mode} interrupted: nothing new written, earlier outputs kept", 130)
    except RuntimeError as e:                           # torch.OutOfMemoryError is one
        if "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        check_memory(args, error=e)

if __name__ == "__main__":
    main()
