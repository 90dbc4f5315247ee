"""Energy Matching on images, in one file meant to be read beside the paper.

Paper: M. Balcerak et al., "Energy Matching: Unifying Flow Matching and Energy-Based Models for
Generative Modeling", arXiv:2504.10612. Authors' code: https://github.com/m1balcerak/EnergyMatching
One time-independent scalar potential V(x). Samples move along -grad V: an OT-like flow far from the
data, then Langevin noise at temperature eps(t) (Eq. 3) near it, so that the end state is the
Boltzmann density p(x) ∝ exp(-V(x) / eps_max) (Eq. 6). Phase 1 (Alg. 1) fits -grad V(x_t) to
x1 - x0 on exact minibatch-OT pairs; phase 2 (Alg. 2) adds lambda_CD * contrastive divergence on
Langevin negatives. EnergyMatching(V) is the paper as printed; EnergyMatching(V, **AUTHORS) is the
authors' CIFAR-10 code, the default of the command line (--recipe authors | paper).

How to run (`python energy_matching.py --help` lists every flag with its default):
    python energy_matching.py --dataset cifar10 --phase warmup       # phase 1, Alg. 1
    python energy_matching.py --dataset cifar10 --phase main         # phase 2, Alg. 2
    python energy_matching.py --mode sample --num-samples 50000      # samples.npz for eval_fid.py
    python energy_matching_experiments.py --mode inpaint --dataset celeba64   # Alg. 3, +- W
    python energy_matching_experiments.py --mode lid --dataset mnist  # Hessian LID vs PNG size
    python energy_matching.py --dataset npz --data-dir digits.npz    # any uint8 N x H x W x C array

Where the maths lives (section 1): Eq. 3 `temperature`; Alg. 1 `EnergyMatching.flow_loss` with
`ot_pair` (authors: `ot_draw_pairs`); Alg. 2 `negatives`, `cd_loss`, `loss`; Eq. 6 / Alg. 2 line 8
`langevin`; the sampler `sample`; Alg. 3 / Eqs. 7-8 `inverse_langevin`; Sec. 3.3 / App. B
`lid_exact`, `lid_slq`.
Section 2: the networks (Fig. 5 UNet + ViT, App. C CNN). Below the divider: engineering only.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== 1. The method ====
def temperature(t, tau_star, eps_max):
    """Eq. (3): eps(t) = 0 for t < tau*, eps_max (t - tau*)/(1 - tau*) on [tau*, 1], eps_max after.
    t: a float or a tensor. tau* = 1 (authors' CIFAR code) is a step: eps_max from t = 1 on."""
    if torch.is_tensor(t):
        if tau_star >= 1.0:
            return torch.where(t < 1.0, torch.zeros_like(t), torch.full_like(t, eps_max))
        ramp = eps_max * ((t - tau_star) / (1.0 - tau_star)).clamp(0.0, 1.0)
        return torch.where(t < tau_star, torch.zeros_like(t), ramp)
    t = float(t)
    if t >= 1.0:
        return float(eps_max)                                         # equilibrium regime
    if t < tau_star:
        return 0.0                                                    # flow regime: no entropy
    return float(eps_max) * (t - tau_star) / (1.0 - tau_star)  # linear ramp between tau* and 1

@torch.no_grad()
def ot_plan(x0, x1):
    """Exact minibatch OT plan (Alg. 1 line 5) between two batches of B, uniform weights: a (B, B)
    float64 CPU tensor, a permutation / B; the cost in float64: a plan independent of dtype."""
    import ot
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"ot_pair needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    B = x0.shape[0]
    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    M = torch.cdist(a, b).pow(2).numpy()                              # M_ij = ||x0_i - x1_j||^2
    w = np.full(B, 1.0 / B)                                           # uniform empirical measures
    return torch.from_numpy(ot.emd(w, w, M, numItermax=10_000_000))   # (B, B)

@torch.no_grad()
def ot_pair(x0, x1):
    """x0 reordered so that (x0[i], x1[i]) are the plan's B pairs: each x0 and x1 used once (the
    paper's reading of Alg. 1 line 5)."""
    perm = ot_plan(x0, x1).argmax(0).to(x0.device)                   # column j (x1_j) -> its row i
    return x0[perm]

@torch.no_grad()
def ot_draw_pairs(x0, x1):
    """B pairs (x0[i], x1[j]) drawn from the plan with replacement (authors' code: torchcfm's
    OTPlanSampler.sample_plan): about 1 - 1/e of them distinct at large B. -> (x0', x1')."""
    B = x0.shape[0]
    p = ot_plan(x0, x1).flatten()
    k = torch.multinomial(p / p.sum(), B, replacement=True).to(x0.device)   # (i, j) = divmod(k, B)
    return x0[k // B], x1[k % B]

def math_sdpa():
    """Attention through the math SDPA kernel: the only one with a double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])

def grad_V(V, x, create_graph=False):
    """grad_x V(x) for a batch: autograd of sum_i V(x_i). create_graph=True only for the flow loss,
    which differentiates it again w.r.t. theta; chains detach it (the sg(.) of Alg. 2)."""
    kern = math_sdpa() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), kern:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(V(x).float().sum(), x, create_graph=create_graph)
    return g.to(x.dtype)

def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))                   # (B,) -> (B, 1, ..., 1)

class EnergyMatching:
    """The method: a scalar potential V (any module x -> (B,)), its two losses and its sampler.
    EnergyMatching(V) is the paper as printed: Alg. 1-2 with App. C's CIFAR-10 numbers (tau* 0.9,
    eps_max 0.01, lambda_CD 2e-4, 200 Langevin steps of dt 0.01, tau_s 3). AUTHORS below is their
    CIFAR-10 code. Switches where the two differ (README, "Paper vs code"):
      flow_reduction    "sum" = ||.||^2 of Alg. 1 (paper) | "mean" over pixels (code)
      flow_weighting    code: fade the flow loss to 0 between tau* and t = 1 in phase 2 (2-D)
      flow_weighting_warmup  code: the same in phase 1 (CIFAR-10 code: both phases)
      cd_neg_clamp      code: lambda_CD CD >= -cd_neg_clamp (0 = off, paper)
      cd_trim           code: drop the top cd_trim fraction of V(negatives) (0 = paper)
      same_temperature  data-started negatives follow eps(t) too (code), not eps_max (Alg. 2 l. 10)
      clamp_negatives   (lo, hi): clamp the chains' end state (code: (-1, 1) on images)
      chain_clock       m -> t, the chain time of Langevin step m (default t = m dt, Alg. 2)
      ot_sigma          std of noise around the straight path (OT-CFM's sigma; paper: 0)
      ot_replace        code: B pairs drawn from the OT plan with replacement (torchcfm), so some
                        pairs repeat and some images drop out; paper: the permutation, all once
    The noise-started negatives start from fresh noise (Alg. 2 line 5, and the code), not the flow
    term's x0: pass x0_cd to loss() to choose the starts.
    """

    def __init__(self, V, tau_star=0.9, eps_max=0.01, lambda_cd=2e-4, n_langevin=200, dt=0.01,
                 cd_neg_clamp=0.0, cd_trim=0.0, neg_data_frac=0.5, flow_reduction="sum",
                 tau_s=3.0, clamp_negatives=None, use_ot=True, flow_weighting=False,
                 same_temperature=False, chain_clock=None, ot_sigma=0.0, ot_replace=False,
                 flow_weighting_warmup=False):
        self.V, self.lambda_cd = V, float(lambda_cd)
        self.tau_star, self.eps_max = float(tau_star), float(eps_max)
        self.n_langevin, self.dt, self.tau_s = int(n_langevin), float(dt), float(tau_s)
        self.cd_neg_clamp, self.cd_trim = cd_neg_clamp, float(cd_trim)
        self.neg_data_frac = float(neg_data_frac)  # negatives started at data (paper: half)
        self.clamp_negatives = clamp_negatives
        self.use_ot, self.ot_sigma, self.flow_reduction = use_ot, float(ot_sigma), flow_reduction
        self.ot_replace = bool(ot_replace)
        if flow_reduction not in ("sum", "mean"):
            raise ValueError(f"flow_reduction: 'sum' or 'mean', not {flow_reduction!r}")
        self.flow_weighting, self.flow_weighting_warmup = flow_weighting, flow_weighting_warmup
        self.same_temperature, self.chain_clock = bool(same_temperature), chain_clock

    def eps(self, t):
        return temperature(t, self.tau_star, self.eps_max)           # Eq. (3)

    def energy(self, x):
        return self.V(x).float()                                      # V(x), fp32 (B,)

    # --- the flow-like objective L_OT (Sec. 2.1.1, Alg. 1) ---
    def flow_weight(self, t):
        """Authors' code, not the paper: w(t) = 1 for t < tau*, linear to 0 at t = 1 (near the data
        the flow asks grad V = x0 - x1 != 0 while CD asks for minima; the fade leaves it to CD)."""
        if self.tau_star >= 1.0:
            return torch.ones_like(t)
        return ((1.0 - t) / (1.0 - self.tau_star)).clamp(0.0, 1.0)

    def flow_loss(self, x1, x0, weighted=False):
        """L_OT = E ||grad V(x_t) + x1 - x0||^2 on OT pairs: -grad V is the path's velocity."""
        if self.use_ot and self.ot_replace:                         # authors' code (torchcfm)
            x0, x1 = ot_draw_pairs(x0, x1)
        elif self.use_ot:
            x0 = ot_pair(x0, x1)                                      # Alg. 1 line 5: T = OT map
        t = torch.rand(x1.shape[0], device=x1.device)                 # Alg. 1 line 6: t ~ U(0, 1)
        tb = _bcast(t, x1)
        xt = tb * x1 + (1 - tb) * x0  # x_t = (1 - t) T(x_data) + t x_data
        if self.ot_sigma > 0:
            xt = xt + self.ot_sigma * torch.randn_like(xt)            # OT-CFM: x_t + sigma N(0, I)
        r = self.flow_residual(xt, x1 - x0)  # ||grad V(x_t) + x1 - T(x1)||^2 per sample
        if weighted:
            r = self.flow_weight(t) * r                               # w(t) ||.||^2 (authors' code)
        return r.mean()

    def flow_residual(self, xt, u):
        """||grad V(x_t) + u||^2 per sample, summed over pixels (paper) or averaged (code); the
        graph of grad V is kept: the loss differentiates it again w.r.t. theta."""
        r = (self.flow_grad(xt).float() + u).flatten(1).pow(2)
        return r.mean(1) if self.flow_reduction == "mean" else r.sum(1)

    def flow_grad(self, xt):
        """grad V(x_t), its graph kept: the flow loss differentiates it again w.r.t. theta."""
        return grad_V(self.V, xt, create_graph=True)

    # --- the contrastive objective L_CD (Sec. 2.1.2, Alg. 2 lines 5-15) ---
    def negatives(self, x1, x0=None):
        """Langevin negatives: the first floor(neg_data_frac B) of the batch start at data x1
        (B // 2 at a half, odd B as in the code), the rest at x0, fresh N(0, I) when x0 is None.
        Noise-started chains follow eps(t); data-started ones stay at eps_max (Alg. 2 line 10)
        unless same_temperature. Returns (x_neg, at_data)."""
        B = x1.shape[0]
        n_data = int(self.neg_data_frac * B)
        at_data = torch.arange(B, device=x1.device) < n_data
        noise = torch.randn_like(x1[n_data:]) if x0 is None else x0[n_data:]
        x_init = torch.cat([x1[:n_data], noise])                      # Alg. 2 line 5
        hot = at_data & (not self.same_temperature)

        def eps_fn(t):                                                # per-sample eps^(m)
            return torch.where(hot, self.eps_max, self.eps(t))

        x_neg = langevin(self.V, x_init, self.n_langevin, self.dt, eps_fn,
                         clamp=self.clamp_negatives, clock=self.chain_clock)
        return x_neg, at_data

    def cd_loss(self, x1, x0=None):
        """L_CD = E_data[V] - E_neg[V(sg(x~))] (Alg. 2 lines 13-15, as printed there and in the
        code; Sec. 2.1.2 also divides by eps_max, which lambda_CD absorbs). cd_trim: the code's."""
        x_neg, _ = self.negatives(x1, x0)     # the network stays in train mode, as in the code
        e_pos = self.energy(x1)                                       # Alg. 2 line 14
        e_neg = self.energy(x_neg)                                    # Alg. 2 line 13
        k = int(self.cd_trim * e_neg.shape[0])
        neg_stat = e_neg.sort().values[:e_neg.shape[0] - k].mean() if k > 0 else e_neg.mean()
        cd = e_pos.mean() - neg_stat                                  # Alg. 2 line 15
        return cd, {"cd": cd.item(), "e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item()}

    def loss(self, x1, x0=None, phase="warmup", x1_cd=None, x0_cd=None):
        """"warmup": L_OT (Alg. 1). "main": L_OT + lambda_CD L_CD (Alg. 2 line 16). x0: the noise
        x0 ~ N(0, I) (drawn if None, Alg. 1 line 4); x1_cd: a second data batch for CD (code;
        default x1); x0_cd: starts of the noise-started negatives (default fresh noise; x0_cd = x0
        reuses the flow term's noise). -> (loss, dict of floats)."""
        if phase not in ("warmup", "main"):
            raise ValueError(f"phase must be 'warmup' or 'main', got {phase!r}")
        x0 = torch.randn_like(x1) if x0 is None else x0               # Alg. 1 line 4
        weighted = self.flow_weighting if phase == "main" else self.flow_weighting_warmup
        flow = self.flow_loss(x1, x0, weighted=weighted)
        logs = {"flow": flow.item()}
        if phase == "warmup" or self.lambda_cd == 0:
            logs["loss"] = logs["flow"]
            return flow, logs
        x1_cd = x1 if x1_cd is None else x1_cd
        cd, cd_logs = self.cd_loss(x1_cd, x0_cd)
        cd_term = self.lambda_cd * cd
        if self.cd_neg_clamp:
            cd_term = torch.clamp(cd_term, min=-float(self.cd_neg_clamp))
        total = flow + cd_term                                        # Alg. 2 line 16
        logs.update(cd_logs, cd_term=cd_term.item(), loss=total.item())
        return total, logs

    def sample(self, x0, tau_s=None, dt=None, solver="heun", clamp=None, return_traj=False):
        """dx = -grad V(x) dt + s(t) dW, s = sqrt(2 eps(t)), t: 0 -> tau_s in round(tau_s/dt) steps.
        "euler": Euler-Maruyama (= Alg. 2 line 8). "heun": stochastic Heun (the authors' torchsde
        sampler); additive noise, so Ito = Stratonovich. Returns x, or (x, traj (K+1, B, ...))."""
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        dt = self.dt if dt is None else float(dt)
        K = max(1, int(round(float(self.tau_s if tau_s is None else tau_s) / dt)))
        x = x0.detach().float()
        traj = [x] if return_traj else None
        for k in range(K):
            s0 = math.sqrt(2.0 * float(self.eps(k * dt)))                 # s(t_k)
            s1 = math.sqrt(2.0 * float(self.eps((k + 1) * dt)))           # s(t_k + dt)
            dW = math.sqrt(dt) * torch.randn_like(x) if s0 + s1 > 0 else torch.zeros_like(x)
            g = grad_V(self.V, x)
            x_pred = x - dt * g + s0 * dW  # Euler-Maruyama = Heun predictor x~
            if solver == "heun":   # corrector: x - dt/2 (grad V(x) + grad V(x~)) + (s0 + s1)/2 dW
                x_pred = x - 0.5 * dt * (g + grad_V(self.V, x_pred)) + 0.5 * (s0 + s1) * dW
            x = x_pred.detach()
            if return_traj:
                traj.append(x)
        if clamp is not None:
            x = x.clamp(*clamp)
        return (x, torch.stack(traj)) if return_traj else x

# The authors' CIFAR-10 code (experiments/cifar10 of their repository, and the flags of their README
# command): EnergyMatching(V, **AUTHORS). Its training numbers (lr, steps, EMA, a second data batch
# for CD) are in section 7's RECIPES.
AUTHORS = dict(tau_star=1.0, lambda_cd=1e-3, cd_neg_clamp=0.02, cd_trim=0.1, flow_reduction="mean",
               flow_weighting=True, flow_weighting_warmup=True, same_temperature=True,
               clamp_negatives=(-1.0, 1.0), ot_replace=True)

def langevin(V, x, n_steps, dt, eps, clamp=None, clock=None):
    """Unadjusted Langevin, Alg. 2 lines 6-12; stationary law p(x) ∝ exp(-V(x) / eps) (Eq. 6).
    eps: a float, a (B,) tensor, or t -> either, read at t = clock(m) (default m dt). clamp=(lo, hi)
    clamps the final state only (authors' code)."""
    x = x.detach().float()
    for m in range(n_steps):
        t = clock(m) if clock is not None else m * dt                 # chain time of step m
        e = torch.as_tensor(eps(t) if callable(eps) else eps, dtype=x.dtype, device=x.device)
        std = _bcast(torch.sqrt(2.0 * dt * e), x)  # sqrt(2 dt eps^(m)), per sample
        x = (x - dt * grad_V(V, x) + std * torch.randn_like(x)).detach()   # Alg. 2 line 8
    return x.clamp(*clamp) if clamp is not None else x

def inverse_langevin(V, y, A, n_chains, tau_s, dt, eps, zeta, sigma=None, Bmask=None, x_init=None,
                     clamp=None):
    """Algorithm 3 (Eqs. 7-8): posterior sampling for y = A x + w, learned prior, M chains each.
    y (N, ...); A a 0/1 mask (...) or (N, ...). Step n (e = eps(n dt), Eq. 3), every chain m:
        U_m = e/zeta^2 ||y - A x_m||^2 + V(x_m) - e/sigma^2 sum_{k != m} ||B (x_m - x_k)||^2
    Sec. 3.2's interaction is a repulsion; Alg. 3 prints "+ eps/sigma^2 sum W" (attraction, sigma^2
    twice): we follow the text. sigma=None: no interaction. Returns x (N, M, ...)."""
    N, shape, M = y.shape[0], tuple(y.shape[1:]), n_chains
    y_r = y.float().unsqueeze(1)                                      # (N, 1, ...)
    A_r = A.float().unsqueeze(1) if A.dim() == y.dim() else A.float()
    B_r = None
    if sigma is not None:
        B_r = torch.ones_like(A_r) if Bmask is None else (
            Bmask.float().unsqueeze(1) if Bmask.dim() == y.dim() else Bmask.float())
    x = torch.randn(N, M, *shape, device=y.device) if x_init is None else x_init.detach().float()
    K = max(1, int(math.floor(float(tau_s) / float(dt))))             # Alg. 3 line 4
    for n in range(K):
        e = float(eps(n * dt))
        g = grad_V(V, x.reshape(N * M, *shape)).reshape(x.shape)      # grad V(x_m)
        g = g + (e / zeta ** 2) * 2.0 * A_r * (A_r * x - y_r)         # grad e/zeta^2 ||y - Ax||^2
        if B_r is not None and M > 1:
            diff_sum = M * x - x.sum(dim=1, keepdim=True)             # sum_{k != m} (x_m - x_k)
            g = g - (e / sigma ** 2) * 2.0 * B_r * B_r * diff_sum  # grad -e/sigma^2 sum ||B(.)||^2
        x = (x - dt * g + math.sqrt(2.0 * e * dt) * torch.randn_like(x)).detach()   # Alg. 3 line 9
    return x.clamp(*clamp) if clamp is not None else x

# --- LID (Sec. 3.3, App. B): LID(x) = #{ |lambda_i(Hess V(x))| < tau }, near-flat directions ---
def lid_exact(V, xs, tau):
    """LID from the exact spectrum of the Hessian (d up to a few thousand): (lids, spectra)."""
    lids, spectra = [], []
    for x in xs:
        with math_sdpa():
            H = torch.autograd.functional.hessian(lambda z: V(z.view(1, *x.shape)).float().sum(),
                                                  x.detach().float().reshape(-1), vectorize=True)
        ev = torch.linalg.eigvalsh(0.5 * (H.double() + H.double().T))  # symmetrise round-off
        spectra.append(ev.cpu())
        lids.append(int((ev.abs() < tau).sum()))
    return lids, spectra

def lid_slq(V, xs, tau, n_probe=8, n_lanczos=60, seed=0):
    """LID for large d by stochastic Lanczos quadrature (the partial-spectrum route of Sec. 4):
    #{|lambda| < tau} = tr 1(|H| < tau) ≈ d mean_v sum_j (e1^T u_j)^2 1(|theta_j| < tau), (theta_j,
    u_j) the eigenpairs of the Lanczos matrix from a Rademacher v; full re-orthogonalisation."""
    x = xs.detach().float().clone().requires_grad_(True)
    B, d = x.shape[0], x[0].numel()
    with torch.enable_grad(), math_sdpa():
        g, = torch.autograd.grad(V(x).float().sum(), x, create_graph=True)

    def hvp(v):                                                       # H v for every image at once
        with torch.enable_grad():
            return torch.autograd.grad(g, x, v.view_as(x).to(g.dtype), retain_graph=True)[0]

    gen = torch.Generator().manual_seed(seed)
    m = min(n_lanczos, d)
    est = torch.zeros(B, dtype=torch.float64)
    for _ in range(n_probe):
        v = (torch.randint(0, 2, (B, d), generator=gen) * 2 - 1).double().to(x.device)
        q = v / v.norm(dim=1, keepdim=True)
        Q, alpha, beta = [q], [], []
        for j in range(m):
            w = hvp(q.float()).flatten(1).double()
            alpha.append((w * q).sum(1))
            Qs = torch.stack(Q)                                       # (j+1, B, d)
            w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", Qs, w), Qs)
            b = w.norm(dim=1)
            if j < m - 1:
                beta.append(b)
                q = torch.where(b[:, None] > 1e-10, w / b.clamp_min(1e-30)[:, None], 0.0)
                Q.append(q)
        T = torch.diag_embed(torch.stack(alpha, 1))
        if beta:
            off = torch.stack(beta, 1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, U = torch.linalg.eigh(T.cpu())
        est += d * ((U[:, 0, :] ** 2) * (theta.abs() < tau)).sum(1)
    return (est / n_probe).tolist()

# ==== 2. Networks ====
# V: x (B, C, H, W) -> (B,). The velocity is -grad V by autograd, never a network output. Smooth
# activations only (SiLU, GELU): the flow loss differentiates grad V again, LID needs the Hessian.
# Each V is two pieces: `trunk(x)`, the features, then a scalar head on them (forward).
def _groups(ch):
    return math.gcd(32, ch)  # GroupNorm(32) at full width, fewer groups for tiny test networks

AUTHORS_T = 0.5  # the fixed t their potential(x, t) feeds the UNet; App. C prints t = 0.0

def sinusoidal_embedding(t, dim, max_period=10000.0, dtype=torch.float64):
    """guided-diffusion's timestep features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
    half = dim // 2
    f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half)
    e = torch.cat([torch.cos(t * f), torch.sin(t * f)])
    return torch.cat([e, e.new_zeros(dim % 2)])                          # (dim,)

class ResBlock(nn.Module):
    """Guided-diffusion ResBlock (Tong et al.'s UNet). The authors feed a fixed dummy t, whose
    embedding is a constant per-channel vector after conv1, i.e. a conv bias: without emb_ch that
    bias is all there is (the folded form); with emb_ch the block keeps their time layer `emb`."""

    def __init__(self, cin, cout, dropout, emb_ch=None):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        if emb_ch:
            self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, cout))   # their emb_layers
        self.n2, self.drop = nn.GroupNorm(_groups(cout), cout), nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)  # zero_module: starts as identity
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb=None):
        h = self.c1(F.silu(self.n1(x)))
        if emb is not None:
            h = h + self.emb(emb)[:, :, None, None]                   # + emb_layers(emb(t))
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h

class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions (guided-diffusion AttentionBlock)."""

    def __init__(self, ch, head_ch=64):
        super().__init__()
        self.heads = max(1, ch // head_ch)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))                        # (B, 3C, N)
        # heads first, then (q, k, v) per head ("legacy" order); contiguous for the fast kernels
        qkv = qkv.reshape(B, self.heads, 3 * C // self.heads, H * W).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # (B, heads, N, C/h)
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H * W)
        return x + self.proj(h).reshape(B, C, H, W)

class TransformerBlock(nn.Module):
    """Post-LN encoder layer, as nn.TransformerEncoderLayer(gelu, 4x MLP) of the authors, written
    out to control the SDPA kernel. attn_dropout: on attention probabilities (theirs: 0.1)."""

    def __init__(self, dim, heads, dropout, attn_dropout=0.0):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(4 * dim, dim))
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, N, D)
        x = self.ln1(x + self.drop1(self.out(h)))
        return self.ln2(x + self.drop2(self.ff(x)))

class UNetViTPotential(nn.Module):
    """The CIFAR-10 potential (Fig. 5): UNet (no time) -> C-channel map -> PatchEmbed(4) + 8-layer
    ViT (3 ch wide: 384, 4 heads) -> mean-pool -> Linear -> scalar, times output_scale (1000,
    authors' code). ch 128, mult (1, 2, 2, 2), 2 ResBlocks/level, attention at 16x16 and middle.
    time_layers: the authors' time MLP `time_embed` and per-block `emb` layers kept as parameters,
    fed the fixed t (AUTHORS_T, their code's 0.5, not App. C's 0.0: their runs and checkpoints
    use 0.5). The same function as the folded form (False: the time term is conv1's bias), but
    trained differently: Adam moves the time layers' weights, not the bias they add up to."""

    def __init__(self, shape=(3, 32, 32), ch=128, res_blocks=2, vit_depth=8, dropout=0.1,
                 output_scale=1000.0, ch_mult=(1, 2, 2, 2), attn_res=(16,), patch=4,
                 attn_dropout=0.0, time_layers=False, time_t=AUTHORS_T):
        super().__init__()
        C, H, W = shape
        dim = 3 * ch                                                  # 384 at ch = 128
        self.output_scale = output_scale
        self.time_layers, emb_ch = bool(time_layers), 4 * ch if time_layers else None
        self.time_t = float(time_t)
        if time_layers:                       # their time_embed on sinusoid(t), float32 as theirs
            self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(),
                                            nn.Linear(emb_ch, emb_ch))
            t_feat = sinusoidal_embedding(torch.tensor(float(time_t)), ch, dtype=torch.float32)
            self.register_buffer("t_feat", t_feat[None], persistent=False)   # (1, ch)
        self.inp = nn.Conv2d(C, ch, 3, padding=1)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, H  # encoder: remember skip widths
        for lvl, m in enumerate(ch_mult):
            for _ in range(res_blocks):
                blk = [ResBlock(cur, ch * m, dropout, emb_ch)]
                cur = ch * m
                if res in attn_res:
                    blk.append(SelfAttention2d(cur))
                self.down.append(nn.Sequential(*blk))
                skips.append(cur)
            if lvl < len(ch_mult) - 1:                                # Downsample: stride-2 conv
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid = nn.Sequential(ResBlock(cur, cur, dropout, emb_ch), SelfAttention2d(cur),
                                 ResBlock(cur, cur, dropout, emb_ch))
        self.up = nn.ModuleList()  # decoder: res_blocks + 1 blocks per level, one skip each
        for lvl, m in reversed(list(enumerate(ch_mult))):
            for i in range(res_blocks + 1):
                blk = [ResBlock(cur + skips.pop(), ch * m, dropout, emb_ch)]
                cur = ch * m
                if res in attn_res:
                    blk.append(SelfAttention2d(cur))
                if lvl > 0 and i == res_blocks:
                    blk += [nn.Upsample(scale_factor=2), nn.Conv2d(cur, cur, 3, padding=1)]
                    res *= 2
                self.up.append(nn.Sequential(*blk))
        self.out = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(),
                                 nn.Conv2d(cur, C, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)                           # zero_module, as in the UNet
        nn.init.zeros_(self.out[-1].bias)
        self.patch = nn.Conv2d(C, dim, patch, stride=patch)  # ViT head on the UNet's output
        nn.init.xavier_uniform_(self.patch.weight)
        self.pos = nn.Parameter(torch.zeros(1, (H // patch) * (W // patch), dim))
        heads = 4 if dim % 4 == 0 else 1
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout, attn_dropout)
                                      for _ in range(vit_depth)])
        self.head = nn.Linear(dim, 1)

    def trunk(self, x):
        emb = self.time_embed(self.t_feat) if self.time_layers else None      # (1, 4 ch)

        def run(blk, h):                  # a block, its ResBlocks fed emb
            for m in (blk if isinstance(blk, nn.Sequential) else [blk]):
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            return h

        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = run(blk, h)
            hs.append(h)
        h = run(self.mid, h)
        for blk in self.up:
            h = run(blk, torch.cat([h, hs.pop()], dim=1))
        u = self.out(h)                                               # (B, C, H, W)
        tok = self.patch(u).flatten(2).transpose(1, 2) + self.pos     # (B, N, dim)
        return self.blocks(tok).mean(dim=1)  # mean-pool over tokens (B, dim)

    def forward(self, x):
        return self.head(self.trunk(x)).squeeze(-1) * self.output_scale  # V = scale (w.h + b)

class CNNPotential(nn.Module):
    """The MNIST potential (App. C): a two-stage CNN (ch, 2 ch, 4 ch channels), then a two-layer
    MLP (8 ch hidden); ~2M parameters at ch = 32."""

    def __init__(self, shape=(1, 28, 28), ch=32):
        super().__init__()
        C, H, W = shape
        c1, c2, hid = ch, 2 * ch, 8 * ch
        self.features = nn.Sequential(
            nn.Conv2d(C, c1, 3, padding=1), nn.SiLU(),                               # stage 1
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c2, 2 * c2, 3, padding=1), nn.SiLU(),                          # stage 2
            nn.Conv2d(2 * c2, 2 * c2, 4, stride=2, padding=1), nn.SiLU())
        n = 2 * c2 * (H // 4) * (W // 4)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(n, hid), nn.SiLU(), nn.Linear(hid, 1))

    def trunk(self, x):
        return self.features(x)

    def forward(self, x):
        return self.mlp(self.trunk(x)).squeeze(-1)                    # the MLP is the scalar head

# ==== ENGINEERING: nothing below this line is in the paper ====
# The engineering's own imports (flags, signals, processes, files): sections 1-2 need none of them.
import argparse
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
    norm = [T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)]          # [0, 1] -> [-1, 1]
    gray = [T.Grayscale(c)] if name == "mnist" or c == 1 else []
    tf = T.Compose([T.Resize(s), T.CenterCrop(s)] + gray + norm)
    if name == "fake":
        return D.FakeData(size=args.fake_size, image_size=(c, s, s), num_classes=10,
                          transform=T.Compose(norm), random_offset=0 if train else 10_000)
    if name in ("celeba64", "folder"):
        crop = [face_crop] if name == "celeba64" else []
        return image_folder(os.path.join(root, "celeba64") if name == "celeba64" else root,
                            T.Compose(crop + tf.transforms), name)
    what = {"cifar10": "cifar-10-batches-py/ (from cifar-10-python.tar.gz)",
            "mnist": "MNIST/raw/"}[name]
    try:
        kind = {"cifar10": D.CIFAR10, "mnist": D.MNIST}[name]
        return kind(root, train=train, download=True, transform=tf)
    except Exception as e:  # no internet, bad archive, ...
        first = str(e).splitlines()[0] if str(e) else ""
        die(f"could not load {name} ({type(e).__name__}: {first}); put {what} under "
            f"{os.path.abspath(root)}, allow the download, or use --dataset npz")

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
# bf16 (--amp): the network trunk runs under autocast on CUDA (engineer); the scalar head (CD
# subtracts energies ~1e3 that differ in the third digit), the loss, the chains, parameters, Adam
# and EMA stay fp32, the OT cost fp64; no GradScaler (bf16 has fp32's exponent range). DDP does not
# support torch.autograd.grad: each process keeps a plain module and allreduce_grads averages the
# gradients after backward.
def net_of(args):
    """The potential V of --arch (auto: the CNN for MNIST-like data, UNet+ViT otherwise)."""
    shape = (args.channels, args.image_size, args.image_size)
    if args.arch == "cnn":
        return CNNPotential(shape, args.model_size)
    return UNetViTPotential(shape, args.model_size, args.res_blocks, args.vit_depth, args.dropout,
                            args.output_scale, ints(args.ch_mult, "--ch-mult"),
                            attn_dropout=args.attn_dropout, time_layers=args.time_layers)

def build_net(args, device=None):
    """The network of the flags (net_of), engineered for `device` (--amp, --channels-last)."""
    net = net_of(args)
    return net if device is None else engineer(net, device, args.amp, args.channels_last)

def build_method(net, args):
    """EnergyMatching(net, ...) with the method's flags (section 7 filled them from the recipe)."""
    kw = {k: getattr(args, k) for k in METHOD_FLAGS}
    kw["clamp_negatives"] = (-1.0, 1.0) if args.clamp_negatives else None   # a flag: on / off
    return EnergyMatching(net, use_ot=not args.no_ot, **kw)

def build_optimizer(net, args):
    """Adam with grouped (foreach) kernels, on the CPU too (the same numbers as the loop)."""
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=tuple(args.betas), foreach=True)
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
    """The flow loss's grad V by torch.func: the same numbers, in a form torch.compile can
    differentiate again (aot_autograd compiles no double backward of autograd.grad)."""
    def flow_grad(x):
        with math_sdpa():
            return torch.func.grad(lambda z: method.V(z).float().sum())(x).to(x.dtype)
    method.flow_grad = flow_grad
    return method

