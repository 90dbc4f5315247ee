"""vpfb.py -- Variational Potential Flow Bayes (VPFB), one self-contained file.

(Work in progress: sections 4 and 5 -- the maths core -- are complete; the rest follows.)
"""
import argparse
import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def die(msg):
    """Bad input: one clear line on stderr, exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# === 1. Arguments ===
# (filled in below main(); see build_parser)

# === 2. Data ===

# === 3. Networks ===


# === 4. Loss ===
#
# Notation of the paper (papers/vpfb.md, Section 3):
#   xbar          a data point (the paper's \bar x), flattened to D numbers
#   x             a generative sample at pseudo-time t in [0, 1]
#   q(x)          = N(0, w^2 I)           Gaussian prior          (w = omega)
#   p(xbar | x)   = N(xbar; x, nu^2 I)    Gaussian data likelihood
#   h             = alpha(t) log q(x) + beta(t) log p(xbar | x)          Eq. (7)
#   rho(x|xbar,t) = e^h / int e^h = N(x; mu(t) xbar, sigma(t)^2 I)     Eq. (6), Prop. 1
#
# Everything below works on tensors of any shape (B, ...): we always reduce over all
# non-batch dimensions with x.flatten(1), so the same code runs on (B, 2) toy points and
# (B, C, H, W) images.


def _bdim(t, x):
    """Reshape a per-sample (B,) time so it broadcasts against x of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _sqnorm(x):
    """Squared Euclidean norm of every sample: ||x||^2 summed over all non-batch dims -> (B,)."""
    return x.flatten(1).pow(2).sum(1)


class Schedule:
    """A log-homotopy schedule alpha(t), beta(t) (Eq. 7) with the prior / likelihood scales omega, nu.

    The default is the OT flow-matching schedule of Section 3.5:
        alpha(t) = omega^2 / (1 - t),   beta(t) = nu^2 t / (1 - t)^2.
    Any other monotone pair can be passed as callables on tensors; their time derivatives
    (needed by the innovation, Eq. 12) are then taken by autograd.
    """

    def __init__(self, alpha=None, beta=None, omega=1.0, nu=1.0):
        self.omega, self.nu = float(omega), float(nu)
        w2, n2 = self.omega ** 2, self.nu ** 2
        self.is_otfm = alpha is None and beta is None
        self.alpha = alpha if alpha is not None else (lambda t: w2 / (1 - t))          # Sec. 3.5
        self.beta = beta if beta is not None else (lambda t: n2 * t / (1 - t) ** 2)    # Sec. 3.5

    def mu_sigma(self, t):
        """Prop. 1, Eq. (8): mu = sigmoid(log(beta w^2 / (alpha nu^2))), sigma = sqrt(nu^2 mu / beta)."""
        a, b = self.alpha(t), self.beta(t)
        mu = torch.sigmoid(torch.log(b * self.omega ** 2 / (a * self.nu ** 2)))        # Eq. (8), left
        sigma = torch.sqrt(self.nu ** 2 * mu / b)                                       # Eq. (8), right
        return mu, sigma

    def rates(self, t):
        """(alpha_dot / omega^2, beta_dot / nu^2): the two coefficients of the innovation, Eq. (12).

        Closed form for OT-FM:  alpha_dot/w^2 = 1/(1-t)^2,  beta_dot/nu^2 = (1+t)/(1-t)^3.
        Otherwise by autograd through alpha(t), beta(t)."""
        if self.is_otfm:
            return 1.0 / (1 - t) ** 2, (1 + t) / (1 - t) ** 3
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            ad = torch.autograd.grad(self.alpha(tt).sum(), tt)[0]
            bd = torch.autograd.grad(self.beta(tt).sum(), tt)[0]
        return ad / self.omega ** 2, bd / self.nu ** 2

    def gamma(self, x, xbar, t):
        """Innovation, Eq. (12): gamma = alpha_dot/w^2 ||x||^2 + beta_dot/nu^2 ||x - xbar||^2  -> (B,)."""
        ra, rb = self.rates(t)
        return ra * _sqnorm(x) + rb * _sqnorm(x - xbar)

    def gamma_bar(self, xbar, t):
        """Conditional mean of the innovation, gamma_bar = E_{x ~ N(mu xbar, sigma^2 I)}[gamma]  -> (B,).

        Gaussian moments: E||x||^2 = mu^2 ||xbar||^2 + D sigma^2,
                          E||x - xbar||^2 = (1 - mu)^2 ||xbar||^2 + D sigma^2."""
        ra, rb = self.rates(t)
        mu, sigma = self.mu_sigma(t)
        D = xbar[0].numel()
        n2 = _sqnorm(xbar)
        return ra * (mu ** 2 * n2 + D * sigma ** 2) + rb * ((1 - mu) ** 2 * n2 + D * sigma ** 2)


