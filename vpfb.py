"""vpfb.py -- Variational Potential Flow Bayes (VPFB) on images, in one self-contained file.

Paper: "Learning Energy-Based Generative Models via Potential Flow: A Variational Principle Approach to
Probability Density Homotopy Matching" (papers/vpfb.md). One scalar potential Phi(x, t) is learned so
that the potential flow dx/dt = +grad_x Phi (Eq. 13) carries N(0, I) noise at t = 0 to the data at t = 1;
the loss (Eq. 27) is a Deep Ritz form of the density-weighted Poisson equation (16). At the stationary
end t_max the same potential gives a Boltzmann energy Phi_B (Eq. 22) for SGLD sampling and OOD scores.

The file reads top to bottom: 1. Arguments, 2. Data, 3. Networks, 4. Loss (the maths: Prop. 1 kernel,
innovation Eq. 12, loss Eq. 27 in the class VPFB), 5. Samplers (ODE Euler / RK45, SGLD), 6. Training loop,
7. Checkpointing, 8. Evaluation commands, then main().

How to run (every mode writes into --out-dir, default runs/vpfb_<dataset>):
    python vpfb.py --dataset cifar10                       # train the time-varying U-Net (53.6M; authors 55.7M)
    python vpfb.py --dataset cifar10 --model wrn           # autonomous Phi(x), WideResNet
    torchrun --nproc_per_node 4 vpfb.py --dataset cifar10  # multi-GPU (gradients all-reduced by hand)
    python vpfb.py --dataset cifar10 --resume              # continue from <out-dir>/ckpt.pt
    python vpfb.py --mode sample --num-samples 50000       # samples.npz (uint8 NHWC) for eval_fid.py, NFE, img/s
    python vpfb.py --mode sample --sampler sgld --sgld-temp 0.01   # SGLD on Phi_B (Sec. 4.6)
    python vpfb.py --mode interp                           # slerp between noises -> interp.png (Sec. 4.3)
    python vpfb.py --mode nn                               # 5 nearest training images (pixel L2) -> nn.png (Fig. 5)
    python vpfb.py --mode hist                             # Phi_B histogram train vs test -> hist.png (Fig. 11)
    python vpfb.py --mode ood                              # AUROC vs svhn, cifar100, celeba, interp -> ood.json (Table 2)
    python vpfb.py --mode longrun                          # t in [0, 20]: frames + gradient/energy norms (Figs. 12-18)
    python vpfb.py --dataset celeba64 --class-cond         # Male / Smiling / Young (+ none) conditional Phi(x, c)
    python vpfb.py --dataset celeba64 --mode compose --compose "0,2;0,1;2,1"   # averaged energies (Fig. 4)
    python vpfb.py --mode benchmark --bench-steps 50       # images/s, ms/iter, peak memory: ours vs authors' fp32
    python vpfb.py --dataset fake --model-size 8 --image-size 8 --steps 2   # a seconds-long smoke run, no data
Datasets (layout as in energy_matching.py): cifar10, mnist (torchvision, download=True into --data-dir),
celeba64 (an ImageFolder copy in <data-dir>/celeba64/, plus list_attr_celeba.txt there for --class-cond),
folder (any ImageFolder at --data-dir), fake (FakeData, tests); svhn, cifar100 (torchvision) and celeba (the
celeba64 folder at 32x32) for OOD. A missing set is one line saying what to put where.

Paper vs the authors' code (REFERENCE_NOTES.md) -- what this file does, and the flag for the other choice:
  * Prior N(0, I): both agree in effect (OT-FM makes sigma(0) = 1 for every omega, nu; test_prop1_*).
  * Covariance term: the paper's Cov[Phi, w(t) gamma] with gamma centred by its closed-form conditional mean
    gamma_bar (the exact Deep Ritz form; tests derive Eq. 11 and the minimiser). --cov-form corr = the
    authors' batch Pearson correlation with Gamma = mean((eps^2 - xbar eps)(1-t)).
  * Where w(t) = (1-t)^kappa goes: on BOTH the covariance and E|grad_x Phi|^2 (--weight-on ritz), so the
    minimiser at every t is still the true potential; the paper as printed weights gamma only (--weight-on cov),
    whose minimiser is w(t) Phi* -- a flow w(t) times too slow (test_deep_ritz_minimiser_*). kappa = 1 then
    makes w (gamma - gamma_bar) = 2 sum(eps^2 - xbar eps - 1) equally spread at all t (--kappa).
  * Cosine term: the paper's -cos(grad Phi, v); --cos-form authors = -(grad Phi . v)/(|grad Phi||v|)^t / D.
  * Gradient norms: E|grad_x Phi|^2 with weight 1 (needed for the Deep Ritz minimiser) and 0.01 E(dPhi/dt)^2
    (paper 1, authors 0.1; it biases the flow, see VPFB docstring); --lam-gx, --lam-gt, --grad-norm mean.
  * Poincare term: in the loss with small eta = 1e-4 (paper); the authors only log it (--eta 0). The ratio
    E|grad Phi|^2 / E Phi^2 is logged either way (Fig. 10).
  * t_end = 1, t_max = 1 - 1e-5 (authors; the paper gives no numbers). Phi(x,t) = 1/2 |x - UNet(x,t)|^2 (authors).
  * Boltzmann energy Eq. (22): the paper prints (4 Phi + f|x|^2)/g^2; the probability-flow ODE (19) gives
    2 Phi, and the analytic Gaussian test (test_boltzmann_factor) confirms 2. --bfactor 4 restores the print.
  * Sampler: scipy RK45 with rtol = atol = 1e-3 from t = 1e-5 to 1 - 1e-5 (authors), or Euler.
  * Phi_B is read off at t_max = 1 - 1e-5, where 1/g^2 = 5e4 magnifies any error of Phi; --t-inf reads it earlier.
  * --recipe paper / --recipe authors switch all loss flags at once to the paper as printed / the authors' code.
Engineering: bf16 autocast for the network trunk on CUDA (the scalar head, the loss and its double backward
inputs stay fp32), TF32, optional channels-last, EMA, atomic self-describing checkpoints loaded with
weights_only=True, resume, NaN guard, progress lines with ms/iter, images/s and ETA. --compile only compiles
the sampling network: the training loss needs a double backward, which torch.compile does not support
("torch.compile with aot_autograd does not currently support double backward", torch 2.14).
Status: written and tested on CPU only (tests/test_vpfb.py). Nothing here was trained to convergence, so the
file claims no FID, AUROC or GPU speed numbers; the benchmark mode prints them when run on a GPU.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def die(msg):
    """Bad input: one clear line on stderr, exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# === 1. Arguments ===
MODES = ["train", "sample", "interp", "nn", "hist", "ood", "longrun", "compose", "benchmark"]
DATASETS = ["cifar10", "celeba64", "mnist", "folder", "fake"]      # training sets
OOD_SETS = ["svhn", "cifar100", "celeba", "interp"]                  # OOD sets (+ the training set's test split)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (not the usage block)."""

    def error(self, message):
        die(f"{message} (see python vpfb.py --help)")