def compile_method(method, backend="inductor"):
    """--compile: the potential's gradient through torch.func, then the loss's network part
    compiled once: minutes of compilation at full size, worth it for long runs (README, "Speed");
    eager's numbers to round-off."""
    use_torch_func(method)
    method.flow_residual = torch.compile(method.flow_residual, backend=backend)
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

def plot_losses(records, path, title, keys=("flow", "cd_term")):
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

def generate(method, n, shape, device, batch, solver="heun", x0=None, strict=True,
             progress=False):
    """n images from N(0, I) (or x0) by method.sample (K = tau_s / dt steps), clamped to [-1, 1]
    -> (images on the CPU, stats). Non-finite images: exit 3 (strict) or a warning (grids)."""
    outs, t_start = [], time.time()
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = (x0[i:i + b] if x0 is not None else torch.randn(b, *shape)).to(device)
        outs.append(method.sample(z, solver=solver, clamp=(-1.0, 1.0)).cpu())
        if progress:
            done, el = i + b, time.time() - t_start
            print(f"sampled {done}/{n} | {done / el:.1f} img/s | ETA "
                  f"{(n - done) * el / done / 60:.1f} min", flush=True)
    dt, x = time.time() - t_start, torch.cat(outs) if outs else torch.empty(0, *shape)
    n_bad = int((~torch.isfinite(x)).sum())
    msg = f"the {solver} sampler produced non-finite values ({n_bad} of {x.numel()})"
    if n_bad and strict:                   # never hand garbage on (FID would take it as valid)
        die(f"{msg}: the weights, or sampler settings that overflow "
            f"({OVERFLOW_FLAGS.get(solver, 'its flags')}); nothing written", 3)
    if n_bad:
        print("warning: " + msg, file=sys.stderr)
    return x, {"sampler": solver, "steps": max(1, round(method.tau_s / method.dt)),
               "images_per_s": n / max(dt, 1e-9), "seconds": dt}

