"""Energy Matching on images, in one file meant to be read beside the paper.

Paper: M. Balcerak et al., "Energy Matching: Unifying Flow Matching and Energy-Based Models for
Generative Modeling", arXiv:2504.10612. Authors' code: https://github.com/m1balcerak/EnergyMatching
One time-independent scalar potential V(x). Samples move along -grad V: an OT-like flow far from the
data, then Langevin noise at temperature eps(t) (Eq. 3) near it, so that the end state is the
Boltzmann density p(x) ∝ exp(-V(x) / eps_max) (Eq. 6). Phase 1 (Alg. 1) fits -grad V(x_t) to
x1 - x0 on exact minibatch-OT pairs; phase 2 (Alg. 2) adds lambda_CD * contrastive divergence on
Langevin negatives.

How to run (`python energy_matching.py --help` lists every flag with its default):
    python energy_matching.py --dataset cifar10 --phase warmup       # phase 1, Alg. 1
    python energy_matching.py --dataset cifar10 --phase main         # phase 2, Alg. 2
    python energy_matching.py --mode sample --num-samples 50000      # samples.npz for eval_fid.py
    python energy_matching.py --mode inpaint --dataset celeba64      # Alg. 3, with vs without W
    python energy_matching.py --mode lid --dataset mnist             # Hessian LID vs PNG size
    python energy_matching.py --dataset npz --data-dir digits.npz    # any uint8 N x H x W x C array
    python energy_matching.py --mode sample --ckpt cifar10_main_training_147000.pt --tau-s 3.25
--ckpt also reads the authors' released training files. --recipe authors (default) follows their
CIFAR-10 code, --recipe paper the paper's App. C; each difference is a flag ("Paper vs code").

Where the maths lives (section 1): Eq. 3 `temperature`; Alg. 1 `EnergyMatching.flow_loss` with
`ot_pair` (Eq. 2); Alg. 2 `negatives`, `cd_loss`, `loss`; Eq. 6 / Alg. 2 line 8 `langevin`; the
sampler `sample`; Alg. 3 / Eqs. 7-8 `inverse_langevin`; Sec. 3.3 / App. B `lid_exact`,
`lid_slq`. Section 2: the networks (Fig. 5 UNet + ViT, App. C CNN). Below: engineering only.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
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
def ot_pair(x0, x1):
    """Exact minibatch OT (Alg. 1 line 5): x0 reordered so that (x0[i], x1[i]) are OT pairs (uniform
    weights: the plan is a permutation / B); float64 on the CPU: a plan independent of dtype."""
    import ot
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"ot_pair needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    B = x0.shape[0]
    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    M = torch.cdist(a, b).pow(2).numpy()                              # M_ij = ||x0_i - x1_j||^2
    w = np.full(B, 1.0 / B)                                           # uniform empirical measures
    plan = ot.emd(w, w, M, numItermax=10_000_000)                     # (B, B) = permutation / B
    perm = torch.from_numpy(np.argmax(plan, axis=0)).to(x0.device)   # column j (x1_j) -> its row i
    return x0[perm]

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
    Keyword defaults: the authors' CIFAR-10 code. Paper-vs-code switches:
      flow_reduction    "mean" over pixels (code) | "sum" = ||.||^2 of Alg. 1 (paper)
      flow_weighting    False | "main" | "both": fade the flow loss to 0 between tau* and t = 1,
                        in phase 2 (authors' 2-D code; True = "main") or both phases (CIFAR code)
      cd_neg_clamp      code: lambda_CD CD >= -cd_neg_clamp (0 = off, paper)
      cd_trim           code: drop the top cd_trim fraction of V(negatives) (0 = paper)
      same_temperature  data-started negatives follow eps(t) too (code), not eps_max (Alg. 2 l. 10)
      chain_clock       m -> t, the chain time of Langevin step m (default t = m dt, Alg. 2)
      ot_sigma          std of noise around the straight path (OT-CFM's sigma; paper: 0)
    """

    def __init__(self, V, tau_star=1.0, eps_max=0.01, lambda_cd=1e-3, n_langevin=200, dt=0.01,
                 cd_neg_clamp=0.02, cd_trim=0.1, neg_data_frac=0.5, flow_reduction="mean",
                 tau_s=3.0, clamp_negatives=None, use_ot=True, flow_weighting=False,
                 same_temperature=False, chain_clock=None, ot_sigma=0.0):
        self.V, self.lambda_cd = V, float(lambda_cd)
        self.tau_star, self.eps_max = float(tau_star), float(eps_max)
        self.n_langevin, self.dt, self.tau_s = int(n_langevin), float(dt), float(tau_s)
        self.cd_neg_clamp, self.cd_trim = cd_neg_clamp, float(cd_trim)
        self.neg_data_frac = float(neg_data_frac)  # negatives started at data (paper: half)
        self.clamp_negatives = clamp_negatives        # (-1, 1) for images, as the authors' chains
        self.use_ot, self.ot_sigma, self.flow_reduction = use_ot, float(ot_sigma), flow_reduction
        fw = "main" if flow_weighting is True else flow_weighting          # True: phase 2 only
        if fw not in (False, None, "off", "main", "both"):
            raise ValueError(f"flow_weighting: False, 'main' or 'both', not {flow_weighting!r}")
        self.flow_weighting = fw if fw in ("main", "both") else False
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
        if self.use_ot:
            x0 = ot_pair(x0, x1)                                      # Alg. 1 line 5: T = OT map
        t = torch.rand(x1.shape[0], device=x1.device)                 # Alg. 1 line 6: t ~ U(0, 1)
        tb = _bcast(t, x1)
        xt = tb * x1 + (1 - tb) * x0  # x_t = (1 - t) T(x_data) + t x_data
        if self.ot_sigma > 0:
            xt = xt + self.ot_sigma * torch.randn_like(xt)            # OT-CFM: x_t + sigma N(0, I)
        g = grad_V(self.V, xt, create_graph=True)  # grad V(x_t), graph kept for theta
        r = (g.float() + (x1 - x0)).flatten(1).pow(2)  # ||grad V(x_t) + x1 - T(x1)||^2
        r = r.mean(1) if self.flow_reduction == "mean" else r.sum(1)
        if weighted:
            r = self.flow_weight(t) * r                               # w(t) ||.||^2 (authors' code)
        return r.mean()

    # --- the contrastive objective L_CD (Sec. 2.1.2, Alg. 2 lines 5-15) ---
    def negatives(self, x1, x0):
        """Langevin negatives: the first neg_data_frac of the batch starts at data x1, the rest at
        x0. Noise-started chains follow eps(t); data-started ones stay at eps_max (Alg. 2 line 10)
        unless same_temperature. Returns (x_neg, at_data)."""
        B = x1.shape[0]
        at_data = torch.arange(B, device=x1.device) < int(round(self.neg_data_frac * B))
        x_init = torch.where(_bcast(at_data, x1), x1, x0)             # Alg. 2 line 5
        hot = at_data & (not self.same_temperature)

        def eps_fn(t):                                                # per-sample eps^(m)
            return torch.where(hot, self.eps_max, self.eps(t))

        x_neg = langevin(self.V, x_init, self.n_langevin, self.dt, eps_fn,
                         clamp=self.clamp_negatives, clock=self.chain_clock)
        return x_neg, at_data

    def cd_loss(self, x1, x0):
        """L_CD = E_data[V] - E_neg[V(sg(x~))] (Alg. 2 lines 13-15). The paper divides both by
        eps_max; the code does not (lambda_CD absorbs it): we follow the code, and its trimming."""
        x_neg, _ = self.negatives(x1, x0)     # the network stays in train mode, as in the code
        e_pos = self.energy(x1)                                       # Alg. 2 line 14
        e_neg = self.energy(x_neg)                                    # Alg. 2 line 13
        k = int(self.cd_trim * e_neg.shape[0])
        neg_stat = e_neg.sort().values[:e_neg.shape[0] - k].mean() if k > 0 else e_neg.mean()
        cd = e_pos.mean() - neg_stat                                  # Alg. 2 line 15
        return cd, {"cd": cd.item(), "e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item()}

    def loss(self, x1, x0, phase="warmup", x1_cd=None, x0_cd=None):
        """"warmup": L_OT (Alg. 1). "main": L_OT + lambda_CD L_CD (Alg. 2 line 16). x1_cd: a second
        data batch for CD (code; default x1); x0_cd: starts of the noise-started negatives."""
        if phase not in ("warmup", "main"):
            raise ValueError(f"phase must be 'warmup' or 'main', got {phase!r}")
        weighted = self.flow_weighting in ("both", phase if phase == "main" else "-")
        flow = self.flow_loss(x1, x0, weighted=weighted)
        logs = {"flow": flow.item()}
        if phase == "warmup" or self.lambda_cd == 0:
            logs["loss"] = logs["flow"]
            return flow, logs
        x1_cd = x1 if x1_cd is None else x1_cd
        if x0_cd is None:
            x0_cd = x0 if x0.shape == x1_cd.shape else torch.randn_like(x1_cd)
        cd, cd_logs = self.cd_loss(x1_cd, x0_cd)
        cd_term = self.lambda_cd * cd
        if self.cd_neg_clamp:
            cd_term = torch.clamp(cd_term, min=-float(self.cd_neg_clamp))
        total = flow + cd_term                                        # Alg. 2 line 16
        logs.update(cd_logs, cd_term=cd_term.item(), loss=total.item())
        return total, logs

    def sample(self, x0, tau_s=None, dt=None, method="heun", clamp=None, return_traj=False):
        """dx = -grad V(x) dt + s(t) dW, s = sqrt(2 eps(t)), t: 0 -> tau_s in round(tau_s/dt) steps.
        "euler": Euler-Maruyama (= Alg. 2 line 8). "heun": stochastic Heun (the authors' torchsde
        sampler); additive noise, so Ito = Stratonovich. Returns x, or (x, traj (K+1, B, ...))."""
        if method not in ("heun", "euler"):
            raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
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
            if method == "heun":   # corrector: x - dt/2 (grad V(x) + grad V(x~)) + (s0 + s1)/2 dW
                x_pred = x - 0.5 * dt * (g + grad_V(self.V, x_pred)) + 0.5 * (s0 + s1) * dW
            x = x_pred.detach()
            if return_traj:
                traj.append(x)
        if clamp is not None:
            x = x.clamp(*clamp)
        return (x, torch.stack(traj)) if return_traj else x

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
# Engineering sets two attributes: `amp` (bf16 autocast of the trunk on CUDA; the scalar head stays
# fp32: CD subtracts energies ~1e3 that differ in the third digit) and `channels_last`.
def _groups(ch):
    return math.gcd(32, ch)  # GroupNorm(32) at full width, fewer groups for tiny test networks

def _trunk_autocast(net, x):
    on = getattr(net, "amp", False) and x.is_cuda
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

class ResBlock(nn.Module):
    """Guided-diffusion ResBlock (Tong et al.'s UNet) without time input: the authors feed a fixed
    dummy t, whose embedding is a constant per-channel vector after conv1, i.e. a conv bias."""

    def __init__(self, cin, cout, dropout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.drop = nn.GroupNorm(_groups(cout), cout), nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)  # zero_module: starts as identity
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
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
    ViT (384 wide, 4 heads) -> mean-pool -> Linear -> scalar, times output_scale (1000, authors'
    code). Width 128, mult (1, 2, 2, 2), 2 ResBlocks/level, attention at 16x16 and in the middle."""

    def __init__(self, shape=(3, 32, 32), size=1.0, res_blocks=2, vit_depth=8, dropout=0.1,
                 output_scale=1000.0, ch_mult=(1, 2, 2, 2), attn_res=(16,), patch=4,
                 attn_dropout=0.0):
        super().__init__()
        C, H, W = shape
        ch = max(8, int(round(128 * size / 8)) * 8)
        dim = max(16, int(round(384 * size / 4)) * 4)
        self.output_scale, self.amp, self.channels_last = output_scale, False, False
        self.inp = nn.Conv2d(C, ch, 3, padding=1)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, H  # encoder: remember skip widths
        for lvl, m in enumerate(ch_mult):
            for _ in range(res_blocks):
                blk = [ResBlock(cur, ch * m, dropout)]
                cur = ch * m
                if res in attn_res:
                    blk.append(SelfAttention2d(cur))
                self.down.append(nn.Sequential(*blk))
                skips.append(cur)
            if lvl < len(ch_mult) - 1:                                # Downsample: stride-2 conv
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid = nn.Sequential(ResBlock(cur, cur, dropout), SelfAttention2d(cur),
                                 ResBlock(cur, cur, dropout))
        self.up = nn.ModuleList()  # decoder: res_blocks + 1 blocks per level, one skip each
        for lvl, m in reversed(list(enumerate(ch_mult))):
            for i in range(res_blocks + 1):
                blk = [ResBlock(cur + skips.pop(), ch * m, dropout)]
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
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = blk(h)
            hs.append(h)
        h = self.mid(h)
        for blk in self.up:
            h = blk(torch.cat([h, hs.pop()], dim=1))
        u = self.out(h)                                               # (B, C, H, W)
        tok = self.patch(u).flatten(2).transpose(1, 2) + self.pos     # (B, N, dim)
        return self.blocks(tok).mean(dim=1)  # mean-pool over tokens (B, dim)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _trunk_autocast(self, x):
            pooled = self.trunk(x)
        return self.head(pooled.float()).squeeze(-1) * self.output_scale   # fp32 head

class CNNPotential(nn.Module):
    """The MNIST potential (App. C): a two-stage CNN, then a two-layer MLP (~2M at size 1)."""

    def __init__(self, shape=(1, 28, 28), size=1.0):
        super().__init__()
        C, H, W = shape
        c1, c2, hid = max(4, int(32 * size)), max(8, int(64 * size)), max(8, int(256 * size))
        self.amp, self.channels_last = False, False
        self.features = nn.Sequential(
            nn.Conv2d(C, c1, 3, padding=1), nn.SiLU(),                               # stage 1
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c2, 2 * c2, 3, padding=1), nn.SiLU(),                          # stage 2
            nn.Conv2d(2 * c2, 2 * c2, 4, stride=2, padding=1), nn.SiLU())
        n = 2 * c2 * (H // 4) * (W // 4)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(n, hid), nn.SiLU(), nn.Linear(hid, 1))

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _trunk_autocast(self, x):
            h = self.features(x)
        return self.mlp(h.float()).squeeze(-1)

# ==== ENGINEERING: nothing below this line is in the paper ====

# ==== 3. Data ====
# Images live in [-1, 1] as float NCHW; files on disk are uint8 NHWC (samples.npz, --dataset npz).
def die(msg, code=2):
    """One line "error: ..." on stderr, no traceback; exit 2: bad input, 3: non-finite numbers."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

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

def build_dataset(args, train=True):
    import torchvision.transforms as T
    from torchvision import datasets
    root = args.data_dir
    if args.dataset == "npz":
        return load_npz(root)                                         # one file: no test split
    c, s, _ = data_shape(args)
    norm = [T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)]         # [0, 1] -> [-1, 1]
    flip = [T.RandomHorizontalFlip()] if train else []
    if args.dataset == "fake":
        return datasets.FakeData(size=args.fake_size, image_size=(c, s, s),
                                 transform=T.Compose(norm), random_offset=0 if train else 10_000)
    if args.dataset in ("celeba64", "folder"):
        path = os.path.join(root, "celeba64") if args.dataset == "celeba64" else root
        try:
            tf = T.Compose([T.Resize(s), T.CenterCrop(s)] + flip + norm)
            return datasets.ImageFolder(path, transform=tf)
        except OSError:
            die(f"no image folder at {os.path.abspath(path)}; put images in at least one "
                f"sub-folder there (celeba64: e.g. img_align_celeba/*.jpg)")
    try:
        if args.dataset == "cifar10":
            return datasets.CIFAR10(root, train=train, transform=T.Compose(flip + norm),
                                    download=True)
        return datasets.MNIST(root, train=train, transform=T.Compose(norm), download=True)
    except Exception as e:  # no internet, bad archive, ...
        name = {"cifar10": "cifar-10-batches-py/", "mnist": "MNIST/raw/"}[args.dataset]
        first = str(e).splitlines()[0] if str(e) else ""
        die(f"could not load {args.dataset} ({type(e).__name__}: {first}); put {name} under "
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

def batch_iterator(dataset, args, batch, rank=0, world=1, start_step=0, pin=False):
    sampler = StepBatches(len(dataset), batch, args.seed, rank, world, start_step)
    # own generator: making the iterator must not consume the global RNG (resume would shift noise)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=pin, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed + rank))
    return (x for x, _ in loader)

def data_shape(args):
    if args.dataset == "mnist":
        return (1, 28, 28)
    c = args.channels if args.dataset in ("fake", "npz") else 3
    return (c, args.image_size, args.image_size)

# ==== 4. Training loop ====
# bf16 (--amp): the network trunk runs under autocast on CUDA (`net.amp`); the scalar head, the
# loss, the chains, parameters, Adam and EMA stay fp32, the OT cost fp64; no GradScaler (bf16 has
# fp32's exponent range). DDP does not support torch.autograd.grad: each process keeps a plain
# module and allreduce_grads averages the gradients after backward.
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

def build_model(args, device=None):
    """The potential for --arch (auto: CNN for MNIST, UNet+ViT otherwise), engineering set."""
    shape = data_shape(args)
    arch = args.arch if args.arch != "auto" else ("cnn" if args.dataset == "mnist" else "unetvit")
    if arch == "cnn":
        model = CNNPotential(shape, args.model_size)
    else:
        try:
            mult = tuple(int(c) for c in str(args.ch_mult).split(","))
        except ValueError:
            die(f"--ch-mult must be comma-separated integers, got {args.ch_mult!r}")
        if shape[1] < 8 or shape[1] % 4 or shape[1] % (2 ** (len(mult) - 1)):
            die(f"the UNet+ViT potential needs an image side >= 8 divisible by 4 and by "
                f"2^{len(mult) - 1} (--ch-mult), got {shape[1]}")
        p_att = getattr(args, "attn_dropout", None)
        model = UNetViTPotential(shape, args.model_size, args.res_blocks, args.vit_depth,
                                 args.dropout, args.output_scale, ch_mult=mult,
                                 attn_dropout=args.dropout if p_att is None else p_att)
    if device is None:
        return model
    return engineer(model, device, args.amp, getattr(args, "channels_last", False))

def engineer(model, device, amp, channels_last=False):
    """On `device`, with the network's bf16-trunk (`amp`, section 2) and channels-last settings."""
    model = model.to(device)
    model.amp = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model

def build_em(V, args, clamp=(-1.0, 1.0)):
    return EnergyMatching(V, tau_star=args.tau_star, eps_max=args.eps_max, lambda_cd=args.lambda_cd,
                          n_langevin=args.n_langevin, dt=args.dt, cd_neg_clamp=args.cd_neg_clamp,
                          cd_trim=args.cd_trim, neg_data_frac=args.neg_data_frac,
                          flow_reduction=args.flow_reduction, tau_s=args.tau_s or 1.0,
                          clamp_negatives=clamp, use_ot=not args.no_ot,
                          flow_weighting=getattr(args, "flow_weighting", "off"),
                          same_temperature=bool(getattr(args, "same_temperature", False)))

def count_params(m):
    return sum(p.numel() for p in m.parameters())

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

def step_seed(seed, step, rank):
    """Every (step, rank) has its own seed: a resumed run draws the numbers a straight run draws."""
    return (seed * 1_000_003 + step * 4099 + rank * 7) % (2 ** 62)

def train_step(em, model, opt, x1, phase, args, world, step, x1_cd=None, signum=0):
    """One optimisation step -> (logs, applied, signum). A step whose loss or gradient norm is
    non-finite on any rank is skipped; the same all-reduce gives every rank the largest stop
    signal number of any rank. Learning rate: linear warm-up (code)."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    for g in opt.param_groups:
        g["lr"] = lr
    x0 = torch.randn_like(x1)                                         # Alg. 1 line 4: x0 ~ N(0, I)
    loss, logs = em.loss(x1, x0, phase=phase, x1_cd=x1_cd)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    allreduce_grads(model.parameters(), world)
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    logs["lr"], logs["grad_norm"] = lr, float(gn)
    bad = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
    bad, signum = all_max([bad, signum], x1.device, world)          # the step's one all-reduce
    if not bad:
        opt.step()
    return logs, not bad, int(signum)

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

def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")        # one per DDP rank
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to output folder {os.path.abspath(path)} ({e.strerror or e})")

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

def plot_losses(records, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("flow", "cd_term"):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def draw_samples(V, args, n, shape, device, batch=None):
    """n samples: K = tau_s / dt Heun (or Euler) steps from N(0, I), clamped to [-1, 1]."""
    em = build_em(V, args)
    out, batch = [], batch or args.sample_batch
    for i in range(0, n, batch):
        x0 = torch.randn(min(batch, n - i), *shape, device=device)
        out.append(em.sample(x0, tau_s=args.tau_s, method=args.sampler, clamp=(-1.0, 1.0)).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)

def cmd_train(args):
    """Phase 1 (Alg. 1) or phase 2 (Alg. 2) on --dataset; resumable, NaN-guarded, signal-safe."""
    stop = StopSignals()
    try:
        rank, world, device = setup_distributed(args)
        phase, main_rank = args.phase, rank == 0
        ckpt_path = os.path.join(args.out_dir, f"ckpt_{phase}.pt")
        if main_rank:
            prepare_out_dir(args.out_dir)
            for name in os.listdir(args.out_dir):    # temp files of an interrupted save are garbage
                if name.endswith((".pt.tmp", ".tmp.npz")):
                    os.remove(os.path.join(args.out_dir, name))
        log = Logger(args.out_dir, main_rank)
        torch.manual_seed(args.seed)
        model = build_model(args, device)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas))

        # weights: resume (--ckpt wins, else <out-dir>/ckpt_<phase>.pt) > phase-1 checkpoint > fresh
        ck, src, resumed = None, None, False
        if args.resume and (args.ckpt or os.path.exists(ckpt_path)):
            src = args.ckpt or ckpt_path
            ck = load_checkpoint(src, device)
            resumed = ck.get("phase") == phase
        elif args.resume:
            log(f"--resume: no {ckpt_path}; starting phase {phase} afresh")
        if ck is None and phase == "main" and not args.from_scratch:
            src = args.ckpt or os.path.join(args.out_dir, "ckpt_warmup.pt")
            if not os.path.exists(src):
                die(f"phase main starts from a phase-1 checkpoint: {src} not found "
                    f"(run --phase warmup first, pass --ckpt, or --from-scratch)")
            ck = load_checkpoint(src, device)
        start_step = phase_start = ema_n = 0
        if ck is not None:
            load_states(ck, model, ema, opt, src, args)
            start_step = int(ck["step"])
            phase_start = int(ck.get("phase_start", 0)) if resumed else start_step
            ema_n = int(ck.get("ema_n", start_step))
            log(f"{'resumed' if resumed else 'phase main'} from {src} at step {start_step}")
        end_step = phase_start + args.steps
        if world > 1:                                                 # identical weights everywhere
            for t in list(model.state_dict().values()) + list(ema.state_dict().values()):
                dist.broadcast(t, 0)
        log.truncate_metrics(start_step)

        def save(step):
            save_checkpoint(ckpt_path, model, ema, opt, step, args, phase=phase,
                            phase_start=phase_start, ema_n=ema_n)

        def grid(step):                         # from the EMA (or, with --no-ema, the raw) weights
            net, which = (model, "raw") if args.no_ema else (ema, "ema")
            path = os.path.join(args.out_dir, f"samples_{which}_{step}.png")
            net.eval()
            save_grid(draw_samples(torch.compile(net) if args.compile else net, args,
                                   min(64, args.num_samples), shape, device), path)
            model.train()
            how = "raw weights" if args.no_ema else f"EMA weights ({ema_n} updates)"
            log(f"grid at step {step}: {how}, tau_s {args.tau_s} -> {path}")

        em = build_em(model, args)
        dataset = build_dataset(args, train=True)
        shape = tuple(dataset[0][0].shape)
        two = args.cd_separate_batch and phase == "main"              # a second data batch for CD
        batches = batch_iterator(dataset, args, args.batch_size * (2 if two else 1), rank, world,
                                 start_step, pin=device.type == "cuda")
        log(f"energy_matching | phase {phase} | recipe {args.recipe} | {args.dataset} {shape} | "
            f"{count_params(model) / 1e6:.2f}M params | device {device} x {world} | "
            f"{'bf16 trunk' if model.amp else 'fp32'} | threads {torch.get_num_threads()} | steps "
            f"{start_step}->{end_step} | batch {args.batch_size}/rank | lr {args.lr} "
            f"tau* {args.tau_star} eps_max {args.eps_max} lambda_CD {args.lambda_cd} | EMA "
            f"{args.ema_decay}{' with warm-up' if args.ema_warmup else ''}")
        if phase == "warmup" and args.tau_s_default:
            log(f"grids use tau_s = {args.tau_s}: after phase 1 there is no Boltzmann well to "
                f"sample past t = 1 (pass --tau-s to change)")

        n_bad, t_last, s_last = 0, time.time(), start_step
        model.train()
        for step in range(start_step, end_step):
            torch.manual_seed(step_seed(args.seed, step, rank))
            xb = next(batches).to(device, non_blocking=True).float()
            x1, x1_cd = xb.chunk(2) if two else (xb, None)
            logs, applied, signum = train_step(em, model, opt, x1, phase, args, world, step,
                                               x1_cd, stop.signum or 0)
            done = step + 1
            n_bad = 0 if applied else n_bad + 1
            if applied:
                ema_update(ema, model, ema_decay_at(args.ema_decay, ema_n, args.ema_warmup))
                ema_n += 1
            else:
                log(f"step {done}: non-finite loss or gradient ({logs['loss']:.4g}, "
                    f"{logs['grad_norm']:.4g}); skipped ({n_bad} in a row)")
            if n_bad >= 10:
                kept = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
                die(f"{n_bad} non-finite steps in a row at step {done}; stopped; last good "
                    f"checkpoint: {kept}", 3)
            rec = {"step": done, "phase": phase, **{k: round(v, 6) for k, v in logs.items()}}
            if args.log_every and (done % args.log_every == 0 or done == end_step):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall, n = time.time() - t_last, max(done - s_last, 1)
                ms, ips = 1000 * wall / n, n * args.batch_size * world / max(wall, 1e-9)
                rec.update(ms_per_iter=round(ms, 2), images_per_s=round(ips, 1))
                log(f"step {done}/{end_step} | " + " ".join(f"{k} {v:.4g}" for k, v in logs.items())
                    + f" | {ms:.1f} ms/it | {ips:.1f} img/s | ETA "
                    f"{(end_step - done) * wall / n / 60:.1f} min")
                t_last, s_last = time.time(), done
            log.metrics(rec)
            if signum:
                if main_rank:
                    save(done)
                    cmd = shlex.join(["python", os.path.basename(__file__)]
                                     + [a for a in args.argv_ if a != "--resume"])
                    print(f"stopped at step {done} by {signal.Signals(signum).name}; checkpoint "
                          f"{ckpt_path}; resume: {cmd} --resume", flush=True)
                sys.exit(128 + signum)
            if main_rank and args.save_every and done % args.save_every == 0 and done < end_step:
                save(done)
            if main_rank and args.sample_every and done % args.sample_every == 0 < end_step - done:
                grid(done)
    except SystemExit:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    finally:
        stop.restore()

    records = log.read_metrics(phase) if main_rank else []
    if main_rank:
        save(end_step)
        if records:
            plot_losses(records, os.path.join(args.out_dir, f"loss_{phase}.png"), f"EM, {phase}")
        if args.num_samples > 0 and end_step > start_step:
            grid(end_step)
        summary = {"phase": phase, "steps": end_step, "params": count_params(model),
                   "final": records[-1] if records else None}
        if device.type == "cuda":
            summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        write_json(args.out_dir, f"summary_{phase}.json", summary)
        log(f"saved {ckpt_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    ran = end_step - start_step
    return records[-ran:] if main_rank and ran > 0 else []

# ==== 5. Checkpoints ====
# A plain dict for torch.load(weights_only=True): {"format", "model", "ema", "opt", "step", "phase",
# "phase_start", "ema_n", "args"}, written to <path>.tmp and then os.replace'd: a crash mid-write
# never leaves half a checkpoint.
CKPT_FORMAT = "energy_matching/v1"
ARCH_FLAGS = ("dataset", "arch", "model_size", "res_blocks", "ch_mult", "vit_depth", "output_scale",
              "image_size", "channels")

def save_checkpoint(path, model, ema, opt, step, args, **extra):
    obj = {"format": CKPT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
           "opt": opt.state_dict() if opt is not None else None, "step": int(step),
           "args": args_to_dict(args), **extra}
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)

def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True); a missing or corrupt file is one line and exit code 2."""
    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({type(e).__name__})")

def load_checkpoint(path, map_location="cpu"):
    """Our checkpoint dict from ours or an authors' training file (converted); else exit 2."""
    obj = read_checkpoint(path, map_location)
    if is_authors_checkpoint(obj):
        return authors_checkpoint_as_ours(obj, path)
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        die(f"{path} is not an Energy Matching checkpoint (format {fmt!r}, not {CKPT_FORMAT!r})")
    return obj

def load_states(ck, model, ema=None, opt=None, path="checkpoint", args=None):
    """Load weights (and EMA, optimiser); a wrong architecture names the flags that differ."""
    try:
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if opt is not None and ck.get("opt"):
            opt.load_state_dict(ck["opt"])
    except (RuntimeError, KeyError, ValueError) as e:
        old, new = ck.get("args", {}), vars(args) if args is not None else {}
        diff = [f"--{k.replace('_', '-')} {new.get(k)} (checkpoint {old[k]})"
                for k in ARCH_FLAGS if k in old and k in new and old[k] != new[k]]
        why = ", ".join(diff) if diff else f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        die(f"{path} does not fit this model; flags that differ from the checkpoint's: {why}")

def model_from_checkpoint(path, device, use_ema=True):
    """Rebuild the network from the checkpoint's own args and load its EMA (or raw) weights."""
    ck = load_checkpoint(path, device)
    cargs = argparse.Namespace(**ck["args"])
    model = build_model(cargs).to(device)
    load_states({"model": ck["ema" if use_ema else "model"]}, model, path=path)
    return model.eval().requires_grad_(False), cargs, ck

# ---- The authors' released weights (https://github.com/m1balcerak/EnergyMatching) ----
# Their files are {"net_model", "ema_model", "sched", "optim", "step"}; both models are state dicts
# of EBViTModelWrapper: torchcfm's guided-diffusion UNet at a fixed dummy t = 0.5, PatchEmbed(4), a
# post-LN nn.TransformerEncoder, mean-pool, final_linear, times output_scale: the layers of
# UNetViTPotential in the same order. Only the names differ; the time layers fold into biases.
AUTHORS_T = 0.5                  # the dummy time their potential(x, t) always feeds the UNet
AUTHORS_OUTPUT_SCALE = 1000.0    # not in their files; 1000 in their CIFAR-10 and ImageNet32 configs
_AUTHORS_RES = {"n1": "in_layers.0", "c1": "in_layers.2", "n2": "out_layers.0",
                "c2": "out_layers.3", "skip": "skip_connection"}
_AUTHORS_ATTN = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_AUTHORS_VIT = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias"}
_AUTHORS_VIT.update({f"{o}.{p}": f"{t}.{p}" for p in ("weight", "bias") for o, t in (
    ("out", "self_attn.out_proj"), ("ln1", "norm1"), ("ln2", "norm2"), ("ff.0", "linear1"),
    ("ff.3", "linear2"))})

def _short(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

def strip_prefixes(sd):
    """Keys without DataParallel/DDP "module." and torch.compile "_orig_mod." prefixes."""
    return {re.sub(r"^(module\.)+", "", k.replace("_orig_mod.", "")): v for k, v in sd.items()}

def is_authors_checkpoint(ck):
    """Their layout: "net_model" and "ema_model" state dicts (ours has "format", VPFB's "model")."""
    return (isinstance(ck, dict) and "format" not in ck
            and isinstance(ck.get("net_model"), dict) and isinstance(ck.get("ema_model"), dict))

def sinusoidal_embedding(t, dim, max_period=10000.0):
    """guided-diffusion's timestep features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
    half = dim // 2
    f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    e = torch.cat([torch.cos(t * f), torch.sin(t * f)])
    return torch.cat([e, e.new_zeros(dim % 2)])                          # (dim,)

def authors_time_embedding(sd, t=AUTHORS_T):
    """emb = time_embed(sinusoid(t)) = Linear(SiLU(Linear(.))), (4 ch,): input of every ResBlock."""
    w0, b0, w2, b2 = (sd[f"time_embed.{k}"].double() for k in ("0.weight", "0.bias", "2.weight",
                                                                "2.bias"))
    e = sinusoidal_embedding(t, w0.shape[1]).to(w0.device)
    return F.linear(F.silu(F.linear(e, w0, b0)), w2, b2)

def fold_time_bias(sd, prefix, emb):
    """conv1's bias of the authors' ResBlock `prefix` with the time term folded in: their block adds
    c = emb_layers(emb) = Linear(SiLU(emb)) after conv1, a constant at fixed t, so conv(x) + b + c =
    conv(x) + (b + c) to float32 rounding. Computed in float64, stored in the file's dtype."""
    w, b = sd[f"{prefix}.emb_layers.1.weight"].double(), sd[f"{prefix}.emb_layers.1.bias"].double()
    bias = sd[f"{prefix}.in_layers.2.bias"]
    c = F.linear(F.silu(emb), w, b)
    if c.shape != bias.shape:    # 2 x channels: scale-shift norm (FiLM after GroupNorm), not a bias
        die(f"authors' ResBlock {prefix} uses scale-shift time conditioning (emb_layers gives "
            f"{c.shape[0]} values for {bias.shape[0]} channels); only the additive form folds")
    return (bias.double() + c).to(bias.dtype)

def authors_arch(sd):
    """UNetViTPotential keywords for an EBViTModelWrapper state dict, from key names and shapes."""
    ch, C = sd["input_blocks.0.0.weight"].shape[:2]
    dim, _, patch, _ = sd["patch_embed.patch_embed.weight"].shape
    side = math.isqrt(sd["patch_embed.pos_embed"].shape[1]) * patch   # square: N = (H / patch)^2
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    n_down = sum(f"input_blocks.{i}.0.op.weight" in sd for i in range(n_in))
    res_blocks = (n_in - 1 - n_down) // (n_down + 1)
    mult, attn = [], []
    for lvl in range(n_down + 1):
        first = 1 + lvl * (res_blocks + 1)                       # first ResBlock of the level
        mult.append(sd[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // ch)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attn.append(side // 2 ** lvl)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer_encoder.layers."))
    return dict(shape=(C, side, side), size=ch / 128, res_blocks=res_blocks, vit_depth=depth,
                dropout=0.1, output_scale=AUTHORS_OUTPUT_SCALE, ch_mult=tuple(mult),
                attn_res=tuple(attn), patch=patch)

def authors_names(model):
    """({our key: the authors' key} for every tensor of a UNetViTPotential, authors' ResBlocks)."""
    names, resblocks = {}, []

    def leaf(mod, ours, theirs, table=None):
        if isinstance(mod, ResBlock):
            resblocks.append(theirs)
            table = _AUTHORS_RES
        elif isinstance(mod, SelfAttention2d):
            table = _AUTHORS_ATTN
        for n in mod.state_dict():
            head, _, rest = n.partition(".")
            names[f"{ours}.{n}"] = f"{theirs}.{table[head]}.{rest}" if table else f"{theirs}.{n}"

    def seq(mods, ours, theirs):   # our nn.Upsample + Conv2d is their single Upsample(.conv)
        for i, m in enumerate(mods):
            up = i > 0 and isinstance(mods[i - 1], nn.Upsample)
            leaf(m, f"{ours}.{i}", f"{theirs}.{i - 1}.conv" if up else f"{theirs}.{i}")

    leaf(model.inp, "inp", "input_blocks.0.0")
    for i, m in enumerate(model.down):             # their input_blocks[0] is our inp, so index + 1
        if isinstance(m, nn.Conv2d):
            leaf(m, f"down.{i}", f"input_blocks.{i + 1}.0.op")        # Downsample(conv, stride 2)
        else:
            seq(m, f"down.{i}", f"input_blocks.{i + 1}")
    seq(model.mid, "mid", "middle_block")
    for i, m in enumerate(model.up):
        seq(m, f"up.{i}", f"output_blocks.{i}")
    seq(model.out, "out", "out")
    leaf(model.patch, "patch", "patch_embed.patch_embed")
    names["pos"] = "patch_embed.pos_embed"
    for i, blk in enumerate(model.blocks):
        for n in blk.state_dict():
            names[f"blocks.{i}.{n}"] = f"transformer_encoder.layers.{i}.{_AUTHORS_VIT[n]}"
    leaf(model.head, "head", "final_linear")
    return names, resblocks

def authors_to_ours(sd, model, name="checkpoint"):
    """Our state dict for `model` from the authors' prefix-free `sd`, time layers folded."""
    names, resblocks = authors_names(model)
    time_keys = [f"time_embed.{i}" for i in (0, 2)] + [f"{r}.emb_layers.1" for r in resblocks]
    expected = set(names.values()) | {f"{k}.{p}" for k in time_keys for p in ("weight", "bias")}
    extra, missing = set(sd) - expected, expected - set(sd)
    if extra or missing:
        die(f"{name}: the authors' weights do not map onto UNetViTPotential; unmatched keys in the "
            f"file: [{_short(extra)}]; missing: [{_short(missing)}]")
    emb = authors_time_embedding(sd)
    out = {k: fold_time_bias(sd, v[:-len(".in_layers.2.bias")], emb)     # ResBlock conv1 bias
           if v.endswith(".in_layers.2.bias") else sd[v] for k, v in names.items()}
    want = model.state_dict()
    bad = [f"{k} {tuple(out[k].shape)} vs ours {tuple(want[k].shape)}" for k in want
           if out[k].shape != want[k].shape]
    if bad:
        die(f"{name}: tensor shapes differ from the rebuilt UNetViTPotential: {_short(bad, 4)}")
    return out

def authors_model(ck, key="ema_model", name="checkpoint"):
    """(an untrained UNetViTPotential shaped like ck[key], ck[key] unprefixed); else exit 2."""
    if not is_authors_checkpoint(ck):
        own = isinstance(ck, dict) and "format" in ck
        die(f"{name} is not an authors' Energy Matching checkpoint (a dict with 'net_model' and "
            f"'ema_model' state dicts)" + ("; it is in this file's own format" if own else ""))
    sd = strip_prefixes(ck[key])
    if any(k.startswith("mlp.") for k in sd):
        die(f"{name} holds the authors' MLP-head potential (EBMLPModelWrapper); only the UNet+ViT "
            f"one (EBViTModelWrapper) maps onto UNetViTPotential")
    try:
        kw = authors_arch(sd)
        model = UNetViTPotential(**kw)
    except (KeyError, ValueError, IndexError, ZeroDivisionError, RuntimeError) as e:
        die(f"{name}: cannot rebuild the authors' architecture from its keys "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    model.arch_kwargs = kw               # so callers can rebuild the run's shape/model flags
    return model, sd

def load_authors_checkpoint(path, use_ema=True, device="cpu"):
    """Our UNetViTPotential (eval) from an authors' CIFAR-10 training file: V(x) = their
    potential(x, t), any t, to float32 rounding; use_ema: "ema_model", else "net_model"."""
    model, sd = authors_model(read_checkpoint(path), "ema_model" if use_ema else "net_model", path)
    model.load_state_dict(authors_to_ours(sd, model, path))
    return model.to(device).eval()

def authors_checkpoint_as_ours(ck, name="checkpoint"):
    """An authors' file as our checkpoint dict: args = --recipe authors defaults + the arch read
    from the keys; "opt" None (their Adam state indexes their parameter list: fresh Adam)."""
    model, sd_ema = authors_model(ck, "ema_model", name)
    kw = model.arch_kwargs
    if kw["shape"][0] != 3 or kw["attn_res"] != (16,) or kw["patch"] != 4:
        die(f"{name}: an authors' network with {kw['shape'][0]} channels, attention at "
            f"{kw['attn_res']}, patch {kw['patch']} has no flags here (3, (16,), 4)")
    args = resolve_args(build_parser().parse_args(["--recipe", "authors", "--dataset", "cifar10"]))
    args.image_size, args.model_size, args.res_blocks = kw["shape"][1], kw["size"], kw["res_blocks"]
    args.ch_mult, args.vit_depth = ",".join(map(str, kw["ch_mult"])), kw["vit_depth"]
    args.dropout, args.output_scale = kw["dropout"], kw["output_scale"]
    step = int(ck.get("step") or 0)
    return {"format": CKPT_FORMAT, "model": authors_to_ours(strip_prefixes(ck["net_model"]),
                                                            model, name),
            "ema": authors_to_ours(sd_ema, model, name), "opt": None, "step": step,
            "phase": "authors", "phase_start": step, "args": args_to_dict(args)}

# ==== 6. Experiment modes ====
def eval_setup(args):
    """Device, the (EMA) potential of --ckpt (else <out-dir>/ckpt_{main,warmup}.pt), its args."""
    prepare_out_dir(args.out_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)                          # --seed: the same samples every run
    found = [p for p in (os.path.join(args.out_dir, f"ckpt_{ph}.pt") for ph in ("main", "warmup"))
             if os.path.exists(p)]
    if not (args.ckpt or found):
        die(f"no checkpoint in {args.out_dir} (train first or pass --ckpt)")
    path = args.ckpt or found[0]
    V, cargs, ck = model_from_checkpoint(path, device, use_ema=not args.no_ema)
    V = engineer(V, device, args.amp)
    if args.tau_s is None and args.mode != "lid":                   # LID does not sample
        args.tau_s = 1.0 if ck.get("phase") == "warmup" else 3.0
        why = ("phase-1 checkpoint: past t = 1 it only extrapolates" if args.tau_s == 1 else
               "paper" + ("; the authors' README samples their files at 3.25"
                          if ck.get("phase") == "authors" else ""))
        print(f"tau_s = {args.tau_s:g} ({why}; pass --tau-s to change)", flush=True)
    for k in ("tau_s", "dt", "sampler", "sample_batch", "num_samples"):
        if getattr(args, k) is not None:
            setattr(cargs, k, getattr(args, k))
    return device, torch.compile(V) if args.compile else V, cargs, path

def eval_images(args, cargs, n, device):
    """The first n held-out images of --dataset (test split where there is one), checked to fit."""
    data = build_dataset(args, train=False)
    x = torch.stack([data[i][0] for i in range(min(n, len(data)))]).to(device)
    if tuple(x.shape[1:]) != data_shape(cargs):
        die(f"images of {args.dataset} have shape {tuple(x.shape[1:])} but the checkpoint's model "
            f"expects {data_shape(cargs)} (dataset {cargs.dataset!r})")
    return x

def refuse_non_finite(x, what):
    """Sample modes never write garbage: non-finite output is one line, exit 3, nothing written."""
    if not torch.isfinite(x).all():
        die(f"{what} contain NaN/Inf (non-finite weights?); nothing written", 3)

def cmd_sample(args):
    """--num-samples SDE samples -> samples.npz ("images" uint8 NHWC, eval_fid.py), samples.png."""
    device, V, cargs, path = eval_setup(args)
    shape = data_shape(cargs)
    t0, imgs = time.time(), []
    for i in range(0, args.num_samples, args.sample_batch):
        n = min(args.sample_batch, args.num_samples - i)
        x = draw_samples(V, cargs, n, shape, device, batch=n)
        refuse_non_finite(x, "samples")
        imgs.append(to_uint8(x))
        done, el = i + n, time.time() - t0
        print(f"sampled {done}/{args.num_samples} | {done / el:.1f} img/s | ETA "
              f"{(args.num_samples - done) * el / done / 60:.1f} min", flush=True)
    images = np.concatenate(imgs) if imgs else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
    out = os.path.join(args.out_dir, "samples.npz")
    np.savez(out + ".tmp.npz", images=images)                   # atomic: a temp name, then replace
    os.replace(out + ".tmp.npz", out)
    if len(images):
        save_grid(torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1,
                  os.path.join(args.out_dir, "samples.png"))
    meta = {"ckpt": path, "n": int(len(images)), "tau_s": cargs.tau_s, "dt": cargs.dt,
            "sampler": cargs.sampler, "weights": "raw" if args.no_ema else "ema",
            "seconds": round(time.time() - t0, 2)}
    write_json(args.out_dir, "samples.json", meta)
    print(f"wrote {out} ({images.shape})")
    return images

def cmd_inpaint(args):
    """Alg. 3 on data images with a centred hole: M chains per image without and with the repulsive
    interaction (same noise) -> inpaint.png (the paper's "with vs without" figure), inpaint.json."""
    device, V, cargs, path = eval_setup(args)
    torch.manual_seed(args.seed)
    x = eval_images(args, cargs, args.num_images or 4, device)
    H, W = x.shape[2:]
    s, A = max(1, int(round(args.hole * H))), torch.ones(x.shape[1:], device=device)
    A[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s] = 0   # 0 in a centred hole
    Bmask = 1 - A                                                     # interaction where unseen
    y = A * x                                                         # y = A(x), noise-free
    x_init = torch.randn(x.shape[0], args.chains, *x.shape[1:], device=device)
    kw = dict(n_chains=args.chains, tau_s=cargs.tau_s, dt=cargs.dt, zeta=args.zeta, x_init=x_init,
              eps=lambda t: temperature(t, cargs.tau_star, cargs.eps_max), clamp=(-1.0, 1.0))
    plain = inverse_langevin(V, y, A, **kw)
    inter = inverse_langevin(V, y, A, sigma=args.sigma_int, Bmask=Bmask, **kw)
    refuse_non_finite(torch.cat([plain, inter]), "inpaintings")

    def spread(z):  # mean pairwise distance between the chains inside the hole
        d = [(Bmask * (z[:, i] - z[:, j])).flatten(1).norm(dim=1)
             for i in range(z.shape[1]) for j in range(i)]
        return float(torch.stack(d).mean()) if d else 0.0

    def fidelity(z):  # RMS error on the observed pixels
        return float(((A * (z - x[:, None])) ** 2).sum() / (A.sum() * z.shape[:2].numel())) ** 0.5

    res = {"ckpt": path, "spread_without": spread(plain), "spread_with": spread(inter),
           "fidelity_rmse_without": fidelity(plain), "fidelity_rmse_with": fidelity(inter),
           "zeta": args.zeta, "sigma": args.sigma_int, "tau_s": cargs.tau_s, "dt": cargs.dt}
    from torchvision.utils import save_image
    # one row per image: original, masked, M chains without W, M chains with W
    rows = [torch.stack([x[r], y[r], *plain[r], *inter[r]]) for r in range(x.shape[0])]
    path_png = os.path.join(args.out_dir, "inpaint.png")
    save_image((torch.cat(rows).cpu().clamp(-1, 1) + 1) / 2, path_png, nrow=2 + 2 * args.chains)
    write_json(args.out_dir, "inpaint.json", res)
    print(json.dumps(res))
    return res

def cmd_lid(args):
    """LID of --num-images data images from the Hessian of V (exact or SLQ), Spearman vs PNG size
    (Table 2). If every LID is equal, Spearman is undefined: one line says which way to move tau."""
    from PIL import Image
    from scipy.stats import spearmanr
    device, V, cargs, path = eval_setup(args)
    xs = eval_images(args, cargs, args.num_images or 4096, device)
    n, d = xs.shape[0], xs[0].numel()
    method = args.lid_method if args.lid_method != "auto" else ("exact" if d <= 1024 else "slq")
    t0 = time.time()
    if method == "exact":
        lids, _ = lid_exact(V, xs, args.lid_tau)
    else:
        lids = []
        for i in range(0, n, 16):
            lids += lid_slq(V, xs[i:i + 16], args.lid_tau, args.lid_probes, args.lid_lanczos,
                            args.seed)
    sizes = []                                    # lossless PNG bytes: the paper's complexity proxy
    for im in to_uint8(xs):
        buf = io.BytesIO()
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(buf, "PNG", optimize=True)
        sizes.append(len(buf.getvalue()))
    distinct = set(round(float(v), 3) for v in lids)                 # SLQ estimates are floats
    varied = n > 2 and len(distinct) > 1 < len(set(sizes))
    rho = float(spearmanr(lids, sizes)[0]) if varied else None
    res = {"ckpt": path, "method": method, "tau": args.lid_tau, "d": d, "n": n,
           "spearman_lid_vs_png": rho, "lid": [float(v) for v in lids], "png_bytes": sizes,
           "seconds": round(time.time() - t0, 2)}
    head = f"LID ({method}, tau={args.lid_tau}) on {n} images:"
    write_json(args.out_dir, "lid.json", res)
    if rho is not None:
        print(f"{head} Spearman vs PNG size = {rho:.3f}")
    elif len(distinct) == 1:
        side = "lower" if lids[0] >= d - 0.5 else "higher"
        print(f"{head} all LIDs equal {lids[0]:.0f} (d = {d}), "
              f"so no Spearman correlation; try a {side} --lid-tau")
    else:
        print(f"{head} too few distinct values for a Spearman correlation")
    return res

def cmd_benchmark(args):
    """Ours vs the authors' recipe (fp32, math attention) from the same seed, weights and batches:
    phase-1/2 and sampler images/s, peak memory (CUDA), max |difference| of the loss curves."""
    device = pick_device(args.device)
    cuda, shape, B, N = device.type == "cuda", data_shape(args), args.batch_size, args.bench_steps
    K = args.bench_sample_steps
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.rand(B, *shape, generator=gen) * 2 - 1 for _ in range(4)]  # any pixels do
    torch.manual_seed(args.seed)
    ref = build_model(args)
    configs = {"authors_fp32_math": dict(amp="none", channels_last=False, compile=False,
                                         math_everywhere=True),
               "ours": dict(amp=args.amp, channels_last=args.channels_last or cuda,
                            compile=args.compile, math_everywhere=False)}
    sync = torch.cuda.synchronize if cuda else (lambda device: None)

    def timed(fn, n, warm):          # (outputs, calls/s, peak GB on CUDA) of n calls after `warm`
        for i in range(warm):
            fn(i)
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.time()
        out = [fn(warm + i) for i in range(n)]
        sync(device)
        rate = n / (time.time() - t)
        return out, rate, torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None

    results = {}
    for name, cfg in configs.items():
        model = engineer(copy.deepcopy(ref), device, cfg["amp"], cfg["channels_last"])
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas))
        em = build_em(model, args)
        em_s = build_em(torch.compile(model) if cfg["compile"] else model, args)

        def step(i, phase="warmup"):
            torch.manual_seed(step_seed(args.seed, i, 0))
            x1 = batches[i % len(batches)].to(device)
            return train_step(em, model, opt, x1, phase, args, 1, i)[0]["loss"]

        def samp(i):
            torch.manual_seed(i)
            return em_s.sample(torch.randn(B, *shape, device=device), K * args.dt, method="heun")

        r = dict(cfg)
        with math_sdpa() if cfg["math_everywhere"] else contextlib.nullcontext():
            r["phase1_losses"], it1, r["phase1_peak_gb"] = timed(step, N, 3)
            _, it2, r["phase2_peak_gb"] = timed(lambda i: step(i, "main"), args.bench_steps_main, 1)
            model.eval()
            _, it3, r["sampler_peak_gb"] = timed(samp, 1, 1 if cfg["compile"] else 0)
        r.update(phase1_img_s=it1 * B, phase1_ms_iter=1000 / it1, phase2_img_s=it2 * B,
                 phase2_ms_iter=1000 / it2, sampler_img_s=it3 * B, sampler_heun_steps=K)
        results[name] = r
        print(f"[{name}] phase1 {it1 * B:.1f} img/s ({1000 / it1:.1f} ms/it) | phase2 "
              f"{it2 * B:.1f} img/s | sampler ({K} Heun steps) {it3 * B:.1f} img/s | peak GB "
              f"{r['phase1_peak_gb']}/{r['phase2_peak_gb']}/{r['sampler_peak_gb']}", flush=True)
    a, o = results["authors_fp32_math"], results["ours"]
    diff = [abs(x - y) for x, y in zip(a["phase1_losses"], o["phase1_losses"])]
    rel = max(d / max(abs(x), 1e-12) for d, x in zip(diff, a["phase1_losses"]))
    s = {"device": torch.cuda.get_device_name(device) if cuda else str(device), "batch": B,
         "params": count_params(ref), "shape": list(shape), "measured_phase1_steps": N,
         "command": " ".join(sys.argv), "loss_max_abs_diff": max(diff), "loss_max_rel_diff": rel,
         "configs": results}
    for k in ("phase1", "phase2", "sampler"):
        s[f"speedup_{k}"] = o[f"{k}_img_s"] / a[f"{k}_img_s"]
    print("speed-up ours/authors: " + ", ".join(f"{k[8:]} x{v:.2f}" for k, v in s.items()
          if k.startswith("speedup_")) + f" | loss curves: max |diff| {max(diff):.3g} (rel "
          f"{rel:.3g}) over {N} steps")
    prepare_out_dir(args.out_dir)
    write_json(args.out_dir, "benchmark.json", s)
    return s

# ==== 7. Arguments and main ====
DATASETS = ("cifar10", "mnist", "celeba64", "folder", "fake", "npz")
MODES = ("train", "sample", "inpaint", "lid", "benchmark")

# Recipes fill every flag left at None. "authors": the authors' CIFAR-10 code and README commands;
# "paper": Appendix C (what it does not give is the plain method: no clamp, no trim, no fade).
RECIPES = {
    "authors": dict(lr=1.2e-3, tau_star=1.0, lambda_cd=1e-3, eps_max=0.01, n_langevin=200, dt=0.01,
                    steps_warmup=145_000, steps_main=2_000, batch_size=128, warmup=10_000,
                    ema_warmup_phase=0.9999, ema_main_phase=0.99, cd_neg_clamp=0.02, cd_trim=0.1,
                    same_temperature=True, flow_weighting="both", cd_separate_batch=True,
                    model_size=1.0),
    "paper": dict(lr=8e-4, tau_star=0.9, lambda_cd=2e-4, eps_max=0.01, n_langevin=200, dt=0.01,
                  steps_warmup=200_000, steps_main=25_000, batch_size=128, warmup=10_000,
                  ema_warmup_phase=0.9999, ema_main_phase=0.9999, cd_neg_clamp=0.0, cd_trim=0.0,
                  same_temperature=False, flow_weighting="off", cd_separate_batch=False,
                  model_size=1.0),
}
DATASET_OVERRIDES = {
    # App. C, CelebA: ~2x the parameters (width x1.5 here), batch 32, lr 1e-4, eps_max 0.05,
    # lambda_CD 2e-5, 250k + 25k steps (no authors' code for CelebA: paper values in both recipes)
    "celeba64": dict(lr=1e-4, eps_max=0.05, lambda_cd=2e-5, batch_size=32, steps_warmup=250_000,
                     steps_main=25_000, model_size=1.5),
    # App. C, MNIST: Alg. 2 directly (--from-scratch), lambda_CD 0.25, dt 0.05, 50 Langevin steps,
    # 300k steps, small CNN. lr and eps_max are not in the paper: 1e-4 and 0.01 are our choice.
    "mnist": dict(lambda_cd=0.25, dt=0.05, n_langevin=50, steps_main=300_000, lr=1e-4),
}

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
frac_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        die(f"{message} (see --help)")

def build_parser():
    p = Parser(description="Energy Matching (Balcerak et al., arXiv:2504.10612): train, sample, "
               "inpaint, LID, benchmark.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, bool_opt = p.add_argument, argparse.BooleanOptionalAction
    a("--mode", default="train", choices=MODES, help="what to do")
    a("--phase", default="warmup", choices=("warmup", "main"), help="Alg. 1 or Alg. 2 (+ CD)")
    a("--recipe", default="authors", choices=RECIPES, help="authors' CIFAR code or App. C")
    a("--dataset", default="cifar10", choices=DATASETS, help="training / evaluation images")
    a("--data-dir", default="data", help="dataset folder (npz: the .npz file)")
    a("--image-size", type=pos_int, help="image side for folder/fake (default 32; celeba64 64)")
    a("--channels", type=pos_int, default=3, help="channels of fake data")
    a("--fake-size", type=pos_int, default=256, help="number of FakeData images")
    a("--workers", type=nonneg_int, default=4, help="DataLoader processes (0 = main process)")
    a("--out-dir", help="output folder (default runs/em_<dataset>); always written to")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a("--threads", type=nonneg_int, default=0, help="CPU threads (0 = the cores this process has)")
    a("--seed", type=nonneg_int, default=0, help="random seed (each step and rank derives its own)")
    a("--batch-size", type=pos_int, help="per-process batch size (recipe: 128)")
    a("--steps", type=nonneg_int, help="steps of this phase (authors 145k + 2k)")
    a("--lr", type=pos_float, help="Adam learning rate (authors 1.2e-3, paper 8e-4)")
    a("--betas", type=unit_float, nargs=2, default=(0.9, 0.95), help="Adam betas (authors' code)")
    a("--warmup", type=nonneg_int, help="linear learning-rate warm-up steps (10k)")
    a("--grad-clip", type=nonneg_float, default=1.0, help="gradient-norm clipping (0 = off)")
    a("--ema-decay", type=unit_float, help="EMA decay (0.9999; authors' phase 2: 0.99)")
    a("--ema-warmup", action=bool_opt, default=True, help="min(decay, (1+n)/(10+n)); no: authors")
    a("--no-ema", action="store_true", help="grids / sampling with the raw weights, not the EMA")
    a("--arch", default="auto", choices=("auto", "unetvit", "cnn"), help="auto: cnn for MNIST")
    a("--model-size", type=pos_float, help="width multiplier (1.0 = the ~50M CIFAR net)")
    a("--res-blocks", type=pos_int, default=2, help="UNet residual blocks per level")
    a("--ch-mult", default="1,2,2,2", help="UNet channel multipliers per resolution level")
    a("--vit-depth", type=pos_int, default=8, help="ViT head layers")
    a("--dropout", type=unit_float, default=0.1, help="dropout in UNet and ViT (authors' code)")
    a("--attn-dropout", type=unit_float, help="ViT attention dropout (default: --dropout)")
    a("--output-scale", type=pos_float, default=1000.0, help="V = this * head (authors' code)")
    # method (Eq. 3, Alg. 2)
    a("--tau-star", type=nonneg_float, help="tau*, Eq. 3 (authors 1, paper 0.9)")
    a("--eps-max", type=nonneg_float, help="eps_max: p ∝ exp(-V/eps_max) (0.01)")
    a("--lambda-cd", type=nonneg_float, help="CD weight (authors 1e-3, paper 2e-4)")
    a("--n-langevin", type=nonneg_int, help="Langevin steps per negative chain (M)")
    a("--dt", type=pos_float, help="time step of the chains and of the sampler")
    a("--cd-neg-clamp", type=nonneg_float, help="lambda_CD CD >= -this (authors 0.02, paper 0)")
    a("--cd-trim", type=unit_float, help="drop the top fraction of V(negatives) (authors 0.1)")
    a("--neg-data-frac", type=frac_float, default=0.5, help="share of negatives started at data")
    a("--same-temperature", action=bool_opt, help="data chains at eps(t) (authors), not eps_max")
    a("--cd-separate-batch", action=bool_opt, help="a second data batch for CD (authors' code)")
    a("--flow-reduction", default="mean", choices=("mean", "sum"), help="sum: ||.||^2 (Alg. 1)")
    a("--flow-weighting", choices=("off", "main", "both"),
      help="fade the flow loss to 0 from tau* to 1: phase 2 (authors' 2-D), both (CIFAR), off")
    a("--no-ot", action="store_true", help="random instead of exact-OT pairs (ablation)")
    a("--from-scratch", action="store_true", help="phase main without a warmup checkpoint (MNIST)")
    a("--amp", default="auto", choices=("auto", "bf16", "none"), help="bf16 trunk (auto: on CUDA)")
    a("--compile", action="store_true", help="torch.compile the potential for sampling only")
    a("--channels-last", action="store_true", help="channels_last memory (faster convs on GPU)")
    a("--resume", action="store_true", help="resume from --ckpt, else <out-dir>/ckpt_<phase>.pt")
    a("--ckpt", help="checkpoint to read (ours or the authors'); outputs go to --out-dir")
    a("--log-every", type=nonneg_int, default=100, help="log every N steps (0 = off)")
    a("--save-every", type=nonneg_int, default=5000, help="checkpoint every N steps (0 = at end)")
    a("--sample-every", type=nonneg_int, default=0,
      help="sample grid every N steps (0 = only at the end)")
    a("--num-samples", type=nonneg_int, default=64, help="samples to draw (50000 for FID)")
    a("--tau-s", type=pos_float, help="sampling time, K = tau_s/dt (3; 1 after phase 1 alone)")
    a("--sampler", default="heun", choices=("heun", "euler"), help="SDE integrator")
    a("--sample-batch", type=pos_int, default=256, help="batch size when sampling")
    # inverse problems (Alg. 3)
    a("--num-images", type=pos_int, help="inpaint: images (4); lid: images (4096, paper)")
    a("--hole", type=frac_float, default=0.5, help="inpaint: side of the masked centre / side")
    a("--zeta", type=pos_float, default=0.1, help="inpaint: data-fidelity scale zeta (Eq. 8)")
    a("--sigma-int", type=pos_float, default=1.0, help="inpaint: interaction sigma (Sec. 3.2)")
    a("--chains", type=pos_int, default=2, help="inpaint: chains M per image")
    a("--lid-tau", type=pos_float, help="LID: |lambda| < tau (paper: 10 MNIST, 2 CIFAR)")
    a("--lid-method", default="auto", choices=("auto", "exact", "slq"), help="auto: d <= 1024")
    a("--lid-probes", type=pos_int, default=8, help="SLQ: Rademacher probe vectors")
    a("--lid-lanczos", type=pos_int, default=60, help="SLQ: Lanczos steps per probe")
    a("--bench-steps", type=pos_int, default=20, help="benchmark: measured phase-1 steps")
    a("--bench-steps-main", type=pos_int, default=5, help="benchmark: measured phase-2 steps")
    a("--bench-sample-steps", type=pos_int, default=300, help="benchmark: sampler Heun steps")
    return p

def resolve_args(args):
    """Fill the None defaults from the recipe and the dataset row."""
    row = {**RECIPES[args.recipe], **DATASET_OVERRIDES.get(args.dataset, {})}
    row.update(steps=row[f"steps_{args.phase}"], ema_decay=row[f"ema_{args.phase}_phase"])
    for k, v in row.items():
        if getattr(args, k, 0) is None:                           # a flag of the row left at None
            setattr(args, k, v)
    if args.dataset == "npz":
        args.channels, args.image_size = load_npz(args.data_dir).tensors[0].shape[1:3]
    if args.image_size is None:
        args.image_size = 64 if args.dataset == "celeba64" else 32
    if args.lid_tau is None:
        args.lid_tau = 10.0 if args.dataset == "mnist" else 2.0
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"em_{args.dataset}")
    args.tau_s_default = args.tau_s is None
    if args.mode in ("train", "benchmark") and args.tau_s is None:
        args.tau_s = 1.0 if args.phase == "warmup" else 3.0   # no Boltzmann well before phase 2
    return args

def args_to_dict(args):
    """A plain dict of str/int/float/bool/None/list for the checkpoint (weights_only loads it)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if not k.endswith("_")}

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    args.argv_ = argv
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    return {"train": cmd_train, "sample": cmd_sample, "inpaint": cmd_inpaint, "lid": cmd_lid,
            "benchmark": cmd_benchmark}[args.mode](args)

if __name__ == "__main__":
    main()
