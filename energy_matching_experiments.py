"""energy_matching_experiments.py -- the evaluation experiments of the Energy Matching paper
(Balcerak et al., arXiv:2504.10612) on a checkpoint of energy_matching.py: the same flags,
checkpoints and settings rule (a typed flag > the checkpoint's value > the recipe's), plus each
experiment's own flags.

    python energy_matching_experiments.py --mode inpaint --ckpt runs/em_cifar10/ckpt_main.pt
    python energy_matching_experiments.py --mode lid --num-images 512        # LID (Table 2)

Inpainting runs Alg. 3 without and with the repulsive interaction (Sec. 3.2); LID counts the
near-flat directions of the Hessian of V (Sec. 3.3). The maths (inverse_langevin, lid_exact,
lid_slq) is energy_matching.py's section 1.
"""
import io
import os
import time

import torch

import energy_matching as em
from energy_matching import (DATA_KEYS, build_dataset, die, eval_setup, inverse_langevin,
                             lid_exact, lid_slq, report, save_grid, to_uint8, write_json)

def first_images(ds, n, batch=256):
    """The first n images of a dataset as one tensor (the held-out images of these modes)."""
    xs, got = [], 0
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False):
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]

def eval_images(args, n):
    """The first n held-out images of --dataset (test split where there is one), checked to fit
    and, for a typed --num-images, to be there (one line before the network, as --nn-k is)."""
    data = build_dataset(args, train=False)
    if args.num_images is not None and args.num_images > len(data):
        die(f"--num-images {args.num_images} is more than the {len(data)} held-out images of "
            f"--dataset {args.dataset}")
    x = first_images(data, n)
    want = (args.channels, args.image_size, args.image_size)
    if tuple(x.shape[1:]) != want:
        die(f"images of {args.dataset} have shape {tuple(x.shape[1:])} but the checkpoint's "
            f"network expects {want}")
    return x

def cmd_inpaint(args):
    """Alg. 3 on data images with a centred hole: M chains per image without and with the repulsive
    interaction (same noise) -> inpaint.png (the paper's "with vs without" figure), inpaint.json."""
    s = int(round(args.hole * args.image_size))                     # the hole's side in pixels
    if s < 1:
        die(f"--hole {args.hole} masks {s} pixels of the {args.image_size}-pixel side: there is "
            f"no hole to inpaint")
    if s >= args.image_size:
        die(f"--hole {args.hole} masks all of the {args.image_size}-pixel side: no visible pixel "
            f"is left to condition on")
    if args.chains < 2:
        die(f"--chains {args.chains}: the spread with vs without the interaction between chains "
            f"needs at least 2 chains per image")
    x = eval_images(args, args.num_images or 4)
    device, net, method, info = eval_setup(args)
    x = x.to(device)
    H, W = x.shape[2:]
    A = torch.ones(x.shape[1:], device=device)
    A[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s] = 0   # 0 in a centred hole
    Bmask = 1 - A                                                     # interaction where unseen
    y = A * x                                                         # y = A(x), noise-free
    x_init = torch.randn(x.shape[0], args.chains, *x.shape[1:], device=device)
    kw = dict(n_chains=args.chains, tau_s=method.tau_s, dt=method.dt, zeta=args.zeta,
              x_init=x_init, eps=method.eps, clamp=(-1.0, 1.0))
    plain = inverse_langevin(method.V, y, A, **kw)
    inter = inverse_langevin(method.V, y, A, sigma=args.sigma_int, Bmask=Bmask, **kw)
    if not torch.isfinite(torch.cat([plain, inter])).all():
        die("inpaintings contain NaN/Inf: the weights, or settings that overflow (--dt, --tau-s, "
            "--eps-max, --zeta, --sigma-int); nothing written", 3)

    def spread(z):  # mean pairwise distance between the chains inside the hole
        d = [(Bmask * (z[:, i] - z[:, j])).flatten(1).norm(dim=1)
             for i in range(z.shape[1]) for j in range(i)]
        return float(torch.stack(d).mean()) if d else 0.0

    def fidelity(z):  # RMS error on the observed pixels
        return float(((A * (z - x[:, None])) ** 2).sum() / (A.sum() * z.shape[:2].numel())) ** 0.5

    res = {**info, "spread_without": spread(plain), "spread_with": spread(inter),
           "fidelity_rmse_without": fidelity(plain), "fidelity_rmse_with": fidelity(inter)}
    # one row per image: original, masked, M chains without W, M chains with W
    rows = [torch.stack([x[r], y[r], *plain[r], *inter[r]]) for r in range(x.shape[0])]
    save_grid(torch.cat(rows).cpu(), os.path.join(args.out_dir, "inpaint.png"),
              nrow=2 + 2 * args.chains)
    report(args.out_dir, "inpaint.json", res)
    return res