def cmd_train(args):
    """Phase 1 (Alg. 1) or 2 (Alg. 2) on --dataset: resumable, NaN-guarded, signal-safe, DDP."""
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
        torch.manual_seed(args.seed)                   # the same initial weights on every process
        net = build_net(args, device)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = build_optimizer(net, args)
        ema_n = 0
        if ck is not None:                     # our phase-1 or phase-2 run, or a converted file
            load_states(ck, net, ema, opt)
            ema_n = int(ck.get("ema_n", start))
            log(f"{'resumed' if resumed else 'starting'} from {ck['path']} at step {start}")
        elif args.resume:
            log(f"--resume: no {ckpt_path}; starting phase {phase} afresh")
        if world > 1:                                  # rank 0's weights everywhere
            for t in list(net.state_dict().values()) + list(ema.state_dict().values()):
                dist.broadcast(t, 0)
        log.truncate_metrics(start)
        method = build_method(net, args)               # the method, built once for the loop
        if args.compile:
            compile_method(method)
        grid_net = net if args.no_ema else ema         # the grids: EMA weights unless --no-ema
        grid_method = build_method(grid_net, args)
        two = args.cd_separate_batch and phase == "main"              # a second data batch for CD
        batches = batch_iterator(ds, args.batch_size * (2 if two else 1), args.seed, args.workers,
                                 rank, world, start)
        shape, flip = (args.channels, args.image_size, args.image_size), args.dataset in FLIP_SETS
        lr, warmup, clip = args.lr, args.warmup, args.grad_clip
        decay, ema_warmup, which = args.ema_decay, args.ema_warmup, "raw" if args.no_ema else "ema"
        log(f"energy_matching | phase {phase} | recipe {args.recipe} | {args.dataset}: "
            f"{len(ds)} images {shape} | {count_params(net) / 1e6:.2f}M params | device {device} "
            f"x {world} | {'bf16 trunk' if bf16_trunk(args.amp, device) else 'fp32'} | threads "
            f"{torch.get_num_threads()} | steps {start}->{end} | batch {args.batch_size}/rank | "
            f"lr {lr} tau* {args.tau_star} eps_max {args.eps_max} lambda_CD {args.lambda_cd} | "
            f"EMA {decay}"
            f"{' with warm-up' if ema_warmup else ''}")
        if phase == "warmup" and args.sources_.get("tau_s") == "recipe":
            log(f"grids use tau_s = {args.tau_s}: after phase 1 there is no Boltzmann well to "
                f"sample past t = 1 (pass --tau-s to change)")

        def save(step):
            save_checkpoint(ckpt_path, net, ema, opt, step, args, phase=phase,
                            phase_start=phase_start, ema_n=ema_n)

        def grid(step):
            grid_net.eval()
            x, _ = generate(grid_method, min(64, args.num_samples), shape, device,
                            args.sample_batch, args.sampler, strict=False)
            net.train()
            path = os.path.join(args.out_dir, f"samples_{which}_{step:07d}.png")
            save_grid(x, path)
            log(f"grid at step {step}: {which} weights ({ema_n} EMA updates), {args.sampler}, "
                f"tau_s {args.tau_s} -> {path}")

        n_bad, n_good, t_last, s_last = 0, 0, time.time(), start
        net.train()
        for step in range(start, end):
            torch.manual_seed(step_seed(args.seed, step, rank))   # noise, t, dropout, flips
            x, _ = next_batch(batches, device, flip)
            # ---- the algorithm: one step of Alg. 1 (phase warmup) or Alg. 2 (phase main) ----
            x1, x1_cd = x.chunk(2) if two else (x, None)
            lr_now = warmup_lr(lr, step, warmup)                       # linear warm-up from step 0
            logs, ok, signum = train_step(method, net, opt, dict(x1=x1, phase=phase, x1_cd=x1_cd),
                                          lr_now, clip, world, stop.signum or 0)
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
                outs = [m(x) for m in (net, ema)]
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
                            f"Energy Matching, phase {phase}")
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
FORMAT = "energy_matching/v1"

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
    """Our checkpoint dict (+ "path"); an authors' file: one line."""
    ck = read_checkpoint(path)
    if is_authors_checkpoint(ck):
        die(f"{path} is an authors' checkpoint: convert it once with python "
            f"energy_matching_convert.py {shlex.quote(path)} OUT.pt, then pass --ckpt OUT.pt")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        fmt = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        die(f"{path} is not an Energy Matching checkpoint (format {fmt!r}, not {FORMAT!r})")
    saved = ck.setdefault("args", {})                     # files written before the renames
    saved.setdefault("time_layers", False)
    if isinstance(saved.get("flow_weighting"), str):      # "off" | "main" | "both"
        saved["flow_weighting_warmup"] = saved["flow_weighting"] == "both"
        saved["flow_weighting"] = saved["flow_weighting"] != "off"
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

