"""vpfb_experiments.py -- the evaluation experiments of the VPFB paper (Loo et al., TMLR 2025,
Sec. 4) on a checkpoint of vpfb.py: the same flags, checkpoints and settings rule (a typed flag >
the checkpoint's value > the recipe's), plus each experiment's own flags.

    python vpfb_experiments.py --mode interp --ckpt runs/vpfb_cifar10/ckpt_main.pt   # Sec. 4.3
    python vpfb_experiments.py --mode nn                   # nearest training images (Fig. 5)
    python vpfb_experiments.py --mode hist                 # Phi_B on train vs test (Fig. 11)
    python vpfb_experiments.py --mode ood                  # OOD AUROC (Table 2)
    python vpfb_experiments.py --mode longrun              # long-run ODE and SGLD (Sec. 4.6)
    python vpfb_experiments.py --mode compose              # class compositions (Sec. 4.3)

The maths they call (slerp, Phi_B, the samplers, Conditioned) is vpfb.py's sections 1-2.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

import vpfb
from vpfb import (PHI_B, SAMPLER_KEYS, DATA_KEYS, _sqnorm, build_dataset, die, draw, eval_setup,
                  image_folder, load_npz, machine_memory, ode_solve, pyplot, report, save_figure,
                  save_grid, sgld, slerp, write_json)

def first_images(ds, n, batch=256):
    """The first n images of a dataset as one tensor (the held-out images of these modes)."""
    xs, got = [], 0
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False):
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]

OOD_SETS = ("svhn", "cifar10", "cifar100", "celeba", "interp", "noise")   # or a folder / .npz

def cmd_interp(args, rows=8, cols=10):
    """Spherical interpolation between two noises, each point pushed through the ODE (Sec. 4.3)."""
    device, net, method, info = eval_setup(args)
    shape = (args.channels, args.image_size, args.image_size)
    z0, z1 = torch.randn(rows, *shape), torch.randn(rows, *shape)
    z = torch.stack([slerp(z0, z1, float(v)) for v in torch.linspace(0, 1, cols)], 1)
    x, st = draw(method, args, device, rows * cols, x0=z.flatten(0, 1))
    save_grid(x, os.path.join(args.out_dir, "interp.png"), nrow=cols)
    report(args.out_dir, "interp.json", {**info, **st})

def cmd_nn(args, rows=8):
    """Generated samples and their k nearest training images in pixel (L2) distance (Fig. 5)."""
    data = build_dataset(args, train=True)
    if len(data) < args.nn_k:
        die(f"--nn-k {args.nn_k} is more than the {len(data)} training images")
    device, net, method, info = eval_setup(args)
    x, _ = draw(method, args, device, rows)
    best_d = torch.full((rows, args.nn_k), float("inf"))
    best_x = torch.zeros(rows, args.nn_k, *x.shape[1:])
    xf = x.flatten(1)
    for xb, _ in torch.utils.data.DataLoader(data, batch_size=512):
        d = torch.cdist(xf, xb.flatten(1))                           # (rows, batch) pixel distances
        cand_d = torch.cat([best_d, d], 1)
        cand_x = torch.cat([best_x, xb[None].expand(rows, *xb.shape)], 1)
        best_d, idx = cand_d.topk(args.nn_k, dim=1, largest=False)
        best_x = torch.stack([cand_x[r, idx[r]] for r in range(rows)])
    grid = torch.cat([x[:, None], best_x], 1).flatten(0, 1)
    save_grid(grid, os.path.join(args.out_dir, "nn.png"), nrow=args.nn_k + 1)
    report(args.out_dir, "nn.json", {**info, "nearest_pixel_l2": best_d.tolist()})

@torch.no_grad()
def energies(method, ds, device, n, batch):
    """Phi_B (Eq. 22) and the authors' OOD score 4 Phi(x, t_max) - ||x||^2 of the first n images."""
    pb, auth = [], []
    for x in torch.split(first_images(ds, n), batch):
        x = x.to(device)
        pb.append(method.boltzmann_energy(x).float().cpu())
        tt = torch.full((x.shape[0],), method.t_inf or method.t_max, device=device)
        auth.append((4 * method._phi(x, tt) - _sqnorm(x)).float().cpu())
    return torch.cat(pb).numpy(), torch.cat(auth).numpy()

def auroc(pos, neg):
    """Area under the ROC curve, P(score_pos > score_neg) + 1/2 P(=), by ranks (Mann-Whitney U),
    ties averaged. pos: scores of in-distribution samples (should be higher)."""
    from scipy.stats import rankdata
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    ranks = rankdata(np.concatenate([pos, neg]))                 # tied values: their mean rank
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