def build_parser():
    p = Parser(
        description="VPFB: Variational Potential Flow Bayes (train, sample, evaluate). See the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", default="train", choices=MODES, help="what to do")
    # data / run
    a("--dataset", default="cifar10", help=f"one of {DATASETS} (OOD also reads svhn, cifar100)")
    a("--data-dir", default="data", help="root of the datasets (torchvision layout); folder: an ImageFolder root")
    a("--image-size", type=int, default=None, help="image side (default: 32, celeba64: 64; fake: 32)")
    a("--fake-size", type=int, default=512, help="number of FakeData images (--dataset fake, for tests)")
    a("--out-dir", default=None, help="output folder (default runs/vpfb_<dataset>)")
    a("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    a("--seed", type=int, default=0, help="random seed")
    a("--num-workers", type=int, default=4, help="DataLoader workers")
    # optimisation (authors: Adam lr 1e-4, warm-up 5k, EMA 0.9999, fp32, batch 128)
    a("--batch-size", type=int, default=128, help="batch size per process")
    a("--steps", type=int, default=400_000, help="training steps")
    a("--lr", type=float, default=1e-4, help="Adam learning rate")
    a("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off; authors: off)")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay of the weights used for sampling")
    # network
    a("--model", default="unet", choices=["unet", "wrn"],
      help="unet = time-varying Phi(x, t); wrn = autonomous Phi(x) (WideResNet, ignores t)")
    a("--model-size", type=int, default=128, help="base channels (unet: 128 = the paper's ~55M net)")
    a("--channel-mult", default="2,2,2", help="unet channel multipliers per resolution (authors: 2,2,2)")
    a("--num-res-blocks", type=int, default=4, help="unet residual blocks per resolution (authors: 4)")
    a("--attn-res", default="16", help="unet resolutions with self-attention (comma list; the middle always has one)")
    a("--dropout", type=float, default=0.3, help="dropout in the residual blocks (authors: 0.3)")
    a("--wrn-depth", type=int, default=16, help="WideResNet depth (6n + 4)")
    a("--class-cond", action="store_true", help="class-conditional Phi(x, c) (needed by --mode compose)")
    a("--p-uncond", type=float, default=0.1,
      help="with --class-cond: fraction of labels replaced by a null class, so Phi(x) exists for hist/ood/sample")
    # loss, Eq. (27) -- see the VPFB class for each choice
    a("--recipe", default="ours", choices=["ours", "paper", "authors"],
      help="preset for the loss flags below: ours (defaults), paper (as printed: w on gamma only, kappa 2, "
           "dPhi/dt weight 1, c=4 in Eq. 22), authors (their code: corr, cosine^t/D, 0.5 mean|grad|^2, 0.1 dt^2, eta 0)")
    a("--kappa", type=float, default=None, help="w(t) = (1 - t)^kappa [ours 1]")
    a("--t-end", type=float, default=1.0, help="t ~ U(0, t_end)")
    a("--t-max", type=float, default=1.0 - 1e-5, help="stationarity: t clamped to t_max")
    a("--t-inf", type=float, default=None, help="time at which Phi_B (Eq. 22) is read off (default t_max)")
    a("--eta", type=float, default=None, help="Poincare weight eta [ours 1e-4]")
    a("--lam-cos", type=float, default=None, help="weight of the cosine term [1]")
    a("--lam-gx", type=float, default=None, help="weight of E||grad_x Phi||^2 [1]")
    a("--lam-gt", type=float, default=None, help="weight of E(dPhi/dt)^2 [ours 0.01]")
    a("--cov-form", default=None, choices=["cov", "corr"], help="covariance (paper) or Pearson correlation (authors)")
    a("--cos-form", default=None, choices=["paper", "authors"], help="cosine (paper) or cosine^t / D (authors)")
    a("--weight-on", default=None, choices=["ritz", "cov"], help="w(t) on cov + |grad|^2 (ours) or on gamma only (paper)")
    a("--grad-norm", default=None, choices=["sum", "mean"], help="|grad Phi|^2 summed (paper) or averaged (authors) over dims")
    a("--bfactor", type=float, default=None, help="c in Phi_B = (c Phi + f|x|^2)/g^2 [ours 2; paper prints 4]")
    # samplers
    a("--sampler", default="rk45", choices=["euler", "rk45", "sgld"], help="sampler for sample/interp/nn/compose")
    a("--ode-steps", type=int, default=100, help="Euler steps (and trajectory frames for rk45)")
    a("--rtol", type=float, default=1e-3, help="RK45 relative tolerance (authors 1e-3)")
    a("--atol", type=float, default=1e-3, help="RK45 absolute tolerance (authors 1e-3)")
    a("--t0", type=float, default=1e-5, help="ODE start time (authors 1e-5)")
    a("--t1", type=float, default=1.0 - 1e-5, help="ODE end time (authors 1 - 1e-5)")
    a("--sgld-steps", type=int, default=1000, help="SGLD steps on Phi_B")
    a("--sgld-step", type=float, default=1e-5, help="SGLD step Delta (Sec. 4.6)")
    a("--sgld-temp", type=float, default=1.0, help="SGLD temperature lambda (noise std scale)")
    a("--longrun-t1", type=float, default=20.0, help="long-run ODE horizon t in [0, t1] (Sec. 4.6)")
    a("--clamp", action="store_true", help="clamp samples to [-1, 1] at the end")
    # engineering
    a("--amp", default="bf16", choices=["bf16", "none"], help="bf16 autocast for the network trunk (head and loss in fp32)")
    a("--compile", action="store_true", help="torch.compile the sampling network (training needs double backward, "
      "which compile does not support, so the training net stays eager)")
    a("--channels-last", action="store_true", help="NHWC memory format for the convolutions")
    a("--resume", action="store_true", help="resume from <out-dir>/ckpt.pt (or --ckpt)")
    a("--ckpt", default=None, help="checkpoint to load (default <out-dir>/ckpt.pt)")
    a("--log-every", type=int, default=100, help="progress line every N steps")
    a("--save-every", type=int, default=5000, help="checkpoint every N steps")
    a("--sample-every", type=int, default=5000, help="sample grid every N steps (0 = off)")
    a("--num-samples", type=int, default=64, help="samples to draw (sample: written to samples.npz)")
    a("--eval-batch", type=int, default=256, help="batch size of the evaluation modes")
    # experiments
    a("--ood-sets", default="svhn,cifar100,celeba,interp", help=f"comma list from {OOD_SETS}")
    a("--ood-max", type=int, default=10000, help="at most this many images per set in ood/hist")
    a("--nn-k", type=int, default=5, help="nearest neighbours per sample (mode nn)")
    a("--compose", default="0,1", help="classes whose energies are averaged (mode compose), e.g. '0,1;0,2'")
    a("--bench-steps", type=int, default=20, help="timed steps per config in benchmark mode")
    a("--bench-warmup", type=int, default=3, help="untimed warm-up steps per config in benchmark mode")
    return p


RECIPES = {  # loss presets; explicit flags win over the preset
    "ours": dict(kappa=1.0, eta=1e-4, lam_cos=1.0, lam_gx=1.0, lam_gt=0.01, cov_form="cov", cos_form="paper",
                 weight_on="ritz", grad_norm="sum", bfactor=2.0),
    "paper": dict(kappa=2.0, eta=1e-4, lam_cos=1.0, lam_gx=1.0, lam_gt=1.0, cov_form="cov", cos_form="paper",
                  weight_on="cov", grad_norm="sum", bfactor=4.0),
    "authors": dict(kappa=2.0, eta=0.0, lam_cos=1.0, lam_gx=0.5, lam_gt=0.1, cov_form="corr", cos_form="authors",
                    weight_on="ritz", grad_norm="mean", bfactor=4.0),
}


def loss_kwargs(args):
    """The VPFB(...) keyword arguments: the recipe preset, overridden by any explicit flag."""
    kw = dict(RECIPES[args.recipe])
    for k in kw:
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    kw.update(t_end=args.t_end, t_max=args.t_max, t_inf=getattr(args, "t_inf", None))
    return kw


def check_args(args):
    """Bad input -> one line and exit 2."""
    if args.dataset not in DATASETS + ["svhn", "cifar100"]:
        die(f"unknown dataset {args.dataset!r}; choose one of {DATASETS}")
    for name in ["steps", "sgld_steps", "warmup", "save_every", "sample_every", "batch_size", "num_samples",
                 "ode_steps", "log_every", "eval_batch", "fake_size", "ood_max", "nn_k", "bench_steps", "model_size"]:
        low = 0 if name in ("steps", "sgld_steps", "warmup", "sample_every") else 1
        if getattr(args, name) < low:
            die(f"--{name.replace('_', '-')} must be {'>= 0' if low == 0 else 'positive'}, got {getattr(args, name)}")
    if not 0 <= args.p_uncond < 1 or args.lr <= 0 or not 0 <= args.ema_decay < 1:
        die("need 0 <= --p-uncond < 1, --lr > 0 and 0 <= --ema-decay < 1")
    if not 0 < args.t_max <= 1 or args.t_end <= 0:
        die(f"need 0 < --t-max <= 1 and --t-end > 0, got t_max={args.t_max}, t_end={args.t_end}")
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"vpfb_{args.dataset}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        probe = os.path.join(args.out_dir, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to --out-dir {args.out_dir!r}: {e.strerror}")
    if args.model == "unet":
        try:
            args.channel_mult_t = tuple(int(c) for c in args.channel_mult.split(","))
            args.attn_res_t = tuple(int(c) for c in args.attn_res.split(",") if c.strip())
        except ValueError:
            die(f"--channel-mult / --attn-res must be comma lists of integers, got {args.channel_mult!r}, {args.attn_res!r}")
    if args.model == "wrn" and (args.wrn_depth - 4) % 6:
        die(f"--wrn-depth must be 6n + 4 (10, 16, 22, 28 ...), got {args.wrn_depth}")
    return args


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        die(f"unknown --device {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda asked for but no CUDA GPU is visible")
    return dev


