"""vpfb.py -- Variational Potential Flow Bayes (VPFB) on images, in one self-contained file.

Paper: "Learning Energy-Based Generative Models via Potential Flow: A Variational Principle Approach
to Probability Density Homotopy Matching" (Loo et al., TMLR 2025, arXiv:2504.16262). Authors' code:
https://github.com/ljun0004/VAPO. One scalar potential Phi(x, t) is learned so that the potential
flow dx/dt = +grad_x Phi (Eq. 13) carries N(0, I) noise at t = 0 to the data at t = 1; the loss
(Eq. 27) is a Deep Ritz form of the density-weighted Poisson equation (16). At the stationary end
t_max the same potential gives a Boltzmann energy Phi_B (Eq. 22) for SGLD sampling and OOD scores.

Where the equations live (section 1): Schedule = Prop. 1 kernel (Eq. 8), innovation (Eq. 12) and
SDE coefficients (Eq. 18); VPFB.loss = Eq. (27), one method per term; VPFB.sample = the ODE (13);
VPFB.boltzmann_energy = Eq. (22); sgld = Sec. 4.6. Section 2: the networks Phi(x, t) and Phi(x).
Everything below the ENGINEERING line is plumbing. Each paper-vs-code choice is a flag; --recipe
paper / authors switches them all at once (README, "Paper vs code").

How to run (every mode writes into --out-dir, default runs/vpfb_<dataset>):
    python vpfb.py --dataset cifar10                        # train the time-varying U-Net
    python vpfb.py --dataset cifar10 --resume               # continue from <out-dir>/ckpt.pt
    torchrun --nproc_per_node 4 vpfb.py --dataset cifar10   # multi-GPU
    python vpfb.py --mode sample --num-samples 50000        # samples.npz (uint8 NHWC), eval_fid.py
    python vpfb.py --dataset npz --data-dir digits.npz --ch-mult 1,2 --model-size 32   # any images
    python vpfb.py --dataset fake --model-size 8 --image-size 8 --steps 2             # smoke run
Other modes: interp, nn, hist, ood, longrun, compose, benchmark (see --help).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
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

def _center(v):
    return v - v.mean()

class VPFB:
    """The method: a scalar potential Phi(x, t) whose gradient is the velocity dx/dt = grad_x Phi,
    Eq. (13). phi(x, t) takes x (B, ...) and t (B,) and returns (B,); an autonomous Phi(x) ignores
    t. Defaults are ours, [paper / authors' code] where they differ (README, "Paper vs code"):
      kappa      w(t) = (1 - t)^kappa, Sec. 3.5 [1; paper > 1 (2 here), authors 2 in effect]
      t_end      t ~ U(0, t_end) (Eq. 26); t_max: t is clamped to t_max (stationarity) [1, 1-1e-5]
      eta        Poincare term eta E[Phi^2] of Eq. (27) [1e-4; authors 0: only logged]
      lam_cos, lam_gx, lam_gt   weights of -cos, E||grad_x Phi||^2, E(dPhi/dt)^2 [1, 1, 0.01;
                 paper 1, 1, 1; authors 1, 0.5, 0.1]: E(dPhi/dt)^2 biases the flow, so it is small
      cov_form   Cov[Phi, w gamma] [stein: by parts, -2 E[w grad Phi . v]; paper cov; authors corr]
      cos_form, weight_on, grad_norm   the term's paper / authors' form (its method)
      bfactor    c in Phi_B = (c Phi + f ||x||^2) / g^2, Eq. (22) [2, from the ODE (19); paper 4]
      t_inf      where Phi_B is read off [None = t_max]"""

    def __init__(self, phi, autonomous=False, kappa=1.0, t_end=1.0, t_max=1.0 - 1e-5, eta=1e-4,
                 lam_cos=1.0, lam_gx=1.0, lam_gt=0.01, cov_form="stein", cos_form="paper",
                 weight_on="ritz", grad_norm="sum", bfactor=2.0, schedule=None, t_inf=None):
        for name, val, ok in (("cov_form", cov_form, ("cov", "corr", "stein")),
                              ("cos_form", cos_form, ("paper", "authors")),
                              ("weight_on", weight_on, ("ritz", "cov")),
                              ("grad_norm", grad_norm, ("sum", "mean"))):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")
        self.phi, self.autonomous = phi, bool(autonomous)
        self.kappa, self.t_end, self.t_max = float(kappa), float(t_end), float(t_max)
        self.eta, self.lam_cos, self.lam_gx, self.lam_gt = (float(eta), float(lam_cos),
                                                            float(lam_gx), float(lam_gt))
        self.cov_form, self.cos_form = cov_form, cos_form
        self.weight_on, self.grad_norm = weight_on, grad_norm
        self.bfactor = float(bfactor)
        self.t_inf = None if t_inf is None else float(t_inf)
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
        t = t.to(xbar.dtype).clamp(max=self.t_max)           # stationarity beyond t_max, Sec. 3.5
        mu, sig, dmu, dsig = (_bdim(c, xbar) for c in self.schedule.kernel_and_rates(t))
        x = (mu * xbar + sig * eps).detach().requires_grad_(True)   # x ~ rho(x|xbar, t), Prop. 1
        v = dmu * xbar + dsig * eps                          # Eq. (20): v = xbar - eps for OT-FM
        tl = t.detach().clone().requires_grad_(not self.autonomous)   # dPhi/dt at fixed x
        phi = self.phi(x, tl).reshape(-1)                    # Phi(x, t)  (B,)
        gx, gt = self.gradients(phi, x, tl)                  # grad_x Phi (B, ...), dPhi/dt (B,)
        w = (1 - t) ** self.kappa                            # w(t) = (1 - t)^kappa, Sec. 3.5
        cov = self.cov_term(phi, x, xbar, eps, t, w, gx, v)  # Cov[Phi, w gamma]
        cos = self.cos_term(gx, v, t)                        # cos(grad_x Phi, v)
        ritz = self.ritz_term(gx, w)                         # E ||grad_x Phi||^2
        dphidt2 = gt.pow(2).mean()                           # E (dPhi/dt)^2
        phi2 = phi.pow(2).mean()                             # E Phi^2 (Poincare)
        lam_cos, lam_gx, lam_gt, eta = self.lam_cos, self.lam_gx, self.lam_gt, self.eta
        loss = cov - lam_cos * cos + lam_gx * ritz + lam_gt * dphidt2 + eta * phi2   # Eq. (27)
        logs = dict(loss=loss, cov=cov, cos=cos, grad_x2=ritz, grad_t2=dphidt2, phi2=phi2,
                    poincare_ratio=_sqnorm(gx).mean() / (phi2 + 1e-12))   # Fig. 10 monitor
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def gradients(self, phi, x, tl):
        """grad_x Phi and dPhi/dt with create_graph=True: the loss differentiates them again."""
        inputs = [x] if self.autonomous else [x, tl]
        grads = torch.autograd.grad(phi.sum(), inputs, create_graph=True, allow_unused=True)
        gt = grads[1] if len(grads) > 1 and grads[1] is not None else torch.zeros_like(phi)
        return grads[0], gt

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
        return (_center(phi) * _center(w * G)).mean()        # Cov[Phi, w (gamma - gamma_bar)]

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
    def sample(self, x0, method="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
               return_traj=False):
        """Potential-flow ODE dx/dt = +grad_x Phi(x, t) (Eq. 13) from prior noise x0 at t0 to t1,
        "euler" or "rk45" (ode_solve). Past t_max Phi(x, t_max) acts, so t1 > 1 is long-run
        sampling (Sec. 4.6). NFE in self.last_nfe. Returns x, or (x, traj (K, B, ...))."""
        x, traj, self.last_nfe = ode_solve(self.grad_phi, x0, method, n_steps, t0, t1, rtol, atol,
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

    def langevin(self, x0, n_steps=100, step_size=1e-3, temperature=1.0, return_traj=False):
        """SGLD ascent on the Boltzmann energy Phi_B (Sec. 4.6); stationary law exp(Phi_B / T^2)."""
        x, traj, self.last_nfe = sgld(self.grad_boltzmann, x0, n_steps, step_size, temperature,
                                      return_traj)
        return (x, traj) if return_traj else x

# ---- samplers: plain functions of a gradient field (tests feed analytic fields)

def ode_solve(velocity, x0, method="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
              return_traj=False):
    """Integrate dx/dt = velocity(x, t) from t0 to t1 -> (x, traj or None, nfe). "euler": n_steps
    steps; "rk45": scipy's adaptive Dormand-Prince 5(4) on the flat batch in float64."""
    if method not in ("euler", "rk45"):
        raise ValueError(f"method must be euler|rk45, got {method!r}")
    x = x0.detach()
    if method == "euler":
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

def sgld(grad_energy, x0, n_steps=100, step_size=1e-3, temperature=1.0, return_traj=False):
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

# ==== 2. Networks ====
# Both networks return ONE number per image, Phi (B,). The authors' time-varying Phi is a U-Net
# read as a scalar through Phi(x, t) = 1/2 ||x - UNet(x, t)||^2 (>= 0); we use the same head. The
# autonomous Phi(x) is a WideResNet with a linear read-out of its pooled features. Both use SiLU
# (smooth: the loss differentiates grad_x Phi once more w.r.t. the weights) and GroupNorm, never
# BatchNorm, which would couple the images of a batch and make Phi_i depend on x_j.

def _groups(ch):
    """GroupNorm groups: 32 as usual, but at least 4 channels per group. With one channel per group
    the norm would remove the per-channel time embedding added just before it (tiny test nets)."""
    return math.gcd(32, max(1, ch // 4))

def _trunk_autocast(net, x):
    on = getattr(net, "amp", False) and x.is_cuda
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

def _norm(ch, groups=None):
    """GroupNorm with `groups` groups (the authors' nets: always 32), else the _groups rule."""
    return nn.GroupNorm(groups or _groups(ch), ch)

def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding of scale * t, (B,) -> (B, dim). scale = 1000 maps t in [0, 1] to the
    diffusion-style 0..1000 (ours); the authors embed the raw t (scale = 1)."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    ang = scale * t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], 1)

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time conditioning, GroupNorm-SiLU-dropout-conv, plus a skip.
    Conditioning: add the embedding before the second norm (ours), or with scale_shift=True the
    authors' FiLM form norm(h) * (1 + scale) + shift (the embedding gives 2 * cout numbers)."""

    def __init__(self, cin, cout, emb_dim, dropout, scale_shift=False, groups=None):
        super().__init__()
        self.scale_shift = scale_shift
        self.n1, self.c1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.n2, self.c2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]           # the time (and class) embedding
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.n2(h) * (1 + scale) + shift
        else:
            h = self.n2(h + e)
        h = self.c2(self.drop(F.silu(h)))
        return self.skip(x) + h

class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels, written out with softmax: it has a double backward
    (the flash / memory-efficient SDPA kernels do not), which the loss needs. heads: a fixed
    number (the authors: 1), else ch // head_dim; the qkv channels split as q | k | v, then heads
    (guided-diffusion's QKVAttention, as the authors' net)."""

    def __init__(self, ch, head_dim=64, heads=None, groups=None):
        super().__init__()
        self.heads = heads or max(1, ch // head_dim)
        self.norm = _norm(ch, groups)
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
    A guided-diffusion U-Net (defaults: the paper's size): per resolution `num_res` ResBlocks
    (attention at `attn_res`), a ResBlock-Attention-ResBlock middle, the mirror image up with skips.
    Keywords (defaults = ours; AUTHORS_UNET = their net): scale_shift (FiLM time conditioning),
    attn_heads (fixed heads, authors 1), conv_resample (strided conv down, nearest + conv up;
    authors: average pool, nearest), t_scale (embed t_scale * t; authors the raw t), stem_mult
    (stem gives base * mult[0] channels), norm_groups (authors 32), zero_out (output conv zero:
    Phi = 1/2 |x|^2 at start). `amp`: the trunk runs in bf16 on CUDA; the head stays fp32."""

    def __init__(self, in_ch=3, base=128, mult=(2, 2, 2), num_res=4, attn_res=(16,), dropout=0.3,
                 image_size=32, num_classes=0, *, scale_shift=False, attn_heads=None, head_dim=64,
                 conv_resample=True, t_scale=1000.0, stem_mult=False, norm_groups=None,
                 zero_out=False):
        super().__init__()
        self.amp = False
        emb = base * 4
        self.base, self.t_scale = base, t_scale
        self.temb = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        # class embedding with one extra "null" class (index num_classes): y=None -> Phi(x, t)
        self.num_classes = num_classes
        self.cemb = nn.Embedding(num_classes + 1, emb) if num_classes else None

        def res(cin, cout):
            return ResBlock(cin, cout, emb, dropout, scale_shift, norm_groups)

        def attn(c):
            return AttnBlock(c, head_dim, attn_heads, norm_groups)

        ch = base * mult[0] if stem_mult else base
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, res_px = nn.ModuleList(), [ch], image_size
        for i, m in enumerate(mult):
            for _ in range(num_res):
                blk = nn.ModuleList([res(ch, base * m)])
                ch = base * m
                if res_px in attn_res:
                    blk.append(attn(ch))
                self.down.append(blk)
                chans.append(ch)
            if i < len(mult) - 1:                                    # halve the resolution
                pool = nn.Conv2d(ch, ch, 3, 2, 1) if conv_resample else nn.AvgPool2d(2)
                self.down.append(nn.ModuleList([pool]))
                chans.append(ch)
                res_px //= 2
        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for j in range(num_res + 1):
                blk = nn.ModuleList([res(ch + chans.pop(), base * m)])
                ch = base * m
                if res_px in attn_res:
                    blk.append(attn(ch))
                if i > 0 and j == num_res:                           # double the resolution
                    blk.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    if conv_resample:
                        blk.append(nn.Conv2d(ch, ch, 3, padding=1))
                    res_px *= 2
                self.up.append(blk)
        self.out = nn.Sequential(_norm(ch, norm_groups), nn.SiLU(),
                                 nn.Conv2d(ch, in_ch, 3, padding=1))
        if zero_out:
            nn.init.zeros_(self.out[2].weight)
            nn.init.zeros_(self.out[2].bias)

    def _run(self, blk, h, emb):
        for layer in blk:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def unet(self, x, t, y=None):
        emb = self.temb(timestep_embedding(t, self.base, self.t_scale))
        if self.cemb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.cemb(y)
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
        with _trunk_autocast(self, x):
            u = self.unet(x, t, y)
        return 0.5 * (x - u.float()).flatten(1).pow(2).sum(1)       # Phi = 1/2 ||x - UNet(x, t)||^2

# The authors' network (configs/homotopy/cifar10.py, celeba.py of their repository): UNetPhi(3, 128,
# (2, 2, 2), 4, attn_res=(image_size // 2,), **AUTHORS_UNET), their 55,676,419 parameters.
AUTHORS_UNET = dict(scale_shift=True, attn_heads=1, conv_resample=False, t_scale=1.0,
                    stem_mult=True, norm_groups=32, zero_out=True)

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, stride, 1)
        self.n2, self.c2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, 1, 1)
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
        self.amp = False
        n = (depth - 4) // 6
        layers, ch = [nn.Conv2d(in_ch, width // 2, 3, padding=1)], width // 2
        for i, w in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                layers.append(WideBlock(ch, w, 2 if (j == 0 and i > 0) else 1, dropout))
                ch = w
        self.body = nn.Sequential(*layers, nn.GroupNorm(_groups(ch), ch), nn.SiLU())
        self.num_classes = num_classes
        self.head = nn.Linear(ch, num_classes + 1 if num_classes else 1)   # + a "null" read-out

    def forward(self, x, t=None, y=None):
        with _trunk_autocast(self, x):
            h = self.body(x).mean((2, 3))
        out = self.head(h.float())                                      # (B, classes + 1) or (B, 1)
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
# ==== 3. Data ====
# Images live in [-1, 1]; torchvision sets are downloaded into --data-dir (offline: one clear line).
def die(msg, code=2):
    """One line "error: ..." on stderr, no traceback; exit 2: bad input, 3: non-finite numbers."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

DATASETS = ["cifar10", "celeba64", "mnist", "folder", "npz", "fake"]    # training sets
OOD_SETS = ["svhn", "cifar100", "celeba", "interp"]                   # OOD sets (+ the test split)
FLIP_SETS = ("cifar10", "celeba64", "folder")                         # random horizontal flips
CELEBA_ATTRS = ("Male", "Smiling", "Young")             # classes 0, 1, 2 of --class-cond (3 = none)

def load_npz(path):
    """--dataset npz (`images` uint8 NHWC, optional `labels`) as float [-1, 1] NCHW tensors."""
    if not os.path.isfile(path):
        die(f"--dataset npz: --data-dir must be a .npz file; {os.path.abspath(path)} is not one")
    try:
        with np.load(path) as z:
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else np.zeros(len(images), np.int64)
    except (OSError, ValueError, KeyError, EOFError) as e:
        die(f"cannot read {path}: need a .npz with key 'images' ({type(e).__name__})")
    if images.dtype != np.uint8 or images.ndim != 4:
        die(f"{path}: 'images' must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return torch.utils.data.TensorDataset(x, torch.as_tensor(labels).long())

def build_dataset(args, train=True, name=None):
    """(image in [-1, 1], label) of args.dataset or `name` (the OOD sets). celeba64 and celeba:
    <data-dir>/celeba64/. Training flips are drawn in the training loop (per step), not here."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    name, root = name or args.dataset, args.data_dir
    if name == "npz":
        return load_npz(root)                                         # one file: no test split
    ch, size = args.channels, args.image_size
    norm = [T.ToTensor(), T.Normalize([0.5] * ch, [0.5] * ch)]                   # [0, 1] -> [-1, 1]
    resize = [T.Resize(size), T.CenterCrop(size)]
    gray = [T.Grayscale(ch)] if name == "mnist" or ch == 1 else []   # OOD sets for an MNIST model
    if name == "fake":
        return D.FakeData(size=args.fake_size, image_size=(ch, size, size), num_classes=10,
                          transform=T.Compose(norm), random_offset=0 if train else 10_000)
    if name in ("celeba64", "celeba", "folder"):
        path = os.path.join(root, "celeba64") if name != "folder" else root
        crop = [T.CenterCrop(140)] if name != "folder" else []     # CelebA: the 140 x 140 face crop
        try:
            ds = D.ImageFolder(path, transform=T.Compose(crop + resize + gray + norm))
        except (FileNotFoundError, OSError) as e:
            what = ("CelebA images (e.g. img_align_celeba/*.jpg) in a sub-folder"
                    if name != "folder" else "images in at least one sub-folder")
            die(f"no image folder at {os.path.abspath(path)} ({type(e).__name__}); "
                f"put {what} there")
        if name == "celeba64" and getattr(args, "class_cond", False):   # Sec. 4.3's attributes
            attr_file = os.path.join(path, "list_attr_celeba.txt")
            if not os.path.isfile(attr_file):
                die(f"--class-cond on celeba64 needs CelebA's attribute file at "
                    f"{os.path.abspath(attr_file)}")
            with open(attr_file) as fh:
                lines = fh.read().splitlines()
            cols = [lines[1].split().index(a) for a in CELEBA_ATTRS]
            attrs = {r[0]: [int(r[1 + c]) for c in cols] for r in map(str.split, lines[2:]) if r}
            ds.samples = [(p, attrs.get(os.path.basename(p), [-1] * 3)) for p, _ in ds.samples]
            ds.target_transform, ds.classes = celeba_label, list(CELEBA_ATTRS) + ["none"]
        return ds
    tf = T.Compose(resize + gray + norm)
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
        die(f"could not load {name} ({type(e).__name__}: {first}); "
            f"put {what} under {os.path.abspath(root)} or allow the download")

def celeba_label(attr):
    """A random positive attribute among Male, Smiling, Young (0, 1, 2), or 3 if none."""
    pos = [i for i, a in enumerate(attr) if a == 1]
    return pos[int(torch.randint(len(pos), ()))] if pos else 3

def num_classes_of(ds):
    if isinstance(ds, torch.utils.data.TensorDataset):                 # npz: labels 0 .. max
        return int(ds.tensors[1].max()) + 1
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

def batch_iterator(ds, args, rank=0, world=1, start_step=0):
    sampler = StepBatches(len(ds), args.batch_size, args.seed, rank, world, start_step)
    # own generator: making the iterator must not consume the global RNG (resume would shift noise)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers,
                                     pin_memory=torch.cuda.is_available(),
                                     persistent_workers=args.workers > 0,
                                     worker_init_fn=quiet_worker,
                                     generator=torch.Generator().manual_seed(args.seed + rank))
    return iter(dl)

def first_images(ds, n, batch=256):
    """The first n images of a dataset as one tensor (for nn / hist / ood)."""
    xs, got = [], 0
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False):
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]