# An authors' file (https://github.com/m1balcerak/EnergyMatching: {"net_model", "ema_model", ...})
# is converted once into ours by energy_matching_convert.py; --ckpt refuses it with that command.
def is_authors_checkpoint(ck):
    """Their layout: "net_model" and "ema_model" state dicts (ours has "format", VPFB's "model")."""
    return (isinstance(ck, dict) and "format" not in ck
            and isinstance(ck.get("net_model"), dict) and isinstance(ck.get("ema_model"), dict))

# ==== 6. Sampling ====
def eval_setup(args):
    """Device, the checkpoint's network (EMA unless --no-ema) and the method with the settings this
    mode reads, each printed once with where it came from (flag / checkpoint / recipe)."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)                          # --seed: the same samples every run
    net = net_from_checkpoint(args.ck_, args, device)
    method = build_method(torch.compile(net) if args.compile else net, args)
    settings = {k: getattr(args, k) for k in args.reads_}
    if "tau_s" in settings:                                        # K = tau_s / dt sampler steps
        settings["steps"] = max(1, round(args.tau_s / args.dt))
    settings["weights"] = "raw" if args.no_ema else "ema"
    src = {k: args.sources_.get(k, "default") for k in args.reads_}
    print(f"{args.mode} with {args.ck_['path']}: " + ", ".join(
        f"{k} {v} ({src[k]})" if k in src else f"{k} {v}" for k, v in settings.items()), flush=True)
    if args.ck_.get("phase") == "warmup" and "tau_s" in src and src["tau_s"] != "flag":
        print(f"tau_s = {args.tau_s:g} from a phase-1 checkpoint: past t = 1 there is no Boltzmann "
              f"well, the flow only extrapolates (pass --tau-s to change)", flush=True)
    return device, net, method, {"ckpt": args.ck_["path"], "settings": settings, "from": src}

def cmd_sample(args):
    """--num-samples SDE samples -> samples.npz ("images" uint8 NHWC, eval_fid.py), samples.png."""
    device, net, method, info = eval_setup(args)
    x, st = generate(method, args.num_samples, (args.channels, args.image_size, args.image_size),
                     device, args.sample_batch, args.sampler, progress=True)
    out = os.path.join(args.out_dir, "samples.npz")
    with atomic(out) as tmp:
        np.savez(tmp, images=to_uint8(x))
    save_grid(x[:64], os.path.join(args.out_dir, "samples.png"))
    report(args.out_dir, "samples.json", {**info, "n": len(x), **st})
    return to_uint8(x)

# ==== 7. Arguments and main ====
DATASETS = ("cifar10", "mnist", "celeba64", "folder", "npz", "fake")
MODES = {"train": cmd_train, "sample": cmd_sample}    # energy_matching_experiments.py: the others

# --recipe sets these flags (a typed flag, then a checkpoint's value, wins); steps and EMA decay
# per phase. The parser's own defaults of the method's flags are EnergyMatching's (section 1; a
# test checks that they agree). "paper": App. C's training numbers; "authors": AUTHORS and their
# training script and README command (lr, steps, EMA 0.99 in phase 2, a second data batch for CD).
RECIPES = {"paper": dict(lr=8e-4, steps_warmup=200_000, steps_main=25_000, batch_size=128,
                         warmup=10_000, ema_decay_warmup=0.9999, ema_decay_main=0.9999,
                         cd_separate_batch=False, time_layers=False),
           "authors": dict(AUTHORS, clamp_negatives=True, lr=1.2e-3, steps_warmup=145_000,
                           steps_main=2_000, ema_decay_main=0.99, cd_separate_batch=True,
                           time_layers=True)}
DATASET_ROWS = {
    # App. C, CelebA: ~2x the parameters (ch 192 here), batch 32, lr 1e-4, eps_max 0.05,
    # lambda_CD 2e-5, 250k + 25k steps (no authors' code for CelebA: paper values in both recipes)
    "celeba64": dict(lr=1e-4, eps_max=0.05, lambda_cd=2e-5, batch_size=32, steps_warmup=250_000,
                     steps_main=25_000, model_size=192),
    # App. C, MNIST (also --dataset npz of 28 x 28 grey images): Alg. 2 directly (--phase main
    # --from-scratch), lambda_CD 0.25, dt 0.05, 50 Langevin steps, 300k steps, the small CNN.
    # lr and eps_max are not in the paper: 1e-4 and 0.01 are our choice.
    "mnist": dict(lambda_cd=0.25, dt=0.05, n_langevin=50, steps_main=300_000, lr=1e-4),
}
METHOD_FLAGS = ("tau_star", "eps_max", "lambda_cd", "n_langevin", "dt", "cd_neg_clamp", "cd_trim",
                "neg_data_frac", "flow_reduction", "tau_s", "clamp_negatives", "flow_weighting",
                "flow_weighting_warmup", "same_temperature", "ot_replace")
# The flags whose values can overflow the numbers: the one line of a non-finite run names them.
OVERFLOW_FLAGS = {"train": "--lr, --grad-clip, --output-scale, --lambda-cd, --dt, --eps-max",
                  "heun": "--dt, --tau-s, --eps-max, --tau-star",
                  "euler": "--dt, --tau-s, --eps-max, --tau-star"}

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
ARCH_KEYS = ("arch", "model_size", "res_blocks", "ch_mult", "vit_depth", "dropout", "attn_dropout",
             "output_scale", "image_size", "channels", "time_layers")
DATA_KEYS = ("dataset", "data_dir", "fake_size")
MODE_SETTINGS = {          # what a mode reads (and prints) beyond the run flags and the network's
    "sample": ("sampler", "tau_s", "dt", "eps_max", "tau_star", "num_samples", "sample_batch")}
PHASE_KEYS = {"phase", "steps", "ema_decay", "tau_s", "from_scratch"}   # phase 2 sets its own
EVAL_READS = {"mode", "out_dir", "device", "threads", "seed", "ckpt", "amp", "compile",
              "channels_last", "workers", "no_ema", *ARCH_KEYS}

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
frac_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

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
    p = Parser(description="Energy Matching (Balcerak et al., arXiv:2504.10612): "
               f"{', '.join(modes)}. [r] = set by --recipe (shown: {recipe}'s).",
               formatter_class=Help, allow_abbrev=False)
    a, bool_opt = p.add_argument, argparse.BooleanOptionalAction
    a("--mode", default="train" if "train" in modes else None, required="train" not in modes,
      choices=modes, help="what to do")
    a("--phase", default="warmup", choices=("warmup", "main"), help="Alg. 1 or Alg. 2 (+ CD)")
    a("--recipe", default="authors", choices=RECIPES, help="authors' CIFAR code or the paper")
    a("--dataset", default="cifar10", choices=DATASETS, help="training / evaluation images")
    a("--data-dir", default="data", help="dataset folder (npz: the .npz file, uint8 NHWC)")
    a("--image-size", type=pos_int, help="image side (celeba64 64; mnist 28; npz: the file's)")
    a("--channels", type=pos_int, help="channels (mnist 1; npz: the file's)")
    a("--fake-size", type=pos_int, default=256, help="number of FakeData images")
    a("--workers", type=nonneg_int, default=4, help="DataLoader processes (0 = main process)")
    a("--out-dir", help="output folder (default runs/em_<dataset>); always written to")
    a("--device", type=device_spec, default="auto",
      help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a("--threads", type=nonneg_int, default=0,
      help="CPU threads (0: the free cores, i.e. the cores less the load average, at least 1)")
    a("--seed", type=seed_int, default=0, help="random seed (each step and rank derives its own)")
    a("--batch-size", type=pos_int, help="[r] per-process batch size")
    a("--steps", type=nonneg_int, help="[r] steps of this phase (authors 145k + 2k)")
    a("--lr", type=pos_float, help="[r] Adam learning rate (authors 1.2e-3, paper 8e-4)")
    a("--betas", type=unit_float, nargs=2, default=(0.9, 0.95), help="Adam betas (authors' code)")
    a("--warmup", type=nonneg_int,
      help="[r] linear lr warm-up steps, counted from step 0 of phase 1: phase 2 continues "
           "the count, as the authors' resumed scheduler does")
    a("--grad-clip", type=nonneg_float, default=1.0, help="gradient-norm clipping (0 = off)")
    a("--ema-decay", type=unit_float, help="[r] EMA decay (authors' phase 2: 0.99)")
    a("--ema-warmup", action=bool_opt, default=True, help="min(decay, (1+n)/(10+n)); no: const")
    a("--no-ema", action="store_true", help="grids / sampling with the raw weights, not the EMA")
    a("--arch", default="auto", choices=("auto", "unetvit", "cnn"),
      help="network: UNet+ViT (Fig. 5) or the MNIST CNN (App. C); auto: CNN for MNIST-like data")
    a("--model-size", type=pos_int,
      help="base channels of the network (UNet+ViT 128, CNN 32: the papers' sizes)")
    a("--ch-mult", default="1,2,2,2", help="UNet channel multipliers per resolution level")
    a("--res-blocks", type=pos_int, default=2, help="UNet residual blocks per level")
    a("--vit-depth", type=pos_int, default=8, help="ViT head layers")
    a("--dropout", type=unit_float, default=0.1, help="dropout in UNet and ViT (authors' code)")
    a("--attn-dropout", type=unit_float, help="ViT attention dropout (default: --dropout)")
    a("--output-scale", type=pos_float, default=1000.0, help="V = this * head (authors' code)")
    a("--tau-star", type=nonneg_float, default=0.9, help="[r] tau*, Eq. 3 (paper 0.9)")
    a("--eps-max", type=nonneg_float, default=0.01, help="[r] eps_max: p ∝ exp(-V/eps_max)")
    a("--lambda-cd", type=nonneg_float, default=2e-4, help="[r] CD weight (paper 2e-4)")
    a("--n-langevin", type=nonneg_int, default=200, help="[r] Langevin steps per negative chain")
    a("--dt", type=pos_float, default=0.01, help="[r] time step of the chains and of the sampler")
    a("--cd-neg-clamp", type=nonneg_float, default=0.0, help="[r] lambda_CD CD >= -this (paper 0)")
    a("--cd-trim", type=unit_float, default=0.0,
      help="[r] drop the top fraction of V(negatives) (paper 0)")
    a("--neg-data-frac", type=frac_float, default=0.5, help="[r] share of negatives from data")
    a("--same-temperature", action=bool_opt, default=False,
      help="[r] data chains at eps(t) (authors), eps_max (paper)")
    a("--clamp-negatives", action=bool_opt, default=False,
      help="[r] chains end clamped to [-1, 1] (authors)")
    a("--cd-separate-batch", action=bool_opt, help="[r] a second data batch for CD (authors)")
    a("--flow-reduction", default="sum", choices=("mean", "sum"),
      help="[r] mean (authors) or sum: ||.||^2 (paper)")
    a("--flow-weighting", action=bool_opt, default=False,
      help="[r] fade the flow loss to 0 from tau* to 1 in phase 2 (authors)")
    a("--flow-weighting-warmup", action=bool_opt, default=False,
      help="[r] the same in phase 1 (authors' CIFAR-10 code)")
    a("--no-ot", action="store_true", help="random instead of exact-OT pairs (ablation)")
    a("--ot-replace", action=bool_opt, default=False,
      help="[r] draw the B OT pairs from the plan with replacement (authors' torchcfm) or use the "
           "permutation once (paper)")
    a("--time-layers", action=bool_opt,
      help="[r] UNet+ViT: train the authors' time layers fed t = 0.5 (authors) or their folded "
           "form, conv biases (paper)")
    a("--from-scratch", action="store_true", help="phase main without a warmup checkpoint (MNIST)")
    a("--sampler", default="heun", choices=("heun", "euler"), help="SDE integrator")
    a("--tau-s", type=pos_float, default=3.0,
      help="[r] sampling time, K = tau_s/dt (training's phase 1: 1)")
    a("--amp", default="auto", choices=("auto", "bf16", "none"), help="bf16 trunk (auto: on CUDA)")
    a("--compile", action="store_true",
      help="torch.compile the loss (via torch.func) and the potential for sampling")
    a("--channels-last", action="store_true", help="channels_last memory (faster convs on GPU)")
    a("--resume", action="store_true", help="resume from --ckpt, else <out-dir>/ckpt_<phase>.pt")
    a("--ckpt", help="checkpoint to read (authors' files: energy_matching_convert.py first); "
                     "outputs go to --out-dir")
    a("--log-every", type=nonneg_int, default=100, help="log every N steps (0 = off)")
    a("--save-every", type=nonneg_int, default=5000, help="checkpoint every N steps (0 = at end)")
    a("--sample-every", type=nonneg_int, default=5000,
      help="sample grid every N steps (0 = only at the end)")
    a("--num-samples", type=nonneg_int, default=64, help="samples to draw (50000 for FID)")
    a("--sample-batch", type=pos_int, default=256, help="batch size when sampling")
    p.set_defaults(**recipe_row(recipe, "cifar10", "warmup"), image_size=32, channels=3)
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
    train --resume: the run's own ckpt_<phase>.pt (it continues this run), else --ckpt (all its
    training flags); phase main: the phase-1 checkpoint (all but PHASE_KEYS); the other modes:
    --ckpt, else the run's newest."""
    own = os.path.join(args.out_dir, f"ckpt_{args.phase}.pt")
    if args.mode == "train":
        if not args.resume:
            refuse_to_replace(args, ("warmup", "main"))
        if args.resume and (args.ckpt or os.path.isfile(own)):
            ck = load_checkpoint(own if os.path.isfile(own) else args.ckpt)
        elif args.phase == "main" and not args.from_scratch:
            path = args.ckpt or os.path.join(args.out_dir, "ckpt_warmup.pt")
            if not os.path.isfile(path):
                die(f"phase main starts from a phase-1 checkpoint: {path} not found "
                    f"(run --phase warmup first, pass --ckpt, or --from-scratch)")
            ck = load_checkpoint(path)
        else:
            return None, ()
        skip = RUN_FLAGS | (set() if ck.get("phase") == args.phase else PHASE_KEYS)
        return ck, [k for k in ck["args"] if k not in skip]
    found = [p for p in (os.path.join(args.out_dir, f"ckpt_{ph}.pt") for ph in ("main", "warmup"))
             if os.path.isfile(p)]
    if not (args.ckpt or found):
        die(f"no checkpoint in {args.out_dir} (train first or pass --ckpt)")
    ck = load_checkpoint(args.ckpt or found[0])
    return ck, [k for k in ck["args"] if k in ARCH_KEYS + DATA_KEYS + METHOD_FLAGS
                + ("sampler", "recipe", "no_ot")]

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
    args.out_dir = args.out_dir or os.path.join("runs", f"em_{args.dataset}")
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