def at_least_two(args, ds, what, needs):
    """--ood-max and the set it reads must give 2 images or more: one image gives a histogram of a
    single value (or no bins at all) and an AUROC of 0 or 1. One line, before the network."""
    if args.ood_max < 2:
        die(f"--ood-max {args.ood_max}: {needs} needs at least 2 images per set")
    if len(ds) < 2:
        die(f"{what} holds {len(ds)} image(s): {needs} needs at least 2")

def cmd_hist(args):
    """Histogram of the Boltzmann energy on train vs test images (Fig. 11)."""
    plt = pyplot()
    splits = {split: build_dataset(args, train=split == "train") for split in ("train", "test")}
    for split, ds in splits.items():
        at_least_two(args, ds, f"the {split} split", "a histogram")
    device, net, method, info = eval_setup(args)
    res, fig = dict(info), plt.figure(figsize=(5, 3.5))
    for split, ds in splits.items():
        e, _ = energies(method, ds, device, args.ood_max, args.sample_batch)
        if not np.isfinite(e).all():
            die(f"Phi_B is NaN or inf on {int((~np.isfinite(e)).sum())} of the {len(e)} {split} "
                f"images: the weights, or --bfactor / --t-inf that overflow; nothing written", 3)
        res[split] = {"n": int(len(e)), "mean": float(e.mean()), "std": float(e.std())}
        e = e.astype(np.float64)              # float32 bin edges collapse on close, large values
        plt.hist(e, bins=50, alpha=0.5, density=True, label=split)
    plt.xlabel("Boltzmann energy Phi_B (Eq. 22)")
    plt.legend()
    save_figure(fig, os.path.join(args.out_dir, "hist.png"))
    report(args.out_dir, "hist.json", res)

def ood_set(args, name, ind_ds):
    """An OOD set by name (OOD_SETS), or a path: an image folder or a .npz, shaped like the data."""
    import torchvision.transforms as T
    if name == "interp":                           # the paper's "Interp.": mean of 2 test images
        imgs = first_images(ind_ds, args.ood_max)
        g = torch.Generator().manual_seed(args.seed)
        imgs = 0.5 * (imgs + imgs[torch.randperm(len(imgs), generator=g)])
        return torch.utils.data.TensorDataset(imgs, torch.zeros(len(imgs)))
    if os.path.isdir(name):
        c, s = args.channels, args.image_size
        tf = T.Compose([T.Resize(s), T.CenterCrop(s)] + ([T.Grayscale(c)] if c == 1 else [])
                       + [T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)])
        return image_folder(name, tf, "folder")
    if name.endswith(".npz"):
        x = load_npz(name).tensors[0]
        if x.shape[1] == 3 > args.channels:            # colour to grey as the folder route does
            x = T.Grayscale(1)(x)                      # (ITU-R 601 weights, on the tensor)
        x = x.expand(-1, args.channels, -1, -1)                # grey images for a colour Phi
        x = F.interpolate(x, size=args.image_size, mode="bilinear", antialias=True)
        return torch.utils.data.TensorDataset(x, torch.zeros(len(x)))
    if name not in OOD_SETS:
        die(f"unknown OOD set {name!r}; choose from {OOD_SETS}, an image folder or a .npz")
    ds = build_dataset(args, train=False, name="fake" if args.dataset == "fake" else name)
    if args.dataset == "fake":                                 # smoke test: a shifted fake set
        ds.random_offset = 10 ** 7 + 1000 * OOD_SETS.index(name)
    return ds