# ==== 4. Training loop ====
# bf16 (--amp): only the network trunk (`net.amp`, CUDA); Phi, the loss, samplers, Adam and EMA
# stay fp32. DDP: DistributedDataParallel has no double backward (the loss differentiates grad_x
# Phi), so each process keeps a plain module and allreduce_grads averages the gradients.
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
    try:
        dev = torch.device(spec)
    except RuntimeError:
        die(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"device {spec} requested but CUDA is not available (use --device cpu)")
    return dev

def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(args.device)
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

def build_model(args, num_classes, device=None):
    """Phi from the flags (--net authors: their U-Net); with a device: on it, engineering set."""
    nc = num_classes if args.class_cond else 0
    if args.model == "unet":
        net = UNetPhi(args.channels, args.model_size, ints(args.ch_mult), args.res_blocks,
                      ints(args.attn_res), args.dropout, args.image_size, nc,
                      **(AUTHORS_UNET if args.net == "authors" else {}))
    else:
        net = WRNPhi(args.channels, args.model_size, args.wrn_depth, 0.0, nc)
    if device is None:
        return net
    return engineer(net, device, args.amp, args.channels_last)

def engineer(model, device, amp, channels_last=False):
    """On `device`, with the network's bf16-trunk (`amp`, section 2) and channels-last settings."""
    model = model.to(device)
    model.amp = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model

