"""toy2d.py -- the 2-D laboratory for Energy Matching and VPFB: the papers' 2-D figures plus numbers
(exact W2, MMD, and a Boltzmann density normalised on a grid).

    python toy2d.py --method em                   # Energy Matching, 8 Gaussians -> two moons
    python toy2d.py --method em --recipe authors  # the EM authors' own 2-D run (their notebook)
    python toy2d.py --method vpfb                 # VPFB, standard Gaussian -> two moons
    python toy2d.py --method vpfb --autonomous    # VPFB with a time-independent Phi(x)
    python toy2d.py --method vpfb --vpfb-recipe paper   # VPFB's Eq. (27) as printed (default: ours)
    python toy2d.py --method otcfm                # baseline: OT conditional flow matching
    python toy2d.py --method cd                   # baseline: an EBM trained by contrastive div.
    python toy2d.py --method all                  # all of the above, then a markdown table

Papers: "Energy Matching: Unifying Flow Matching and Energy-Based Models for Generative Modeling"
(arXiv:2504.10612, code https://github.com/m1balcerak/EnergyMatching); "Learning Energy-Based
Generative Models via Potential Flow: A Variational Principle Approach to Probability Density
Homotopy Matching" (VPFB, arXiv:2504.16262, code https://github.com/ljun0004/VAPO). OT-CFM:
"Improving and generalizing flow-based generative models with minibatch optimal transport"
(arXiv:2302.00482).

The EM and VPFB losses and samplers are NOT written here: they are imported from energy_matching.py
and vpfb.py, the same code the image pipelines run. This file holds what is specific to 2-D: toy
data, a small MLP, the two baselines of the EM paper's Figure 1, the metrics and the plots, in that
order (sections 1-7); the experiment, arguments and main() come last (8-9). Every method gets the
same number of optimiser steps (--steps), so W2 at equal steps compares like with like.
`--recipe ours` (default) is sized for a laptop CPU; how its EM values were chosen, and what each
method scores, is in README. `--recipe authors` is the EM authors' 2-D notebook: their sizes, chain
clock, sigma, flow weighting and path-length sampler. `--vpfb-recipe ours|paper|authors` picks
VPFB's loss: vpfb.OURS (default), the bare vpfb.VPFB (Eq. 27 as printed) or vpfb.AUTHORS.

Outputs in runs/<method>_<source>_<target>/ :
    trajectories.png  start (black), paths (green, a few red), end (blue): EM Fig. 1, VPFB Fig. 1
    energy.png        V(x) (EM, CD), Phi(x, t) at several t (VPFB Fig. 1 bottom), |v(x, t)| (OT-CFM)
    density.png       the Boltzmann density normalised on the grid (EM exp(-V/eps_max),
                      VPFB exp(Phi_B), CD exp(-E/T))
    loss.png          training loss curve(s)
    samples.npy       the generated samples (n_eval, 2)
    metrics.json      W2, MMD^2, NLL beside the flat and untrained NLLs, wall time, every argument
    model.pt          the trained network (a self-describing dict, see save_checkpoint)
"""
import argparse
import math
import os
import platform
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn

import energy_matching as em
import vpfb

# ==== 1. Data ====
SOURCES = ["auto", "gauss", "8gauss"]
TARGETS = ["moons", "8gauss", "circles", "checkerboard"]
# The source each paper uses: the EM paper (and its Fig. 1 baselines) starts from 8 Gaussians,
# the VPFB paper from a standard Gaussian (its Boltzmann energy, Eq. 22, assumes a Gaussian prior).
DEFAULT_SOURCE = {"em": "8gauss", "otcfm": "8gauss", "cd": "8gauss", "vpfb": "gauss"}

# Infinite toy distributions. Each call draws fresh i.i.d. points from a torch.Generator, so the
# training stream and the held-out set (another generator, another seed) never share a point.

def sample_8gauss(n, gen, radius=5.0, std=0.1 ** 0.25):
    """8 Gaussians on a circle of radius 5, std 0.1**0.25 ~ 0.56 (torchcfm's sample_8gaussians,
    which the EM authors' 2-D code uses)."""
    k = torch.randint(0, 8, (n,), generator=gen)
    ang = k.float() * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centres + std * torch.randn(n, 2, generator=gen)

def sample_moons(n, gen, noise=0.2):
    """Two moons (sklearn's make_moons geometry, uniform angles), noise 0.2, then x*3 - 1 as in
    torchcfm."""
    n_out = n // 2
    a = math.pi * torch.rand(n, generator=gen)
    outer = torch.stack([torch.cos(a), torch.sin(a)], 1)                 # upper moon
    inner = torch.stack([1 - torch.cos(a), 1 - torch.sin(a) - 0.5], 1)  # lower moon, shifted
    x = torch.where((torch.arange(n) < n_out)[:, None], outer, inner)
    x = x + noise * torch.randn(n, 2, generator=gen)
    return (x * 3 - 1)[torch.randperm(n, generator=gen)]

def sample_circles(n, gen, factor=0.5, noise=0.05, scale=3.0):
    """Two concentric circles (sklearn's make_circles geometry), radii 3 and 1.5."""
    a = 2 * math.pi * torch.rand(n, generator=gen)
    r = torch.where(torch.rand(n, generator=gen) < 0.5, torch.tensor(1.0), torch.tensor(factor))
    x = r[:, None] * torch.stack([torch.cos(a), torch.sin(a)], 1)
    return scale * (x + noise * torch.randn(n, 2, generator=gen))

def sample_checkerboard(n, gen):
    """Checkerboard on [-4, 4]^2 (FFJORD's toy data)."""
    x1 = torch.rand(n, generator=gen) * 4 - 2
    x2 = torch.rand(n, generator=gen) - torch.randint(0, 2, (n,), generator=gen).float() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2

def sample_data(name, n, gen):
    if name == "gauss":
        return torch.randn(n, 2, generator=gen)
    if name == "8gauss":
        return sample_8gauss(n, gen)
    if name == "moons":
        return sample_moons(n, gen)
    if name == "circles":
        return sample_circles(n, gen)
    if name == "checkerboard":
        return sample_checkerboard(n, gen)
    die(f"unknown dataset {name!r} (choose from gauss, {', '.join(TARGETS)})")

