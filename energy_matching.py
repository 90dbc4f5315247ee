"""Energy Matching (Balcerak et al.): one scalar potential V(x) that is both an OT flow and an EBM.

(Full docstring with every mode follows in the finished file.)
"""
import contextlib
import math
import sys

import numpy as np
import torch


def die(msg):
    """Bad input: one clear line on stderr and exit code 2 (never a traceback)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ======================================================================================================
# === 4. Loss ===
# ======================================================================================================
def temperature(t, tau_star, eps_max):
    """Eq. (3): eps(t) = 0 for t < tau*, eps_max (t - tau*) / (1 - tau*) on [tau*, 1], eps_max for t >= 1.

    `t` may be a python float (returns a float) or a tensor (returns a tensor of the same shape).
    tau* = 1 (the authors' CIFAR-10 code) is the limit of a step: 0 before t = 1, eps_max from t = 1 on.
    """
    if torch.is_tensor(t):
        if tau_star >= 1.0:
            return torch.where(t < 1.0, torch.zeros_like(t), torch.full_like(t, eps_max))
        ramp = eps_max * ((t - tau_star) / (1.0 - tau_star)).clamp(min=0.0, max=1.0)   # linear ramp, capped at 1
        return torch.where(t < tau_star, torch.zeros_like(t), ramp)
    t = float(t)
    if t < tau_star and t < 1.0:
        return 0.0                                                   # flow regime: no entropy
    if t >= 1.0:
        return float(eps_max)                                        # equilibrium regime
    return float(eps_max) * (t - tau_star) / (1.0 - tau_star)        # linear ramp between tau* and 1


@torch.no_grad()
def ot_pair(x0, x1):
    """Exact minibatch OT coupling (Alg. 1 line 5): return x0 reordered so (x0_perm[i], x1[i]) are paired.

    Cost M_ij = ||x0_i - x1_j||^2 on flattened samples (Eq. 2), uniform weights 1/B on both sides; POT's
    network simplex `ot.emd` returns a vertex of the transport polytope, which for two uniform clouds of equal
    size is a permutation matrix / B (Birkhoff), so each column has exactly one non-zero entry.
    The cost is computed in float64 on the CPU: fp32/bf16 cancellation in |a|^2 + |b|^2 - 2ab would make the
    plan depend on the precision, and the solver wants float64 anyway.
    """
    import ot
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"ot_pair needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    B = x0.shape[0]
    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    M = torch.cdist(a, b).pow(2).numpy()                             # M_ij = ||x0_i - x1_j||^2
    w = np.full(B, 1.0 / B)                                          # uniform empirical measures
    plan = ot.emd(w, w, M, numItermax=10_000_000)                   # (B, B), a permutation matrix / B
    perm = torch.from_numpy(np.argmax(plan, axis=0)).to(x0.device)  # for column j (x1_j): its row i (x0_i)
    return x0[perm]


def grad_V(V, x, create_graph=False, autocast=None):
    """grad_x V(x) for a batch: autograd of sum_i V(x_i) (samples are independent, so this is per-sample).

    create_graph=True only in training (the flow loss differentiates the gradient again w.r.t. theta);
    samplers and Langevin chains use create_graph=False and detach, which is the stop-gradient sg(.) of Alg. 2.
    `autocast` is an optional context-manager factory (bf16 forward/backward of the network); the returned
    gradient is always cast to x's dtype (fp32) so the update arithmetic stays in fp32.
    """
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with ctx:
            e = V(x)
        g, = torch.autograd.grad(e.float().sum(), x, create_graph=create_graph)
    return g.to(x.dtype)


def _bcast(v, x):
    """Reshape a per-sample (B,) tensor to broadcast against x of shape (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def langevin(V, x, n_steps, dt, eps, t0=0.0, clamp=None, return_traj=False, autocast=None):
    """Unadjusted Langevin chain, Alg. 2 lines 6-12:  x <- x - dt grad V(x) + sqrt(2 dt eps) eta,  eta ~ N(0, I).

    Its stationary law (dt -> 0, constant eps) is p(x) ∝ exp(-V(x) / eps)  (Eq. 6).
    eps: a float, a per-sample (B,) tensor, or a callable t -> float | (B,) tensor evaluated at t = t0 + m dt
    (the eps(t) schedule of Eq. 3). The chain is detached: no gradient flows back through it (sg in Alg. 2).
    The state and the update are fp32 even when the network runs under bf16 autocast (small steps of size
    dt * grad would be lost in bf16's 8-bit mantissa). clamp=(lo, hi) clamps the final state only (authors' code).
    Returns x, or (x, traj) with traj of shape (n_steps + 1, B, ...).
    """
    x = x.detach().float()
    traj = [x] if return_traj else None
    for m in range(n_steps):
        t = t0 + m * dt
        e = eps(t) if callable(eps) else eps
        g = grad_V(V, x, autocast=autocast)                          # grad V(x^(m)), no graph kept
        if torch.is_tensor(e):
            noise_std = _bcast(torch.sqrt(2.0 * dt * e.to(x)), x)   # sqrt(2 dt eps_i), per sample
        else:
            noise_std = math.sqrt(2.0 * dt * float(e))
        x = (x - dt * g + noise_std * torch.randn_like(x)).detach()  # Alg. 2 line 8
        if return_traj:
            traj.append(x)
    if clamp is not None:
        x = x.clamp(*clamp)
    if return_traj:
        return x, torch.stack(traj)
    return x


class EnergyMatching:
    """The method: a scalar potential V(x) (any nn.Module returning (B,)) and its two losses and sampler.

    Samples move along -grad V. Boltzmann density of the learned model: p(x) ∝ exp(-V(x) / eps_max)  (Eq. 6).
    Defaults follow the authors' CIFAR-10 code (REFERENCE_NOTES): tau* = 1.0, eps_max = 0.01, lambda_CD = 1e-3,
    200 Langevin steps of dt = 0.01, CD clamped from below at -1, top 10 % of negative energies trimmed.
    The paper's Appendix C (tau* = 0.9, lambda_CD = 2e-4) is one flag away in main().
    """

    def __init__(self, V, tau_star=1.0, eps_max=0.01, lambda_cd=1e-3, n_langevin=200, dt=0.01,
                 cd_neg_clamp=1.0, cd_trim=0.1, neg_data_frac=0.5, flow_reduction="mean", tau_s=3.0,
                 clamp_negatives=None, autocast=None, use_ot=True):
        self.V = V
        self.tau_star, self.eps_max, self.lambda_cd = float(tau_star), float(eps_max), float(lambda_cd)
        self.n_langevin, self.dt = int(n_langevin), float(dt)
        self.cd_neg_clamp = cd_neg_clamp       # loss term lambda*CD clamped from below at -cd_neg_clamp (0/None: off)
        self.cd_trim = float(cd_trim)          # fraction of the highest negative energies dropped (trimmed mean)
        self.neg_data_frac = float(neg_data_frac)   # fraction of negatives started at data (paper: half)
        self.flow_reduction = flow_reduction   # "mean" over pixels (authors' code) or "sum" (paper's ||.||^2)
        self.tau_s = float(tau_s)
        self.clamp_negatives = clamp_negatives  # e.g. (-1, 1) for images, as in the authors' chains
        self.autocast = autocast               # context-manager factory for bf16 network passes, or None
        self.use_ot = use_ot

    def eps(self, t):
        """eps(t) of Eq. (3) with this model's tau* and eps_max."""
        return temperature(t, self.tau_star, self.eps_max)

    def energy(self, x):
        """V(x) as fp32 (B,), the network optionally under autocast."""
        ctx = self.autocast() if self.autocast is not None else contextlib.nullcontext()
        with ctx:
            e = self.V(x)
        return e.float()

    # --- phase 1: the flow-like objective L_OT (Sec. 2.1.1, Alg. 1) ---
    def flow_loss(self, x1, x0):
        if self.use_ot:
            x0 = ot_pair(x0, x1)                                     # Alg. 1 line 5: T = OT map noise -> data
        t = torch.rand(x1.shape[0], device=x1.device)                # Alg. 1 line 6: t ~ U(0, 1), per sample
        tb = _bcast(t, x1)
        xt = tb * x1 + (1 - tb) * x0                                 # x_t = (1 - t) T(x_data) + t x_data
        g = grad_V(self.V, xt, create_graph=True, autocast=self.autocast)   # grad V(x_t), graph kept for theta
        r = (g.float() + (x1 - x0)).flatten(1).pow(2)                # || grad V(x_t) + x_data - T(x_data) ||^2
        r = r.mean(1) if self.flow_reduction == "mean" else r.sum(1)
        return r.mean()

    # --- phase 2: the contrastive objective L_CD (Sec. 2.1.2, Alg. 2 lines 5-15) ---
    def negatives(self, x1, x0):
        """Langevin negatives: the first neg_data_frac of the batch starts at data (eps = eps_max throughout,
        Alg. 2 line 10), the rest at noise x0 with the eps(t) schedule of Eq. (3)."""
        B = x1.shape[0]
        n_data = int(round(self.neg_data_frac * B))
        at_data = torch.zeros(B, dtype=torch.bool, device=x1.device)
        at_data[:n_data] = True
        x_init = torch.where(_bcast(at_data, x1), x1, x0)

        def eps_fn(t):                                               # per-sample temperature at chain time t
            return torch.where(at_data, torch.full((B,), self.eps_max, device=x1.device),
                               torch.full((B,), self.eps(t), device=x1.device))

        return langevin(self.V, x_init, self.n_langevin, self.dt, eps_fn, clamp=self.clamp_negatives,
                        autocast=self.autocast), at_data

    def cd_loss(self, x1, x0):
        """L_CD = E_data[V(x)] - E_neg[V(x~)]  (the paper divides both by eps_max; the authors' code does not,
        that constant is absorbed in lambda_CD, so we follow the code). x~ = sg(Langevin chain)."""
        x_neg, _ = self.negatives(x1, x0)
        e_pos = self.energy(x1)                                      # Alg. 2 line 14: V on data
        e_neg = self.energy(x_neg)                                   # Alg. 2 line 13: V on negatives
        B = e_neg.shape[0]
        k = int(self.cd_trim * B)                                    # trimmed mean (authors' code): drop the
        neg_stat = e_neg.sort().values[: B - k].mean() if k > 0 else e_neg.mean()   # k highest neg energies
        cd = e_pos.mean() - neg_stat                                 # Alg. 2 line 15
        return cd, {"cd": cd.item(), "e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item()}

    def loss(self, x1, x0, phase="warmup"):
        """phase "warmup": L_OT (Alg. 1). phase "main": L_OT + lambda_CD L_CD (Alg. 2 line 16), where (authors'
        code) lambda_CD L_CD is clamped from below at -cd_neg_clamp so a run-away CD term cannot dominate."""
        if phase not in ("warmup", "main"):
            raise ValueError(f"phase must be 'warmup' or 'main', got {phase!r}")
        flow = self.flow_loss(x1, x0)
        logs = {"flow": flow.item()}
        if phase == "warmup" or self.lambda_cd == 0:
            return flow, logs
        x0_cd = torch.randn_like(x1) if self.use_ot else x0          # fresh noise for the noise-started chains
        cd, cd_logs = self.cd_loss(x1, x0_cd)
        cd_term = self.lambda_cd * cd
        if self.cd_neg_clamp:
            cd_term = torch.clamp(cd_term, min=-float(self.cd_neg_clamp))
        logs.update(cd_logs)
        logs["cd_term"] = cd_term.item()
        return flow + cd_term, logs

    # === 5. Samplers (methods; the module-level `langevin` above is the shared chain) ===
    def sample(self, x0, tau_s=None, dt=None, method="heun", clamp=None, return_traj=False):
        """Integrate dx = -grad V(x) dt + sqrt(2 eps(t)) dW from t = 0 to tau_s in K = round(tau_s / dt) steps.

        eps(t) follows Eq. (3): a deterministic OT-like flow first, Langevin at eps_max after t = 1.
        "euler": Euler-Maruyama, x' = x - dt grad V(x) + sqrt(2 eps(t) dt) eta  (= Alg. 2 line 8).
        "heun":  stochastic Heun (authors' sampler), the noise is additive so one eta serves both stages:
                 x~ = x - dt grad V(x) + s eta;   x' = x - dt/2 (grad V(x) + grad V(x~)) + s eta,  s = sqrt(2 eps dt).
        With eps = 0 both are the plain ODE solvers (Heun is 2nd order, Euler 1st). clamp=(lo, hi) clamps the
        final state only. Runs in fp32 unless the model was given an autocast factory. Returns x or (x, traj).
        """
        tau_s = self.tau_s if tau_s is None else float(tau_s)
        dt = self.dt if dt is None else float(dt)
        if method not in ("heun", "euler"):
            raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
        K = max(1, int(round(tau_s / dt)))
        x = x0.detach().float()
        traj = [x] if return_traj else None
        for k in range(K):
            t = k * dt
            s = math.sqrt(2.0 * self.eps(t) * dt)                    # diffusion sqrt(2 eps(t)) times sqrt(dt)
            noise = s * torch.randn_like(x) if s > 0 else 0.0
            g = grad_V(self.V, x, autocast=self.autocast)
            x_pred = x - dt * g + noise                              # Euler-Maruyama step (Heun's predictor)
            if method == "heun":
                g2 = grad_V(self.V, x_pred, autocast=self.autocast)
                x = x - 0.5 * dt * (g + g2) + noise                  # trapezoidal corrector
            else:
                x = x_pred
            x = x.detach()
            if return_traj:
                traj.append(x)
        if clamp is not None:
            x = x.clamp(*clamp)
        if return_traj:
            return x, torch.stack(traj)
        return x