def build_vpfb(phi, args):
    return VPFB(phi, autonomous=(args.model == "wrn"), **loss_kwargs(args))

def ema_decay_at(decay, n, warmup=True):
    """Decay of EMA update number n: min(decay, (1 + n) / (10 + n)) with warm-up, else constant."""
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay

@torch.no_grad()
def ema_update(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta (one fused foreach op)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_e, b in zip(ema.buffers(), model.buffers()):
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
    """The authors' clip mode `std`: every gradient element is clipped to +-(bound * RMS + 0.1), the
    RMS being Adam's bias-corrected running sqrt(v_hat) from the steps before (none at step 1)."""
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            st = opt.state.get(p, {})
            if p.grad is None or float(st.get("step", 0)) < 1:
                continue
            lim = bound * torch.sqrt(st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))) + 0.1
            p.grad.copy_(torch.maximum(torch.minimum(p.grad, lim), -lim))

def step_seed(seed, step, rank):
    """Every (step, rank) has its own seed: a resumed run draws the numbers a straight run draws."""
    return (seed * 1_000_003 + step * 4099 + rank * 7) % (2 ** 62)

def train_step(model, net, opt, x, args, world, step, stop):
    """One step of Eq. (27) -> (logs, bad, signum). One all-reduce makes all ranks agree whether
    the loss or gradient was non-finite anywhere (then nothing is updated) and a signal came."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))      # linear warm-up (authors)
    for g in opt.param_groups:
        g["lr"] = lr
    loss, stats = model.loss(x)                                     # one Monte-Carlo batch
    opt.zero_grad(set_to_none=True)
    loss.backward()                      # even when NaN: every rank must join the all-reduce
    allreduce_grads(net.parameters(), world)
    clip = args.grad_clip if (args.grad_clip > 0 and args.clip_mode == "norm") else math.inf
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip))
    stats["lr"] = lr
    finite = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    bad, signum = all_max([not finite, stop.signum or 0], x.device, world)
    if not bad:
        if args.clip_mode == "std" and args.grad_clip > 0:
            clip_std_(opt, args.grad_clip)
        opt.step()
    return stats, bool(bad), int(signum)

class Logger:
    """Plain-text log (stdout + <out>/train.log) and JSON-lines metrics, rank 0 only."""

    def __init__(self, out_dir, active=True):
        self.active, self.out_dir = active, out_dir
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            with open(os.path.join(self.out_dir, "train.log"), "a") as f:
                f.write(msg + "\n")

    def metrics(self, rec):
        if self.active:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def truncate_metrics(self, upto):
        """On (re)start at step `upto`: drop records past it (no duplicate steps on resume)."""
        if self.active and os.path.exists(self.metrics_path):
            keep = [r for r in self.read_metrics() if r.get("step", 0) <= upto]
            with open(self.metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

    def read_metrics(self, phase=None):
        """The records of `phase` (all of them when phase is None or a record has no phase)."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            recs = [json.loads(s) for s in f if s.strip()]
        return [r for r in recs if phase is None or r.get("phase", phase) == phase]

def write_json(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=1)

def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC (the .npz layout eval_fid.py reads)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()

