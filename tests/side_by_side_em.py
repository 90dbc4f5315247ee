"""Energy Matching's --recipe authors against the authors' own training code, step for step.

Not collected by pytest (it needs their code): pass the folder of an unmodified copy of
https://github.com/m1balcerak/EnergyMatching (experiments/cifar10/*.py, utils_cifar_imagenet.py)
with torchcfm from https://github.com/atong01/conditional-flow-matching beside it:

    python tests/side_by_side_em.py /path/to/EnergyMatching [--shims /path/to/stand-ins]

--shims: a folder appended to sys.path for packages their modules import but these code paths do
not use (absl, torchdyn, matplotlib, ...); by default the `_shims` folder beside the given one, if
there is one. An installed package always wins.

It builds their EBViTModelWrapper at a tiny size (8 x 8 images, 64 base channels, one ResBlock a
level, two ViT layers, dropout 0: dropout masks are drawn inside the modules), perturbs its weights
(so every layer has a gradient from the first step), loads them into our UNetViTPotential with the
time layers (--recipe authors) through the converter, and trains both side by side: their
forward_all, clipping, Adam (0.9, 0.95), LambdaLR(warmup_lr), ema(); our EnergyMatching(V,
**AUTHORS), train_step, warmup_lr, ema_update. Identical data batches; identical random draws from
one queue: their step draws and records (x0, the OT-plan draws, t, the chains' starts and noise),
ours replays them, checking kind, shape and order. The flow term's sigma-0 noise of torchcfm
(multiplied by 0) is left out. After --steps1 steps of phase 1 and --steps2 of phase 2 the raw
parameters must agree to --tol in units of the largest move Adam can have made (the sum of the
learning rates so far: float round-off in a gradient element near 0 changes that element's Adam
step, not its size), the EMA parameters to --tol-ema relative to each tensor's largest entry. It
prints the largest differences and exits 1 if they do not agree. --folded trains our folded form
instead (time layers in the conv biases), which must fail: a control that the check can fail.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import energy_matching as em  # noqa: E402
import energy_matching_convert as emc  # noqa: E402


class Queue:
    """One queue of random draws: "record" draws them and keeps them, "replay" hands them out again
    in the same order, checking that each request is of the same kind and shape."""

    def __init__(self):
        self.mode, self.items, self.pos = "record", [], 0
        self.randn_like, self.rand = torch.randn_like, torch.rand
        self.multinomial = torch.multinomial

    def take(self, kind, shape, draw):
        if self.mode == "record":
            self.items.append((kind, draw()))
            return self.items[-1][1]
        if self.pos >= len(self.items):
            sys.exit(f"FAIL: our step asks for a draw ({kind}, {tuple(shape)}) theirs never made")
        k, v = self.items[self.pos]
        if k != kind or tuple(v.shape) != tuple(shape):
            sys.exit(f"FAIL: draw {self.pos}: ours asks ({kind}, {tuple(shape)}), theirs made "
                     f"({k}, {tuple(v.shape)})")
        self.pos += 1
        return v.clone()

    def start(self, mode):
        if self.mode == "replay" and self.pos != len(self.items):
            sys.exit(f"FAIL: ours used {self.pos} of their {len(self.items)} random draws")
        self.mode, self.pos = mode, 0
        if mode == "record":
            self.items = []

    def install(self):
        """Route torch's and numpy's draws (as the two codes call them) through the queue."""
        q = self

        def randn_like(x, **kw):
            return q.take("normal", x.shape, lambda: q.randn_like(x, **kw))

        def rand(*size, **kw):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            return q.take("uniform", shape, lambda: q.rand(*size, **kw))

        def multinomial(p, n, replacement=False, **kw):      # ours: ot_draw_pairs
            k = q.take("pairs", (n,), lambda: q.multinomial(p, n, replacement, **kw))
            if not (p[k] > 0).all():
                sys.exit("FAIL: a drawn pair has probability 0 in our OT plan (plans differ)")
            return k

        def choice(a, size=None, replace=True, p=None):      # theirs: OTPlanSampler.sample_map
            pt = torch.as_tensor(p)
            k = q.take("pairs", (size,), lambda: q.multinomial(pt, size, replace))
            if not (pt[k] > 0).all():
                sys.exit("FAIL: a drawn pair has probability 0 in their OT plan (plans differ)")
            return k.numpy()

        torch.randn_like, torch.rand, torch.multinomial = randn_like, rand, multinomial
        np.random.choice = choice


def import_theirs(path, shims):
    sys.path.append(os.path.join(path, "experiments", "cifar10"))
    sys.path.append(path)
    if shims:
        sys.path.append(shims)
    sys.argv = sys.argv[:1]
    import train_cifar_multigpu as train          # their training script (main() not run)
    import utils_cifar_imagenet as utils
    from network_transformer_vit import EBViTModelWrapper
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    return train, utils, EBViTModelWrapper, ExactOptimalTransportConditionalFlowMatcher


class OneProcess(torch.nn.Module):
    """What DDP adds around their model on one process: `.module`, and calls passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def worst(ours, theirs):
    """(max relative difference, its tensor, max absolute difference), in our layout: their weights
    through the converter (for our folded form, their time layers folded into the biases)."""
    mapped = emc.authors_to_ours(theirs.state_dict(), ours)
    rows = [((v - mapped[k]).abs().max().item() / max(mapped[k].abs().max().item(), 1e-12),
             k, (v - mapped[k]).abs().max().item()) for k, v in ours.state_dict().items()]
    return max(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("authors", help="folder of the authors' EnergyMatching code")
    p.add_argument("--shims", help="folder of import stand-ins (default: _shims beside it)")
    p.add_argument("--steps1", type=int, default=5, help="phase-1 steps (flow only)")
    p.add_argument("--steps2", type=int, default=2, help="phase-2 steps (flow + CD)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-langevin", type=int, default=20, help="Langevin steps of the CD chains")
    p.add_argument("--tol", type=float, default=1e-2,
                   help="max |parameter difference| / sum of the learning rates so far")
    p.add_argument("--tol-ema", type=float, default=1e-4,
                   help="max |EMA difference| / max |EMA parameter| of a tensor")
    p.add_argument("--folded", action="store_true", help="control: train our folded form")
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.authors, "experiments", "cifar10",
                                       "train_cifar_multigpu.py")):
        print(f"error: {a.authors} holds no experiments/cifar10/train_cifar_multigpu.py",
              file=sys.stderr)
        sys.exit(2)
    shims = a.shims or os.path.join(os.path.dirname(os.path.abspath(a.authors)), "_shims")
    train, utils, EBViT, Matcher = import_theirs(a.authors, shims if os.path.isdir(shims) else None)
    torch.set_num_threads(1)

    # their flags as their README's CIFAR-10 command sets them, at a tiny warm-up and chain length
    F = train.FLAGS
    lr, warmup, clip, ema1, ema2 = 1.2e-3, 4, 1.0, 0.9999, 0.99
    for k, v in dict(epsilon_max=0.01, dt_gibbs=0.01, n_gibbs=a.n_langevin, time_cutoff=1.0,
                     lambda_cd=1e-3, cd_neg_clamp=0.02, cd_trim_fraction=0.1, split_negative=True,
                     same_temperature_scheduler=True, warmup=warmup, lr=lr, grad_clip=clip).items():
        setattr(F, k, v)

    torch.manual_seed(0)
    theirs = EBViT(dim=(3, 8, 8), num_channels=64, num_res_blocks=1, channel_mult=[1, 2],
                   attention_resolutions="4", num_heads=4, num_head_channels=64, dropout=0.0,
                   output_scale=1000.0, patch_size=4, embed_dim=192, transformer_nheads=4,
                   transformer_nlayers=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in theirs.parameters():
            t.add_(0.02 * torch.randn(t.shape, generator=g))
    kw = {**emc.authors_arch(theirs.state_dict()), "dropout": 0.0}
    ours = em.UNetViTPotential(**kw, time_layers=True)
    ours.load_state_dict(emc.authors_to_ours(theirs.state_dict(), ours))
    if a.folded:
        ours = emc.fold_time_layers(ours)
    theirs_ema, ours_ema = [__import__("copy").deepcopy(m) for m in (theirs, ours)]
    wrapped, matcher = OneProcess(theirs), Matcher(sigma=0.0)
    matcher.sample_noise_like = torch.zeros_like         # times sigma = 0: no draw needed
    opt_t = torch.optim.Adam(wrapped.parameters(), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_t, lr_lambda=utils.warmup_lr)
    opt_o = torch.optim.Adam(ours.parameters(), lr=lr, betas=(0.9, 0.95), foreach=True)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        v_t, v_o = theirs.potential(x, None), ours(x)
    gv_t, gv_o = -theirs.velocity(x, None), em.grad_V(ours, x)
    print(f"start: V max |diff| {(v_t - v_o).abs().max():.2e} (|V| {v_t.abs().max():.3g}), "
          f"grad V max |diff| {(gv_t - gv_o).abs().max():.2e} (|grad V| {gv_t.abs().max():.3g})")

    method = em.EnergyMatching(ours, **{**em.AUTHORS, "n_langevin": a.n_langevin, "dt": 0.01,
                                        "eps_max": 0.01})
    q = Queue()
    q.install()
    data = torch.Generator().manual_seed(2)
    ok, moved = True, 0.0
    for step in range(a.steps1 + a.steps2):
        phase = "warmup" if step < a.steps1 else "main"
        x_flow = torch.rand(a.batch, 3, 8, 8, generator=data) * 2 - 1
        x_cd = torch.rand(a.batch, 3, 8, 8, generator=data) * 2 - 1
        decay = ema1 if phase == "warmup" else ema2
        # theirs: one iteration of their training loop's body
        q.start("record")
        opt_t.zero_grad()
        with em.math_sdpa():                           # their loop: sdp_kernel(math only)
            loss_t, flow_t, cd_t, _, _ = train.forward_all(
                wrapped, matcher, x_flow, x_cd, F.lambda_cd if phase == "main" else 0.0,
                F.cd_neg_clamp, F.cd_trim_fraction, F.n_gibbs, F.dt_gibbs, F.epsilon_max,
                F.time_cutoff)
            loss_t.backward()
        gn_t = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
        lr_t = opt_t.param_groups[0]["lr"]
        opt_t.step()
        sched.step()
        utils.ema(theirs, theirs_ema, decay)
        # ours: the same step through our loop's pieces
        q.start("replay")
        batch = dict(x1=x_flow, phase=phase, x1_cd=x_cd if phase == "main" else None)
        logs, good, _ = em.train_step(method, ours, opt_o, batch, em.warmup_lr(lr, step, warmup),
                                      clip)
        em.ema_update(ours_ema, ours, decay)
        q.start("record")
        moved += lr_t
        rel, name, absd = worst(ours, theirs)
        rel_e, name_e, absd_e = worst(ours_ema, theirs_ema)
        in_moves = absd / moved if moved else (0.0 if absd == 0 else float("inf"))
        print(f"step {step + 1} ({phase}): lr {lr_t:.3g} / {logs['lr']:.3g} | loss "
              f"{loss_t.item():.7g} / {logs['loss']:.7g} | grad norm {gn_t:.7g} / "
              f"{logs['grad_norm']:.7g} | CD term {cd_t.item():.4g} / {logs.get('cd_term', 0):.4g}"
              f" | params: max |diff| {absd:.2e} = {in_moves:.2e} of "
              f"Adam's largest move ({name}), max rel {rel:.2e} | EMA: max rel {rel_e:.2e}")
        ok = (ok and good and in_moves <= a.tol and rel_e <= a.tol_ema
              and lr_t == logs["lr"])
    n_time = sum(v.numel() for k, v in theirs.state_dict().items()
                 if k.startswith("time_embed.") or ".emb_layers." in k)
    print(f"parameters: ours {em.count_params(ours)}, theirs {em.count_params(theirs)} "
          f"({n_time} in their time layers)")
    print("PASS" if ok else f"FAIL: a difference above --tol {a.tol} / --tol-ema {a.tol_ema}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