# ==== 2. Network ====
class MLP(nn.Module):
    """A plain MLP on R^2 (optionally with the time t as one more input).

    out_dim=1 gives a scalar potential, forward(x, t) -> (B,), for V (EM), Phi (VPFB) and E (CD);
    out_dim=2 gives a velocity field (B, 2) for the OT-CFM baseline.
    The activation is smooth (SiLU or softplus): the losses differentiate grad_x of the output
    again (create_graph=True), which a ReLU network would make piecewise constant. first_act="relu"
    puts one ReLU after the first layer, as the EM authors' 2-D MLP does (smooth layers follow).
    With time=False the network ignores t, which is exactly an autonomous potential Phi(x).
    """

    def __init__(self, dim=2, hidden=128, depth=3, time=False, out_dim=1, act="silu",
                 first_act=None):
        super().__init__()
        self.time, self.out_dim = time, out_dim
        acts = {"silu": nn.SiLU, "softplus": nn.Softplus, "relu": nn.ReLU}
        layers, width_in = [], dim + (1 if time else 0)
        for i in range(depth):
            Act = acts[first_act or act] if i == 0 else acts[act]
            layers += [nn.Linear(width_in, hidden), Act()]
            width_in = hidden
        layers.append(nn.Linear(width_in, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t=None):
        h = x.flatten(1)
        if self.time:
            if t is None:
                raise ValueError("this MLP was built with time=True: call it as net(x, t)")
            t = torch.as_tensor(t, dtype=h.dtype, device=h.device).reshape(-1)
            h = torch.cat([h, t.expand(h.shape[0])[:, None]], 1)  # a float t is broadcast
        out = self.net(h)
        return out.squeeze(-1) if self.out_dim == 1 else out

def build_mlp(a, time=False, out_dim=1):
    return MLP(2, a.hidden, a.depth, time=time, out_dim=out_dim, first_act=a.first_act)

# ==== 3. Methods ====
# Every method is wrapped in one small object with the same face:
#   .net                         the trained network
#   .loss(x1, x0, step)          -> (loss, dict of floats)   x1 = target batch, x0 = source batch
#   .sample(x0)                  -> (samples, trajectory (K+1, B, 2))
#   .log_density(x)              -> unnormalised log p(x) of the model's Boltzmann density, or None
# EM and VPFB only forward to the imported classes; the two baselines are written out here.

AUTHORS_BATCH = 1024    # the EM authors' notebook samples 1024 points; its path length is of them

def method_sigma(a):
    """The OT path's sigma for this method: --sigma, else OT-CFM's usual 0.1 and EM's Alg. 1 (0)."""
    if a.sigma is not None:
        return a.sigma
    return 0.1 if a.method == "otcfm" else 0.0

def path_length_stop(traj, max_length, n=AUTHORS_BATCH):
    """Number of steps K after which the summed step length first reaches max_length.

    The EM authors' 2-D notebook integrates until sum_k ||x_{k+1} - x_k|| >= max_length, the norm
    taken over the whole batch (Frobenius) of its n = 1024 samples; we measure on the first n
    chains, so the stopping time does not depend on --n-eval. Returns None if never reached.
    """
    steps = (traj[1:, :n] - traj[:-1, :n]).flatten(2).flatten(1).norm(dim=1)   # (K,)
    reached = torch.nonzero(steps.cumsum(0) >= max_length)
    return int(reached[0]) + 1 if len(reached) else None

class EMToy:
    """Energy Matching (imported): phase 1 = flow loss (Alg. 1), phase 2 = flow + lambda_CD CD
    (Alg. 2)."""
    name = "em"
    has_density = True

    def __init__(self, a):
        self.net = build_mlp(a)
        n = a.n_langevin
        # The negative chains read eps(t) on a clock: Alg. 2's t = m * chain_dt (so n * chain_dt
        # should pass t = 1 for noise-started negatives to reach the data), or the authors' 2-D
        # clock t = (m + 1) / n, which spans [0, 1] whatever the step size.
        clock = (lambda m: (m + 1) / n) if a.chain_clock == "authors" else None
        # Every keyword is spelled out, as EnergyMatching(V) alone is the paper's CIFAR-10 setting.
        # flow_reduction "mean": ||.||^2 averaged over the 2 coordinates (the authors' 2-D code).
        self.model = em.EnergyMatching(
            self.net, tau_star=a.tau_star, eps_max=a.eps_max, lambda_cd=a.lambda_cd,
            n_langevin=n, dt=a.chain_dt or a.dt, cd_neg_clamp=a.cd_neg_clamp, cd_trim=a.cd_trim,
            neg_data_frac=0.5, flow_reduction="mean", tau_s=a.tau_s, clamp_negatives=None,
            use_ot=True, flow_weighting=a.flow_weighting, same_temperature=False,
            chain_clock=clock, ot_sigma=method_sigma(a))
        # the phase-2 noise-started negatives start at source points from their own stream
        self.gen_cd = torch.Generator().manual_seed(a.seed + 40_000)
        self.steps_cd = round(a.steps * a.cd_share) if a.steps_cd is None else a.steps_cd
        self.steps_warmup = a.steps - self.steps_cd
        self.last_stop = None
        self.a = a

    def phase(self, step):
        return "warmup" if step < self.steps_warmup else "main"

    def loss(self, x1, x0, step):
        phase = self.phase(step)
        # Alg. 2 starts the noise-started negatives at the source: for 8 Gaussians (the EM paper's
        # 2-D figure and the authors' 2-D code) we hand fresh source points to the loss as x0_cd.
        x0_cd = x1_cd = None
        if phase == "main" and self.a.source != "gauss":
            x0_cd = sample_data(self.a.source, x1.shape[0], self.gen_cd).to(x1.device)
        if phase == "main" and self.a.fresh_cd_batch:
            x1_cd = sample_data(self.a.target, x1.shape[0], self.gen_cd).to(x1.device)
        return self.model.loss(x1, x0, phase=phase, x1_cd=x1_cd, x0_cd=x0_cd)

    def sample(self, x0):
        # dx = -grad V dt + sqrt(2 eps(t)) dW from t = 0 (Eq. 3 for eps), Heun or Euler-Maruyama,
        # up to tau_s, or (--max-length) until the path length of the authors' notebook is reached
        a = self.a
        x, traj = self.model.sample(x0, tau_s=a.tau_s, dt=a.dt, solver=a.em_sampler,
                                    return_traj=True)
        if a.max_length > 0:
            self.last_stop = path_length_stop(traj, a.max_length)
            if self.last_stop is not None:
                traj = traj[:self.last_stop + 1]
                x = traj[-1]
        return x, traj

    def log_density(self, x):
        return -self.net(x) / self.a.eps_max  # Eq. (6): rho_eq ∝ exp(-V / eps_max)

# --vpfb-recipe: vpfb.VPFB(phi) alone is Eq. (27) as printed; OURS is our variant (the by-parts
# covariance "stein", w(t) on E||grad Phi||^2, kappa 1, lam_gt 0.01); AUTHORS their code.
VPFB_PRESETS = {"ours": vpfb.OURS, "paper": {}, "authors": vpfb.AUTHORS}

class VPFBToy:
    """VPFB (imported): Eq. (27) loss; samples follow dx/dt = +grad Phi (Eq. 13); Boltzmann energy
    Phi_B (Eq. 22)."""
    name = "vpfb"
    has_density = True
    KNOBS = ("kappa", "t_end", "t_max", "eta", "t_inf", "cov_form")     # flags of this file
    HPARAMS = KNOBS + ("lam_cos", "lam_gx", "lam_gt", "cos_form", "weight_on", "grad_norm",
                       "bfactor")

    def __init__(self, a):
        self.net = build_mlp(a, time=not a.autonomous)
        # the preset, then the knobs typed on the command line (None = not typed: the preset's)
        knobs = {k: getattr(a, k) for k in self.KNOBS if getattr(a, k) is not None}
        self.preset = dict(VPFB_PRESETS[a.vpfb_recipe])
        self.model = vpfb.VPFB(self.net, autonomous=a.autonomous, **{**self.preset, **knobs})
        self.a = a

    def used(self):
        return {k: getattr(self.model, k) for k in self.HPARAMS if hasattr(self.model, k)}

    def loss(self, x1, x0, step):
        return self.model.loss(x1, eps=x0)  # eps = prior sample; x = t x1 + (1 - t) eps (Prop. 1)

    def sample(self, x0):
        # Eq. (13): dx/dt = +grad_x Phi(x, t) from t = 0 to 1
        return self.model.sample(x0, solver=self.a.ode_method, n_steps=self.a.ode_steps,
                                 return_traj=True)

    def langevin(self, x0):
        # Sec. 4.6 / Fig. 2: SGLD ascending the Boltzmann energy Phi_B
        return self.model.langevin(x0, n_steps=self.a.langevin_steps,
                                   step_size=self.a.langevin_step_size,
                                   temperature=self.a.langevin_temp, return_traj=True)

    def log_density(self, x):
        return self.model.boltzmann_energy(x)  # Eq. (22): log p_B = Phi_B + const

class OTCFM:
    """Baseline 1 (EM Fig. 1): OT conditional flow matching (Tong et al., arXiv:2302.00482) with a
    time-dependent velocity MLP.

    loss = E || v(x_t, t) - (x1 - x0) ||^2,  x_t = t x1 + (1 - t) x0 + sigma * noise, (x0, x1)
    OT-paired; sigma = 0.1 as in Tong et al.'s 2-D experiments (--sigma). Sampling integrates
    dx/dt = v(x, t) from t = 0 to 1 with K Heun (or Euler) steps. No energy: no density, no NLL.
    """
    name = "otcfm"
    has_density = False

    def __init__(self, a):
        self.net = build_mlp(a, time=True, out_dim=2)
        self.sigma = method_sigma(a)
        self.a = a

    def loss(self, x1, x0, step):
        x0 = em.ot_pair(x0, x1)                                     # (x0[i], x1[i]) OT-coupled
        t = torch.rand(x1.shape[0], device=x1.device)               # t ~ U(0, 1)
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0                # straight path
        xt = xt + self.sigma * torch.randn_like(xt)                 # Gaussian tube of std sigma
        loss = (self.net(xt, t) - (x1 - x0)).pow(2).sum(1).mean()   # || v - u_t ||^2
        return loss, {"flow": loss.item()}

    @torch.no_grad()
    def sample(self, x0):
        K = self.a.ode_steps
        h, x, traj = 1.0 / K, x0, [x0]
        for k in range(K):
            t = k * h
            v = self.net(x, t)
            if self.a.cfm_solver == "heun":                         # mean slope of both ends
                x_pred = x + h * v
                x = x + 0.5 * h * (v + self.net(x_pred, t + h))
            else:
                x = x + h * v
            traj.append(x)
        return x, torch.stack(traj)

    def log_density(self, x):
        return None

def langevin_chain(E, x, n_steps, dt, temp, keep_traj=False):
    """Unadjusted Langevin on E: x <- x - dt grad E(x) + sqrt(2 dt T) eta, towards p ∝ exp(-E/T).

    A few plain lines for the CD baseline only (the EM module's sampler follows the EM schedule).
    """
    traj = [x.detach()] if keep_traj else None
    x = x.detach()
    for _ in range(n_steps):
        x.requires_grad_(True)
        g = torch.autograd.grad(E(x).sum(), x)[0]
        x = (x - dt * g + math.sqrt(2 * dt * temp) * torch.randn_like(x)).detach()
        if keep_traj:
            traj.append(x)
    return x, (torch.stack(traj) if keep_traj else None)

class CDEBM:
    """Baseline 2 (EM Fig. 1): a plain EBM E(x), p ∝ exp(-E/T), trained by contrastive divergence.

    Negatives: short-run Langevin chains (n_langevin steps of size chain_dt at temperature
    T = eps_max) started at the source distribution, no gradient through the chain. Loss (Hinton
    2002; Du & Mordatch 2019):  L = E(x+)/T - E(x-)/T + reg * (E(x+)^2 + E(x-)^2).
    Sampling runs the very chain it was trained with (a short-run EBM's model is its chain).
    """
    name = "cd"
    has_density = True

    def __init__(self, a):
        self.net = build_mlp(a)
        self.a = a

    def chain(self, x0, keep_traj=False):
        a = self.a
        return langevin_chain(self.net, x0, a.n_langevin, a.chain_dt or a.dt, a.eps_max,
                              keep_traj=keep_traj)

    def loss(self, x1, x0, step):
        x_neg, _ = self.chain(x0)                                   # sg(): the chain is detached
        e_pos, e_neg = self.net(x1), self.net(x_neg)
        cd = (e_pos.mean() - e_neg.mean()) / self.a.eps_max
        reg = self.a.cd_reg * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        return cd + reg, {"cd": cd.item(), "reg": reg.item()}

    def sample(self, x0):
        return self.chain(x0, keep_traj=True)

    def log_density(self, x):
        return -self.net(x) / self.a.eps_max

def build_method(a):
    return {"em": EMToy, "vpfb": VPFBToy, "otcfm": OTCFM, "cd": CDEBM}[a.method](a)

# ==== 4. Metrics ====
TEMP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

def w2_exact(x, y):
    """Exact 2-Wasserstein distance between two equal-size point clouds: sqrt of the OT cost
    (POT's ot.emd2)."""
    import ot
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    M = ot.dist(x, y)                                   # squared Euclidean cost |x_i - y_j|^2
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    return float(math.sqrt(max(ot.emd2(a, b, M, numItermax=10_000_000), 0.0)))

def mmd2_rbf(x, y, bandwidths):
    """Unbiased MMD^2 with k(x, y) = sum_s exp(-|x - y|^2 / (2 s^2)) over the given bandwidths."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    kxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))   # drop i = j (unbiased U-statistic)
    kyy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(kxx + kyy - 2 * kxy.mean())

def make_grid(lim, n, device):
    """Cell centres of an n x n grid over [-lim, lim]^2, and the cell area."""
    edges = torch.linspace(-lim, lim, n + 1, device=device)
    centres = 0.5 * (edges[1:] + edges[:-1])
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), (2 * lim / n) ** 2

def eval_in_chunks(fn, x, chunk=20000):
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])

def log_density_at(method, x):
    """The model's unnormalised log density at x, float64 (autograd on: VPFB's Phi_B may use it)."""
    with torch.enable_grad():
        return eval_in_chunks(lambda z: method.log_density(z).detach(), x).double()

def grid_density(method, a, device):
    """The model's Boltzmann density normalised on the grid: p(x) = exp(logp(x)) / Z,
    Z = sum_cells exp(logp) * cell area.

    2-D lets us normalise exactly (up to the Riemann sum and the box), so NLLs are comparable
    across methods. Returns (grid points, normalised log p on the grid (n*n,), log Z).
    """
    grid, area = make_grid(a.grid_lim, a.grid_n, device)
    logp = log_density_at(method, grid)
    log_z = torch.logsumexp(logp, 0) + math.log(area)
    need_finite(logp - log_z, f"{a.method}: the log density on the grid [-L, L]^2",
                f" (--grid-lim {a.grid_lim:g} too large, or a diverged network?)")
    return grid, logp - log_z, log_z

def nll_heldout(method, a, x_test, log_z):
    """Mean -log p(x) (nats) of held-out points inside the box, p normalised on the grid."""
    inside = (x_test.abs() <= a.grid_lim).all(1)
    logp = log_density_at(method, x_test[inside])
    return float(-(logp - log_z).mean()), int((~inside).sum())

def nll_flat(a):
    """NLL of the flat density on the box: ln of its area (ln 196 = 5.28 for [-7, 7]^2). A model
    density that scores above it is worse than knowing nothing but the box."""
    return math.log((2 * a.grid_lim) ** 2)

def nll_by_temperature(method, a, x_test, device, factors=TEMP_FACTORS):
    """NLL of exp(logp / c) for a few factors c, each normalised on the grid.

    For EM and CD, exp(-V / eps_max)^(1/c) is the Boltzmann density at temperature c * eps_max: if
    some c != 1 scores far better, the shape of the energy is right but its scale is not (a
    diagnostic; c is read off the held-out points, so it is not a fair NLL itself)."""
    grid, area = make_grid(a.grid_lim, a.grid_n, device)
    logp_grid = log_density_at(method, grid)
    inside = (x_test.abs() <= a.grid_lim).all(1)
    logp_test = log_density_at(method, x_test[inside])
    out = {}
    for c in factors:
        log_z = torch.logsumexp(logp_grid / c, 0) + math.log(area)
        out[c] = float(-(logp_test / c - log_z).mean())
    return out

def sample_from_grid(logp, a, n, gen):
    """Draw n points from the grid density (a cell by its mass, then uniform inside the cell)."""
    grid, _ = make_grid(a.grid_lim, a.grid_n, "cpu")
    idx = torch.multinomial(logp.exp().float().cpu(), n, replacement=True, generator=gen)
    cell = 2 * a.grid_lim / a.grid_n
    return grid[idx] + (torch.rand(n, 2, generator=gen) - 0.5) * cell

# ==== 5. Training loop ====
def train(method, a, device, gen, log_fn=print):
    """Plain Adam loop on fresh source/target batches; returns (loss history, seconds)."""
    opt = torch.optim.Adam(method.net.parameters(), lr=a.lr)
    hist = {"loss": [], "step": []}
    log_every = a.log_every or max(1, a.steps // 10)
    t0 = time.time()
    t_last, s_last = t0, 0
    for step in range(a.steps):
        x1 = sample_data(a.target, a.batch_size, gen).to(device)
        x0 = sample_data(a.source, a.batch_size, gen).to(device)
        loss, logs = method.loss(x1, x0, step)
        need_finite(loss.detach(), f"{a.method}: the training loss at step {step + 1}",
                    f" (--lr {a.lr:g} or another flag too large?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["loss"].append(loss.item())
        hist["step"].append(step)
        for k, v in logs.items():
            if k not in ("loss", "step"):                        # the total is under "loss"
                hist.setdefault(k, []).append(float(v))
        if (step + 1) % log_every == 0 or step + 1 == a.steps:
            now = time.time()
            ms = 1000 * (now - t_last) / (step + 1 - s_last)
            eta = (now - t0) / (step + 1) * (a.steps - step - 1)
            phase = f" [{method.phase(step)}]" if hasattr(method, "phase") else ""
            extra = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")
            log_fn(f"step {step + 1:>6}/{a.steps}{phase} loss {loss.item():.4g} {extra} | "
                   f"{ms:.1f} ms/iter, {1000 * a.batch_size / max(ms, 1e-9):.0f} samples/s | "
                   f"ETA {eta:.0f}s")
            t_last, s_last = now, step + 1
    return hist, time.time() - t0

# ==== 6. Checkpoint ====
def plain_args(a):
    return {k: v for k, v in vars(a).items()
            if isinstance(v, (str, int, float, bool, type(None), list))}

def save_checkpoint(path, method, a, step):
    """Self-describing checkpoint of the final network, written atomically (tmp + os.replace).

    Runs are short, so there is no resume; load with torch.load(path, weights_only=True).
    """
    ckpt = {"format": "toy2d/v1", "method": method.name, "model": method.net.state_dict(),
            "ema": None, "opt": None, "step": step, "args": plain_args(a)}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)

# ==== 7. Plots ====
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def plot_trajectories(path, traj, x_test, title, lim, n_paths=400, n_red=8):
    """EM Fig. 1 style: start (black), paths (green), end (blue), a few paths in red; right:
    samples vs held-out data."""
    plt = _plt()
    traj = traj.cpu().numpy()
    fig, ax = plt.subplots(1, 2, figsize=(11, 5.3))
    n = min(n_paths, traj.shape[1])
    ax[0].scatter(traj[0, :, 0], traj[0, :, 1], s=2, c="black", label="start (source)")
    ax[0].plot(traj[:, :n, 0], traj[:, :n, 1], c="green", lw=0.4, alpha=0.25)
    ax[0].scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="tab:blue", label="end (samples)")
    for i in range(min(n_red, traj.shape[1])):
        ax[0].plot(traj[:, i, 0], traj[:, i, 1], c="red", lw=1.2)
    ax[0].set_title(f"{title}: trajectories ({traj.shape[0] - 1} steps)")
    ax[0].legend(loc="upper right", fontsize=8, markerscale=4)
    x_test = x_test.cpu().numpy()
    ax[1].scatter(x_test[:, 0], x_test[:, 1], s=2, c="tab:orange", alpha=0.5,
                  label="held-out target")
    ax[1].scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="tab:blue", alpha=0.5, label="samples")
    ax[1].set_title("samples vs held-out target")
    ax[1].legend(loc="upper right", fontsize=8, markerscale=4)
    for a_ in ax:
        a_.set_xlim(-lim, lim)
        a_.set_ylim(-lim, lim)
        a_.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def plot_fields(path, method, a, device, x_test):
    """The landscape that drives the samples: V / E contours, Phi(x, t) over time (VPFB Fig. 1
    bottom) or |v| (OT-CFM)."""
    plt = _plt()
    n = 120
    grid, _ = make_grid(a.grid_lim, n, device)
    ext = [-a.grid_lim, a.grid_lim, -a.grid_lim, a.grid_lim]
    xt = x_test[:500].cpu().numpy()

    def scalar(fn):
        with torch.no_grad():
            return eval_in_chunks(fn, grid).reshape(n, n).cpu().numpy()

    if a.method in ("em", "cd"):
        name = "V(x)" if a.method == "em" else "E(x)"
        panels = [(f"{name} (samples move along -grad)", scalar(lambda z: method.net(z)))]
    elif a.method == "vpfb":
        ts = [0.0] if a.autonomous else [0.0, 0.25, 0.5, 0.75, 1.0]
        panels = []
        for t in ts:
            tt = min(t, method.model.t_max)       # beyond t_max the potential is frozen (Sec. 3.5)
            f = scalar(lambda z: method.net(z, torch.full((len(z),), tt, device=device)))
            panels.append((f"Phi(x, t={t:g})" + (" (autonomous)" if a.autonomous else ""), f))
    else:  # otcfm: no energy; show the speed |v(x, t)|
        panels = [(f"|v(x, t={t:g})| (OT-CFM has no energy)",
                   scalar(lambda z: method.net(z, t).norm(dim=1))) for t in [0.0, 0.5, 1.0]]
    fig, ax = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for axi, (title, f) in zip(ax[0], panels):
        im = axi.imshow(f, origin="lower", extent=ext, cmap="viridis", aspect="equal")
        axi.contour(f, levels=20, origin="lower", extent=ext, colors="white", linewidths=0.4,
                    alpha=0.6)
        axi.scatter(xt[:, 0], xt[:, 1], s=1, c="tab:orange", alpha=0.6)
        axi.set_title(title, fontsize=9)
        fig.colorbar(im, ax=axi, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plot_density(path, logp, a, x_test, title):
    """Grid-normalised Boltzmann density, its log (VPFB Fig. 2 middle), and a histogram of
    held-out target points."""
    plt = _plt()
    n, lim = a.grid_n, a.grid_lim
    ext = [-lim, lim, -lim, lim]
    dens = logp.exp().reshape(n, n).cpu().numpy()                 # logp is already normalised
    hist, _, _ = np.histogram2d(x_test[:, 1].cpu().numpy(), x_test[:, 0].cpu().numpy(), bins=n,
                                range=[[-lim, lim], [-lim, lim]], density=True)
    logd = np.maximum(logp.reshape(n, n).cpu().numpy(), logp.max().item() - 15)  # clip 15 nats
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    for axi, img, t in [(ax[0], dens, title),
                        (ax[1], logd, "log of the same density (clipped at max - 15)"),
                        (ax[2], hist, "held-out target (histogram)")]:
        im = axi.imshow(img, origin="lower", extent=ext, cmap="magma", aspect="equal")
        axi.set_title(t, fontsize=9)
        fig.colorbar(im, ax=axi, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plot_loss(path, hist, title, switch=None):
    """Loss and its components (raw and a moving average); log scale where a curve stays > 0."""
    plt = _plt()
    keys = [k for k in hist if k != "step" and len(hist[k]) > 0]
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, ax = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for axi in ax.flat[len(keys):]:
        axi.axis("off")
    for axi, k in zip(ax.flat, keys):
        y = np.asarray(hist[k])
        x = np.asarray(hist["step"])[-len(y):]  # components logged only in phase 2 sit at the end
        w = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        axi.plot(x, y, c="tab:blue", alpha=0.25, lw=0.6)
        axi.plot(x[w - 1:], smooth, c="tab:blue", lw=1.2)
        if np.all(y > 0):
            axi.set_yscale("log")
        if switch is not None and 0 < switch < len(hist["step"]):
            axi.axvline(switch, c="gray", ls="--", lw=0.8)
        axi.set_title(f"{title}: {k}", fontsize=9)
        axi.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# ==== 8. Experiment: train, evaluate, write ====
def fmt(v, nd=3):
    """A number for the table and log lines: n/a for None, fixed point, or 1 significant
    exponent for the huge NLLs."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.1e}" if abs(v) >= 1e4 else f"{v:.{nd}f}"