def save_grid(x, path, nrow=8):
    import torchvision.utils as vu
    vu.save_image((x.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow)

def plot_losses(records, path):
    """Loss curve of the whole run and the Poincare ratio E|grad Phi|^2 / E Phi^2 (Fig. 10)."""
    if not records:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = [h["step"] for h in records]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, sign in (("loss", 1), ("cov", 1), ("cos", -1)):
        ax[0].plot(s, [sign * h[key] for h in records], label=("-" if sign < 0 else "") + key)
    ax[0].set(xlabel="step", title="VPFB loss, Eq. (27)")
    ax[0].legend()
    ax[1].semilogy(s, [max(h["poincare_ratio"], 1e-12) for h in records])
    ax[1].set(xlabel="step", title="Poincare ratio E|grad Phi|^2 / E Phi^2")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def cmd_train(args):
    """Eq. (27) on --dataset; resumable, NaN-guarded, signal-safe, DDP under torchrun."""
    stop, batches = StopSignals(), None
    try:
        rank, world, device = setup_distributed(args)
        main_rank = rank == 0
        log = Logger(args.out_dir, main_rank)
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt")             # always WRITE into --out-dir
        if main_rank and os.path.exists(ckpt_path + ".tmp"):
            os.remove(ckpt_path + ".tmp")                             # a save that crashed
        torch.manual_seed(args.seed)                  # the same initial weights on every process
        if device.type == "cuda":                                     # TF32: safe for this loss
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        ds = build_dataset(args, train=True)
        ncls = num_classes_of(ds)
        net = build_model(args, ncls, device)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        step, n_ema, src = 0, 0, args.ckpt or ckpt_path               # READ from --ckpt if given
        if args.resume and (args.ckpt or os.path.isfile(src)):
            st = load_checkpoint(src)
            if is_authors_checkpoint(st):
                die(f"{src} is an authors' checkpoint: their optimizer state does not resume "
                    f"here; use it with --mode sample/ood/... --ckpt {src}")
            diff = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (checkpoint: {st['args'][k]!r})"
                    for k in ARCH_KEYS if st["args"].get(k, getattr(args, k)) != getattr(args, k)]
            if diff:
                die(f"{src} was trained with another architecture: {', '.join(diff)}")
            net.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
            step, n_ema = st["step"], st.get("ema_updates", st["step"])
            log(f"resumed from {src} at step {step}")
        elif args.resume:
            log(f"--resume: no checkpoint at {src}, starting from scratch")
        if world > 1:                                                 # rank 0's weights everywhere
            for t in list(net.state_dict().values()) + list(ema.state_dict().values()):
                dist.broadcast(t, 0)
        log.truncate_metrics(step)
        if main_rank:
            write_json(args.out_dir, "args.json", args_to_dict(args))
        cond = Conditioned(net)
        model = build_vpfb(cond, args)
        batches = batch_iterator(ds, args, rank, world, step)
        n_params = sum(p.numel() for p in net.parameters())
        log(f"vpfb: {args.model} Phi with {n_params / 1e6:.2f}M parameters on {device} x{world}, "
            f"{len(ds)} images of {args.dataset}, recipe {args.recipe}, loss {loss_kwargs(args)}")
        n_bad, t_last, s_last = 0, time.time(), step
        while step < args.steps:
            torch.manual_seed(step_seed(args.seed, step, rank))  # noise, t, dropout, flips, labels
            x, y = next(batches)
            x = x.to(device, non_blocking=True).float()
            if args.dataset in FLIP_SETS:
                flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
                x = torch.where(flip, x.flip(-1), x)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            cond.y = None
            if args.class_cond:                                 # labels, some replaced by "null"
                y = y.to(device)
                drop = torch.rand(y.shape[0], device=device) < args.p_uncond
                cond.y = torch.where(drop, torch.full_like(y, ncls), y)
            net.train()
            stats, bad, signum = train_step(model, net, opt, x, args, world, step, stop)
            step += 1
            if bad:                                             # NaN guard: the step was skipped
                n_bad += 1
                log(f"step {step}: non-finite loss or gradient ({stats['loss']:.4g}, "
                    f"{stats['grad_norm']:.4g}); skipped ({n_bad} in a row)")
                if n_bad >= 10:
                    kept = src if (args.resume and os.path.isfile(src)) else "none written yet"
                    kept = ckpt_path if os.path.isfile(ckpt_path) else kept
                    die(f"{n_bad} non-finite steps in a row at step {step}; stopped; last good "
                        f"checkpoint: {kept}", 3)
            else:
                n_bad = 0
                ema_update(ema, net, ema_decay_at(args.ema_decay, n_ema, args.ema_warmup))
                n_ema += 1
            if args.log_every and (step % args.log_every == 0 or step == args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall, n = time.time() - t_last, max(step - s_last, 1)
                ms, ips = 1000 * wall / n, n * args.batch_size * world / max(wall, 1e-9)
                eta = (args.steps - step) * wall / n / 60
                logs = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
                log(f"step {step}/{args.steps} | {logs} | {ms:.1f} ms/it | {ips:.1f} img/s | "
                    f"ETA {eta:.1f} min")
                t_last, s_last = time.time(), step
                log.metrics({"step": step, **stats, "ms_per_iter": ms, "images_per_s": ips,
                             "skipped": int(bad)})
            saving = args.save_every and step % args.save_every == 0
            if main_rank and (signum or saving or step == args.steps):
                save_checkpoint(ckpt_path, net, ema, opt, step, args, ema_updates=n_ema)
            if main_rank and (signum or step == args.steps):       # the whole run's curves
                plot_losses(log.read_metrics(), os.path.join(args.out_dir, "loss.png"))
            if signum:
                cmd = shlex.join(["python", "vpfb.py"] + [a for a in args.argv if a != "--resume"])
                log(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint "
                    f"{ckpt_path}; resume: {cmd} --resume")
                sys.exit(128 + signum)
            every = args.sample_every and step % args.sample_every == 0
            if main_rank and args.num_samples and (every or step == args.steps):   # 0: at the end
                which = "raw" if args.no_ema else "ema"
                xs, _ = generate(Conditioned(net if args.no_ema else ema), args, device,
                                 min(64, args.num_samples), x.shape[1:], "euler", n_classes=ncls,
                                 strict=False)
                save_grid(xs, os.path.join(args.out_dir, f"samples_{which}_{step:07d}.png"))
                log(f"grid samples_{which}_{step:07d}.png: {which.upper()} weights, Euler ODE")
    finally:
        stop.restore()
        getattr(batches, "_shutdown_workers", lambda: None)()   # workers ignore SIGTERM: stop them
    if world > 1:
        dist.destroy_process_group()
    return net, ema

# ==== 5. Checkpoints ====
# A plain dict {"format", "model", "ema", "opt", "step", "ema_updates", "args"} (weights_only
# loadable), written to <path>.tmp, then os.replace'd: a crash never leaves half a checkpoint.
FORMAT = "vpfb/v1"
ARCH_KEYS = ["model", "model_size", "ch_mult", "res_blocks", "attn_res", "dropout", "wrn_depth",
             "class_cond", "image_size", "channels", "recipe", "net"]

def save_checkpoint(path, net, ema, opt, step, args, **extra):
    state = {"format": FORMAT, "model": net.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict() if opt is not None else {}, "step": int(step),
             "args": args_to_dict(args), **extra}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True); a missing or corrupt file is one line and exit code 2."""
    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({type(e).__name__})")

def load_checkpoint(path):
    """Our checkpoint (old flag names mapped), or an authors' one as it is."""
    state = read_checkpoint(path)
    if is_authors_checkpoint(state):
        return state
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        die(f"{path!r} is not a VPFB checkpoint (format {fmt!r}, expected {FORMAT!r})")
    saved = state.setdefault("args", {})                 # checkpoints written before the renames
    for old, new in (("channel_mult", "ch_mult"), ("num_res_blocks", "res_blocks")):
        if old in saved:
            saved.setdefault(new, saved.pop(old))
    saved.setdefault("net", "ours")                      # written before --net existed
    saved.setdefault("channels", 1 if saved.get("dataset") == "mnist" else 3)
    if saved.get("image_size") is None:
        saved["image_size"] = 64 if saved.get("dataset") == "celeba64" else 32
    return state

# ---- The authors' checkpoints (https://github.com/ljun0004/VAPO, README "Checkpoints") ----
# score_sde-style dicts: "model" = the state dict of nn.DataParallel(MyUnet), keys "module.model."
# + a guided-diffusion UNet key; "ema" = {"shadow_params": EMA copies of model.parameters() in
# order, ...}; "optimizer", "step". Their UNet is our UNetPhi with AUTHORS_UNET; names map part by
# part (_AUTHORS_NAMES; input_blocks.k = down.(k-1), their 1-D convs = our 1x1 convs); resampling
# convs are "op" (down) or "conv" (up; our nn.Upsample and conv are two layers), none in the
# released nets. Both nets register their parameters in the same order, so shadow_params[i] is our
# i-th parameter. They embed the raw t.