# === 2. Data ===
# Images live in [-1, 1]. Every real set is read through torchvision with download=True, so on a
# machine with internet it fetches itself into --data-dir; offline, a missing set is one clear line.

def image_size_of(args):
    return args.image_size or (64 if args.dataset == "celeba64" else 32)


CELEBA_ATTRS = ("Male", "Smiling", "Young")                        # classes 0, 1, 2 of --class-cond (3 = none)


def get_dataset(name, root, train=True, size=32, fake_size=512, channels=3, augment=None, class_cond=False):
    """A dataset of (image in [-1, 1], label). Layout as in energy_matching.py: cifar10 / cifar100 / svhn / mnist
    through torchvision (download=True into --data-dir); celeba64 (and celeba, the same images for OOD) is an
    ImageFolder copy in <data-dir>/celeba64/ (torchvision's Google-Drive download is unreliable); folder is any
    ImageFolder at --data-dir; fake is torchvision FakeData (tests)."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    norm = [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]           # [0, 1] -> [-1, 1]
    augment = train if augment is None else augment
    flip = [T.RandomHorizontalFlip()] if augment and name not in ("mnist", "svhn", "fake") else []
    resize = [T.Resize(size), T.CenterCrop(size)]
    if name == "fake":
        return D.FakeData(size=fake_size, image_size=(channels, size, size), num_classes=10,
                          transform=T.Compose(norm), random_offset=0 if train else 10_000)
    if name in ("celeba64", "celeba", "folder"):
        path = os.path.join(root, "celeba64") if name != "folder" else root
        crop = [T.CenterCrop(140)] if name != "folder" else []    # CelebA: the 140x140 face crop, then resize
        try:
            ds = D.ImageFolder(path, transform=T.Compose(crop + resize + flip + norm))
        except (FileNotFoundError, OSError) as e:
            what = ("CelebA images (e.g. img_align_celeba/*.jpg) in a sub-folder" if name != "folder"
                    else "images in at least one sub-folder")
            die(f"no image folder at {os.path.abspath(path)} ({type(e).__name__}); put {what} there")
        if name == "celeba64" and class_cond:
            attach_celeba_attributes(ds, path)
        return ds
    makers = {
        "cifar10": (lambda: D.CIFAR10(root, train=train, download=True, transform=T.Compose(resize + flip + norm)),
                    "cifar-10-batches-py/ (from cifar-10-python.tar.gz)"),
        "cifar100": (lambda: D.CIFAR100(root, train=train, download=True, transform=T.Compose(resize + norm)),
                     "cifar-100-python/ (from cifar-100-python.tar.gz)"),
        "svhn": (lambda: D.SVHN(os.path.join(root, "svhn"), split="train" if train else "test", download=True,
                                transform=T.Compose(resize + norm)), "svhn/train_32x32.mat and svhn/test_32x32.mat"),
        "mnist": (lambda: D.MNIST(root, train=train, download=True,
                                  transform=T.Compose([T.Resize(size), T.Grayscale(channels)] + norm)), "MNIST/raw/"),
    }
    if name not in makers:
        die(f"unknown dataset {name!r}; choose one of {DATASETS} (OOD: {OOD_SETS})")
    make, what = makers[name]
    try:
        return make()
    except Exception as e:  # no internet, bad archive, ...
        die(f"could not load {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"put {what} under {os.path.abspath(root)} or allow the download")


def attach_celeba_attributes(ds, path):
    """Labels for the compositional CelebA experiment (Sec. 4.3) from CelebA's list_attr_celeba.txt (put it
    in <data-dir>/celeba64/): each time an image is drawn its class is one of its positive attributes among
    Male (0), Smiling (1), Young (2), at random; 3 = none of them."""
    f = os.path.join(path, "list_attr_celeba.txt")
    if not os.path.isfile(f):
        die(f"--class-cond on celeba64 needs CelebA's attribute file at {os.path.abspath(f)}")
    with open(f) as fh:
        lines = fh.read().splitlines()
    names = lines[1].split()
    cols = [names.index(a) for a in CELEBA_ATTRS]
    attrs = {ln.split()[0]: [int(ln.split()[1 + c]) for c in cols] for ln in lines[2:] if ln.strip()}
    ds.samples = [(p, attrs.get(os.path.basename(p), [-1, -1, -1])) for p, _ in ds.samples]
    ds.target_transform = celeba_label
    ds.classes = list(CELEBA_ATTRS) + ["none"]


def celeba_label(attr):
    """A random positive attribute among Male, Smiling, Young (0, 1, 2), or 3 if none."""
    pos = [i for i, a in enumerate(attr) if a == 1]
    return pos[int(torch.randint(len(pos), ()))] if pos else 3


def infinite_loader(ds, batch_size, seed, num_workers, rank=0, world=1):
    """Endless iterator of (x, y) batches, reshuffled every epoch; each DDP rank sees its own shard."""
    from torch.utils.data import DataLoader, DistributedSampler
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed) if world > 1 else None
    dl = DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                    num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                    generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
    if len(dl) == 0:
        die(f"the dataset has {len(ds)} images, fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from dl
        epoch += 1


def first_images(ds, n, batch=256):
    """The first n images of a dataset as one tensor (for nn / hist / ood)."""
    from torch.utils.data import DataLoader
    xs, got = [], 0
    for x, _ in DataLoader(ds, batch_size=batch, shuffle=False):
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]


# === 3. Networks ===
# Both networks return ONE number per image, Phi (B,). The authors' time-varying Phi is a U-Net
# read as a scalar through Phi(x, t) = 1/2 ||x - UNet(x, t)||^2 (>= 0); we use the same head. The
# autonomous Phi(x) is a WideResNet with a linear read-out of its pooled features. Both use SiLU
# (smooth: the loss differentiates grad_x Phi once more w.r.t. the weights) and GroupNorm, never
# BatchNorm, which would couple the images of a batch and make Phi_i depend on x_j.

def _groups(ch):
    """GroupNorm groups: 32 as usual, but at least 4 channels per group. With one channel per group the
    norm would remove the per-channel time embedding added just before it (tiny test nets)."""
    return math.gcd(32, max(1, ch // 4))


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
    (the flash / memory-efficient SDPA kernels do not), which the loss needs.
    heads: a fixed number (the authors: 1), else ch // head_dim. order: how the 3 * ch channels
    of the qkv conv split: "new" = q | k | v, then heads; "legacy" = per head, then q, k, v."""

    def __init__(self, ch, head_dim=64, heads=None, order="new", groups=None):
        super().__init__()
        if order not in ("new", "legacy"):
            raise ValueError(f"attention order must be 'new' or 'legacy', got {order!r}")
        self.heads = heads or max(1, ch // head_dim)
        self.order = order
        self.norm = _norm(ch, groups)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        n, c = self.heads, C // self.heads
        qkv = self.qkv(self.norm(x))
        if self.order == "new":
            q, k, v = qkv.reshape(B, 3, n, c, H * W).unbind(1)          # (B, heads, c, HW) each
        else:
            q, k, v = qkv.reshape(B, n, 3, c, H * W).unbind(2)
        att = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bhnm,bhcm->bhcn", att, v).reshape(B, C, H, W)
        return x + self.proj(out)


class UNetPhi(nn.Module):
    """Time-varying potential Phi(x, t [, y]) = 1/2 ||x - UNet(x, t [, y])||^2 (authors' head).

    A guided-diffusion style U-Net: per resolution `num_res` ResBlocks (attention at `attn_res`),
    down-sampling, a ResBlock-Attention-ResBlock middle, and the mirror image going up with skip
    connections. Paper size: base 128, mult (2,2,2), 4 blocks, attention at 16, dropout 0.3.
    Keyword options (defaults = our network; AUTHORS_UNET = the authors' CIFAR-10/CelebA net):
      scale_shift    FiLM time conditioning in every ResBlock (authors: True)
      attn_heads     a fixed number of heads (authors: 1); None = ch // head_dim heads
      attn_order     "new" (split q, k, v, then heads; ours and the authors') or "legacy"
      conv_resample  strided conv down / nearest + conv up (ours); False: 2x2 average pool down,
                     nearest up, no parameters (authors)
      t_scale        the time embedding sees t_scale * t (ours 1000; authors the raw t: 1)
      stem_mult      the input conv gives base * mult[0] channels (authors) instead of base
      norm_groups    GroupNorm groups everywhere (authors: 32); None = _groups(ch)
      zero_out       zero-initialise the output conv, so Phi = 1/2 |x|^2 at start (authors)
    The trunk may run in bf16 (self.amp_dtype); the head and everything after it stay fp32."""

    def __init__(self, in_ch=3, base=128, mult=(2, 2, 2), num_res=4, attn_res=(16,), dropout=0.3,
                 image_size=32, num_classes=0, *, scale_shift=False, attn_heads=None, head_dim=64,
                 attn_order="new", conv_resample=True, t_scale=1000.0, stem_mult=False,
                 norm_groups=None, zero_out=False):
        super().__init__()
        self.amp_dtype = None
        emb = base * 4
        self.base, self.t_scale = base, t_scale
        self.temb = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        # class embedding with one extra "null" class (index num_classes): y=None -> Phi(x, t)
        self.num_classes = num_classes
        self.cemb = nn.Embedding(num_classes + 1, emb) if num_classes else None

        def res(cin, cout):
            return ResBlock(cin, cout, emb, dropout, scale_shift, norm_groups)

        def attn(c):
            return AttnBlock(c, head_dim, attn_heads, attn_order, norm_groups)

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
                if conv_resample:
                    pool = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                else:
                    pool = nn.AvgPool2d(2)
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
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            u = self.unet(x, t, y)
        return 0.5 * (x - u.float()).flatten(1).pow(2).sum(1)            # Phi = 1/2 ||x - UNet(x, t)||^2


# The authors' network (https://github.com/ljun0004/VAPO, configs/homotopy/cifar10.py, celeba.py):
# UNetPhi(3, 128, (2, 2, 2), 4, attn_res=(image_size // 2,), dropout=0.3, **AUTHORS_UNET) has their
# 55,676,419 parameters (README: 55.7M); loaded with their weights it computes their potential.
AUTHORS_UNET = dict(scale_shift=True, attn_heads=1, attn_order="new", conv_resample=False,
                    t_scale=1.0, stem_mult=True, norm_groups=32, zero_out=True)


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, stride, 1)
        self.n2, self.c2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(self.drop(F.silu(self.n2(h))))