def run_one(a, log_fn=print):
    """Train one method, evaluate it, write plots + samples.npy + metrics.json; return metrics."""
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)              # training data stream
    gen_eval = torch.Generator().manual_seed(a.seed + 10_000)  # held-out data + evaluation noise
    method = build_method(a)
    method.net.to(device)
    tag = a.method + ("-autonomous" if a.method == "vpfb" and a.autonomous else "")
    n_par = sum(p.numel() for p in method.net.parameters())
    recipe = a.recipe + (f", vpfb recipe {a.vpfb_recipe}" if a.method == "vpfb" else "")
    log_fn(f"== {tag} (recipe {recipe}): {a.source} -> {a.target}, {a.steps} steps, batch "
           f"{a.batch_size}, MLP {a.hidden}x{a.depth}, {n_par} params, device {device}")
    x_test = sample_data(a.target, a.n_eval, gen_eval).to(device)
    x_ref = sample_data(a.target, a.n_eval, gen_eval).to(device)  # 2nd target sample: W2 floor
    x0 = sample_data(a.source, a.n_eval, gen_eval).to(device)
    # the untrained model's NLL: the baseline training must beat (uses no random numbers)
    nll_untrained = None
    if method.has_density:
        nll_untrained = nll_heldout(method, a, x_test, grid_density(method, a, device)[2])[0]

    hist, train_s = train(method, a, device, gen, log_fn)

    # --- evaluation: n_eval samples from fresh source points vs fresh held-out target points
    t_eval = time.time()
    torch.manual_seed(a.seed + 20_000)                             # sampler noise
    t_s = time.time()
    x_gen, traj = method.sample(x0)
    sample_s = time.time() - t_s
    x_gen, traj = x_gen.detach(), traj.detach()
    if not torch.allclose(traj[0], x0, atol=1e-5):      # some samplers do not store the start
        traj = torch.cat([x0[None], traj], 0)
    need_finite(x_gen, f"{tag}: the samples", " (a sampler step, --sigma or --lr too large?)")
    m = {"method": tag, "recipe": a.recipe, "source": a.source, "target": a.target,
         "steps": a.steps, "batch_size": a.batch_size, "n_eval": a.n_eval,
         "sampler_steps": traj.shape[0] - 1,
         "w2": w2_exact(x_gen.cpu(), x_test.cpu()),
         "w2_floor_target_vs_target": w2_exact(x_ref.cpu(), x_test.cpu()),
         "mmd2": mmd2_rbf(x_gen.cpu(), x_test.cpu(), a.bandwidths),
         "mmd_bandwidths": a.bandwidths, "mmd_kernel": "sum_s exp(-|x-y|^2/(2 s^2)), unbiased",
         "n_nonfinite_samples": 0}                          # need_finite: none, or exit 3
    if a.method == "em":
        m.update(steps_warmup=method.steps_warmup, steps_cd=method.steps_cd)
        if a.max_length > 0:
            m["max_length_reached"] = method.last_stop is not None
    if a.method in ("em", "otcfm"):
        m["sigma"] = method_sigma(a)
    if a.method == "vpfb":
        m["vpfb_recipe"], m["vpfb_preset"] = a.vpfb_recipe, method.preset
        m["vpfb_hparams_used"] = method.used()
    nfe = getattr(getattr(method, "model", None), "last_nfe", None)   # VPFB counts grad-Phi calls
    if nfe is not None:
        m["sampler_nfe"] = nfe

    # --- density on the grid (every method with an energy), NLL of held-out points, baselines
    m["nll_flat"] = nll_flat(a)
    m["nll_untrained"] = nll_untrained
    dens = grid_density(method, a, device) if method.has_density else None
    if dens is not None:
        grid, logp, log_z = dens
        m["nll"], m["nll_points_outside_box"] = nll_heldout(method, a, x_test, log_z)
        m["w2_grid_density"] = w2_exact(sample_from_grid(logp, a, a.n_eval, gen_eval),
                                        x_test.cpu())
        scan = nll_by_temperature(method, a, x_test, device)
        m["nll_by_temperature_factor"] = {f"{c:g}": v for c, v in scan.items()}
    else:
        m["nll"], m["nll_points_outside_box"], m["w2_grid_density"] = None, None, None
    m["nll_grid"] = f"[-{a.grid_lim:g},{a.grid_lim:g}]^2, {a.grid_n}x{a.grid_n} cells"

    # --- VPFB Fig. 2: Langevin samples on the Boltzmann energy Phi_B
    lang = None
    if a.method == "vpfb" and a.langevin_steps > 0:
        torch.manual_seed(a.seed + 30_000)
        x_l, lang = method.langevin(x0)
        x_l = x_l.detach()
        need_finite(x_l, f"{tag}: the Langevin samples on Phi_B",
                    f" (--langevin-step-size {a.langevin_step_size:g} too large?)")
        m["w2_langevin_boltzmann"] = w2_exact(x_l.cpu(), x_test.cpu())

    m.update(train_seconds=round(train_s, 2),
             ms_per_iter=round(1000 * train_s / max(a.steps, 1), 3),
             sample_seconds=round(sample_s, 2), device=str(device), torch=torch.__version__,
             cpu=cpu_name(), torch_threads=torch.get_num_threads())

    # --- write everything
    np.save(os.path.join(a.out_dir, "samples.npy"), x_gen.cpu().numpy())
    save_checkpoint(os.path.join(a.out_dir, "model.pt"), method, a, a.steps)
    if not a.no_plots:
        lim = a.grid_lim
        plot_trajectories(os.path.join(a.out_dir, "trajectories.png"), traj, x_test,
                          f"{tag} (W2 {m['w2']:.3f})", lim)
        plot_fields(os.path.join(a.out_dir, "energy.png"), method, a, device, x_test)
        if dens is not None:
            what = {"em": "exp(-V/eps_max)", "cd": "exp(-E/T)", "vpfb": "exp(Phi_B), Eq. (22)"}
            plot_density(os.path.join(a.out_dir, "density.png"), dens[1], a, x_test,
                         f"{tag}: {what[a.method]} normalised on the grid "
                         f"(NLL {fmt(m['nll'])}, flat {m['nll_flat']:.2f})")
        if lang is not None:
            lang = lang.detach()
            if not torch.allclose(lang[0], x0, atol=1e-5, equal_nan=True):
                lang = torch.cat([x0[None], lang], 0)
            plot_trajectories(os.path.join(a.out_dir, "langevin.png"), lang, x_test,
                              f"{tag} Langevin on Phi_B (W2 {m['w2_langevin_boltzmann']:.3f})", lim)
        if hist["loss"]:
            plot_loss(os.path.join(a.out_dir, "loss.png"), hist, tag,
                      switch=getattr(method, "steps_warmup", None))
    m["eval_seconds"] = round(time.time() - t_eval, 2)
    m["args"] = plain_args(a)
    with open(os.path.join(a.out_dir, "metrics.json"), "w") as f:  # NaN -> null: strict JSON
        f.write(em.strict_json(m, indent=2))
    log_fn(f"   {tag}: W2 {m['w2']:.4f} (floor {m['w2_floor_target_vs_target']:.4f}) | MMD^2 "
           f"{m['mmd2']:.5f} | NLL {fmt(m['nll'])} (flat {m['nll_flat']:.3f}, untrained "
           f"{fmt(m['nll_untrained'])}) | train {train_s:.1f}s, eval {m['eval_seconds']:.1f}s "
           f"-> {a.out_dir}")
    return m

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