def cmd_lid(args):
    """LID of --num-images data images from the Hessian of V (exact or SLQ), Spearman vs PNG size
    (Table 2). If every LID is equal, Spearman is undefined: one line says which way to move tau."""
    from PIL import Image
    from scipy.stats import spearmanr
    if args.lid_tau is None:                               # the paper's: 10 MNIST, 2 CIFAR-10
        args.lid_tau, args.sources_["lid_tau"] = 10.0 if em.like_mnist(args) else 2.0, "recipe"
    if (args.num_images or 4096) < 3:
        die(f"--num-images {args.num_images}: a Spearman correlation needs at least 3 images")
    xs = eval_images(args, args.num_images or 4096)
    device, net, method, info = eval_setup(args)
    xs = xs.to(device)
    n, d = xs.shape[0], xs[0].numel()
    if n < 3:
        die(f"--dataset {args.dataset} gave {n} images: a Spearman correlation needs at least 3")
    how = args.lid_method if args.lid_method != "auto" else ("exact" if d <= 1024 else "slq")
    t0 = time.time()
    if how == "exact":
        lids, _ = lid_exact(method.V, xs, args.lid_tau)
    else:
        lids = []
        for i in range(0, n, 16):
            lids += lid_slq(method.V, xs[i:i + 16], args.lid_tau, args.lid_probes,
                            args.lid_lanczos, args.seed)
    sizes = []                                    # lossless PNG bytes: the paper's complexity proxy
    for im in to_uint8(xs):
        buf = io.BytesIO()
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(buf, "PNG", optimize=True)
        sizes.append(len(buf.getvalue()))
    distinct = set(round(float(v), 3) for v in lids)                 # SLQ estimates are floats
    varied = n > 2 and len(distinct) > 1 < len(set(sizes))
    rho = float(spearmanr(lids, sizes)[0]) if varied else None
    res = {**info, "method": how, "tau": args.lid_tau, "d": d, "n": n,
           "spearman_lid_vs_png": rho, "lid": [float(v) for v in lids], "png_bytes": sizes,
           "seconds": round(time.time() - t0, 2)}
    head = f"LID ({how}, tau={args.lid_tau}) on {n} images:"
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

MODES = {"inpaint": cmd_inpaint, "lid": cmd_lid}
F32 = torch.finfo(torch.float32)
SQUARE_RANGE = (F32.tiny ** 0.5, F32.max ** 0.5)          # x^2 a normal float32: [1.1e-19, 1.8e19]
# --zeta and --sigma-int enter Alg. 3 squared (eps / zeta^2): a Python float squared to 0 or inf
# was a ZeroDivisionError / OverflowError; the square must be a non-zero, finite float32
square_float = em._number(float, lambda v: SQUARE_RANGE[0] <= v <= SQUARE_RANGE[1],
                          "a number in [%.2g, %.2g] (its square a float32)" % SQUARE_RANGE)
MODE_SETTINGS = {          # what a mode reads (and prints) beyond the run flags and the network's
    "inpaint": ("tau_s", "dt", "eps_max", "tau_star", "num_images", "hole", "zeta", "sigma_int",
                "chains") + DATA_KEYS,
    "lid": ("num_images", "lid_tau", "lid_method", "lid_probes", "lid_lanczos") + DATA_KEYS}

def build_parser(recipe="authors"):
    """energy_matching.py's flags (--mode: the experiments) and the experiments' own."""
    p = em.build_parser(recipe, MODES)
    a = p.add_argument
    a("--num-images", type=em.pos_int, help="inpaint: images (4); lid: images (4096, paper)")
    a("--hole", type=em.frac_float, default=0.5, help="inpaint: side of the masked centre / side")
    a("--zeta", type=square_float, default=0.1, help="inpaint: data-fidelity scale zeta (Eq. 8)")
    a("--sigma-int", type=square_float, default=1.0, help="inpaint: interaction sigma (Sec. 3.2)")
    a("--chains", type=em.pos_int, default=2, help="inpaint: chains M per image")
    a("--lid-tau", type=em.pos_float,
      help="LID: |lambda| < tau (the paper's: 10 on MNIST-like data, 2 on CIFAR-10)")
    a("--lid-method", default="auto", choices=("auto", "exact", "slq"), help="auto: d <= 1024")
    a("--lid-probes", type=em.pos_int, default=8, help="SLQ: Rademacher probe vectors")
    a("--lid-lanczos", type=em.pos_int, default=60, help="SLQ: Lanczos steps per probe")
    return p

def parse_args(argv=None):
    return em.parse_args(argv, build_parser, MODE_SETTINGS)

def main(argv=None):
    return em.main(argv, build_parser, MODES, MODE_SETTINGS)

if __name__ == "__main__":
    main()