class WRNPhi(nn.Module):
    """Autonomous potential Phi(x [, y]) (paper Sec. 4.2, Zagoruyko & Komodakis): a WideResNet with
    three groups of (depth-4)/6 blocks of widths (w, 2w, 4w), GroupNorm + SiLU, global average pooling
    and a linear read-out Phi = <a, pool(h)> + b (one read-out per class with --class-cond). t is ignored."""

    def __init__(self, in_ch=3, width=128, depth=16, dropout=0.0, num_classes=0):
        super().__init__()
        self.amp_dtype = None
        n = (depth - 4) // 6
        layers, ch = [nn.Conv2d(in_ch, width // 2, 3, padding=1)], width // 2
        for i, w in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                layers.append(WideBlock(ch, w, 2 if (j == 0 and i > 0) else 1, dropout))
                ch = w
        self.body = nn.Sequential(*layers, nn.GroupNorm(_groups(ch), ch), nn.SiLU())
        self.num_classes = num_classes
        self.head = nn.Linear(ch, num_classes + 1 if num_classes else 1)   # + a "null" (unconditional) read-out

    def forward(self, x, t=None, y=None):
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            h = self.body(x).mean((2, 3))
        out = self.head(h.float())                                       # (B, classes + 1) or (B, 1)
        if out.shape[1] == 1:
            return out[:, 0]
        return out[:, -1] if y is None else out.gather(1, y[:, None])[:, 0]


def build_network(args, in_ch, num_classes):
    nc = num_classes if args.class_cond else 0
    if args.model == "unet":
        return UNetPhi(in_ch, args.model_size, args.channel_mult_t, args.num_res_blocks, args.attn_res_t,
                       args.dropout, image_size_of(args), nc)
    return WRNPhi(in_ch, args.model_size, args.wrn_depth, 0.0, nc)


class Conditioned(nn.Module):
    """phi(x, t) with the labels fixed (VPFB calls phi(x, t)); y=None -> unconditional.
    A list of labels gives the compositional energy: the average of the conditional energies (Sec. 4.3)."""

    def __init__(self, net, y=None):
        super().__init__()
        self.net, self.y = net, y

    def forward(self, x, t):
        if self.y is None:
            return self.net(x, t)
        ys = self.y if isinstance(self.y, (list, tuple)) else [self.y]
        return sum(self.net(x, t, y.expand(x.shape[0]) if y.dim() == 0 else y) for y in ys) / len(ys)


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

    def kernel_and_rates(self, t):
        """mu, sigma of Eq. (8) and their time derivatives mu_dot, sigma_dot (closed form for OT-FM:
        t, 1 - t, 1, -1; otherwise by autograd). Needed for x = mu xbar + sigma eps and the conditional
        velocity v = mu_dot xbar + sigma_dot eps of Eq. (20)."""
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
        f = -mu_dot / mu,  g^2 = -2 sigma (sigma_dot + f sigma)  (OT-FM: f = -1/t, g^2 = 2 (1-t)/t).
        (Eq. 18 prints g = -sqrt(2 sigma (sigma_dot + f sigma)); the radicand is negative in this time
        direction, so the sign belongs inside: g^2 must be positive.)"""
        t = torch.as_tensor(t, dtype=torch.float64)
        mu, sigma, dmu, dsig = self.kernel_and_rates(t.reshape(1))
        f = -dmu / mu                                                     # Eq. (18), f
        g2 = -2 * sigma * (dsig + f * sigma)                              # Eq. (18), g^2
        return float(f), float(g2)

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
      kappa      w(t) = (1 - t)^kappa (Sec. 3.5 asks kappa > 1 with w on gamma only; the authors'
                 code is kappa = 2 in effect) [1: with weight_on="ritz", w(t) (gamma - gamma_bar)
                 = 2 sum(eps^2 - xbar eps - 1) then has the same spread at every t; on two moons
                 kappa = 1 gave W2^2 ~0.05-0.11 vs ~0.19 for kappa = 2 at 3k steps]
      t_end      t ~ U(0, t_end)                                           [1.0, authors]
      t_max      t is clamped to t_max beyond it (enforced stationarity)    [1 - 1e-5, authors]
      eta        Poincare term eta E[Phi^2], Eq. (27) [paper: "small"; authors: 0, only logged]
      lam_cos    weight of the cosine term                                  [1, paper]
      lam_gx     weight of E||grad_x Phi||^2                                [1, paper: must be 1
                 relative to the covariance for the Deep Ritz minimiser to be the true potential]
      lam_gt     weight of E(dPhi/dt)^2 [0.01; paper: 1, authors: 0.1]. The true potential does
                 move with t, so this "quasi-static" term biases the flow: on two moons 0.1 shrank
                 the samples (std 1.12 vs 1.30) and 0.01 was close to 0. Kept small, not zero,
                 so Phi still settles towards a steady state for the Boltzmann energy.
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
      t_inf      the time at which Phi_B is read off [None = t_max, as in the paper]
    """

    def __init__(self, phi, autonomous=False, kappa=1.0, t_end=1.0, t_max=1.0 - 1e-5, eta=1e-4,
                 lam_cos=1.0, lam_gx=1.0, lam_gt=0.01, cov_form="cov", cos_form="paper",
                 weight_on="ritz", grad_norm="sum", bfactor=2.0, schedule=None, t_inf=None):
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
        self.t_inf = None if t_inf is None else float(t_inf)   # where Phi_B is read off (default t_max)
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
        # Prop. 1: x ~ rho(x | xbar, t) = N(mu xbar, sigma^2 I); with OT-FM mu = t, sigma = 1 - t
        mu, sig, dmu, dsig = (_bdim(c, xbar) for c in self.schedule.kernel_and_rates(t))
        x = (mu * xbar + sig * eps).detach().requires_grad_(True)        # x = t xbar + (1 - t) eps
        v = dmu * xbar + dsig * eps                         # Eq. (20): v = mu_dot xbar + sigma_dot eps = xbar - eps
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
            if self.schedule.is_otfm:
                G = w * otfm_centered_innovation(eps, xbar, t)             # w(t) (gamma - gamma_bar)
            else:
                G = w * (self.schedule.gamma(x.detach(), xbar, t) - self.schedule.gamma_bar(xbar, t))
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
        2 and keep the paper's 4 behind bfactor=4 (flag --bfactor 4).
        Caveat: at t_inf = t_max = 1 - 1e-5 the factor 1/g^2 = t / (2 (1 - t)) is 5e4, so Phi_B is the
        log-density of the data blurred by only 1e-5 and any error of the network in Phi is multiplied
        by 5e4 (on 2-D toys exp(Phi_B) collapses to a spike). t_inf (--t-inf), e.g. 0.9-0.99, reads
        a smoother density off the same potential."""
        t = (self.t_inf if self.t_inf is not None else self.t_max) if t_inf is None else float(t_inf)
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


# === 6. Training loop (CUDA, AMP, EMA, DDP) ===

def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python vpfb.py` is one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
    return rank, world, local


def allreduce_grads(params, world):
    """Average gradients over processes. We do this by hand instead of wrapping the net in DDP: the loss
    differentiates grad_x Phi (create_graph=True, a double backward), which DDP's reducer does not support."""
    if world == 1:
        return
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


@torch.no_grad()
def ema_update(ema, net, decay):
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p, 1.0 - decay)                                   # ema <- decay ema + (1 - decay) theta
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def channels_of(name):
    return 1 if name == "mnist" else 3


def num_classes_of(ds):
    return max(1, len(getattr(ds, "classes", [])) or 10)


def make_network(args, device, in_ch, num_classes):
    net = build_network(args, in_ch, num_classes).to(device)
    net.amp_dtype = torch.bfloat16 if (args.amp == "bf16" and device.type == "cuda") else None   # bf16 trunk only
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_vpfb(phi, args):
    return VPFB(phi, autonomous=(args.model == "wrn"), **loss_kwargs(args))


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))      # linear warm-up, then constant (authors)