def markdown_table(rows):
    lines = ["| method | source -> target | train steps | sampler steps | W2 (target-vs-target "
             "floor) | MMD^2 | NLL (nats) | NLL untrained | NLL flat | W2 of grid density | "
             "train s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        lines.append(f"| {m['method']} | {m['source']} -> {m['target']} | {m['steps']} | "
                     f"{m['sampler_steps']} | {m['w2']:.3f} ({m['w2_floor_target_vs_target']:.3f})"
                     f" | {m['mmd2']:.4f} | {fmt(m['nll'])} | {fmt(m['nll_untrained'])} | "
                     f"{m['nll_flat']:.3f} | {fmt(m['w2_grid_density'])} | "
                     f"{m['train_seconds']:.1f} | {m['train_seconds'] + m['eval_seconds']:.1f} |")
    return "\n".join(lines)

def em_vs_baselines(rows):
    """EM's W2 against the best baseline (OT-CFM, CD-EBM) at equal steps; the goal is <= 1.5x."""
    ems = [m for m in rows if m["method"] == "em"]
    base = [m for m in rows
            if m["method"] in ("otcfm", "cd") and m["source"] == (ems[0]["source"] if ems else "")]
    if not ems or not base:
        return ""
    best = min(base, key=lambda m: m["w2"])
    r = ems[0]["w2"] / best["w2"]
    return (f"EM W2 {ems[0]['w2']:.3f} / best baseline W2 {best['w2']:.3f} ({best['method']}) = "
            f"{r:.2f} (goal <= 1.5 at equal steps: {'met' if r <= 1.5 else 'NOT met'})")