def like_mnist(args):
    """MNIST, or an .npz of 28 x 28 grey images: App. C's MNIST numbers and the CNN."""
    return args.dataset == "mnist" or (args.dataset == "npz" and args.channels == 1
                                       and args.image_size == 28)

def dataset_row(args, saved):
    """The recipe's flags for --dataset and --phase, the image shape (npz: the file's, unless a
    checkpoint gives it) and the network (auto: the CNN for MNIST-like data)."""
    shape = dict(channels=1, image_size=28) if args.dataset == "mnist" else dict(
        channels=3, image_size=64 if args.dataset == "celeba64" else 32)
    if args.dataset == "npz" and "image_size" not in saved:
        c, s = load_npz(args.data_dir).tensors[0].shape[1:3]
        shape = dict(channels=c, image_size=s)
    shape.update({k: saved[k] for k in shape if k in saved})
    mnist = like_mnist(argparse.Namespace(**{**vars(args), **shape}))
    arch = ("cnn" if mnist else "unetvit") if args.arch == "auto" else args.arch
    row = recipe_row(args.recipe, "mnist" if mnist else args.dataset, args.phase)
    row = {"model_size": 32 if arch == "cnn" else 128, **row, **shape, "arch": arch}
    if args.mode == "train" and args.phase == "warmup":
        row["tau_s"] = 1.0                        # no Boltzmann well to sample before phase 2
    return row