def otfm_centered_innovation(eps, xbar, t):
    """gamma - gamma_bar for OT-FM, written in the noise eps of x = t xbar + (1 - t) eps  -> (B,).

    Substituting x = t xbar + (1-t) eps into Eq. (12) and subtracting the Gaussian mean gives
        gamma - gamma_bar = 2 / (1 - t) * sum_i (eps_i^2 - xbar_i eps_i - 1).
    This is algebraically identical to Schedule().gamma(...) - Schedule().gamma_bar(...)
    (a test checks it) but has no cancellation of two huge numbers near t = 1, where both
    gamma and gamma_bar grow like D / (1 - t)^3. The authors' code uses the per-pixel mean of
    (eps^2 - xbar eps)(1 - t), i.e. this times (1-t)^2 / (2D) with the "-1" dropped."""
    s = (eps * eps - xbar * eps - 1.0).flatten(1).sum(1)
    return 2.0 / (1.0 - t) * s


def _center(v):
    return v - v.mean()


def _pearson(a, b, eps=1e-8):
    """Batch Pearson correlation of two (B,) vectors (the authors' form of the covariance term)."""
    a, b = _center(a), _center(b)
    return (a * b).mean() / (a.pow(2).mean().sqrt() * b.pow(2).mean().sqrt() + eps)