# ==== 9. Arguments, recipes and main ====
die = em.die        # one line "error: ..." on stderr; exit 2: bad input, 3: NaN / inf (need_finite)

def need_finite(x, what, hint=""):
    """The NaN guard: a loss, samples or a density with NaN / inf end the run here, one line and
    exit 3, before anything is written (no model.pt, samples.npy or metrics.json that would pass
    for a result)."""
    bad = int((~torch.isfinite(torch.as_tensor(x))).sum())
    if bad:
        die(f"{what}: {bad} of {torch.as_tensor(x).numel()} values are NaN or inf"
            f"{hint}; nothing written", 3)

METHODS = ["em", "vpfb", "otcfm", "cd", "all"]

# `--recipe authors`: the EM authors' 2-D run, read from the notebook and utils_2D.py under
# experiments/toy2d of https://github.com/m1balcerak/EnergyMatching. Sampler: Euler until the
# path length reaches 500 (tau_s = 5 is only the cap). Flags on the command line win over these.
RECIPES = {
    "ours": {},
    "authors": dict(steps=22000, cd_share=2000 / 22000, batch_size=128, lr=1e-4, hidden=256,
                    depth=4, first_act="relu", n_langevin=200, chain_dt=0.01, chain_clock="authors",
                    lambda_cd=2.0, tau_star=0.8, eps_max=0.15, cd_trim=0.0, cd_neg_clamp=0.0,
                    flow_weighting=True, sigma=0.1, fresh_cd_batch=True, em_sampler="euler",
                    dt=0.01, max_length=500.0, tau_s=5.0),
}

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage and a line: we promise exactly one line
        # a number type's "argument --lr: must be ..." reads as check_args does: "--lr must be ..."
        die(re.sub(r"^argument ([^:]+): must ", r"\1 must ", message))