_AUTHORS_NAMES = {"temb": "time_embed", "cemb": "label_emb", "inp": "input_blocks.0.0",
                  "down": "input_blocks", "mid": "middle_block", "up": "output_blocks",
                  "n1": "in_layers.0", "c1": "in_layers.2", "emb": "emb_layers.1",
                  "n2": "out_layers.0", "c2": "out_layers.3", "skip": "skip_connection",
                  "proj": "proj_out"}                   # the rest (out, norm, qkv, 0, ...) as ours
_AUTHORS_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.",
                     "output_blocks.", "out.")

def is_authors_checkpoint(ck):
    """True for a dict as the authors' code writes it (score_sde style), False for ours."""
    return (isinstance(ck, dict) and "format" not in ck and isinstance(ck.get("model"), dict)
            and isinstance(ck.get("ema"), dict)
            and isinstance(ck["ema"].get("shadow_params"), (list, tuple)) and "step" in ck)

def _listing(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

def authors_names(net):
    """{our parameter name: the authors' name (no prefix)}, in our parameter order."""
    names = {}
    for key, _ in net.named_parameters():
        part = key.split(".")
        if part[0] == "down":                      # their input_blocks.0 is our stem `inp`
            part[1] = str(int(part[1]) + 1)
            if len(part) == 4:                     # strided conv: their Downsample.op
                part.insert(3, "op")
        elif part[0] == "up" and len(part) == 4:   # conv after nn.Upsample: their Upsample.conv
            part[2:3] = [str(int(part[2]) - 1), "conv"]
        names[key] = ".".join(_AUTHORS_NAMES.get(p, p) for p in part)
    return names

def authors_arch(sd, image_size=32):
    """UNetPhi keyword arguments for the authors' net with (prefix-free) state dict sd.
    attn_res is in pixels for a nominal image_size: the net itself is fully convolutional."""
    base = sd["time_embed.0.weight"].shape[1]             # their embedding width = base channels
    stem = sd["input_blocks.0.0.weight"]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    res = [k for k in blocks if f"input_blocks.{k}.0.in_layers.2.weight" in sd]
    n_in = max(res) + 1                                   # the last level has no down-sampling
    gaps = sorted(set(range(1, n_in)) - set(res))
    num_res = gaps[0] - 1 if gaps else len(res)
    levels = n_in // (num_res + 1)
    if num_res < 1 or levels * (num_res + 1) != n_in or len(res) != levels * num_res:
        raise ValueError("input blocks do not form a U-Net")
    first = [1 + lv * (num_res + 1) for lv in range(levels)]
    out_ch = [sd[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0] for k in first]
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    kw = dict(AUTHORS_UNET)
    kw.update(scale_shift=emb_out == 2 * out_ch[0], stem_mult=stem.shape[0] != base,
              conv_resample=bool(gaps) and f"input_blocks.{gaps[0]}.0.op.weight" in sd)
    attn = tuple(image_size // 2 ** lv for lv, k in enumerate(first)
                 if f"input_blocks.{k}.1.qkv.weight" in sd)
    ncls = sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else 0
    return dict(in_ch=stem.shape[1], base=base, mult=tuple(c // base for c in out_ch),
                num_res=num_res, attn_res=attn, dropout=0.3, image_size=image_size,
                num_classes=ncls, **kw)

def authors_network(ck, use_ema=True, image_size=32, name="checkpoint"):
    """Our UNetPhi (eval mode, frozen) holding the weights of an authors' checkpoint dict `ck`:
    the EMA shadow_params (use_ema) or the raw model. What does not fit: one line, exit 2."""
    if not is_authors_checkpoint(ck):
        found = _listing(sorted(ck)) if isinstance(ck, dict) else type(ck).__name__
        die(f"{name!r} is not an authors' VAPO checkpoint (expects model, ema.shadow_params, "
            f"step; found {found})")
    sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in ck["model"].items()}
    try:
        net = UNetPhi(**authors_arch(sd, image_size))
    except (KeyError, IndexError, ValueError, ZeroDivisionError, AttributeError):
        odd = [k for k in sd if not k.startswith(_AUTHORS_PREFIXES)] or list(sd)
        die(f"{name!r} is a score_sde-style checkpoint but not the authors' VAPO U-Net "
            f"(unmatched keys: {_listing(odd)})")
    names = authors_names(net)
    known = set(names.values())
    unmatched = [k for k in sd if k not in known]
    missing = [theirs for theirs in names.values() if theirs not in sd]
    if unmatched or missing:
        die(f"{name!r} does not fit the authors' U-Net it describes (unmatched keys: "
            f"{_listing(unmatched) or 'none'}; missing: {_listing(missing) or 'none'})")
    theirs = sd
    if use_ema:                                   # shadow_params[i]: the EMA of parameter i
        shadow, order = list(ck["ema"]["shadow_params"]), list(names.values())
        if len(shadow) != len(order):
            die(f"{name!r}: {len(shadow)} EMA shadow_params for {len(order)} parameters")
        if list(sd) != order:
            die(f"{name!r}: the model's tensors are not in the authors' parameter order")
        theirs = dict(zip(order, shadow))
    ours = {}
    for key, p in net.named_parameters():
        v = theirs[names[key]]
        if not torch.is_tensor(v) or v.numel() != p.numel() or v.shape[:2] != p.shape[:2]:
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            die(f"{name!r}: {names[key]} has shape {shape}, the network needs {tuple(p.shape)}")
        ours[key] = v.reshape(p.shape).float()            # (O, I, 1) 1-D conv -> (O, I, 1, 1)
    net.load_state_dict(ours, strict=True)
    return net.eval().requires_grad_(False)

def load_authors_checkpoint(path, use_ema=True, image_size=32):
    """The authors' released Phi (their checkpoints/checkpoint_*.pth) as our UNetPhi in eval mode:
    net(x, t) is their potential, x in [-1, 1] NCHW. EMA weights unless use_ema=False."""
    return authors_network(read_checkpoint(path), use_ema, image_size, name=path)

def load_for_eval(args, device):
    """The network of a checkpoint (EMA weights, raw with --no-ema), its architecture flags winning
    over the command line; an authors' file gives their network and --recipe authors."""
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    state = load_checkpoint(path)
    if is_authors_checkpoint(state):               # their file says nothing of the data: --dataset
        net = authors_network(state, not args.no_ema, args.image_size, name=path)
        a = argparse.Namespace(**{**vars(args), "model": "unet", "recipe": "authors",
                                  "net": "authors", "class_cond": net.num_classes > 0,
                                  "channels": net.inp.in_channels})
        ncls = net.num_classes or 10
    else:
        saved = state["args"]
        a = argparse.Namespace(**{**vars(args), **{k: saved[k] for k in ARCH_KEYS + ["dataset"]
                                                   if k in saved}})
        weights = state["model" if args.no_ema else "ema"]
        head = "cemb.weight" if a.model == "unet" else "head.weight"
        ncls = weights[head].shape[0] - 1 if a.class_cond else 10     # minus the null class
        net = build_model(a, ncls)
        try:
            net.load_state_dict(weights)
        except RuntimeError as e:
            die(f"checkpoint weights do not fit the network it describes "
                f"({str(e).splitlines()[0]})")
    net = engineer(net, device, a.amp, a.channels_last).eval().requires_grad_(False)
    if args.compile:
        net = torch.compile(net)                     # first-order gradients only: fine for sampling
    return net, a, ncls

# ==== 6. Experiment modes ====
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

def auroc(pos, neg):
    """Area under the ROC curve, P(score_pos > score_neg) + 1/2 P(=), by ranks (Mann-Whitney U),
    ties averaged. pos: scores of in-distribution samples (should be higher)."""
    from scipy.stats import rankdata
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    ranks = rankdata(np.concatenate([pos, neg]))                 # tied values: their mean rank
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

def generate(phi, args, device, n, shape, method=None, x0=None, n_classes=10, strict=True):
    """Draw n images with the ODE (euler / rk45) or SGLD on Phi_B. Returns (images, stats).
    strict: non-finite images are one line and exit 3 (a training grid only warns)."""
    method = method or args.sampler
    model = build_vpfb(phi, args)
    random_classes = isinstance(phi, Conditioned) and args.class_cond and phi.y is None
    outs, nfes, t_start = [], [], time.time()
    for i in range(0, n, args.sample_batch):
        b = min(args.sample_batch, n - i)
        z = (x0[i:i + b] if x0 is not None else torch.randn(b, *shape)).to(device)
        if random_classes:
            phi.y = torch.randint(n_classes, (b,), device=device)
        if method == "sgld":
            x = model.langevin(z, n_steps=args.sgld_steps, step_size=args.sgld_step,
                               temperature=args.sgld_temp)
        else:
            x = model.sample(z, method=method, n_steps=args.ode_steps, t0=args.t0, t1=args.t1,
                             rtol=args.rtol, atol=args.atol)
        nfes.append(model.last_nfe)
        outs.append(x.clamp(-1, 1) if args.clamp else x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, x = time.time() - t_start, torch.cat(outs) if outs else torch.empty(0, *shape)
    n_bad = int((~torch.isfinite(x)).sum())
    msg = f"the {method} sampler produced non-finite values ({n_bad} of {x.numel()})"
    if n_bad and strict:                   # never hand garbage on (FID would take it as valid)
        die(msg + "; nothing written", 3)
    if n_bad:
        print("warning: " + msg, file=sys.stderr)
    return x, {"sampler": method, "nfe_mean": float(np.mean(nfes)) if nfes else 0.0,
               "images_per_s": n / dt, "seconds": dt}

def report(args, name, obj):
    """A mode's result: <out-dir>/<name> and the same JSON on stdout."""
    write_json(args.out_dir, name, obj)
    print(json.dumps(obj))

def eval_setup(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    net, a, ncls = load_for_eval(args, device)
    return device, net, a, ncls, (a.channels, a.image_size, a.image_size)

def cmd_sample(args):
    device, net, a, ncls, shape = eval_setup(args)
    x, st = generate(Conditioned(net), a, device, args.num_samples, shape, n_classes=ncls)
    path = os.path.join(args.out_dir, "samples.npz")
    np.savez(path + ".tmp.npz", images=to_uint8(x))
    os.replace(path + ".tmp.npz", path)
    if len(x):
        save_grid(x[:64], os.path.join(args.out_dir, "samples.png"))
    report(args, "sample_stats.json", st)

def cmd_interp(args, rows=8, cols=10):
    """Spherical interpolation between two noises, each point pushed through the ODE (Sec. 4.3)."""
    device, net, a, ncls, shape = eval_setup(args)
    z0, z1 = torch.randn(rows, *shape), torch.randn(rows, *shape)
    z = torch.stack([slerp(z0, z1, float(v)) for v in torch.linspace(0, 1, cols)], 1)
    x, st = generate(Conditioned(net), a, device, rows * cols, shape, x0=z.flatten(0, 1),
                     n_classes=ncls)
    save_grid(x, os.path.join(args.out_dir, "interp.png"), nrow=cols)
    report(args, "interp_stats.json", st)

def cmd_nn(args, rows=8):
    """Generated samples and their k nearest training images in pixel (L2) distance (Fig. 5)."""
    device, net, a, ncls, shape = eval_setup(args)
    data = build_dataset(a, train=True)
    if len(data) < args.nn_k:
        die(f"--nn-k {args.nn_k} is more than the {len(data)} training images")
    x, _ = generate(Conditioned(net), a, device, rows, shape, n_classes=ncls)
    best_d = torch.full((rows, args.nn_k), float("inf"))
    best_x = torch.zeros(rows, args.nn_k, *shape)
    xf = x.cpu().flatten(1)
    for xb, _ in torch.utils.data.DataLoader(data, batch_size=512):
        d = torch.cdist(xf, xb.flatten(1))                           # (rows, batch) pixel distances
        cand_d = torch.cat([best_d, d], 1)
        cand_x = torch.cat([best_x, xb[None].expand(rows, *xb.shape)], 1)
        best_d, idx = cand_d.topk(args.nn_k, dim=1, largest=False)
        best_x = torch.stack([cand_x[r, idx[r]] for r in range(rows)])
    grid = torch.cat([x.cpu()[:, None], best_x], 1).reshape(-1, *shape)
    save_grid(grid, os.path.join(args.out_dir, "nn.png"), nrow=args.nn_k + 1)
    report(args, "nn.json", {"nearest_pixel_l2": best_d.tolist()})

@torch.no_grad()
def energies(net, args, ds, device, n):
    """Phi_B (Eq. 22) and the authors' OOD score 4 Phi(x, t_max) - ||x||^2 of the first n images."""
    model = build_vpfb(Conditioned(net), args)
    pb, auth = [], []
    for x in torch.split(first_images(ds, n), args.sample_batch):
        x = x.to(device)
        pb.append(model.boltzmann_energy(x).float().cpu())
        tt = torch.full((x.shape[0],), model.t_inf or model.t_max, device=device)
        auth.append((4 * model._phi(x, tt) - _sqnorm(x)).float().cpu())
    return torch.cat(pb).numpy(), torch.cat(auth).numpy()

def cmd_hist(args):
    """Histogram of the Boltzmann energy on train vs test images (Fig. 11)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device, net, a, ncls, shape = eval_setup(args)
    res, fig = {}, plt.figure(figsize=(5, 3.5))
    for split in ("train", "test"):
        e, _ = energies(net, a, build_dataset(a, train=split == "train"), device, args.ood_max)
        res[split] = {"n": int(len(e)), "mean": float(e.mean()), "std": float(e.std())}
        plt.hist(e, bins=50, alpha=0.5, density=True, label=split)
    plt.xlabel("Boltzmann energy Phi_B (Eq. 22)")
    plt.legend()
    fig.savefig(os.path.join(args.out_dir, "hist.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    report(args, "hist.json", res)

def cmd_ood(args):
    """OOD AUROC (Table 2): in-distribution = the test split of the training set (positives, should
    score higher), OOD = each of --ood-sets; score = Phi_B. 'interp': the mean of 2 test images."""
    device, net, a, ncls, shape = eval_setup(args)
    ind_ds = build_dataset(a, train=False)
    pos, pos_auth = energies(net, a, ind_ds, device, args.ood_max)
    table = {}
    for name in [s.strip() for s in args.ood_sets.split(",") if s.strip()]:
        if name not in OOD_SETS:
            die(f"unknown OOD set {name!r}; choose from {OOD_SETS}")
        if name == "interp":
            imgs = first_images(ind_ds, args.ood_max)
            g = torch.Generator().manual_seed(args.seed)
            imgs = 0.5 * (imgs + imgs[torch.randperm(len(imgs), generator=g)])  # interpolated
            ds = torch.utils.data.TensorDataset(imgs, torch.zeros(len(imgs)))
        else:
            ds = build_dataset(a, train=False, name="fake" if a.dataset == "fake" else name)
            if a.dataset == "fake":                                 # smoke test: a shifted fake set
                ds.random_offset = 10 ** 7 + 1000 * OOD_SETS.index(name)
        neg, neg_auth = energies(net, a, ds, device, args.ood_max)
        table[name] = {"auroc_phi_b": auroc(pos, neg),
                       "auroc_authors_score": auroc(pos_auth, neg_auth),
                       "n_in": int(len(pos)), "n_ood": int(len(neg))}
    report(args, "ood.json", table)

def cmd_longrun(args):
    """Long-run sampling (Sec. 4.6, Figs. 12-18): the ODE over t in [0, longrun_t1] (past t_max it
    follows Phi(x, t_max)), then SGLD on Phi_B from the same noise; E|grad|^2 and E energy^2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device, net, a, ncls, shape = eval_setup(args)
    model = build_vpfb(Conditioned(net), a)
    z = torch.randn(min(args.num_samples, args.sample_batch), *shape, device=device)
    curves = {"ode": {"t": [], "grad2": [], "phi2": []}, "sgld": {"t": [], "grad2": [], "phi2": []}}

    def recorded(energy, c):                   # the gradient field of an energy, logging two norms
        def field(x, t=None):
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                e = energy(xr, t)
                g = torch.autograd.grad(e.sum(), xr)[0]
            c["t"].append(len(c["t"]) if t is None else float(t))
            c["grad2"].append(float(_sqnorm(g).mean()))                 # E ||grad_x energy||^2
            c["phi2"].append(float(e.detach().pow(2).mean()))           # E energy^2
            return g.detach()
        return field

    def phi_at(x, t):
        return model._phi(x, torch.full((x.shape[0],), float(t), device=x.device))

    T, n_steps = args.longrun_t1, int(args.ode_steps * max(1.0, args.longrun_t1))
    _, traj, _ = ode_solve(recorded(phi_at, curves["ode"]), z, "euler", n_steps, 0.0, T,
                           return_traj=True)
    idx = [min(n_steps, round(f / T * n_steps)) for f in (0.5, 1, 2, 5, 10, T) if f <= T]
    save_grid(torch.cat([traj[i][:8] for i in idx]), os.path.join(args.out_dir, "longrun_ode.png"))
    _, traj, _ = sgld(recorded(lambda x, t: model.boltzmann_energy(x), curves["sgld"]), z,
                      args.sgld_steps, args.sgld_step, args.sgld_temp, return_traj=True)
    ks = np.linspace(0, args.sgld_steps, 6).astype(int)
    save_grid(torch.cat([traj[k][:8] for k in ks]), os.path.join(args.out_dir, "longrun_sgld.png"))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for axi, key, lab in ((ax[0], "ode", "ODE time t, Phi"), (ax[1], "sgld", "SGLD step, Phi_B")):
        axi.semilogy(curves[key]["t"], curves[key]["grad2"], label="E|grad|^2")
        axi.semilogy(curves[key]["t"], curves[key]["phi2"], label="E energy^2")
        axi.set_xlabel(lab)
        axi.legend()
    fig.savefig(os.path.join(args.out_dir, "longrun_norms.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    last = {k: {kk: vv[-1] for kk, vv in v.items() if vv} for k, v in curves.items()}
    report(args, "longrun.json", last)
    write_json(args.out_dir, "longrun_curves.json", curves)

def cmd_compose(args, n=8):
    """Compositional sampling (Sec. 4.3): sample with the average of the class-conditional energies
    Phi(x, t) = mean_c Phi(x, t, c). One row per single class of each group, then the composite."""
    device, net, a, ncls, shape = eval_setup(args)
    if not a.class_cond:
        die("--mode compose needs a checkpoint trained with --class-cond")
    try:
        groups = [[int(c) for c in g.split(",")] for g in args.compose.split(";") if g.strip()]
    except ValueError:
        die(f"--compose must look like '0,1;0,2', got {args.compose!r}")
    if any(c < 0 or c >= ncls for g in groups for c in g):
        die(f"--compose classes must be in [0, {ncls})")
    z = torch.randn(n, *shape)
    rows, info = [], {}
    for g in groups:
        for c in g + [None]:
            ys = [torch.tensor(k, device=device) for k in (g if c is None else [c])]
            x, st = generate(Conditioned(net, ys), a, device, n, shape, x0=z, n_classes=ncls)
            rows.append(x.cpu())
            info["+".join(map(str, g)) if c is None else str(c)] = st
    save_grid(torch.cat(rows), os.path.join(args.out_dir, "compose.png"), nrow=n)
    report(args, "compose.json", info)

def cmd_benchmark(args):
    """Training images/s, ms/iter and peak memory of our config (bf16 trunk, channels-last, TF32)
    against the authors' (fp32) from the same weights, batches, noise and times; then the ODE
    sampler's NFE and images/s, and the largest loss difference over the measured steps."""
    device, S, C, B = pick_device(args.device), args.image_size, args.channels, args.batch_size
    torch.manual_seed(args.seed)
    base_net, g = build_model(args, 10), torch.Generator().manual_seed(args.seed)
    n_warm = max(1, args.bench_warmup)
    data = [(torch.rand(B, C, S, S, generator=g) * 2 - 1, torch.randn(B, C, S, S, generator=g),
             torch.rand(B, generator=g) * args.t_end) for _ in range(args.bench_steps + n_warm)]
    cuda, res = device.type == "cuda", {}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name in ("ours", "authors_fp32"):
        fast = name == "ours"
        fmt = (torch.channels_last if fast and (args.channels_last or cuda)
               else torch.contiguous_format)
        net = copy.deepcopy(base_net).to(device, memory_format=fmt)
        net.amp = fast and args.amp != "none" and cuda
        if cuda:            # ours: TF32 everywhere; authors: PyTorch's defaults (cuDNN convs only)
            torch.backends.cuda.matmul.allow_tf32 = fast
            torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats()
        opt, model = torch.optim.Adam(net.parameters(), lr=args.lr), build_vpfb(net, args)
        losses = []
        torch.manual_seed(args.seed)
        for i, (xb, eb, tb) in enumerate(data):
            if i == n_warm:                                          # warm-up steps, then time
                sync()
                t_start = time.time()
            xb, eb = (v.to(device).contiguous(memory_format=fmt) for v in (xb, eb))
            loss, _ = model.loss(xb, eps=eb, t=tb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sync()
        dt = (time.time() - t_start) / args.bench_steps
        r = {"ms_per_iter": 1000 * dt, "images_per_s": B / dt, "losses": losses[n_warm:],
             "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
        z = torch.randn(min(B, args.sample_batch), C, S, S, generator=g).to(device)
        t0 = time.time()
        model.sample(z, method="rk45", t0=args.t0, t1=args.t1, rtol=args.rtol, atol=args.atol)
        sync()
        res[name] = {**r, "ode_nfe": model.last_nfe,
                     "ode_images_per_s": z.shape[0] / (time.time() - t0)}
        print(f"{name:13s} train {r['ms_per_iter']:8.1f} ms/iter {r['images_per_s']:8.1f} img/s"
              + (f" peak {r['peak_mem_gb']:.2f} GiB" if cuda else "")
              + f" | rk45 NFE {model.last_nfe} {res[name]['ode_images_per_s']:.1f} img/s")
    ours, theirs = res["ours"], res["authors_fp32"]
    la, lb = np.array(ours["losses"]), np.array(theirs["losses"])
    summary = {"device": str(device), "batch_size": B, "model": args.model,
               "params_M": sum(p.numel() for p in base_net.parameters()) / 1e6,
               "speedup_images_per_s": ours["images_per_s"] / theirs["images_per_s"],
               "max_abs_loss_diff": float(np.abs(la - lb).max()),
               "max_rel_loss_diff": float((np.abs(la - lb) / np.maximum(np.abs(lb), 1e-12)).max()),
               "configs": res}
    print(f"speed-up {summary['speedup_images_per_s']:.2f}x, max |loss diff| "
          f"{summary['max_abs_loss_diff']:.3g} (relative {summary['max_rel_loss_diff']:.3g}) "
          f"over {args.bench_steps} steps")
    write_json(args.out_dir, "benchmark.json", summary)
    return summary

# ==== 7. Arguments and main ====
MODES = ["train", "sample", "interp", "nn", "hist", "ood", "longrun", "compose", "benchmark"]

def _number(kind, ok, what):
    """An argparse type: parse with `kind`, reject NaN / inf and values failing `ok`."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse

pos_int = _number(int, lambda v: v > 0, "an integer > 0")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
pos_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
time_float = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        die(f"{message} (see --help)")

def build_parser():
    p = Parser(description="VPFB: Variational Potential Flow Bayes (train, sample, evaluate).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, bool_opt = p.add_argument, argparse.BooleanOptionalAction
    a("--mode", default="train", choices=MODES, help="what to do")
    a("--dataset", default="cifar10", choices=DATASETS + ["svhn", "cifar100"], help="images")
    a("--data-dir", default="data", help="dataset folder (npz: the .npz file, uint8 NHWC)")
    a("--image-size", type=pos_int, help="image side (default 32; celeba64 64; npz: the file's)")
    a("--fake-size", type=pos_int, default=512, help="number of FakeData images")
    a("--out-dir", help="output folder (default runs/vpfb_<dataset>); always written to")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a("--seed", type=int, default=0, help="random seed (each step and rank derives its own)")
    a("--workers", type=nonneg_int, default=4, help="DataLoader processes (0 = main process)")
    a("--threads", type=nonneg_int, default=0, help="CPU threads (0 = the cores this process has)")
    a("--batch-size", type=pos_int, default=128, help="per-process batch size")
    a("--steps", type=nonneg_int, default=400_000, help="training steps")
    a("--lr", type=pos_float, default=1e-4, help="Adam learning rate")
    a("--warmup", type=nonneg_int, default=5000, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=nonneg_float, help="gradient clipping (0 = off) [ours 1; authors 3]")
    a("--clip-mode", choices=["norm", "std"], help="norm [ours]; std [authors]: +-(clip RMS + 0.1)")
    a("--ema-decay", type=unit_float, default=0.9999, help="EMA decay")
    a("--ema-warmup", action=bool_opt, default=True, help="min(decay, (1+n)/(10+n)); no: authors")
    a("--no-ema", action="store_true", help="grids / sampling with the raw weights, not the EMA")
    a("--model", default="unet", choices=["unet", "wrn"], help="Phi(x, t) U-Net; WideResNet Phi(x)")
    a("--model-size", type=pos_int, default=128, help="base channels (unet 128 = paper's net)")
    a("--ch-mult", default="2,2,2", help="UNet channel multipliers per resolution level")
    a("--res-blocks", type=pos_int, default=4, help="UNet residual blocks per level")
    a("--net", choices=["ours", "authors"], help="unet variant [the recipe's]")
    a("--attn-res", help="unet attention resolutions [16; --net authors: image size // 2]")
    a("--dropout", type=unit_float, default=0.3, help="dropout in the res blocks (authors 0.3)")
    a("--wrn-depth", type=pos_int, default=16, help="WideResNet depth (6n + 4)")
    a("--class-cond", action="store_true", help="class-conditional Phi(x, c) (for --mode compose)")
    a("--p-uncond", type=unit_float, help="share of null labels [ours 0.1; authors 0.2]")
    a("--recipe", default="ours", choices=list(RECIPES), help="loss + clip presets (flags win)")
    a("--kappa", type=finite_float, help="w(t) = (1 - t)^kappa [ours 1]")
    a("--t-end", type=pos_float, default=1.0, help="t ~ U(0, t_end)")
    a("--t-max", type=time_float, default=1.0 - 1e-5, help="stationarity: t clamped to t_max")
    a("--t-inf", type=pos_float, help="time Phi_B (Eq. 22) is read at [t_max]")
    a("--eta", type=nonneg_float, help="Poincare weight eta [ours 1e-4]")
    a("--lam-cos", type=nonneg_float, help="weight of the cosine term [1]")
    a("--lam-gx", type=nonneg_float, help="weight of E||grad_x Phi||^2 [1]")
    a("--lam-gt", type=nonneg_float, help="weight of E(dPhi/dt)^2 [ours 0.01]")
    a("--cov-form", choices=["cov", "corr", "stein"],
      help="cov (paper), corr (authors), stein: cov by parts [ours]")
    a("--cos-form", choices=["paper", "authors"], help="cos or cos^t / D (authors)")
    a("--weight-on", choices=["ritz", "cov"], help="w(t) on cov + |grad|^2 or gamma")
    a("--grad-norm", choices=["sum", "mean"], help="|grad Phi|^2 summed or averaged")
    a("--bfactor", type=pos_float, help="c in Phi_B, Eq. (22) [ours 2; paper 4]")
    a("--sampler", default="rk45", choices=["euler", "rk45", "sgld"], help="sampler of the modes")
    a("--ode-steps", type=pos_int, default=100, help="Euler steps (and rk45 trajectory frames)")
    a("--rtol", type=pos_float, default=1e-3, help="RK45 relative tolerance (authors 1e-3)")
    a("--atol", type=pos_float, default=1e-3, help="RK45 absolute tolerance (authors 1e-3)")
    a("--t0", type=nonneg_float, default=1e-5, help="ODE start time (authors 1e-5)")
    a("--t1", type=pos_float, default=1.0 - 1e-5, help="ODE end time (authors 1 - 1e-5)")
    a("--sgld-steps", type=nonneg_int, default=1000, help="SGLD steps on Phi_B")
    a("--sgld-step", type=pos_float, default=1e-5, help="SGLD step Delta (Sec. 4.6)")
    a("--sgld-temp", type=nonneg_float, default=1.0, help="SGLD temperature lambda (noise std)")
    a("--longrun-t1", type=pos_float, default=20.0, help="long-run ODE horizon t in [0, t1]")
    a("--clamp", action="store_true", help="clamp samples to [-1, 1] at the end")
    a("--amp", default="auto", choices=["auto", "bf16", "none"], help="bf16 trunk (auto: on CUDA)")
    a("--compile", action="store_true", help="torch.compile the potential for sampling only")
    a("--channels-last", action="store_true", help="channels_last memory (faster convs on GPU)")
    a("--resume", action="store_true", help="resume from --ckpt, else <out-dir>/ckpt.pt")
    a("--ckpt", help="checkpoint to read (ours or the authors'); outputs go to --out-dir")
    a("--log-every", type=nonneg_int, default=100, help="log every N steps (0 = off)")
    a("--save-every", type=nonneg_int, default=5000, help="checkpoint every N steps (0 = at end)")
    a("--sample-every", type=nonneg_int, default=5000,
      help="sample grid every N steps (0 = only at the end)")
    a("--num-samples", type=nonneg_int, default=64, help="samples to draw (50000 for FID)")
    a("--sample-batch", type=pos_int, default=256, help="batch size when sampling")
    a("--ood-sets", default="svhn,cifar100,celeba,interp", help=f"comma list from {OOD_SETS}")
    a("--ood-max", type=pos_int, default=10000, help="at most this many images per set")
    a("--nn-k", type=pos_int, default=5, help="nearest neighbours per sample (mode nn)")
    a("--compose", default="0,1", help="classes whose energies are averaged, e.g. '0,1;0,2'")
    a("--bench-steps", type=pos_int, default=20, help="benchmark: timed steps per config")
    a("--bench-warmup", type=nonneg_int, default=3, help="benchmark: untimed steps per config")
    return p

RECIPES = {  # loss presets (VPFB keywords); explicit flags win over the preset
    "ours": dict(kappa=1.0, eta=1e-4, lam_cos=1.0, lam_gx=1.0, lam_gt=0.01, cov_form="stein",
                 cos_form="paper", weight_on="ritz", grad_norm="sum", bfactor=2.0),
    "paper": dict(kappa=2.0, eta=1e-4, lam_cos=1.0, lam_gx=1.0, lam_gt=1.0, cov_form="cov",
                  cos_form="paper", weight_on="cov", grad_norm="sum", bfactor=4.0),
    "authors": dict(kappa=2.0, eta=0.0, lam_cos=1.0, lam_gx=0.5, lam_gt=0.1, cov_form="corr",
                    cos_form="authors", weight_on="cov", grad_norm="mean", bfactor=4.0),
}
TRAIN_RECIPES = {  # optimiser presets
    "ours": dict(grad_clip=1.0, clip_mode="norm", p_uncond=0.1),
    "paper": dict(grad_clip=1.0, clip_mode="norm", p_uncond=0.1),
    "authors": dict(grad_clip=3.0, clip_mode="std", p_uncond=0.2),
}

def loss_kwargs(args):
    """The VPFB(...) keyword arguments: the recipe preset, overridden by any explicit flag."""
    kw = {k: v if getattr(args, k) is None else getattr(args, k)
          for k, v in RECIPES[args.recipe].items()}
    return dict(kw, t_end=args.t_end, t_max=args.t_max, t_inf=args.t_inf)

def ints(s):
    """'2,2,2' -> (2, 2, 2); --ch-mult and --attn-res stay strings, as checkpoints store them."""
    try:
        return tuple(int(c) for c in str(s).split(",") if c.strip())
    except ValueError:
        die(f"--ch-mult / --attn-res must be comma lists of integers, got {s!r}")

def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")        # one per DDP rank
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to output folder {os.path.abspath(path)} ({e.strerror or e})")

def resolve_args(args, argv=None):
    """Fill the defaults that depend on other flags; bad combinations -> one line and exit 2."""
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for k, v in TRAIN_RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.channels, size = (1 if args.dataset == "mnist" else 3), None
    if args.dataset == "npz":
        args.channels, size = load_npz(args.data_dir).tensors[0].shape[1:3]
    args.image_size = args.image_size or size or (64 if args.dataset == "celeba64" else 32)
    args.net = args.net or ("authors" if args.recipe == "authors" else "ours")
    if args.attn_res is None:
        args.attn_res = str(args.image_size // 2) if args.net == "authors" else "16"
    halvings = len(ints(args.ch_mult)) - 1
    ints(args.attn_res)                                   # a bad list: one line here, not later
    if args.model == "unet" and args.image_size % 2 ** halvings:
        die(f"--image-size {args.image_size} must be a multiple of {2 ** halvings} (the U-Net "
            f"halves it {halvings} times for --ch-mult {args.ch_mult})")
    if args.model == "wrn" and (args.wrn_depth - 4) % 6:
        die(f"--wrn-depth must be 6n + 4 (10, 16, 22, 28 ...), got {args.wrn_depth}")
    args.out_dir = args.out_dir or os.path.join("runs", f"vpfb_{args.dataset}")
    prepare_out_dir(args.out_dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores or 1)
    return args

def args_to_dict(args):
    """args as a plain dict of str/int/float/bool/None/list (safe for weights_only loading)."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items()
            if isinstance(v, (str, int, float, bool, type(None), list, tuple))}

def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv), argv)
    cmds = {"train": cmd_train, "sample": cmd_sample, "interp": cmd_interp, "nn": cmd_nn,
            "hist": cmd_hist, "ood": cmd_ood, "longrun": cmd_longrun, "compose": cmd_compose,
            "benchmark": cmd_benchmark}
    return cmds[args.mode](args)

if __name__ == "__main__":
    main()