class VPFB:
    """The method: a scalar potential Phi(x, t) whose gradient is the velocity dx/dt = grad_x Phi (Eq. 13).

    phi(x, t) takes x (B, ...) and t (B,) and returns (B,). An autonomous Phi(x) ignores t.

    Hyper-parameters (defaults, and where paper and authors' code differ, in brackets):
      kappa      w(t) = (1 - t)^kappa, the weight on the innovation (Sec. 3.5: kappa > 1) [2]
      t_end      t ~ U(0, t_end)                                           [1.0, authors]
      t_max      t is clamped to t_max beyond it (enforced stationarity)    [1 - 1e-5, authors]
      eta        Poincare term eta E[Phi^2], Eq. (27) [paper: "small"; authors: 0, only logged]
      lam_cos    weight of the cosine term                                  [1, paper]
      lam_gx     weight of E||grad_x Phi||^2                                [1, paper: must be 1
                 relative to the covariance for the Deep Ritz minimiser to be the true potential]
      lam_gt     weight of E(dPhi/dt)^2                                     [0.1, authors; paper: 1]
      cov_form   "cov": the paper's covariance with gamma - gamma_bar (exact Deep Ritz form);
                 "corr": the authors' batch Pearson correlation of Phi with
                 Gamma = mean_pixels((eps^2 - xbar eps)(1 - t)) (scale-free, one term dropped)
      cos_form   "paper": -cos(grad Phi, v);  "authors": -(grad Phi . v) / (|grad Phi||v|)^t / D
                 (a dot product near t = 0, a cosine near t = 1)
      weight_on  "ritz" (default): w(t) multiplies BOTH halves of the Deep Ritz pair
                 Cov[Phi, gamma] + E||grad_x Phi||^2. The minimiser at each t is then still the true
                 potential (grad Phi = marginal velocity), the weight only rebalances the times.
                 "cov": the paper as printed, w(t) on gamma only; the minimiser is then w(t) times
                 the true potential, so the ODE moves w(t) times too slowly (a test shows both).
      grad_norm  "sum": ||grad_x Phi||^2 summed over dims (paper); "mean": averaged (authors).
      bfactor    2 (default) or 4 (paper, Eq. 22): the factor in Phi_B = (c Phi + f ||x||^2) / g^2.
                 The analytic 1-D Gaussian case (tests) shows 2 is right; see boltzmann_energy.
    """

    def __init__(self, phi, autonomous=False, kappa=2.0, t_end=1.0, t_max=1.0 - 1e-5, eta=1e-4,
                 lam_cos=1.0, lam_gx=1.0, lam_gt=0.1, cov_form="cov", cos_form="paper",
                 weight_on="ritz", grad_norm="sum", bfactor=2.0, schedule=None):
        if cov_form not in ("cov", "corr"):
            raise ValueError(f"cov_form must be cov|corr, got {cov_form!r}")
        if cos_form not in ("paper", "authors"):
            raise ValueError(f"cos_form must be paper|authors, got {cos_form!r}")
        if weight_on not in ("ritz", "cov"):
            raise ValueError(f"weight_on must be ritz|cov, got {weight_on!r}")
        if grad_norm not in ("sum", "mean"):
            raise ValueError(f"grad_norm must be sum|mean, got {grad_norm!r}")
        self.phi, self.autonomous = phi, bool(autonomous)
        self.kappa, self.t_end, self.t_max, self.eta = float(kappa), float(t_end), float(t_max), float(eta)
        self.lam_cos, self.lam_gx, self.lam_gt = float(lam_cos), float(lam_gx), float(lam_gt)
        self.cov_form, self.cos_form, self.weight_on, self.grad_norm = cov_form, cos_form, weight_on, grad_norm
        self.bfactor = float(bfactor)
        self.schedule = schedule or Schedule()  # OT-FM: mu(t) = t, sigma(t) = 1 - t (Prop. 1, tested)
        self.last_nfe = 0

    # ---------------------------------------------------------------- helpers
    def _phi(self, x, t):
        """Phi at (x, t); t is clamped to t_max (the stationary regime beyond t_max, Sec. 3.5)."""
        return self.phi(x, t.clamp(max=self.t_max)).reshape(-1)

    def grad_phi(self, x, t):
        """grad_x Phi(x, t) with no graph kept (for samplers). t: float or (B,) tensor."""
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            out = self._phi(xr, t)
            g = torch.autograd.grad(out.sum(), xr)[0]
        return g.detach()

    # ---------------------------------------------------------------- Eq. (27)
    def loss(self, xbar, eps=None, t=None):
        """VPFB loss, Eq. (27), averaged over t ~ U(0, t_end) as in Eq. (26).

        xbar: data (B, ...); eps: prior noise N(0, I) (default fresh); t: optional (B,) times.
        Returns (loss tensor, dict of python floats for logging)."""
        B = xbar.shape[0]
        if eps is None:
            eps = torch.randn_like(xbar)
        if t is None:
            t = torch.rand(B, device=xbar.device, dtype=xbar.dtype) * self.t_end   # t ~ U(0, t_end)
        t = t.to(xbar.dtype).clamp(max=self.t_max)          # stationarity: t -> min(t, t_max), Sec. 3.5
        tb = _bdim(t, xbar)
        # Prop. 1 with OT-FM: mu(t) = t, sigma(t) = 1 - t, so x ~ N(t xbar, (1-t)^2 I)
        x = (tb * xbar + (1 - tb) * eps).detach().requires_grad_(True)   # x = t xbar + (1 - t) eps
        v = xbar - eps                                      # Eq. (20): v = mu_dot xbar + sigma_dot eps
        # t enters Phi as its own leaf so that dPhi/dt is the partial derivative at fixed x
        tl = t.detach().clone().requires_grad_(not self.autonomous)
        phi = self.phi(x, tl).reshape(-1)                   # Phi(x, t)  (B,)
        inputs = [x] if self.autonomous else [x, tl]
        grads = torch.autograd.grad(phi.sum(), inputs, create_graph=True, allow_unused=True)
        gx = grads[0]                                       # grad_x Phi  (B, ...)
        gt = grads[1] if (not self.autonomous and grads[1] is not None) else torch.zeros_like(t)
        D = xbar[0].numel()

        w = (1 - t) ** self.kappa                           # w(t) = (1 - t)^kappa, Sec. 3.5
        gx2 = _sqnorm(gx)                                   # ||grad_x Phi||^2  (B,)
        if self.grad_norm == "mean":
            gx2 = gx2 / D                                   # authors: mean over pixels
        # --- covariance term: Cov[Phi, w(t) gamma] -----------------------------------------
        if self.cov_form == "cov":
            # Cov under rho(x|xbar,t) p_data(xbar): gamma is centred by its conditional mean
            # gamma_bar (Eq. 11/23), then the batch mean of Phi is removed too (lower variance,
            # same expectation because E[gamma - gamma_bar] = 0).
            G = w * otfm_centered_innovation(eps, xbar, t)                 # w(t) (gamma - gamma_bar)
            cov = (_center(phi) * _center(G)).mean()                       # Cov[Phi, w gamma]
        else:
            # authors: Pearson correlation of Phi with Gamma = mean_pixels((eps^2 - xbar eps)(1-t))
            Gam = ((eps * eps - xbar * eps).flatten(1).mean(1)) * (1 - t)
            cov = _pearson(phi, Gam)
        ritz_grad = (w * gx2).mean() if self.weight_on == "ritz" else gx2.mean()
        # --- cosine term: -cos(grad_x Phi, v) ------------------------------------------------
        dot = (gx.flatten(1) * v.flatten(1)).sum(1)
        nrm = gx.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1) + 1e-8
        if self.cos_form == "paper":
            cos = (dot / nrm).mean()                                        # cos(grad Phi, v)
        else:
            cos = (dot / nrm.pow(t) / D).mean()                             # authors' normaliser^t / D
        gt2 = gt.pow(2).mean()                                              # E (dPhi/dt)^2
        phi2 = phi.pow(2).mean()                                            # E Phi^2
        # Eq. (27): Cov - cos + E[||grad_x Phi||^2 + |dPhi/dt|^2 + eta Phi^2]
        total = cov - self.lam_cos * cos + self.lam_gx * ritz_grad + self.lam_gt * gt2 + self.eta * phi2
        with torch.no_grad():
            stats = {
                "loss": float(total), "cov": float(cov), "cos": float(cos),
                "grad_x2": float(gx2.mean()), "grad_t2": float(gt2), "phi2": float(phi2),
                # Poincare-ratio monitor E||grad Phi||^2 / E Phi^2 (paper Fig. 10)
                "poincare_ratio": float(_sqnorm(gx).mean() / (phi2 + 1e-12)),
            }
        return total, stats

    # ---------------------------------------------------------------- samplers (Section 5)
    def sample(self, x0, method="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
               return_traj=False):
        """Potential-flow ODE dx/dt = +grad_x Phi(x, t) (Eq. 13) from prior noise x0 at t0 to t1.

        method "euler" (n_steps fixed steps) or "rk45" (scipy adaptive, authors' rtol = atol = 1e-3).
        Times beyond t_max use Phi(x, t_max), so t1 > 1 gives long-run sampling (Sec. 4.6).
        The number of grad-Phi evaluations lands in self.last_nfe.
        Returns x, or (x, traj) with traj a (K, B, ...) tensor of states (K = n_steps + 1)."""
        x, traj, self.last_nfe = ode_solve(self.grad_phi, x0, method, n_steps, t0, t1, rtol, atol, return_traj)
        return (x, traj) if return_traj else x

    def boltzmann_energy(self, x, t_inf=None):
        """Boltzmann energy Phi_B(x) = (c Phi_inf(x) + f_inf ||x||^2) / g_inf^2, Eq. (22)  -> (B,).

        log p_B(x) = Phi_B(x) + const (larger = more likely). OT-FM coefficients at t_inf = t_max:
        f = -1/t, g^2 = 2 (1 - t) / t (Sec. 3.5).
        The factor c: the paper prints 4. The probability-flow ODE (19) with dx/dt = grad Phi reads
            grad Phi = -f x + g^2/2 grad log rho   =>   log rho = (2 Phi + f ||x||^2) / g^2 + const,
        so c = 2. On 1-D Gaussian data, where the marginal and its potential are analytic, only
        c = 2 reproduces the score grad log rho (tests/test_vpfb.py::test_boltzmann_factor); we use
        2 and keep the paper's 4 behind bfactor=4 (flag --bfactor 4)."""
        t = self.t_max if t_inf is None else float(t_inf)
        f = -1.0 / t                                           # f(t) = -1/t
        g2 = 2.0 * (1.0 - t) / t                               # g(t)^2 = 2 (1 - t) / t
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return (self.bfactor * self._phi(x, tt) + f * _sqnorm(x)) / g2   # Eq. (22), c = bfactor

    def grad_boltzmann(self, x):
        """grad_x Phi_B(x), no graph kept."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.boltzmann_energy(xr).sum(), xr)[0].detach()

    def langevin(self, x0, n_steps=100, step_size=1e-3, temperature=1.0, return_traj=False):
        """SGLD ascent on the Boltzmann energy Phi_B (Sec. 4.6), see sgld() below.
        Stationary law p ~ exp(Phi_B / temperature^2)."""
        x, traj, self.last_nfe = sgld(self.grad_boltzmann, x0, n_steps, step_size, temperature, return_traj)
        return (x, traj) if return_traj else x


# === 5. Samplers ===
# Plain functions of a gradient field, so the maths reads without the class around it and
# the tests can feed them analytic fields.


def ode_solve(velocity, x0, method="euler", n_steps=100, t0=0.0, t1=1.0, rtol=1e-3, atol=1e-3,
              return_traj=False):
    """Integrate dx/dt = velocity(x, t) from t0 to t1. Returns (x, traj or None, nfe).

    "euler": x_{k+1} = x_k + dt velocity(x_k, t_k), n_steps evaluations.
    "rk45":  scipy.integrate.solve_ivp(method="RK45") (Dormand-Prince 5(4), adaptive steps) on
             the flattened batch in float64; nfe = the number of velocity calls scipy made."""
    if method not in ("euler", "rk45"):
        raise ValueError(f"method must be euler|rk45, got {method!r}")
    x = x0.detach()
    if method == "euler":
        dt = (t1 - t0) / n_steps
        traj = [x]
        for k in range(n_steps):
            x = x + dt * velocity(x, t0 + k * dt)              # x_{k+1} = x_k + dt grad Phi(x_k, t_k)
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
    For small Delta its stationary law is p ~ exp(E / lambda^2). Returns (x, traj or None, n_steps)."""
    x = x0.detach()
    traj = [x]
    for _ in range(n_steps):
        noise = math.sqrt(2 * step_size) * temperature * torch.randn_like(x)   # sqrt(2 Delta) lambda N(0, I)
        x = x + step_size * grad_energy(x) + noise
        if return_traj:
            traj.append(x)
    return x, (torch.stack(traj) if return_traj else None), n_steps