def train(args):
    import copy
    rank, world, local = setup_distributed()
    device = torch.device(f"cuda:{local}") if (world > 1 and torch.cuda.is_available()) else pick_device(args.device)
    torch.manual_seed(args.seed)                     # the same initial weights on every process ...
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True                 # TF32 convs/matmuls: safe for this loss
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ch = channels_of(args.dataset)
    ds = get_dataset(args.dataset, args.data_dir, True, image_size_of(args), args.fake_size, ch,
                     class_cond=args.class_cond)
    net = make_network(args, device, ch, num_classes_of(ds))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    step, ckpt_path = 0, args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if os.path.isfile(ckpt_path):
            st = load_checkpoint(ckpt_path)
            net.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
            step = st["step"]
            if rank == 0:
                print(f"resumed from {ckpt_path} at step {step}")
        elif rank == 0:
            print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    if world > 1:                                    # ... made certain: rank 0's weights everywhere
        import torch.distributed as dist
        for t_ in list(net.parameters()) + list(ema.parameters()):
            dist.broadcast(t_.data, 0)
    torch.manual_seed(args.seed + rank + 1000 * step)  # ... but different noise and times per process
    cond = Conditioned(net)
    model = make_vpfb(cond, args)
    loader = infinite_loader(ds, args.batch_size, args.seed + step, args.num_workers, rank, world)
    n_params = sum(p.numel() for p in net.parameters())
    if rank == 0:
        print(f"vpfb: {args.model} Phi with {n_params / 1e6:.2f}M parameters on {device} x{world}, "
              f"{len(ds)} images of {args.dataset}, loss {loss_kwargs(args)}")
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(plain_args(args), f, indent=1)
    log_path, history = os.path.join(args.out_dir, "metrics.jsonl"), []
    t_last, n_bad, start_step = time.time(), 0, step
    while step < args.steps:
        x, y = next(loader)
        x = x.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if args.class_cond:                                               # labels, some replaced by "null"
            y = y.to(device)
            drop = torch.rand(y.shape[0], device=device) < args.p_uncond
            cond.y = torch.where(drop, torch.full_like(y, num_classes_of(ds)), y)
        else:
            cond.y = None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        net.train()
        loss, stats = model.loss(x)                                       # Eq. (27), one Monte-Carlo batch
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            allreduce_grads(net.parameters(), world)
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
            stats["grad_norm"] = float(gnorm)
        if not (torch.isfinite(loss) and math.isfinite(stats.get("grad_norm", math.nan))):
            n_bad += 1                                                    # NaN guard: skip the step ...
            if n_bad >= 10:                                               # ... and stop if it persists
                save_checkpoint(os.path.join(args.out_dir, "ckpt_nan.pt"), net, ema, opt, step, args)
                die(f"loss or gradient was NaN/inf for 10 steps in a row at step {step}; saved ckpt_nan.pt "
                    f"(lower --lr, set --grad-clip, or try --amp none)")
            continue
        n_bad = 0
        opt.step()
        ema_update(ema, net, args.ema_decay)
        step += 1
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t_last) / max(1, min(args.log_every, step - start_step))
            t_last = time.time()
            stats.update(step=step, lr=lr_at(step, args), ms_per_iter=1000 * dt,
                         images_per_s=args.batch_size * world / dt)
            if device.type == "cuda":
                stats["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            history.append(stats)
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            eta = (args.steps - step) * dt
            print(f"step {step}/{args.steps} loss {stats['loss']:.4f} cov {stats['cov']:.4f} cos {stats['cos']:.3f} "
                  f"|gPhi|^2 {stats['grad_x2']:.3g} poincare {stats['poincare_ratio']:.3g} | "
                  f"{1000 * dt:.1f} ms/it {stats['images_per_s']:.1f} img/s ETA {eta / 60:.1f} min", flush=True)
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(ckpt_path, net, ema, opt, step, args)
            plot_history(history, os.path.join(args.out_dir, "loss.png"))
        if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            xs, _ = generate(Conditioned(ema), args, device, min(64, args.num_samples), x.shape[1:],
                             method="euler", n_classes=num_classes_of(ds))
            save_grid(xs, os.path.join(args.out_dir, f"samples_{step:07d}.png"))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return net, ema


def plot_history(history, path):
    """Loss curve and the Poincare-ratio monitor E|grad Phi|^2 / E Phi^2 (paper Fig. 10)."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(s, [h["loss"] for h in history], label="loss")
    ax[0].plot(s, [h["cov"] for h in history], label="cov")
    ax[0].plot(s, [-h["cos"] for h in history], label="-cos")
    ax[0].set_xlabel("step"); ax[0].legend(); ax[0].set_title("VPFB loss, Eq. (27)")
    ax[1].semilogy(s, [max(h["poincare_ratio"], 1e-12) for h in history])
    ax[1].set_xlabel("step"); ax[1].set_title("Poincare ratio E|grad Phi|^2 / E Phi^2")
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


# === 7. Checkpointing ===
FORMAT = "vpfb/v1"
ARCH_KEYS = ["model", "model_size", "channel_mult", "num_res_blocks", "attn_res", "dropout", "wrn_depth",
             "class_cond", "image_size", "dataset", "t_max", "t_end"]


def plain_args(args):
    """args as a plain dict of str/int/float/bool/None/list (safe for weights_only loading)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
    return out


def save_checkpoint(path, net, ema, opt, step, args):
    """Atomic: write a temporary file, then os.replace (a crash never leaves half a checkpoint)."""
    state = {"format": FORMAT, "model": net.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict() if opt is not None else {}, "step": int(step), "args": plain_args(args)}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        die(f"checkpoint {path!r} not found (train first, or pass --ckpt PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"checkpoint {path!r} is corrupt or not a torch checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        die(f"{path!r} is not a VPFB checkpoint (format {fmt!r}, expected {FORMAT!r})")
    return state


def load_for_eval(args, device):
    """Rebuild the EMA network of a checkpoint; its architecture flags win over the command line."""
    state = load_checkpoint(args.ckpt or os.path.join(args.out_dir, "ckpt.pt"))
    a = argparse.Namespace(**{**vars(args), **{k: state["args"][k] for k in ARCH_KEYS if k in state["args"]}})
    a.channel_mult_t = tuple(int(c) for c in a.channel_mult.split(","))
    a.attn_res_t = tuple(int(c) for c in a.attn_res.split(",") if c.strip())
    ncls = 10
    if a.class_cond and "cemb.weight" in state["ema"]:
        ncls = state["ema"]["cemb.weight"].shape[0] - 1                 # minus the null class
    elif a.class_cond and "head.weight" in state["ema"]:
        ncls = state["ema"]["head.weight"].shape[0] - 1
    net = make_network(a, device, channels_of(a.dataset), ncls)
    try:
        net.load_state_dict(state["ema"])
    except RuntimeError as e:
        die(f"checkpoint weights do not fit the network it describes ({str(e).splitlines()[0]})")
    net.eval().requires_grad_(False)
    if args.compile:
        net = torch.compile(net)                      # first-order gradients only: fine for sampling
    return net, a, ncls


# === 8. Evaluation commands ===

def save_grid(x, path, nrow=8):
    import torchvision.utils as vu
    vu.save_image((x.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow)


def to_uint8_nhwc(x):
    """[-1, 1] NCHW float -> uint8 NHWC (the .npz layout eval_fid.py reads)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def slerp(z0, z1, alpha):
    """Spherical interpolation between noises (Sec. 4.3), per sample on the flattened vectors:
    slerp = sin((1-a) theta)/sin(theta) z0 + sin(a theta)/sin(theta) z1, cos(theta) = <z0, z1>/(|z0||z1|).
    Keeps the norm when |z0| = |z1|, so every point still looks like prior noise."""
    a0, a1 = z0.flatten(1), z1.flatten(1)
    cos = (a0 * a1).sum(1) / (a0.norm(dim=1) * a1.norm(dim=1))
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))[:, None]
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, 1)
    out = (torch.sin((1 - alpha) * theta) * a0 + torch.sin(alpha * theta) * a1) / torch.sin(theta)
    return out.reshape(z0.shape)


def auroc(pos, neg):
    """Area under the ROC curve, P(score_pos > score_neg) + 1/2 P(=), by ranks (Mann-Whitney U), ties
    averaged. Plain numpy. pos: scores of in-distribution samples (should be higher)."""
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    uniq, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    if len(uniq) < len(allv):                                     # average the ranks of tied values
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / counts)[inv]
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def generate(phi, args, device, n, shape, method=None, x0=None, n_classes=10):
    """Draw n images with the ODE (euler / rk45) or SGLD on Phi_B. Returns (images, stats)."""
    method = method or args.sampler
    model = make_vpfb(phi, args)
    outs, nfes, t_start = [], [], time.time()
    for i in range(0, n, args.eval_batch):
        b = min(args.eval_batch, n - i)
        z = (x0[i:i + b] if x0 is not None else torch.randn(b, *shape)).to(device)
        random_classes = isinstance(phi, Conditioned) and args.class_cond and phi.y is None
        if random_classes:
            phi.y = torch.randint(n_classes, (b,), device=device)       # a class-conditional model: random classes
        if method == "sgld":
            x = model.langevin(z, n_steps=args.sgld_steps, step_size=args.sgld_step, temperature=args.sgld_temp)
        else:
            x = model.sample(z, method=method, n_steps=args.ode_steps, t0=args.t0, t1=args.t1,
                             rtol=args.rtol, atol=args.atol)
        if random_classes:
            phi.y = None
        nfes.append(model.last_nfe)
        outs.append(x.clamp(-1, 1) if args.clamp else x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t_start
    return torch.cat(outs), {"sampler": method, "nfe_mean": float(np.mean(nfes)), "images_per_s": n / dt, "seconds": dt}


def _eval_setup(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    net, a, ncls = load_for_eval(args, device)
    S = image_size_of(a)
    return device, net, a, ncls, (channels_of(a.dataset), S, S)


def _dump(args, name, obj):
    path = os.path.join(args.out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(json.dumps(obj))
    return path


def mode_sample(args):
    device, net, a, ncls, shape = _eval_setup(args)
    x, st = generate(Conditioned(net), a, device, args.num_samples, shape, n_classes=ncls)
    np.savez(os.path.join(args.out_dir, "samples.npz"), images=to_uint8_nhwc(x))
    save_grid(x[:64], os.path.join(args.out_dir, "samples.png"))
    _dump(args, "sample_stats.json", st)


def mode_interp(args, rows=8, cols=10):
    """Spherical interpolation between two noises, each point pushed through the ODE (Sec. 4.3)."""
    device, net, a, ncls, shape = _eval_setup(args)
    z0, z1 = torch.randn(rows, *shape), torch.randn(rows, *shape)
    al = torch.linspace(0, 1, cols)
    z = torch.stack([slerp(z0, z1, torch.full((rows,), float(v))) for v in al], 1).reshape(rows * cols, *shape)
    x, st = generate(Conditioned(net), a, device, rows * cols, shape, x0=z, n_classes=ncls)
    save_grid(x, os.path.join(args.out_dir, "interp.png"), nrow=cols)
    _dump(args, "interp_stats.json", st)


def mode_nn(args, rows=8):
    """Generated samples and their k nearest training images in pixel (L2) distance (Fig. 5)."""
    device, net, a, ncls, shape = _eval_setup(args)
    x, _ = generate(Conditioned(net), a, device, rows, shape, n_classes=ncls)
    train_ds = get_dataset(a.dataset, args.data_dir, True, shape[-1], args.fake_size, shape[0], augment=False)
    best_d = torch.full((rows, args.nn_k), float("inf"))
    best_x = torch.zeros(rows, args.nn_k, *shape)
    from torch.utils.data import DataLoader
    xf = x.cpu().flatten(1)
    for xb, _ in DataLoader(train_ds, batch_size=512):
        d = torch.cdist(xf, xb.flatten(1))                                  # (rows, batch) pixel distances
        cand_d = torch.cat([best_d, d], 1)
        cand_x = torch.cat([best_x, xb[None].expand(rows, *xb.shape)], 1)
        best_d, idx = cand_d.topk(args.nn_k, dim=1, largest=False)
        best_x = torch.stack([cand_x[r, idx[r]] for r in range(rows)])
    grid = torch.cat([x.cpu()[:, None], best_x], 1).reshape(-1, *shape)
    save_grid(grid, os.path.join(args.out_dir, "nn.png"), nrow=args.nn_k + 1)
    _dump(args, "nn.json", {"nearest_pixel_l2": best_d.tolist()})


@torch.no_grad()
def energies(net, args, ds, device, n):
    """Phi_B (Eq. 22) and the authors' OOD score 4 Phi(x, t_max) - ||x||^2 for the first n images."""
    model = make_vpfb(Conditioned(net), args)
    pb, auth = [], []
    for i, x in enumerate(torch.split(first_images(ds, n), args.eval_batch)):
        x = x.to(device)
        pb.append(model.boltzmann_energy(x).float().cpu())
        tt = torch.full((x.shape[0],), model.t_inf or model.t_max, device=device)
        auth.append((4 * model._phi(x, tt) - _sqnorm(x)).float().cpu())
    return torch.cat(pb).numpy(), torch.cat(auth).numpy()


def mode_hist(args):
    """Histogram of the Boltzmann energy on train vs test images (Fig. 11)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device, net, a, ncls, shape = _eval_setup(args)
    res = {}
    fig = plt.figure(figsize=(5, 3.5))
    for split in ("train", "test"):
        ds = get_dataset(a.dataset, args.data_dir, split == "train", shape[-1], args.fake_size, shape[0], augment=False)
        e, _ = energies(net, a, ds, device, args.ood_max)
        res[split] = {"n": int(len(e)), "mean": float(e.mean()), "std": float(e.std())}
        plt.hist(e, bins=50, alpha=0.5, density=True, label=split)
    plt.xlabel("Boltzmann energy Phi_B (Eq. 22)"); plt.legend(); plt.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "hist.png"), dpi=100); plt.close(fig)
    _dump(args, "hist.json", res)


def mode_ood(args):
    """OOD AUROC (Table 2): in-distribution = the test split of the training set (positives, should
    score higher), OOD = each of --ood-sets; score = Phi_B. 'interp' = the average of two test images."""
    device, net, a, ncls, shape = _eval_setup(args)
    ind_ds = get_dataset(a.dataset, args.data_dir, False, shape[-1], args.fake_size, shape[0])
    pos, pos_auth = energies(net, a, ind_ds, device, args.ood_max)
    table = {}
    for name in [s.strip() for s in args.ood_sets.split(",") if s.strip()]:
        if name not in OOD_SETS:
            die(f"unknown OOD set {name!r}; choose from {OOD_SETS}")
        if name == "interp":
            imgs = first_images(ind_ds, args.ood_max)
            g = torch.Generator().manual_seed(args.seed)
            imgs = 0.5 * (imgs + imgs[torch.randperm(len(imgs), generator=g)])     # interpolated CIFAR-10
            ds = torch.utils.data.TensorDataset(imgs, torch.zeros(len(imgs)))
        else:
            ds = get_dataset("fake" if a.dataset == "fake" else name, args.data_dir, False, shape[-1],
                             args.fake_size, shape[0])
            if a.dataset == "fake":                                   # smoke test: a shifted fake set
                ds.random_offset = 10 ** 7 + hash(name) % 1000
        neg, neg_auth = energies(net, a, ds, device, args.ood_max)
        table[name] = {"auroc_phi_b": auroc(pos, neg), "auroc_authors_score": auroc(pos_auth, neg_auth),
                       "n_in": int(len(pos)), "n_ood": int(len(neg))}
    _dump(args, "ood.json", table)


def mode_longrun(args):
    """Long-run sampling over t in [0, longrun_t1] (Sec. 4.6, Fig. 12-18): the ODE beyond t_max keeps
    following Phi(x, t_max); then SGLD on Phi_B from the same noise. Curves of E|grad Phi|^2, E Phi^2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device, net, a, ncls, shape = _eval_setup(args)
    phi = Conditioned(net)
    model = make_vpfb(phi, a)
    n = min(args.num_samples, args.eval_batch)
    z = torch.randn(n, *shape, device=device)
    curves = {"ode": {"t": [], "grad2": [], "phi2": []}, "sgld": {"k": [], "grad2": [], "phi2": []}}

    def velocity(x, t):                                           # grad Phi, recording the two norms
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            p = model._phi(xr, tt)
            g = torch.autograd.grad(p.sum(), xr)[0]
        c = curves["ode"]
        c["t"].append(float(t))
        c["grad2"].append(float(_sqnorm(g).mean()))                    # E ||grad_x Phi||^2
        c["phi2"].append(float(p.detach().pow(2).mean()))             # E Phi^2
        return g.detach()

    n_steps = int(args.ode_steps * max(1.0, args.longrun_t1))
    x_ode, traj, _ = ode_solve(velocity, z, "euler", n_steps, 0.0, args.longrun_t1, return_traj=True)
    frames = [0.5, 1.0, 2.0, 5.0, 10.0, args.longrun_t1]
    idx = [min(n_steps, int(round(f / args.longrun_t1 * n_steps))) for f in frames if f <= args.longrun_t1]
    save_grid(torch.cat([traj[i][:8] for i in idx]), os.path.join(args.out_dir, "longrun_ode.png"), nrow=8)

    def grad_b(x):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            e = model.boltzmann_energy(xr)
            g = torch.autograd.grad(e.sum(), xr)[0]
        c = curves["sgld"]
        c["k"].append(len(c["k"]))
        c["grad2"].append(float(_sqnorm(g).mean()))                    # E ||grad_x Phi_B||^2
        c["phi2"].append(float(e.detach().pow(2).mean()))             # E Phi_B^2
        return g.detach()

    x_sg, traj_sg, _ = sgld(grad_b, z, args.sgld_steps, args.sgld_step, args.sgld_temp, return_traj=True)
    ks = np.linspace(0, args.sgld_steps, 6).astype(int)
    save_grid(torch.cat([traj_sg[k][:8] for k in ks]), os.path.join(args.out_dir, "longrun_sgld.png"), nrow=8)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, xk, lab in (("ode", "t", "ODE time t"), ("sgld", "k", "SGLD step")):
        ax[0 if key == "ode" else 1].semilogy(curves[key][xk], curves[key]["grad2"], label="E|grad|^2")
        ax[0 if key == "ode" else 1].semilogy(curves[key][xk], curves[key]["phi2"], label="E energy^2")
        ax[0 if key == "ode" else 1].set_xlabel(lab); ax[0 if key == "ode" else 1].legend()
    ax[0].set_title("long-run ODE, Phi"); ax[1].set_title("SGLD, Phi_B")
    fig.tight_layout(); fig.savefig(os.path.join(args.out_dir, "longrun_norms.png"), dpi=100); plt.close(fig)
    _dump(args, "longrun.json", {k: {kk: vv[-1] for kk, vv in v.items() if vv} for k, v in curves.items()})
    with open(os.path.join(args.out_dir, "longrun_curves.json"), "w") as f:
        json.dump(curves, f)


def mode_compose(args, n=8):
    """Compositional sampling (Sec. 4.3): sample with the average of the class-conditional energies
    Phi(x, t) = mean_c Phi(x, t, c). One row per single class of each group, then the composite."""
    device, net, a, ncls, shape = _eval_setup(args)
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
    _dump(args, "compose.json", info)


def mode_benchmark(args):
    """Training images/s, ms/iter and peak memory of OUR config (bf16 trunk, channels-last, TF32) against
    the authors' recipe (fp32 everywhere) from the same seed, weights, batches, noise and times; then the
    ODE sampler's NFE and images/s. Prints both and the max |loss difference| over the measured steps.
    Runs anywhere (use a tiny --model-size on CPU); real figures need the GPU and the paper config."""
    import copy
    device = pick_device(args.device)
    S, C = image_size_of(args), channels_of(args.dataset)
    torch.manual_seed(args.seed)
    base_net = build_network(args, C, 10)
    g = torch.Generator().manual_seed(args.seed)
    n_warm = max(1, args.bench_warmup)
    n_tot = args.bench_steps + n_warm
    B = args.batch_size                   # synthetic batches: the speed does not depend on the pixels
    data = [(torch.rand(B, C, S, S, generator=g) * 2 - 1, torch.randn(B, C, S, S, generator=g),
             torch.rand(B, generator=g) * args.t_end) for _ in range(n_tot)]
    results = {}
    for name in ("ours", "authors_fp32"):
        fast = name == "ours"
        net = copy.deepcopy(base_net).to(device)
        # bf16 only on CUDA, as in training (CPU autocast to bf16 is slower than fp32 on most CPUs)
        net.amp_dtype = torch.bfloat16 if (fast and args.amp == "bf16" and device.type == "cuda") else None
        cl = fast and (args.channels_last or device.type == "cuda")
        if cl:
            net = net.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            # ours: TF32 everywhere; authors: PyTorch's defaults (TF32 for cuDNN convs, not for matmuls)
            torch.backends.cuda.matmul.allow_tf32 = fast
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats()
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        model = make_vpfb(net, args)
        losses, t_start = [], None
        torch.manual_seed(args.seed)
        for i, (xb, eb, tb) in enumerate(data):
            if i == n_warm:                                          # warm-up steps, then time
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_start = time.time()
            xb, eb, tb = xb.to(device), eb.to(device), tb.to(device)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
                eb = eb.contiguous(memory_format=torch.channels_last)
            loss, _ = model.loss(xb, eps=eb, t=tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= n_warm:
                losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.time() - t_start) / args.bench_steps
        r = {"ms_per_iter": 1000 * dt, "images_per_s": args.batch_size / dt, "losses": losses}
        if device.type == "cuda":
            r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        net.eval()
        z = torch.randn(min(args.batch_size, args.eval_batch), C, S, S, generator=g).to(device)
        t0 = time.time()
        model.sample(z, method="rk45", t0=args.t0, t1=args.t1, rtol=args.rtol, atol=args.atol)
        if device.type == "cuda":
            torch.cuda.synchronize()
        r.update(ode_nfe=model.last_nfe, ode_images_per_s=z.shape[0] / (time.time() - t0))
        results[name] = r
        print(f"{name:13s} train {r['ms_per_iter']:8.1f} ms/iter {r['images_per_s']:8.1f} img/s"
              + (f" peak {r['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in r else "")
              + f" | rk45 NFE {r['ode_nfe']} {r['ode_images_per_s']:.1f} img/s", flush=True)
    la, lb = np.array(results["ours"]["losses"]), np.array(results["authors_fp32"]["losses"])
    summary = {"device": str(device), "batch_size": args.batch_size, "model": args.model,
               "params_M": sum(p.numel() for p in base_net.parameters()) / 1e6,
               "speedup_images_per_s": results["ours"]["images_per_s"] / results["authors_fp32"]["images_per_s"],
               "max_abs_loss_diff": float(np.abs(la - lb).max()),
               "max_rel_loss_diff": float((np.abs(la - lb) / np.maximum(np.abs(lb), 1e-12)).max()),
               "configs": results}
    print(f"speed-up {summary['speedup_images_per_s']:.2f}x, max |loss diff| {summary['max_abs_loss_diff']:.3g} "
          f"(relative {summary['max_rel_loss_diff']:.3g}) over {args.bench_steps} steps")
    with open(os.path.join(args.out_dir, "benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    args = check_args(build_parser().parse_args(argv))
    modes = {"train": train, "sample": mode_sample, "interp": mode_interp, "nn": mode_nn, "hist": mode_hist,
             "ood": mode_ood, "longrun": mode_longrun, "compose": mode_compose, "benchmark": mode_benchmark}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