def cmd_ood(args):
    """OOD AUROC (Table 2): in-distribution = the test split of the training set (positives, should
    score higher), OOD = each of --ood-sets; score = Phi_B, and the authors' 4 Phi - ||x||^2.
    ood_hist.png: the histograms of Phi_B of each set (symlog axis: the sets lie decades apart)."""
    plt = pyplot()
    names = [s.strip() for s in args.ood_sets.split(",") if s.strip()]
    if not names:
        die(f"--ood-sets {args.ood_sets!r} names no set: give a comma list from {OOD_SETS}, "
            f"image folders or .npz files")
    ind_ds = build_dataset(args, train=False)
    at_least_two(args, ind_ds, "the test split", "an AUROC")
    sets = {name: ood_set(args, name, ind_ds) for name in names}      # every set before the network
    for name, ds in sets.items():
        at_least_two(args, ds, f"OOD set {name}", "an AUROC")
    device, net, method, info = eval_setup(args)
    pos, pos_auth = energies(method, ind_ds, device, args.ood_max, args.sample_batch)
    table, fig, scores = {}, plt.figure(figsize=(6, 3.5)), {"data (test split)": pos}
    for name, ds in sets.items():
        neg, neg_auth = energies(method, ds, device, args.ood_max, args.sample_batch)
        scores[name] = neg
        table[name] = {"auroc_phi_b": auroc(pos, neg), "auroc_authors_score": auroc(pos_auth,
                                                                                    neg_auth),
                       "n_in": int(len(pos)), "n_ood": int(len(neg))}
    allv = np.concatenate(list(scores.values())).astype(np.float64)
    allv = allv[np.isfinite(allv)] if np.isfinite(allv).any() else np.zeros(1)
    u = np.linspace(*(np.sign(v) * np.log10(1 + abs(v)) for v in (allv.min(), allv.max())), 61)
    edges = np.unique(np.sign(u) * (10 ** np.abs(u) - 1))              # even on the symlog axis
    edges = edges if len(edges) > 1 else 10
    for label, e in scores.items():
        plt.hist(e, bins=edges, alpha=0.5, label=os.path.basename(label.rstrip("/\\")) or label)
    plt.xscale("symlog")
    plt.xlabel("Boltzmann energy Phi_B (Eq. 22)")
    plt.ylabel("images")
    plt.legend(fontsize=8)
    save_figure(fig, os.path.join(args.out_dir, "ood_hist.png"))
    report(args.out_dir, "ood.json", {**info, "auroc": table})

def check_longrun(args):
    """--mode longrun's counts, one line before the network: no chain (--num-samples 0), or two
    trajectories (ODE and SGLD, every frame of the batch kept) that overflow or cannot fit in
    memory (a huge --longrun-t1 or --sgld-steps: an OverflowError or a swap storm before)."""
    if args.num_samples == 0:
        die("--num-samples 0: --mode longrun would run its ODE and SGLD chains on no image")
    dt = args.longrun_t1 / int(args.ode_steps * max(1.0, min(args.longrun_t1, 1e300)))
    if float(torch.tensor(dt, dtype=torch.float32)) == 0:
        die(f"--longrun-t1 {args.longrun_t1:g}: an ODE step of {dt:.3g} is 0 in float32, the "
            f"chains would not move from their noise")
    b = min(args.num_samples, args.sample_batch)
    frame = 4 * b * args.channels * args.image_size ** 2                 # float32 bytes a frame
    frames = max(args.ode_steps * max(1.0, args.longrun_t1), args.sgld_steps) + 1   # one at a time
    have = machine_memory(args.device)
    if not frame * frames <= have:
        die(f"--longrun-t1 {args.longrun_t1:g} (x --ode-steps {args.ode_steps}) or --sgld-steps "
            f"{args.sgld_steps} keeps {frames:.3g} frames of {b} images: "
            f"{frame * frames / 2**30:.3g} GiB, more than the {have / 2**30:.0f} GiB here")

def cmd_longrun(args):
    """Long-run sampling (Sec. 4.6, Figs. 12-18): the ODE over t in [0, longrun_t1] (past t_max it
    follows Phi(x, t_max)), then SGLD on Phi_B from the same noise; E|grad|^2 and E energy^2."""
    plt = pyplot()
    check_longrun(args)
    device, net, method, info = eval_setup(args)
    shape = (args.channels, args.image_size, args.image_size)
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
        return method._phi(x, torch.full((x.shape[0],), float(t), device=x.device))

    T, n_steps = args.longrun_t1, int(args.ode_steps * max(1.0, args.longrun_t1))
    _, traj, _ = ode_solve(recorded(phi_at, curves["ode"]), z, "euler", n_steps, 0.0, T,
                           return_traj=True)
    idx = [min(n_steps, round(f / T * n_steps)) for f in (0.5, 1, 2, 5, 10, T) if f <= T]
    ode_frames = torch.cat([traj[i][:8] for i in idx])
    del traj
    _, traj, _ = sgld(recorded(lambda x, t: method.boltzmann_energy(x), curves["sgld"]), z,
                      args.sgld_steps, args.sgld_step, args.sgld_temp, return_traj=True)
    ks = np.linspace(0, args.sgld_steps, 6).astype(int)
    sgld_frames = torch.cat([traj[k][:8] for k in ks])
    for name, x in (("ODE", ode_frames), ("SGLD", sgld_frames)):
        if not torch.isfinite(x).all():            # garbage strips and null curves: not a result
            die(f"the long-run {name} chains went NaN or inf (--sgld-step {args.sgld_step} too "
                f"large, or non-finite weights?); nothing written", 3)
    save_grid(ode_frames, os.path.join(args.out_dir, "longrun_ode.png"))
    save_grid(sgld_frames, os.path.join(args.out_dir, "longrun_sgld.png"))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for axi, key, lab in ((ax[0], "ode", "ODE time t, Phi"), (ax[1], "sgld", "SGLD step, Phi_B")):
        axi.semilogy(curves[key]["t"], curves[key]["grad2"], label="E|grad|^2")
        axi.semilogy(curves[key]["t"], curves[key]["phi2"], label="E energy^2")
        axi.set_xlabel(lab)
        axi.legend()
    save_figure(fig, os.path.join(args.out_dir, "longrun_norms.png"))
    last = {k: {kk: vv[-1] for kk, vv in v.items() if vv} for k, v in curves.items()}
    write_json(args.out_dir, "longrun_curves.json", curves)
    report(args.out_dir, "longrun.json", {**info, **last})