F32_MAX = em.FLOAT32_MAX            # 3.4e38: the networks compute in float32

def _number(ok, what):
    """An argparse type for a float flag: NaN, inf, values failing `ok` and values beyond float32's
    range (the tensors they enter overflow: a traceback, or exit 0 with NaN samples) are input
    errors, caught before any training (a bad --tau-s used to train fully, then fail)."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        if abs(v) > F32_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {F32_MAX:.3g} in size (float32, "
                                             f"the networks' precision), got {s!r}")
        return v
    return parse

def seed_int(s):
    """--seed: an integer numpy's global seed takes (0 <= seed < 2**32); torch takes them all."""
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {s!r}")
    return v

pos_float = _number(lambda v: v > 0, "> 0 and finite")
nonneg_float = _number(lambda v: v >= 0, ">= 0 and finite")
frac_float = _number(lambda v: 0 <= v <= 1, "in [0, 1]")
unit_float = _number(lambda v: 0 <= v < 1, "in [0, 1)")
time_float = _number(lambda v: 0 < v <= 1, "in (0, 1]")
open_time_float = _number(lambda v: 0 < v < 1, "in (0, 1)")

def build_parser():
    p = Parser(description="2-D laboratory for Energy Matching, VPFB and two baselines "
                           "(OT-CFM, CD-EBM).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--method", default="em", choices=METHODS,
                   help="em = Energy Matching, vpfb = Variational Potential Flow Bayes, otcfm = OT "
                        "conditional flow matching baseline, cd = contrastive-divergence EBM "
                        "baseline, all = every method and a markdown table")
    g.add_argument("--recipe", default="ours", choices=sorted(RECIPES),
                   help="ours = sized for a laptop CPU (values below); authors = the EM authors' "
                        "2-D notebook run (22000 steps, MLP 256x4, 200-step chains on their clock, "
                        "sigma 0.1, flow weighting, Euler sampler stopped by path length 500); "
                        "explicit flags override the recipe")
    g.add_argument("--source", default="auto", choices=SOURCES,
                   help="noise distribution; auto = the paper's choice (8gauss for em/otcfm/cd, "
                        "gauss for vpfb)")
    g.add_argument("--target", default="moons", choices=TARGETS, help="data distribution")
    g.add_argument("--steps", type=int, default=3000,
                   help="total optimiser steps, the same for every method (EM: warm-up + CD phase)")
    g.add_argument("--steps-cd", type=int, default=None,
                   help="EM only: phase-2 (flow + CD) steps, counted inside --steps; "
                        "default a share of --steps (ours 1/10, authors 2000 of 22000)")
    g.add_argument("--batch-size", type=int, default=256, help="batch size")
    g.add_argument("--lr", type=pos_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--hidden", type=int, default=128, help="MLP width")
    g.add_argument("--depth", type=int, default=3, help="number of hidden layers of the MLP")
    g.add_argument("--first-act", default="silu", choices=["silu", "relu"],
                   help="activation after the first layer (the EM authors' 2-D MLP: relu, then "
                        "silu)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="random seed (torch, numpy, data streams), in [0, 2**32)")
    g.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--out-dir", default=None,
                   help="output folder; default runs/<method>_<source>_<target> (with --method "
                        "all: one sub-folder per method under it, default runs/)")
    g.add_argument("--n-eval", type=int, default=2000,
                   help="generated and held-out target points for the metrics (>= 2)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = the cores available less the 1-minute load "
                        "average, at least 1 (1 is as fast as 2 for these tiny MLPs)")
    g.add_argument("--log-every", type=int, default=0,
                   help="progress line every N steps (0 = about 10 lines)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNGs (metrics only)")

    g = p.add_argument_group("Energy Matching (passed to energy_matching.EnergyMatching)")
    g.add_argument("--tau-star", type=frac_float, default=0.8,
                   help="tau*, Eq. (3): temperature is 0 before it")
    g.add_argument("--eps-max", type=pos_float, default=0.15,
                   help="eps_max, Eq. (3): equilibrium temperature; also the CD baseline's "
                        "Langevin temperature")
    g.add_argument("--lambda-cd", type=nonneg_float, default=0.5,
                   help="weight of L_CD in phase 2 (Alg. 2, line 16)")
    g.add_argument("--n-langevin", type=int, default=50,
                   help="Langevin steps per negative chain in phase 2; also the CD baseline's "
                        "chain (training and sampling)")
    g.add_argument("--dt", type=pos_float, default=0.01, help="EM sampler step size Delta t")
    g.add_argument("--tau-s", type=pos_float, default=1.25,
                   help="EM sampling time tau_s: round(tau_s/dt) steps (with --max-length: the "
                        "cap)")
    g.add_argument("--chain-dt", type=nonneg_float, default=0.03,
                   help="step of the phase-2 Langevin negative chains and of the CD baseline's "
                        "chains (0 = use --dt)")
    g.add_argument("--chain-clock", default="alg2", choices=["alg2", "authors"],
                   help="chain time t of Langevin step m, read by eps(t) for the noise-started "
                        "negatives: alg2 = m * chain_dt (Alg. 2); authors = (m + 1) / n_langevin "
                        "(their 2-D code: eps > 0 only in the chain's last (1 - tau*) share)")
    g.add_argument("--fresh-cd-batch", action=argparse.BooleanOptionalAction, default=False,
                   help="EM phase 2: CD positives and data-started negatives from a fresh data "
                        "batch, not the flow batch (the authors' 2-D code)")
    g.add_argument("--cd-trim", type=unit_float, default=0.0,
                   help="EM: fraction of highest negative energies dropped (authors' CIFAR code "
                        "0.1, 2-D code 0)")
    g.add_argument("--cd-neg-clamp", type=nonneg_float, default=0.0,
                   help="EM: lambda*CD clamped below at -this (0 = none, as the authors' 2-D code)")
    g.add_argument("--flow-weighting", action=argparse.BooleanOptionalAction, default=False,
                   help="EM phase 2: flow loss weighted by w(t) = 1 before tau*, linear to 0 at "
                        "t = 1 (authors' 2-D code; not in the paper)")
    g.add_argument("--em-sampler", default="heun", choices=["heun", "euler"],
                   help="EM sampler scheme (the authors' 2-D notebook: euler)")
    g.add_argument("--max-length", type=nonneg_float, default=0.0,
                   help="EM: stop the sampler once the summed step length ||dx|| (Frobenius, over "
                        f"the first {AUTHORS_BATCH} chains) passes this, as the authors' notebook "
                        "(500); 0 = run to tau_s")

    g = p.add_argument_group("VPFB (passed to vpfb.VPFB)")
    g.add_argument("--vpfb-recipe", default="ours", choices=list(VPFB_PRESETS),
                   help="VPFB's loss preset, under the flags below: ours = vpfb.OURS (by-parts "
                        "covariance stein, w(t) on E|grad Phi|^2, kappa 1, lam_gt 0.01); paper = "
                        "vpfb.VPFB as printed (Eq. 27: cov, kappa 2, lam_gt 1); authors = "
                        "vpfb.AUTHORS (their code's loss)")
    g.add_argument("--autonomous", action="store_true",
                   help="time-independent potential Phi(x) (VPFB Sec. 4.2)")
    g.add_argument("--kappa", type=nonneg_float, default=None,
                   help="kappa in w(t) = (1 - t)^kappa, Eq. (27); default: the preset's")
    g.add_argument("--t-end", type=time_float, default=None,
                   help="t ~ U(0, t_end), Eq. (26); default: the preset's")
    g.add_argument("--t-max", type=open_time_float, default=None,
                   help="stationarity cutoff: t is clamped to t_max beyond it (Sec. 3.5); "
                        "default: the preset's")
    g.add_argument("--eta", type=nonneg_float, default=None,
                   help="Poincare weight eta, Eq. (27); default: the preset's")
    g.add_argument("--cov-form", default=None, choices=["stein", "cov", "corr"],
                   help="VPFB's covariance term of Eq. (27): stein (by parts, low variance), cov "
                        "(as printed), corr (authors'); default: the preset's")
    g.add_argument("--t-inf", type=open_time_float, default=None,
                   help="time at which the Boltzmann energy Phi_B (Eq. 22) is read off; default "
                        "t_max = 1 - 1e-5, where 1/g^2 = 5e4 magnifies the network's error "
                        "(try 0.95)")
    g.add_argument("--ode-method", default="euler", choices=["euler", "rk45"],
                   help="VPFB ODE solver for dx/dt = grad Phi (the VPFB 2-D figure uses Euler)")
    g.add_argument("--ode-steps", type=int, default=150,
                   help="sampler steps of VPFB (Euler) and OT-CFM (ODE)")
    g.add_argument("--langevin-steps", type=int, default=300,
                   help="VPFB: Langevin steps on Phi_B for the Boltzmann samples of Fig. 2 "
                        "(0 = skip)")
    g.add_argument("--langevin-step-size", type=pos_float, default=0.01,
                   help="VPFB: Langevin step size")
    g.add_argument("--langevin-temp", type=nonneg_float, default=1.0,
                   help="VPFB: Langevin temperature")

    g = p.add_argument_group("baselines and the OT path")
    g.add_argument("--sigma", type=nonneg_float, default=None,
                   help="std of the Gaussian tube around the straight path x_t (OT-CFM's sigma); "
                        "default: 0.1 for OT-CFM (Tong et al.), 0 for EM (Alg. 1); the EM "
                        "authors' 2-D notebook uses 0.1 in its OT matcher (--recipe authors)")
    g.add_argument("--cfm-solver", default="heun", choices=["heun", "euler"],
                   help="OT-CFM ODE scheme")
    g.add_argument("--cd-reg", type=nonneg_float, default=0.1,
                   help="CD-EBM: weight of the energy-magnitude regulariser E(x+)^2 + E(x-)^2 "
                        "(Du & Mordatch)")

    g = p.add_argument_group("metrics")
    g.add_argument("--grid-lim", type=pos_float, default=7.0,
                   help="density grid is [-L, L]^2; held-out points outside it are counted and "
                        "left out of NLL")
    g.add_argument("--grid-n", type=int, default=200, help="density grid cells per axis")
    g.add_argument("--mmd-bandwidths", default="0.1,0.5,1,2",
                   help="RBF bandwidths sigma for MMD^2 (kernel = sum of exp(-|x-y|^2 / "
                        "(2 sigma^2)))")
    p.set_defaults(cd_share=0.1)          # phase-2 share of --steps when --steps-cd is not given
    return p

def parse_args(argv=None):
    """Parse twice: the recipe's values become the defaults, so explicit flags still win."""
    p = build_parser()
    recipe = p.parse_known_args(argv)[0].recipe
    p.set_defaults(**RECIPES[recipe])
    return check_args(p.parse_args(argv))

def check_args(a):
    if a.steps < 0:
        die(f"--steps must be >= 0, got {a.steps}")
    if a.steps_cd is not None and a.steps_cd < 0:
        die(f"--steps-cd must be >= 0, got {a.steps_cd}")
    if a.steps_cd is not None and a.steps_cd > a.steps:
        die(f"--steps-cd ({a.steps_cd}) cannot exceed --steps ({a.steps}); it counts inside "
            "the total")
    for name in ["batch_size", "hidden", "depth", "n_eval", "grid_n"]:
        if getattr(a, name) <= 0:
            die(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.batch_size < 2:
        die("--batch-size must be >= 2 (half the CD negatives start at data, half at noise)")
    if a.n_eval < 2:
        die(f"--n-eval must be >= 2 (the unbiased MMD^2 needs two points), got {a.n_eval}")
    for name in ["n_langevin", "langevin_steps", "log_every"]:
        if getattr(a, name) < 0:
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.ode_steps <= 0:
        die(f"--ode-steps must be > 0, got {a.ode_steps}")
    if a.threads < 0:
        die(f"--threads must be >= 0 (0 = auto), got {a.threads}")
    if a.grid_n < 2:
        die(f"--grid-n must be >= 2 (a density needs cells to tell places apart), got {a.grid_n}")
    check_sizes(a)
    check_work(a)
    a.threads = em.pick_threads(a.threads)         # one count for every run of --method all
    try:
        a.bandwidths = [float(s) for s in a.mmd_bandwidths.split(",") if s.strip()]
        assert a.bandwidths and all(0 < b <= F32_MAX for b in a.bandwidths)
    except (ValueError, AssertionError):
        die("--mmd-bandwidths must be a comma-separated list of finite numbers > 0 (at most "
            f"{F32_MAX:.3g}), got {a.mmd_bandwidths!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device):   # meta, mps, ...: a traceback later
        die(f"unknown --device {a.device!r} (use auto, cpu, cuda or cuda:N)")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {a.device} asked for, but CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        die(f"--device {a.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return a

def check_sizes(a):
    """Sizes whose arrays cannot fit in memory, refused before any work (they were a traceback or
    a swap storm): n x n float64 matrices of exact W2 / MMD (--n-eval) and of the OT pairing
    (--batch-size), the density grid (--grid-n), the MLP with Adam (--hidden, --depth)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = {"--n-eval": (a.n_eval, 4 * 8 * a.n_eval ** 2),
            "--batch-size": (a.batch_size, 4 * 8 * a.batch_size ** 2),
            "--grid-n": (a.grid_n, 8 * 8 * a.grid_n ** 2),
            "--hidden": (a.hidden, 4 * 4 * a.hidden ** 2 * a.depth)}
    for flag, (v, b) in need.items():
        if b > ram / 2:
            die(f"{flag} {v} needs about {b / 2 ** 30:.3g} GiB, more than half of this machine's "
                f"{ram / 2 ** 30:.0f} GiB")

def check_work(a):
    """Flag values that would run and report garbage with exit 0, refused before any work: a grid
    that cannot hold the held-out points (NLL of a few of them, or of none: NaN), sampler or
    negative chains of zero steps."""
    methods = METHODS[:-1] if a.method == "all" else [a.method]
    x_test = sample_data(a.target, a.n_eval, torch.Generator().manual_seed(a.seed + 10_000))
    far = float(x_test.abs().max())                   # run_one's held-out points, drawn the same
    out = int((x_test.abs() > a.grid_lim).any(1).sum())
    if out > 0.01 * a.n_eval:
        die(f"--grid-lim {a.grid_lim:g}: {out} of the {a.n_eval} held-out {a.target} points lie "
            f"outside the grid [-L, L]^2 (they reach {far:.2f}); use --grid-lim {math.ceil(far)}")
    if "em" in methods and round(a.tau_s / a.dt) == 0:
        die(f"--tau-s {a.tau_s:g} with --dt {a.dt:g} gives a sampler of 0 steps (round(tau_s / "
            f"dt)); use --tau-s >= --dt")
    steps_cd = round(a.steps * a.cd_share) if a.steps_cd is None else a.steps_cd
    if a.n_langevin == 0 and ("cd" in methods or ("em" in methods and steps_cd > 0)):
        user = "the CD baseline" if "cd" in methods else "EM's phase 2"
        die(f"--n-langevin 0: {user} would use negative chains of 0 steps (its negatives are then "
            f"its starting points); use --n-langevin >= 1")

def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to output folder {path!r}: {e.strerror or e}")

def main(argv=None):
    a = parse_args(argv)
    if a.method != "all":
        if a.source == "auto":
            a.source = DEFAULT_SOURCE[a.method]
        tag = a.method + ("-autonomous" if a.method == "vpfb" and a.autonomous else "")
        a.out_dir = a.out_dir or os.path.join("runs", f"{tag}_{a.source}_{a.target}")
        prepare_out_dir(a.out_dir)
        run_one(a)
        return
    # --method all: every method with the same steps / batch / network, each with its paper's source
    root = a.out_dir or "runs"
    prepare_out_dir(root)
    rows = []
    for meth, auto in [("em", False), ("otcfm", False), ("cd", False), ("vpfb", False),
                       ("vpfb", True)]:
        b = argparse.Namespace(**vars(a))
        b.method, b.autonomous = meth, auto
        b.source = DEFAULT_SOURCE[meth] if a.source == "auto" else a.source
        tag = meth + ("-autonomous" if auto else "")
        b.out_dir = os.path.join(root, f"{tag}_{b.source}_{b.target}")
        prepare_out_dir(b.out_dir)
        rows.append(run_one(b))
    table = markdown_table(rows)
    verdict = em_vs_baselines(rows)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table + "\n\n" + verdict + "\n")
    print("\n" + table + "\n\n" + verdict)
    print(f"\nCPU: {cpu_name()}, torch threads {torch.get_num_threads()}; table in {root}/table.md")

if __name__ == "__main__":
    main()