def resolve_args(args, typed=(), settings=MODE_SETTINGS):
    """The settings derived from others; bad combinations: exit 2; warnings of typed flags the mode
    does not read."""
    if args.dataset == "npz" and args.sources_.get("image_size") == "flag":
        s = load_npz(args.data_dir).tensors[0].shape[2]
        if args.image_size != s:
            die(f"--image-size {args.image_size}: the images of {args.data_dir} are {s} x {s}")
    if args.arch == "auto":
        args.arch = dataset_row(args, {})["arch"]
    if args.attn_dropout is None:
        args.attn_dropout, args.sources_["attn_dropout"] = args.dropout, "recipe"
    mult = ints(args.ch_mult, "--ch-mult")               # a bad list: one line, not later
    if args.arch == "cnn" and args.image_size < 4:
        die(f"the CNN potential needs an image side >= 4 (two stride-2 4 x 4 convolutions), got "
            f"{args.image_size}")
    if args.arch == "unetvit":
        s = args.image_size
        if s < 8 or s % 4 or s % 2 ** (len(mult) - 1):
            die(f"the UNet+ViT potential needs an image side >= 8 divisible by 4 and by "
                f"2^{len(mult) - 1} (--ch-mult), got {s}")
    if args.mode == "sample" and args.num_samples == 0:
        die("--num-samples 0 in --mode sample would write an empty samples.npz")
    if args.mode in ("sample", "inpaint") and round(args.tau_s / args.dt) == 0:
        die(f"--tau-s {args.tau_s} at --dt {args.dt} is 0 sampler steps: the samples would be "
            f"the noise they start from")
    if args.mode == "train" and args.phase == "main" and args.n_langevin == 0:
        die("--n-langevin 0 in phase main: the CD negatives would be their starts, unmoved")
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
            net(x)
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