def cmd_compose(args, n=8):
    """Compositional sampling (Sec. 4.3): sample with the average of the class-conditional energies
    Phi(x, t) = mean_c Phi(x, t, c). One row per single class of each group, then the composite."""
    try:
        groups = [[int(c) for c in g.split(",")] for g in args.compose.split(";") if g.strip()]
    except ValueError:
        die(f"--compose must look like '0,1;0,2', got {args.compose!r}")
    if not groups:
        die(f"--compose {args.compose!r} names no group of classes (e.g. '0,1;0,2')")
    if not args.class_cond:
        die("--mode compose needs a checkpoint trained with --class-cond")
    device, net, method, info = eval_setup(args)
    if any(c < 0 or c >= args.num_classes for g in groups for c in g):
        die(f"--compose classes must be in [0, {args.num_classes})")
    z = torch.randn(n, args.channels, args.image_size, args.image_size)
    rows, res = [], dict(info)
    for g in groups:
        for c in g + [None]:
            method.phi.y = [torch.tensor(k, device=device) for k in (g if c is None else [c])]
            x, st = draw(method, args, device, n, x0=z)
            rows.append(x)
            res["+".join(map(str, g)) if c is None else str(c)] = st
    save_grid(torch.cat(rows), os.path.join(args.out_dir, "compose.png"), nrow=n)
    report(args.out_dir, "compose.json", res)

MODES = {"interp": cmd_interp, "nn": cmd_nn, "hist": cmd_hist, "ood": cmd_ood,
         "longrun": cmd_longrun, "compose": cmd_compose}
MODE_SETTINGS = {          # what a mode reads (and prints) beyond the run flags and the network's
    "interp": SAMPLER_KEYS + PHI_B, "compose": SAMPLER_KEYS + PHI_B + ("compose",),
    "nn": SAMPLER_KEYS + PHI_B + ("nn_k",) + DATA_KEYS,
    "hist": PHI_B + ("ood_max",) + DATA_KEYS, "ood": PHI_B + ("ood_max", "ood_sets") + DATA_KEYS,
    "longrun": ("ode_steps", "longrun_t1", "sgld_steps", "sgld_step", "sgld_temp", "num_samples")
    + PHI_B}

def build_parser(recipe="authors"):
    """vpfb.py's flags (--mode: the experiments) and the experiments' own."""
    p = vpfb.build_parser(recipe, MODES)
    a = p.add_argument
    a("--ood-sets", default="svhn,cifar100,celeba,interp",
      help=f"comma list from {OOD_SETS}, or paths of image folders / .npz files")
    a("--ood-max", type=vpfb.pos_int, default=10000, help="at most this many images per set")
    a("--nn-k", type=vpfb.pos_int, default=5, help="nearest neighbours per sample (mode nn)")
    a("--compose", default="0,1", help="classes whose energies are averaged, e.g. '0,1;0,2'")
    a("--longrun-t1", type=vpfb.pos_float, default=20.0, help="long-run ODE horizon t in [0, t1]")
    return p

def parse_args(argv=None):
    return vpfb.parse_args(argv, build_parser, MODE_SETTINGS)

def main(argv=None):
    return vpfb.main(argv, build_parser, MODES, MODE_SETTINGS)

if __name__ == "__main__":
    main()
