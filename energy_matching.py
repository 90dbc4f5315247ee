"""energy_matching.py -- Energy Matching on images, one self-contained file meant to be read beside the paper.

Paper: M. Balcerak, T. Amiranashvili, S. Shit, A. Terpin, P. Koumoutsakos, S. Kaltenbach, B. Menze,
"Energy Matching: Unifying Flow Matching and Energy-Based Models for Generative Modeling"
(papers/energy_matching.md; authors' code: github.com/m1balcerak/EnergyMatching, see REFERENCE_NOTES.md).

The idea in four lines
    One time-independent scalar potential V(x). Samples move along -grad V (an OT-like flow far from the data),
    with a temperature eps(t) (Eq. 3) that switches on Langevin noise near the data, so that the end state is the
    Boltzmann density  p(x) ∝ exp(-V(x) / eps_max)  (Eq. 6). Phase 1 (Alg. 1) fits -grad V(x_t) to x1 - x0 on
    exact minibatch-OT pairs; phase 2 (Alg. 2) adds lambda_CD * contrastive divergence with Langevin negatives.

How to run (every flag has a default and a help string: `python energy_matching.py --help`)
    python energy_matching.py --dataset cifar10 --phase warmup                 # phase 1, Alg. 1
    python energy_matching.py --dataset cifar10 --phase main                   # phase 2, Alg. 2, from ckpt_warmup.pt
    python energy_matching.py --dataset mnist --phase main --from-scratch     # MNIST: Alg. 2 directly (App. C)
    python energy_matching.py --mode sample  --dataset cifar10 --num-samples 50000   # 300 Heun steps (tau_s 3,
                                                                 # dt 0.01) -> samples.npz for eval_fid.py
    python energy_matching.py --mode inpaint --dataset celeba64                # Alg. 3, with vs without interaction
    python energy_matching.py --mode lid     --dataset mnist                   # Hessian-spectrum LID vs PNG size
    python energy_matching.py --mode benchmark                                 # images/s: ours vs authors' fp32 recipe
    torchrun --nproc_per_node 4 energy_matching.py --dataset cifar10           # data parallel (nccl; gloo on CPU)
    Datasets: cifar10, mnist (torchvision, download=True into --data-dir), celeba64 (ImageFolder copy in
    <data-dir>/celeba64/), folder (any ImageFolder at --data-dir), fake (torchvision FakeData, for tests).
    Outputs in --out-dir (default runs/em_<dataset>): train.log, metrics.jsonl, ckpt_<phase>.pt, samples_*.png,
    loss_<phase>.png, samples.npz (key "images", uint8, N x H x W x C), inpaint.png, lid.json, benchmark.json.

Paper vs authors' code (and what this file does)
    * Hyper-parameters: `--recipe code` (default) follows the authors' CIFAR-10 code (lr 1.2e-3, tau* = 1.0,
      lambda_CD = 1e-3, ~145k + 2k steps); `--recipe paper` follows Appendix C (lr 8e-4, tau* = 0.9,
      lambda_CD = 2e-4, 200k + 25k steps). Any single flag overrides the recipe. We default to the code because it
      is what produced the reported samples (REFERENCE_NOTES).
    * Flow loss: Alg. 1 writes a sum of squared norms; the code averages over pixels (torchcfm MSE). We average
      (lambda_CD was tuned against that scale); `--flow-reduction sum` gives the paper's form.
    * CD loss: the paper divides both energies by eps_max; the code does not (the constant is absorbed by
      lambda_CD). We follow the code. Code-only extras, all flags: lambda_CD * CD clamped from below at
      -cd_neg_clamp (1.0), trimmed mean dropping the 10 % highest negative energies, negatives clamped to [-1, 1].
    * Negatives: half start at data (at eps_max, Alg. 2 line 10), half at noise on the eps(t) schedule (paper;
      the code has this behind --split_negative). Both use the same data batch as the flow loss (paper Alg. 2;
      the code draws a second batch: `--cd-separate-batch`).
    * Phase-2 flow weighting (authors' 2-D code only, off there by default): `--flow-weighting` multiplies the
      flow residual by w(t) = 1 for t < tau*, linear to 0 at t = 1. With the CIFAR recipe's tau* = 1 it is a no-op.
    * Interaction energy of Alg. 3: printed with a "+" sign and sigma^2 twice, while Sec. 3.2 asks for
      p ∝ ... exp(+W), i.e. repulsion. We implement repulsion with sigma^2 once (see inverse_langevin).
    * The UNet of the CIFAR-10 potential has no time input: the authors feed a fixed dummy t, which only adds a
      constant per-channel vector after each ResBlock's first conv -- exactly a conv bias, so nothing is lost
      (47.1M parameters here vs the authors' ~50M, the difference being those constant-producing layers).
    * Sampler: stochastic Heun as torchsde's Stratonovich "heun" used by the authors; Euler-Maruyama by flag.

Speed (section 6 says what runs in bf16 and why): `--mode benchmark` times phase 1, phase 2 and the sampler for
our configuration (bf16 autocast, fast attention kernels outside the double backward, channels_last, optional
torch.compile for the chains) against the authors' recipe (fp32, math attention everywhere) from the same seed
and weights, and prints the max difference of the two loss curves. GPU figures are not in this file: none were
measured when it was written. Command for the paper's CIFAR-10 configuration on one GPU:
    python energy_matching.py --mode benchmark --dataset cifar10 --batch-size 128 --bench-steps 300
Exit codes: 0 ok, 2 bad input (one line on stderr), 3 stopped by the NaN/Inf guard (last good checkpoint kept).
"""
import argparse
import contextlib
import copy
import io
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
    """Bad input: one clear line on stderr and exit code 2 (never a traceback)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ======================================================================================================
# === 1. Arguments ===
# ======================================================================================================
DATASETS = ("cifar10", "mnist", "celeba64", "folder", "fake")
MODES = ("train", "sample", "inpaint", "lid", "benchmark")

# Hyper-parameter recipes. "code": the authors' CIFAR-10 training code (REFERENCE_NOTES); "paper": Appendix C.
# Flags left at None are filled from here; per-dataset rows override the CIFAR-10 row.
RECIPES = {
    "code": dict(lr=1.2e-3, tau_star=1.0, lambda_cd=1e-3, eps_max=0.01, n_langevin=200, dt=0.01,
                 steps_warmup=145_000, steps_main=2_000, batch_size=128, warmup=10_000),
    "paper": dict(lr=8e-4, tau_star=0.9, lambda_cd=2e-4, eps_max=0.01, n_langevin=200, dt=0.01,
                  steps_warmup=200_000, steps_main=25_000, batch_size=128, warmup=10_000),
}
DATASET_OVERRIDES = {
    # Appendix C, CelebA: ~2x the parameters (83M UNet + 25M ViT; width x1.5 gives ~74M + ~32M here), batch 32,
    # lr 1e-4, eps_max 0.05, lambda_CD 2e-5, 250k + 25k steps (no authors' code for CelebA: paper values).
    "celeba64": dict(lr=1e-4, eps_max=0.05, lambda_cd=2e-5, batch_size=32, steps_warmup=250_000,
                     steps_main=25_000, model_size=1.5),
    # Appendix C, MNIST: Alg. 2 directly (use --from-scratch), lambda_CD 0.25, dt 0.05, 50 Langevin steps,
    # 300k iterations, small CNN. lr and eps_max are not given in the paper: 1e-4 and 0.01 are our choice.
    "mnist": dict(lambda_cd=0.25, dt=0.05, n_langevin=50, steps_main=300_000, lr=1e-4),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (not usage + message)."""

    def error(self, message):
        die(f"{message} (see --help)")


def build_parser():
    p = Parser(
        description="Energy Matching (Balcerak et al.): train, sample, inpaint, LID, benchmark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", default="train", choices=MODES, help="what to do")
    a("--phase", default="warmup", choices=("warmup", "main"),
      help="train: warmup = Alg. 1 (flow loss only), main = Alg. 2 (flow + lambda_CD * CD) from a warmup ckpt")
    a("--recipe", default="code", choices=("code", "paper"),
      help="default hyper-parameters: the authors' code or the paper's Appendix C (flags below override)")
    # data
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    a("--data-dir", default="data", help="where datasets live / are downloaded")
    a("--image-size", type=int, default=None, help="image side for folder/fake (default 32; celeba64: 64)")
    a("--channels", type=int, default=3, help="channels for fake data")
    a("--fake-size", type=int, default=256, help="number of FakeData images")
    a("--workers", type=int, default=4, help="DataLoader worker processes (0 = load in the main process)")
    # run
    a("--out-dir", default=None, help="output folder (default runs/em_<dataset>)")
    a("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    a("--seed", type=int, default=0, help="random seed (each step and rank derives its own from it)")
    a("--batch-size", type=int, default=None, help="per-process batch size (recipe: 128)")
    a("--steps", type=int, default=None, help="training steps of this phase (recipe: 145k warmup / 2k main)")
    a("--lr", type=float, default=None, help="Adam learning rate (code 1.2e-3, paper 8e-4)")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95), help="Adam betas (authors' code)")
    a("--warmup", type=int, default=None, help="linear learning-rate warm-up steps (code: 10k)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay of the weights used for sampling")
    # model
    a("--arch", default="auto", choices=("auto", "unetvit", "cnn"),
      help="potential network: UNet+ViT (CIFAR-10/CelebA) or CNN+MLP (MNIST); auto picks by dataset")
    a("--model-size", type=float, default=None, help="width multiplier (1.0 = paper's ~50M CIFAR-10 net)")
    a("--res-blocks", type=int, default=2, help="UNet residual blocks per level")
    a("--ch-mult", default="1,2,2,2", help="UNet channel multipliers per resolution level")
    a("--vit-depth", type=int, default=8, help="ViT head layers")
    a("--dropout", type=float, default=0.1, help="dropout in UNet and ViT (authors' code)")
    a("--output-scale", type=float, default=1000.0, help="V = output_scale * head(x) (authors' code)")
    # method (Eq. 3, Alg. 2)
    a("--tau-star", type=float, default=None, help="tau*: eps(t) = 0 before it (code 1.0, paper 0.9)")
    a("--eps-max", type=float, default=None, help="eps_max: equilibrium temperature, p ∝ exp(-V/eps_max)")
    a("--lambda-cd", type=float, default=None, help="weight of the CD loss in phase 2 (code 1e-3, paper 2e-4)")
    a("--n-langevin", type=int, default=None, help="Langevin steps per negative chain (M_Langevin)")
    a("--dt", type=float, default=None, help="time step of Langevin chains and of the sampler")
    a("--cd-neg-clamp", type=float, default=1.0, help="clamp lambda_CD*CD from below at -this (0 = off; code)")
    a("--cd-trim", type=float, default=0.1, help="drop this fraction of highest negative energies (code)")
    a("--neg-data-frac", type=float, default=0.5, help="fraction of negatives started at data (paper: half)")
    a("--cd-separate-batch", action="store_true", help="draw a second data batch for CD (authors' code)")
    a("--flow-reduction", default="mean", choices=("mean", "sum"),
      help="flow loss per sample: mean over pixels (code) or sum = ||.||^2 (paper Alg. 1)")
    a("--no-ot", action="store_true", help="random instead of exact-OT pairs (ablation)")
    a("--flow-weighting", action="store_true",
      help="phase 2: weight the flow loss by w(t) = 1 before tau*, linear to 0 at t = 1 (authors' 2-D code)")
    a("--from-scratch", action="store_true", help="phase main without a warmup checkpoint (MNIST recipe)")
    # engineering
    a("--amp", default="auto", choices=("auto", "bf16", "none"),
      help="bf16 autocast of network passes (auto: bf16 on CUDA, none on CPU)")
    a("--compile", action="store_true", help="torch.compile the potential for Langevin/sampler passes")
    a("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    a("--resume", action="store_true", help="resume from --ckpt or <out-dir>/ckpt_<phase>.pt if it exists")
    a("--ckpt", default=None, help="checkpoint to load (main: default <out-dir>/ckpt_warmup.pt)")
    a("--log-every", type=int, default=100, help="log every N steps")
    a("--save-every", type=int, default=5000, help="checkpoint every N steps (0 = only at the end)")
    a("--sample-every", type=int, default=0, help="sample grid every N steps (0 = only at the end)")
    a("--num-samples", type=int, default=64, help="samples to draw (sample mode: e.g. 50000 for FID)")
    # sampler
    a("--tau-s", type=float, default=3.0, help="sampling time tau_s; K = tau_s / dt Heun steps (paper 3.0)")
    a("--sampler", default="heun", choices=("heun", "euler"), help="SDE integrator")
    a("--sample-batch", type=int, default=256, help="batch size when sampling")
    a("--no-ema", action="store_true", help="sample/evaluate with the raw weights instead of the EMA")
    # inverse problems (Alg. 3)
    a("--num-images", type=int, default=None, help="inpaint: images (default 4); lid: images (default 4096, paper)")
    a("--hole", type=float, default=0.5, help="inpaint: side of the masked centre square / image side")
    a("--zeta", type=float, default=0.1, help="inpaint: data-fidelity scale zeta (Eq. 8)")
    a("--sigma-int", type=float, default=1.0, help="inpaint: interaction strength sigma (Sec. 3.2)")
    a("--chains", type=int, default=2, help="inpaint: chains M per image")
    # LID
    a("--lid-tau", type=float, default=None, help="LID threshold |lambda| < tau (paper: 10 MNIST, 2 CIFAR-10)")
    a("--lid-method", default="auto", choices=("auto", "exact", "slq"),
      help="exact Hessian (small inputs) or stochastic Lanczos quadrature (auto: exact if d <= 1024)")
    a("--lid-probes", type=int, default=8, help="SLQ: Rademacher probe vectors")
    a("--lid-lanczos", type=int, default=60, help="SLQ: Lanczos steps per probe")
    # benchmark
    a("--bench-steps", type=int, default=20, help="benchmark: measured phase-1 steps per configuration")
    a("--bench-steps-main", type=int, default=5, help="benchmark: measured phase-2 steps per configuration")
    a("--bench-sample-steps", type=int, default=300, help="benchmark: Heun steps of the sampler measurement")
    return p


def resolve_args(args):
    """Fill the None defaults from the recipe and dataset row; validate; one line on stderr if invalid."""
    if args.dataset not in DATASETS:
        die(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    row = dict(RECIPES[args.recipe])
    row.setdefault("model_size", 1.0)
    row.update(DATASET_OVERRIDES.get(args.dataset, {}))
    for k in ("lr", "tau_star", "lambda_cd", "eps_max", "n_langevin", "dt", "batch_size", "warmup", "model_size"):
        if getattr(args, k) is None:
            setattr(args, k, row[k])
    if args.steps is None:
        args.steps = row["steps_warmup"] if args.phase == "warmup" else row["steps_main"]
    if args.image_size is None:
        args.image_size = 64 if args.dataset == "celeba64" else 32
    if args.lid_tau is None:
        args.lid_tau = 10.0 if args.dataset == "mnist" else 2.0
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"em_{args.dataset}")
    for k in ("steps", "batch_size", "n_langevin", "num_samples", "warmup", "log_every", "save_every",
              "sample_every", "bench_steps", "fake_size", "workers", "num_images"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            die(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if args.batch_size < 1 or args.dt <= 0 or args.model_size <= 0:
        die("--batch-size, --dt and --model-size must be positive")
    if not (0.0 <= args.neg_data_frac <= 1.0) or not (0.0 <= args.cd_trim < 1.0):
        die("--neg-data-frac must be in [0, 1] and --cd-trim in [0, 1)")
    return args


def args_to_dict(args):
    """A plain dict of str/int/float/bool/None/list for the checkpoint (weights_only=True can load it)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ======================================================================================================
# === 2. Data ===
# ======================================================================================================
# Images live in [-1, 1]: ToTensor gives [0, 1], Normalize(0.5, 0.5) maps it to [-1, 1].

def build_dataset(args, train=True):
    import torchvision.transforms as T
    from torchvision import datasets
    root = args.data_dir
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    flip = [T.RandomHorizontalFlip()] if train else []
    try:
        if args.dataset == "cifar10":
            return datasets.CIFAR10(root, train=train, download=True, transform=T.Compose(flip + [T.ToTensor(), norm]))
        if args.dataset == "mnist":
            return datasets.MNIST(root, train=train, download=True,
                                  transform=T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])]))
    except Exception as e:  # no internet, bad archive, ...
        name = {"cifar10": "cifar-10-batches-py/ (from cifar-10-python.tar.gz)", "mnist": "MNIST/raw/"}[args.dataset]
        die(f"could not load {args.dataset} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"put {name} under {os.path.abspath(root)} or allow the download")
    if args.dataset in ("celeba64", "folder"):
        path = os.path.join(root, "celeba64") if args.dataset == "celeba64" else root
        s = args.image_size
        tf = T.Compose([T.Resize(s), T.CenterCrop(s)] + flip + [T.ToTensor(), norm])
        try:
            return datasets.ImageFolder(path, transform=tf)
        except (FileNotFoundError, OSError) as e:
            what = ("CelebA images (e.g. img_align_celeba/*.jpg) in a sub-folder" if args.dataset == "celeba64"
                    else "images in at least one sub-folder")
            die(f"no image folder at {os.path.abspath(path)} ({type(e).__name__}); put {what} there")
    if args.dataset == "fake":
        c, s = args.channels, args.image_size
        tf = T.Compose([T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)])
        return datasets.FakeData(size=args.fake_size, image_size=(c, s, s), transform=tf,
                                 random_offset=0 if train else 10_000)
    die(f"unknown dataset {args.dataset!r}")


class StepBatches(torch.utils.data.Sampler):
    """Index batches as a pure function of (seed, rank, step): epoch e is a fixed permutation seeded by seed + e,
    split between ranks (rank::world). Starting at any step gives the same batches an uninterrupted run would
    have seen, which makes --resume exact (a DistributedSampler would restart its epoch)."""

    def __init__(self, n, batch, seed, rank=0, world=1, start_step=0):
        self.n, self.batch, self.seed, self.rank, self.world, self.start = n, batch, seed, rank, world, start_step
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


def batch_iterator(dataset, args, rank=0, world=1, start_step=0, pin=False):
    sampler = StepBatches(len(dataset), args.batch_size, args.seed, rank, world, start_step)
    # its own generator: creating the iterator must not consume the global RNG (resume would shift the noise)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=pin, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed + rank))
    it = iter(loader)
    return (x for x, _ in it)


def data_shape(args):
    c = 1 if args.dataset == "mnist" else (args.channels if args.dataset == "fake" else 3)
    s = 28 if args.dataset == "mnist" else args.image_size
    return (c, s, s)


# ======================================================================================================
# === 3. Networks ===
# ======================================================================================================
# The potential V: x (B, C, H, W) -> (B,). Velocity = -grad V by autograd (Section 4), never a network output.
# Smooth activations (SiLU, GELU) only: the flow loss differentiates grad V again, and LID needs the Hessian.

def _groups(ch):
    return math.gcd(32, ch)  # GroupNorm(32) at full width, fewer groups for the tiny test networks


class ResBlock(nn.Module):
    """Guided-diffusion ResBlock (as in Tong et al.'s UNet) without the time embedding: the authors feed a fixed
    dummy t, whose embedding is a constant per-channel vector added after conv1 -- i.e. a conv bias."""

    def __init__(self, cin, cout, dropout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.drop = nn.GroupNorm(_groups(cout), cout), nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight), nn.init.zeros_(self.c2.bias)   # zero_module: block starts as identity
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions (guided-diffusion AttentionBlock), via SDPA.

    SDPA picks a kernel; flash / memory-efficient kernels have no double backward, so the flow loss (which needs
    d/dtheta of grad_x V) runs under the math kernel (see grad_V). Everything else may use the fast kernels."""

    def __init__(self, ch, head_ch=64):
        super().__init__()
        self.heads = max(1, ch // head_ch)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))                         # (B, 3C, N)
        # heads first, then (q, k, v) per head: guided-diffusion's "legacy" order. contiguous() so the last dim
        # has stride 1, which the flash / memory-efficient kernels require (else SDPA falls back to math).
        qkv = qkv.reshape(B, self.heads, 3 * C // self.heads, H * W).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)                                            # each (B, heads, N, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)                               # softmax(q k^T / sqrt(d)) v
        h = h.transpose(2, 3).reshape(B, C, H * W)
        return x + self.proj(h).reshape(B, C, H, W)


class TransformerBlock(nn.Module):
    """Post-LN encoder layer, identical in function to nn.TransformerEncoderLayer(gelu, 4x MLP) used by the
    authors, written out so we control the SDPA kernel."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = self.ln1(x + self.drop1(self.out(h)))
        return self.ln2(x + self.drop2(self.ff(x)))


class UNetViTPotential(nn.Module):
    """The paper's CIFAR-10 potential (Fig. 5): UNet (no time) -> 3-channel map -> PatchEmbed(4) + 8-layer ViT
    (384 wide, 4 heads) -> mean-pool -> Linear -> scalar, times output_scale (1000 in the authors' code).
    Width 128, channel mult (1, 2, 2, 2), 2 ResBlocks per level, attention at 16x16 and in the middle,
    dropout 0.1: ~36M (UNet) + ~14M (ViT) = ~50M parameters at size 1.0; `size` scales all widths."""

    def __init__(self, shape=(3, 32, 32), size=1.0, res_blocks=2, vit_depth=8, dropout=0.1, output_scale=1000.0,
                 ch_mult=(1, 2, 2, 2), attn_res=(16,), patch=4):
        super().__init__()
        C, H, W = shape
        ch = max(8, int(round(128 * size / 8)) * 8)
        dim = max(16, int(round(384 * size / 4)) * 4)
        self.output_scale = output_scale
        self.inp = nn.Conv2d(C, ch, 3, padding=1)
        # encoder: remember every skip's channel count
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, H
        for lvl, m in enumerate(ch_mult):
            for _ in range(res_blocks):
                blk = [ResBlock(cur, ch * m, dropout)]
                cur = ch * m
                if res in attn_res:
                    blk.append(SelfAttention2d(cur))
                self.down.append(nn.Sequential(*blk))
                skips.append(cur)
            if lvl < len(ch_mult) - 1:                                   # Downsample: stride-2 conv
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid = nn.Sequential(ResBlock(cur, cur, dropout), SelfAttention2d(cur), ResBlock(cur, cur, dropout))
        # decoder: res_blocks + 1 blocks per level, each eats one skip; upsample at the end of a level
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(ch_mult))):
            for i in range(res_blocks + 1):
                blk = [ResBlock(cur + skips.pop(), ch * m, dropout)]
                cur = ch * m
                if res in attn_res:
                    blk.append(SelfAttention2d(cur))
                if lvl > 0 and i == res_blocks:
                    blk.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blk.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(nn.Sequential(*blk))
        self.out = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(), nn.Conv2d(cur, C, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)   # zero_module, as in the UNet
        # ViT head on the UNet's C-channel output
        self.patch = nn.Conv2d(C, dim, patch, stride=patch)
        nn.init.xavier_uniform_(self.patch.weight)
        self.pos = nn.Parameter(torch.zeros(1, (H // patch) * (W // patch), dim))
        heads = 4 if dim % 4 == 0 else 1
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout) for _ in range(vit_depth)])
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = blk(h)
            hs.append(h)
        h = self.mid(h)
        for blk in self.up:
            h = blk(torch.cat([h, hs.pop()], dim=1))
        u = self.out(h)                                                  # (B, C, H, W)
        tok = self.patch(u).flatten(2).transpose(1, 2) + self.pos        # (B, N, dim)
        pooled = self.blocks(tok).mean(dim=1)                            # mean-pool over tokens
        # The scalar head runs in fp32 even under bf16 autocast: CD subtracts energies of size ~1e3 that differ
        # in the 3rd digit, which bf16 (8-bit mantissa) cannot resolve.
        with torch.autocast(device_type=x.device.type, enabled=False):
            v = self.head(pooled.float()).squeeze(-1)
        return v * self.output_scale


class CNNPotential(nn.Module):
    """The MNIST potential (Appendix C): a two-stage CNN then a two-layer MLP, ~2M parameters at size 1.0."""

    def __init__(self, shape=(1, 28, 28), size=1.0):
        super().__init__()
        C, H, W = shape
        c1, c2, hid = max(4, int(32 * size)), max(8, int(64 * size)), max(8, int(256 * size))
        self.features = nn.Sequential(
            nn.Conv2d(C, c1, 3, padding=1), nn.SiLU(), nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.SiLU(),  # stage 1
            nn.Conv2d(c2, 2 * c2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c2, 2 * c2, 4, stride=2, padding=1), nn.SiLU())                                      # stage 2
        n = 2 * c2 * (H // 4) * (W // 4)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(n, hid), nn.SiLU(), nn.Linear(hid, 1))

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.mlp(self.features(x).float()).squeeze(-1)


def build_model(args):
    shape = data_shape(args)
    arch = args.arch if args.arch != "auto" else ("cnn" if args.dataset == "mnist" else "unetvit")
    if arch == "cnn":
        return CNNPotential(shape, args.model_size)
    if shape[1] % 4 or shape[1] < 8:
        die(f"the UNet+ViT potential needs an image side divisible by 4 and >= 8, got {shape[1]}")
    try:
        mult = tuple(int(c) for c in str(args.ch_mult).split(","))
    except ValueError:
        die(f"--ch-mult must be comma-separated integers, got {args.ch_mult!r}")
    if shape[1] % (2 ** (len(mult) - 1)):
        die(f"image side {shape[1]} is not divisible by 2^{len(mult) - 1} (--ch-mult {args.ch_mult})")
    return UNetViTPotential(shape, args.model_size, args.res_blocks, args.vit_depth, args.dropout, args.output_scale,
                            ch_mult=mult)


def count_params(m):
    return sum(p.numel() for p in m.parameters())


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
    if t >= 1.0:
        return float(eps_max)                                        # equilibrium regime
    if t < tau_star:
        return 0.0                                                   # flow regime: no entropy
    return float(eps_max) * (t - tau_star) / (1.0 - tau_star)        # linear ramp between tau* and 1


@torch.no_grad()
def ot_pair(x0, x1):
    """Exact minibatch OT coupling (Alg. 1 line 5): return x0 reordered so (x0_perm[i], x1[i]) are paired.

    Cost M_ij = ||x0_i - x1_j||^2 on flattened samples (Eq. 2), uniform weights 1/B on both sides; POT's
    network simplex `ot.emd` returns a vertex of the transport polytope, which for two uniform clouds of equal
    size is a permutation matrix / B (Birkhoff), so each column has exactly one non-zero entry.
    The cost is computed in float64 on the CPU: fp32/bf16 cancellation in |a|^2 + |b|^2 - 2ab would make the
    plan depend on the precision, and the solver wants float64 anyway. Under DDP each rank pairs its own batch.
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


def math_sdpa():
    """Context: attention through the math SDPA kernel (the only one with a double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def grad_V(V, x, create_graph=False, autocast=None):
    """grad_x V(x) for a batch: autograd of sum_i V(x_i) (samples are independent, so this is per-sample).

    create_graph=True only in training (the flow loss differentiates the gradient again w.r.t. theta); it then
    runs attention through the math kernel. Samplers and Langevin chains use create_graph=False and detach,
    which is the stop-gradient sg(.) of Alg. 2. `autocast` is an optional context-manager factory (bf16 network
    passes); the returned gradient is cast to x's dtype (fp32) so all update arithmetic stays in fp32.
    """
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    kern = math_sdpa() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), kern:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with ctx:
            e = V(x)
        g, = torch.autograd.grad(e.float().sum(), x, create_graph=create_graph)
    return g.to(x.dtype)


def randn(x):
    """N(0, I) noise shaped like x, drawn in logical (NCHW) order: torch.randn_like on a channels_last tensor fills
    memory in NHWC order, so the same seed would give different noise per pixel with and without --channels-last."""
    return torch.randn(x.shape, device=x.device, dtype=x.dtype)


def _bcast(v, x):
    """Reshape a per-sample (B,) tensor to broadcast against x of shape (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


class EnergyMatching:
    """The method: a scalar potential V(x) (any nn.Module returning (B,)) and its two losses and samplers.

    Samples move along -grad V. Boltzmann density of the learned model: p(x) ∝ exp(-V(x) / eps_max)  (Eq. 6).
    Defaults follow the authors' CIFAR-10 code (REFERENCE_NOTES): tau* = 1.0, eps_max = 0.01, lambda_CD = 1e-3,
    200 Langevin steps of dt = 0.01, lambda_CD*CD clamped from below at -1, top 10 % negative energies trimmed.
    The paper's Appendix C (tau* = 0.9, lambda_CD = 2e-4) is `--recipe paper` in main().
    V_fast (optional) is used where no double backward is needed (Langevin chains, sampler): e.g. a
    torch.compile'd V, which cannot do the flow loss's double backward.
    """

    def __init__(self, V, tau_star=1.0, eps_max=0.01, lambda_cd=1e-3, n_langevin=200, dt=0.01,
                 cd_neg_clamp=1.0, cd_trim=0.1, neg_data_frac=0.5, flow_reduction="mean", tau_s=3.0,
                 clamp_negatives=None, autocast=None, use_ot=True, V_fast=None, flow_weighting=False,
                 same_temperature=False, chain_clock=None, ot_sigma=0.0):
        self.V, self.V_fast = V, (V_fast if V_fast is not None else V)
        self.tau_star, self.eps_max, self.lambda_cd = float(tau_star), float(eps_max), float(lambda_cd)
        self.n_langevin, self.dt = int(n_langevin), float(dt)
        self.cd_neg_clamp = cd_neg_clamp       # lambda*CD clamped from below at -cd_neg_clamp (0/None: off)
        self.cd_trim = float(cd_trim)          # fraction of the highest negative energies dropped (trimmed mean)
        self.neg_data_frac = float(neg_data_frac)   # fraction of negatives started at data (paper: half)
        self.flow_reduction = flow_reduction   # "mean" over pixels (authors' code) or "sum" (paper's ||.||^2)
        self.tau_s = float(tau_s)
        self.clamp_negatives = clamp_negatives  # e.g. (-1, 1) for images, as in the authors' chains
        self.autocast = autocast               # context-manager factory for bf16 network passes, or None
        self.use_ot = use_ot
        self.flow_weighting = bool(flow_weighting)   # phase 2 only: fade the flow loss out for t > tau* (2-D code)
        self.same_temperature = bool(same_temperature)  # data-started negatives follow eps(t) too
        self.chain_clock = chain_clock         # m -> chain time t of Langevin step m (default m * dt)
        self.ot_sigma = float(ot_sigma)        # std of the Gaussian tube around x_t (OT-CFM's sigma)

    def eps(self, t):
        """eps(t) of Eq. (3) with this model's tau* and eps_max."""
        return temperature(t, self.tau_star, self.eps_max)

    def energy(self, x, V=None):
        """V(x) as fp32 (B,), the network optionally under autocast."""
        ctx = self.autocast() if self.autocast is not None else contextlib.nullcontext()
        with ctx:
            e = (V if V is not None else self.V)(x)
        return e.float()

    # --- phase 1: the flow-like objective L_OT (Sec. 2.1.1, Alg. 1) ---
    def flow_weight(self, t):
        """Phase-2 flow weight of the authors' 2-D code (not in the paper): w(t) = 1 for t < tau*, falling
        linearly to 0 at t = 1. Near the data (t -> 1) the flow asks grad V = x0 - x1 != 0 while CD asks the data
        to sit in minima of V (grad V = 0); fading the flow out there leaves that region to CD."""
        if self.tau_star >= 1.0:
            return torch.ones_like(t)
        return ((1.0 - t) / (1.0 - self.tau_star)).clamp(0.0, 1.0)   # = 1 for t <= tau*, (1-t)/(1-tau*) after

    def flow_loss(self, x1, x0, weighted=False):
        """L_OT: -grad V at a point of the straight noise -> data path must equal the path's velocity x1 - x0,
        i.e. the residual grad V(x_t) + (x1 - x0) must vanish. x0 is re-paired by exact minibatch OT first.
        weighted=True multiplies each sample's residual by flow_weight(t) (used by loss() in phase 2 when
        flow_weighting is on)."""
        if self.use_ot:
            x0 = ot_pair(x0, x1)                                     # Alg. 1 line 5: T = OT map noise -> data
        t = torch.rand(x1.shape[0], device=x1.device)                # Alg. 1 line 6: t ~ U(0, 1), per sample
        tb = _bcast(t, x1)
        xt = tb * x1 + (1 - tb) * x0                                 # x_t = (1 - t) T(x_data) + t x_data
        if self.ot_sigma > 0:
            xt = xt + self.ot_sigma * randn(xt)                      # OT-CFM's tube around the path
        g = grad_V(self.V, xt, create_graph=True, autocast=self.autocast)   # grad V(x_t), graph kept for theta
        r = (g.float() + (x1 - x0)).flatten(1).pow(2)                # || grad V(x_t) + x_data - T(x_data) ||^2
        r = r.mean(1) if self.flow_reduction == "mean" else r.sum(1)
        if weighted:
            r = self.flow_weight(t) * r                              # w(t) ||.||^2  (authors' 2-D phase 2)
        return r.mean()

    # --- phase 2: the contrastive objective L_CD (Sec. 2.1.2, Alg. 2 lines 5-15) ---
    def negatives(self, x1, x0):
        """Langevin negatives: the first neg_data_frac of the batch starts at data and keeps eps = eps_max
        (Alg. 2 line 10), the rest starts at noise x0 and follows eps(t) of Eq. (3), t = m * dt."""
        B = x1.shape[0]
        at_data = torch.arange(B, device=x1.device) < int(round(self.neg_data_frac * B))
        x_init = torch.where(_bcast(at_data, x1), x1, x0)
        e_max = torch.full((B,), self.eps_max, device=x1.device)

        def eps_fn(t):                                               # per-sample temperature at chain time t
            if self.chain_clock is not None:
                t = self.chain_clock(int(round(t / self.dt)))        # langevin passes t = m * dt
            e_t = torch.full_like(e_max, self.eps(t))
            return e_t if self.same_temperature else torch.where(at_data, e_max, e_t)

        x_neg = langevin(self.V_fast, x_init, self.n_langevin, self.dt, eps_fn, clamp=self.clamp_negatives,
                         autocast=self.autocast)
        return x_neg, at_data

    def cd_loss(self, x1, x0):
        """L_CD = E_data[V(x)] - E_neg[V(x~)], x~ = sg(Langevin chain) (Alg. 2 lines 13-15). The paper divides
        both by eps_max; the authors' code does not (the constant is absorbed by lambda_CD): we follow the code.
        The negative mean is trimmed (code): the cd_trim fraction of highest negative energies is dropped."""
        x_neg, _ = self.negatives(x1, x0)      # the network stays in train mode (dropout on), as in the code
        e_pos = self.energy(x1)                                      # Alg. 2 line 14: V on data
        e_neg = self.energy(x_neg)                                   # Alg. 2 line 13: V on negatives
        B = e_neg.shape[0]
        k = int(self.cd_trim * B)
        neg_stat = e_neg.sort().values[: B - k].mean() if k > 0 else e_neg.mean()   # trimmed mean
        cd = e_pos.mean() - neg_stat                                 # Alg. 2 line 15
        return cd, {"cd": cd.item(), "e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item()}

    def loss(self, x1, x0, phase="warmup", x1_cd=None, x0_cd=None):
        """phase "warmup": L_OT (Alg. 1). phase "main": L_OT + lambda_CD L_CD (Alg. 2 line 16), where (authors'
        code) lambda_CD L_CD is clamped from below at -cd_neg_clamp so a run-away CD term cannot dominate.
        x1_cd: an optional second data batch for CD (authors' code); default the same batch (paper).
        x0_cd: the starts of the noise-started negatives; default x0 itself (Alg. 2: x~ starts at x0 ~ N(0, I)).
        Pass source samples here when the source is not N(0, I) (the 2-D figure starts them at 8 Gaussians)."""
        if phase not in ("warmup", "main"):
            raise ValueError(f"phase must be 'warmup' or 'main', got {phase!r}")
        flow = self.flow_loss(x1, x0, weighted=(phase == "main" and self.flow_weighting))
        logs = {"flow": flow.item()}
        if phase == "warmup" or self.lambda_cd == 0:
            logs["loss"] = logs["flow"]
            return flow, logs
        x1_cd = x1 if x1_cd is None else x1_cd
        if x0_cd is None:
            x0_cd = x0 if x0.shape == x1_cd.shape else randn(x1_cd)
        cd, cd_logs = self.cd_loss(x1_cd, x0_cd)
        cd_term = self.lambda_cd * cd
        if self.cd_neg_clamp:
            cd_term = torch.clamp(cd_term, min=-float(self.cd_neg_clamp))
        total = flow + cd_term
        logs.update(cd_logs, cd_term=cd_term.item(), loss=total.item())
        return total, logs

    # --- sampling (section 5 below holds the integrators) ---
    def sample(self, x0, tau_s=None, dt=None, method="heun", clamp=None, return_traj=False):
        """Integrate dx = -grad V(x) dt + sqrt(2 eps(t)) dW from t = 0 to tau_s (see `sde_sample`)."""
        return sde_sample(self.V_fast, x0, self.eps, self.tau_s if tau_s is None else tau_s,
                          self.dt if dt is None else dt, method=method, clamp=clamp, return_traj=return_traj,
                          autocast=self.autocast)


# ======================================================================================================
# === 5. Samplers ===
# ======================================================================================================
# All states and updates are fp32; only the network pass inside grad_V may run in bf16 (autocast). A Langevin
# step moves x by dt * grad V ~ 1e-2 per pixel: bf16 would round such increments away on x ~ 1.

def langevin(V, x, n_steps, dt, eps, t0=0.0, clamp=None, return_traj=False, autocast=None):
    """Unadjusted Langevin chain, Alg. 2 lines 6-12:  x <- x - dt grad V(x) + sqrt(2 dt eps) eta,  eta ~ N(0, I).

    Its stationary law (dt -> 0, constant eps) is p(x) ∝ exp(-V(x) / eps)  (Eq. 6).
    eps: a float, a per-sample (B,) tensor, or a callable t -> float | (B,) tensor evaluated at t = t0 + m dt
    (the eps(t) schedule of Eq. 3). The chain is detached: no gradient flows back through it (sg in Alg. 2).
    clamp=(lo, hi) clamps the final state only (authors' code). Returns x, or (x, traj), traj (n_steps+1, B, ...).
    """
    x = x.detach().float()
    traj = [x] if return_traj else None
    for m in range(n_steps):
        e = eps(t0 + m * dt) if callable(eps) else eps
        g = grad_V(V, x, autocast=autocast)                          # grad V(x^(m)), no graph kept
        if torch.is_tensor(e):
            noise_std = _bcast(torch.sqrt(2.0 * dt * e.to(x)), x)   # sqrt(2 dt eps_i), per sample
        else:
            noise_std = math.sqrt(2.0 * dt * float(e))
        x = (x - dt * g + noise_std * randn(x)).detach()  # Alg. 2 line 8
        if return_traj:
            traj.append(x)
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x, torch.stack(traj)) if return_traj else x


def sde_sample(V, x0, eps, tau_s, dt, method="heun", clamp=None, return_traj=False, autocast=None):
    """Integrate dx = -grad V(x) dt + sqrt(2 eps(t)) dW from t = 0 to tau_s in K = round(tau_s / dt) steps.

    eps(t) follows Eq. (3): a deterministic OT-like flow first, Langevin at eps_max after t = 1. With
    s(t) = sqrt(2 eps(t)) and dW = sqrt(dt) eta, eta ~ N(0, I):
    "euler": Euler-Maruyama, x' = x - dt grad V(x) + s(t) dW  (= Alg. 2 line 8).
    "heun":  Stratonovich Euler-Heun, as torchsde's "heun" used by the authors (one dW for both stages):
             x~ = x - dt grad V(x) + s(t) dW;   x' = x - dt/2 (grad V(x) + grad V(x~)) + (s(t) + s(t+dt))/2 dW.
    The noise is additive (s depends on t only), so Ito and Stratonovich agree. With eps = 0 both are the plain
    ODE solvers (Heun 2nd order, Euler 1st order). clamp=(lo, hi) clamps the final state only (authors: [-1, 1]
    for images). Returns x, or (x, traj) with traj (K+1, B, ...).
    """
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
    K = max(1, int(round(float(tau_s) / float(dt))))
    x = x0.detach().float()
    traj = [x] if return_traj else None
    for k in range(K):
        s0 = math.sqrt(2.0 * float(eps(k * dt)))                     # s(t_k)
        s1 = math.sqrt(2.0 * float(eps((k + 1) * dt)))               # s(t_k + dt)
        dW = math.sqrt(dt) * randn(x) if s0 + s1 > 0 else torch.zeros_like(x)
        g = grad_V(V, x, autocast=autocast)
        x_pred = x - dt * g + s0 * dW                                # Euler-Maruyama step (= Heun's predictor)
        if method == "heun":
            g2 = grad_V(V, x_pred, autocast=autocast)
            x = x - 0.5 * dt * (g + g2) + 0.5 * (s0 + s1) * dW       # trapezoidal corrector, same dW
        else:
            x = x_pred
        x = x.detach()
        if return_traj:
            traj.append(x)
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x, torch.stack(traj)) if return_traj else x


def inverse_langevin(V, y, A, n_chains, tau_s, dt, eps, zeta, sigma=None, Bmask=None, x_init=None, clamp=None,
                     autocast=None, return_traj=False):
    """Algorithm 3: posterior sampling for y = A x + w with the learned prior, optional repulsive interaction.

    y: (N, ...) observations, A: 0/1 mask of shape (...) or (N, ...) (a diagonal measurement operator), M =
    n_chains chains per observation, all started at x ~ N(0, I). At step n (t = n dt, eps = eps(t) of Eq. 3):
        U_m = eps/zeta^2 ||y - A x_m||^2 + V(x_m) - eps/sigma^2 sum_{k != m} ||B (x_m - x_k)||^2
        x_m <- x_m - dt grad_{x_m} U_m + sqrt(2 eps dt) eta
    so that at eps_max the chains sample p(x | y) ∝ exp(-||y - Ax||^2 / zeta^2 - V(x)/eps_max)  (Eq. 7-8).
    Interaction (Sec. 3.2): p(x_1..x_M | y) ∝ prod_m p(x_m | y) exp(+W), W = ||B (x_m - x_k)||^2 / sigma^2, i.e.
    repulsion inside region B. Alg. 3 prints "+ eps/sigma^2 sum W" (attraction, sigma^2 twice); we implement the
    repulsion the text asks for, with sigma^2 once. sigma=None: no interaction. Each chain's gradient treats the
    other chains as fixed, as in Alg. 3. The fidelity and interaction gradients are written in closed form.
    Returns x of shape (N, M, ...) (and the trajectory if asked).
    """
    N, shape = y.shape[0], tuple(y.shape[1:])
    M = n_chains
    y_r = y.float().unsqueeze(1)                                      # (N, 1, ...)
    A_r = (A.float().unsqueeze(1) if A.dim() == y.dim() else A.float())
    B_r = None
    if sigma is not None:
        B_r = torch.ones_like(A_r) if Bmask is None else (Bmask.float().unsqueeze(1) if Bmask.dim() == y.dim()
                                                          else Bmask.float())
    x = torch.randn(N, M, *shape, device=y.device) if x_init is None else x_init.detach().float().clone()
    traj = [x] if return_traj else None
    K = max(1, int(math.floor(float(tau_s) / float(dt))))            # Alg. 3 line 4: N = floor(tau_s / dt)
    for n in range(K):
        e = float(eps(n * dt))
        g_prior = grad_V(V, x.reshape(N * M, *shape), autocast=autocast).reshape(x.shape)   # grad V(x_m)
        g = g_prior + (e / zeta ** 2) * 2.0 * A_r * (A_r * x - y_r)  # grad eps/zeta^2 ||y - Ax||^2 (A diagonal)
        if B_r is not None and M > 1:
            diff_sum = M * x - x.sum(dim=1, keepdim=True)            # sum_{k != m} (x_m - x_k)
            g = g - (e / sigma ** 2) * 2.0 * B_r * B_r * diff_sum    # grad of -eps/sigma^2 sum ||B(x_m - x_k)||^2
        x = (x - dt * g + math.sqrt(2.0 * e * dt) * randn(x)).detach()
        if return_traj:
            traj.append(x)
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x, torch.stack(traj)) if return_traj else x


# ======================================================================================================
# === 6. Training loop (CUDA, AMP, EMA, DDP) ===
# ======================================================================================================
# Mixed precision (bf16 autocast, --amp): what runs where
#   bf16: the network's forward, the first backward (grad_x V) and the second backward (d/dtheta) -- the bulk of
#         the FLOPs. GroupNorm/LayerNorm/softmax are kept in fp32 by autocast itself.
#   fp32: the scalar head (CD differences of ~1e3-sized energies), the loss arithmetic, every Langevin/sampler
#         state and update, parameters, Adam and EMA (autocast never touches them), gradient clipping.
#   fp64: the OT cost matrix and solver.  No GradScaler: bf16 has fp32's exponent range.
#   fp32 only (no autocast at all): LID Hessians (eigenvalues are compared with a threshold) and inpainting.
#   Checked: on CPU, bf16 and fp32 phase-1 loss curves agree to ~0.4 % (tests, --mode benchmark) once oneDNN is off
#   (its bf16 conv double backward is wrong, see make_autocast). The CUDA path could not be measured here.
# Attention kernels: the flow loss needs a double backward, which only the math SDPA kernel has, so grad_V
# switches to it when create_graph=True; Langevin chains, CD energies and the sampler may use flash/efficient
# kernels. The authors run fp32 + math attention everywhere (see --mode benchmark).
# DDP: torch's DistributedDataParallel does not support torch.autograd.grad (documented), and one Energy Matching
# step calls V hundreds of times (flow loss, Langevin steps, CD energies). So we keep one plain module per process
# and average the gradients ourselves after backward with one all_reduce -- the same maths DDP does, no overlap.
# Each rank draws its own data shard, its own noise, and pairs its own minibatch by OT (as the authors do).

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
        import torch.distributed as dist
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def make_autocast(amp, device):
    """A factory of autocast contexts (bf16), or None for plain fp32.

    CPU + bf16: oneDNN's bf16 convolution double backward returns wrong weight gradients in the torch version we
    tested (2.14 CPU: ~100 % relative error against fp32 on conv -> SiLU -> conv, 0.3 % with PyTorch's native
    kernels), so bf16 on CPU switches oneDNN off for the whole process. (bf16 on CPU is for testing this code
    path; it is not faster there. CUDA uses cuDNN and is not affected by this switch.)"""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return None
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_em(V, args, V_fast=None, autocast=None, clamp=(-1.0, 1.0)):
    """The EnergyMatching object with the hyper-parameters from the (resolved) command line."""
    return EnergyMatching(V, tau_star=args.tau_star, eps_max=args.eps_max, lambda_cd=args.lambda_cd,
                          n_langevin=args.n_langevin, dt=args.dt, cd_neg_clamp=args.cd_neg_clamp,
                          cd_trim=args.cd_trim, neg_data_frac=args.neg_data_frac,
                          flow_reduction=args.flow_reduction, tau_s=args.tau_s, clamp_negatives=clamp,
                          autocast=autocast, use_ot=not args.no_ot, V_fast=V_fast,
                          flow_weighting=args.flow_weighting)


@torch.no_grad()
def ema_update(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta  (one fused foreach op)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_e, b in zip(ema.buffers(), model.buffers()):
        b_e.copy_(b)


def allreduce_grads(model, world):
    """Average the gradients of all ranks (what DDP does), in one flat buffer."""
    import torch.distributed as dist
    params = list(model.parameters())
    for p in params:
        if p.grad is None:                      # e.g. the head bias: grad_x V does not depend on it (phase 1)
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p))
        i += n


def step_seed(seed, step, rank):
    """Every (step, rank) gets its own seed, so a resumed run draws exactly the numbers a straight run draws."""
    return (seed * 1_000_003 + step * 4099 + rank * 7) % (2 ** 62)


def to_device(x, device, channels_last):
    x = x.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def train_step(em, model, opt, x1, phase, args, world, step, x1_cd=None):
    """One optimisation step; returns the logs (python floats). Learning rate: linear warm-up (authors' code)."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    for g in opt.param_groups:
        g["lr"] = lr
    x0 = randn(x1)                                                   # Alg. 1 line 4: x0 ~ N(0, I)
    loss, logs = em.loss(x1, x0, phase=phase, x1_cd=x1_cd)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        allreduce_grads(model, world)
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    logs["lr"], logs["grad_norm"] = lr, float(gn)
    if math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]):
        opt.step()                                                   # never apply a NaN/Inf update
    return logs


class Logger:
    """Plain-text log (stdout + <out>/train.log) and JSON-lines metrics (<out>/metrics.jsonl), rank 0 only."""

    def __init__(self, out_dir, active=True):
        self.active, self.out_dir = active, out_dir

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            with open(os.path.join(self.out_dir, "train.log"), "a") as f:
                f.write(msg + "\n")

    def metrics(self, rec):
        if self.active:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")


def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to output folder {os.path.abspath(path)} ({e.strerror or e})")


def to_uint8(x):
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, H, W, C), the layout eval_fid.py reads."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8):
    from torchvision.utils import save_image
    save_image((x[:nrow * nrow].float().clamp(-1, 1) + 1) / 2, path, nrow=nrow)


def plot_losses(records, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("flow", "cd_term"):
        vals = [r[key] for r in records if key in r]
        if vals:
            ax.plot(steps[:len(vals)], vals, label=key)
    ax.set_xlabel("step"), ax.set_yscale("symlog", linthresh=1e-3), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_samples(V, args, n, shape, device, autocast=None, batch=None):
    """n samples from the EMA potential: K = tau_s / dt Heun steps from N(0, I), clamped to [-1, 1]."""
    em = build_em(V, args, autocast=autocast)
    out, batch = [], batch or args.sample_batch
    for i in range(0, n, batch):
        x0 = torch.randn(min(batch, n - i), *shape, device=device)
        out.append(em.sample(x0, method=args.sampler, clamp=(-1.0, 1.0)).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def train(args):
    rank, world, device = setup_distributed(args)
    main_rank = rank == 0
    if main_rank:
        prepare_out_dir(args.out_dir)
    log = Logger(args.out_dir, main_rank)
    phase = args.phase
    ckpt_path = os.path.join(args.out_dir, f"ckpt_{phase}.pt")
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas))
    start_step, phase_start = 0, 0

    # --- where do the weights come from? resume (same phase) > phase-1 checkpoint (phase main) > fresh ---
    resume_ck = None
    if args.resume:
        for cand in (ckpt_path, args.ckpt):
            if cand and os.path.exists(cand):
                ck = load_checkpoint(cand, device)
                if ck.get("phase") == phase:
                    resume_ck, src = ck, cand
                    break
        if resume_ck is None:
            log(f"--resume: no '{phase}' checkpoint in {ckpt_path} or --ckpt; starting this phase afresh")
    if resume_ck is not None:
        load_states(resume_ck, model, ema, opt, src)
        start_step, phase_start = int(resume_ck["step"]), int(resume_ck.get("phase_start", 0))
        log(f"resumed from {src} at step {start_step}")
    elif phase == "main" and not args.from_scratch:
        src = args.ckpt or os.path.join(args.out_dir, "ckpt_warmup.pt")
        if not os.path.exists(src):
            die(f"phase main starts from a phase-1 checkpoint: {src} not found "
                f"(run --phase warmup first, pass --ckpt, or --from-scratch)")
        ck = load_checkpoint(src, device)
        load_states(ck, model, ema, opt, src)
        start_step = phase_start = int(ck["step"])                   # lr warm-up is over; step count goes on
        log(f"phase main from {src} (phase-1 step {start_step})")
    end_step = phase_start + args.steps
    if world > 1:                                                    # identical weights everywhere
        import torch.distributed as dist
        for t in list(model.state_dict().values()) + list(ema.state_dict().values()):
            dist.broadcast(t, 0)

    autocast = make_autocast(args.amp, device)
    V_fast = torch.compile(model) if args.compile else None         # no double backward: chains/sampler only
    em = build_em(model, args, V_fast=V_fast, autocast=autocast)
    dataset = build_dataset(args, train=True)
    shape = tuple(dataset[0][0].shape)
    per_step = 2 if (args.cd_separate_batch and phase == "main") else 1
    bargs = copy.copy(args)
    bargs.batch_size = args.batch_size * per_step
    batches = batch_iterator(dataset, bargs, rank, world, start_step, pin=device.type == "cuda")
    log(f"energy_matching | phase {phase} | {args.dataset} {shape} | {count_params(model) / 1e6:.2f}M params | "
        f"device {device} x {world} | {'bf16 autocast' if autocast else 'fp32'} | steps {start_step}->{end_step}"
        f" | batch {args.batch_size}"
        f"/rank | lr {args.lr} tau* {args.tau_star} eps_max {args.eps_max} lambda_CD {args.lambda_cd}")

    records, t_last, s_last = [], time.time(), start_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for step in range(start_step, end_step):
        torch.manual_seed(step_seed(args.seed, step, rank))
        xb = to_device(next(batches), device, args.channels_last)
        x1, x1_cd = (xb.chunk(2) if per_step == 2 else (xb, None))
        logs = train_step(em, model, opt, x1, phase, args, world, step, x1_cd=x1_cd)
        bad = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
        if world > 1:
            import torch.distributed as dist
            flag = torch.tensor([float(bad)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.item() > 0
        if bad:
            last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            print(f"error: non-finite loss or gradient at step {step} ({logs}); stopped without updating; "
                  f"last good checkpoint: {last}", file=sys.stderr)
            sys.exit(3)
        ema_update(ema, model, args.ema_decay)
        rec = {"step": step + 1, **{k: round(v, 6) for k, v in logs.items()}}
        records.append(rec)
        done = step + 1
        if args.log_every and (done % args.log_every == 0 or done == end_step):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt_wall = time.time() - t_last
            n = done - s_last
            ms = 1000 * dt_wall / max(n, 1)
            ips = n * args.batch_size * world / max(dt_wall, 1e-9)
            eta = (end_step - done) * dt_wall / max(n, 1)
            rec.update(ms_per_iter=round(ms, 2), images_per_s=round(ips, 1))
            log(f"step {done}/{end_step} | " + " ".join(f"{k} {v:.4g}" for k, v in logs.items()) +
                f" | {ms:.1f} ms/it | {ips:.1f} img/s | ETA {eta / 60:.1f} min")
            t_last, s_last = time.time(), done
        log.metrics(rec)
        if main_rank and args.save_every and done % args.save_every == 0 and done < end_step:
            save_checkpoint(ckpt_path, model, ema, opt, done, args, phase=phase, phase_start=phase_start)
        if main_rank and args.sample_every and done % args.sample_every == 0 and done < end_step:
            ema.eval()
            save_grid(draw_samples(ema, args, min(64, args.num_samples), shape, device, autocast),
                      os.path.join(args.out_dir, f"samples_{phase}_{done}.png"))

    summary = {"phase": phase, "steps": end_step, "params": count_params(model)}
    if records:
        summary.update(final={k: v for k, v in records[-1].items()})
    if device.type == "cuda":
        summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    if main_rank:
        save_checkpoint(ckpt_path, model, ema, opt, end_step, args, phase=phase, phase_start=phase_start)
        if records:
            plot_losses(records, os.path.join(args.out_dir, f"loss_{phase}.png"), f"Energy Matching, {phase}")
        if args.num_samples > 0 and end_step > start_step:
            ema.eval()
            save_grid(draw_samples(ema, args, min(64, args.num_samples), shape, device, autocast),
                      os.path.join(args.out_dir, f"samples_{phase}.png"))
        with open(os.path.join(args.out_dir, f"summary_{phase}.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log(f"saved {ckpt_path}")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return records


# ======================================================================================================
# === 7. Checkpointing ===
# ======================================================================================================
# A checkpoint is a plain dict of tensors and plain python values, readable with torch.load(weights_only=True):
#   {"format": "energy_matching/v1", "model", "ema", "opt", "step", "phase", "phase_start", "args"}.
# Written to <path>.tmp then os.replace'd: a crash mid-write never leaves a half checkpoint behind.
CKPT_FORMAT = "energy_matching/v1"


def save_checkpoint(path, model, ema, opt, step, args, **extra):
    obj = {"format": CKPT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
           "opt": opt.state_dict() if opt is not None else None, "step": int(step),
           "args": args_to_dict(args), **extra}
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load and check a checkpoint; corrupt, foreign or missing files give one clear line and exit code 2."""
    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({type(e).__name__})")
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        die(f"{path} is not an Energy Matching checkpoint (format {fmt!r}, expected {CKPT_FORMAT!r})")
    return obj


def load_states(ck, model, ema=None, opt=None, path="checkpoint"):
    try:
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if opt is not None and ck.get("opt"):
            opt.load_state_dict(ck["opt"])
    except (RuntimeError, KeyError, ValueError) as e:
        die(f"{path} does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"check --dataset/--model-size/--arch")


def model_from_checkpoint(path, device, use_ema=True):
    """Rebuild the network from the checkpoint's own args (self-describing) and load EMA (or raw) weights."""
    ck = load_checkpoint(path, device)
    cargs = argparse.Namespace(**ck["args"])
    model = build_model(cargs).to(device)
    try:
        model.load_state_dict(ck["ema" if use_ema else "model"])
    except (RuntimeError, KeyError) as e:
        die(f"{path}: weights do not fit the recorded architecture ({type(e).__name__})")
    model.eval().requires_grad_(False)
    return model, cargs, ck


def default_ckpt(args):
    for name in ("ckpt_main.pt", "ckpt_warmup.pt"):
        p = os.path.join(args.out_dir, name)
        if os.path.exists(p):
            return p
    die(f"no checkpoint in {args.out_dir} (train first or pass --ckpt)")


# ======================================================================================================
# === 8. Evaluation commands ===
# ======================================================================================================
def eval_setup(args):
    """Device, the (EMA) potential from the checkpoint, and the sampling hyper-parameters of the run."""
    device = pick_device(args.device)
    path = args.ckpt or default_ckpt(args)
    V, cargs, ck = model_from_checkpoint(path, device, use_ema=not args.no_ema)
    # the model's temperature schedule comes from training; the sampler settings from this command line
    for k in ("tau_s", "dt", "sampler", "sample_batch", "num_samples"):
        setattr(cargs, k, getattr(args, k))
    return device, V, cargs, path


def eval_images(args, cargs, n, device):
    """The first n held-out images of --dataset (test split where there is one); they must fit the model."""
    data = build_dataset(args, train=False)
    x = torch.stack([data[i][0] for i in range(min(n, len(data)))]).to(device)
    if tuple(x.shape[1:]) != data_shape(cargs):
        die(f"images of {args.dataset} have shape {tuple(x.shape[1:])} but the checkpoint's model expects "
            f"{data_shape(cargs)} (dataset {cargs.dataset!r})")
    return x


def save_npz_atomic(path, **arrays):
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def cmd_sample(args):
    """Draw --num-samples images with the Heun (or Euler-Maruyama) SDE sampler; write samples.npz (uint8 NHWC,
    key "images", for eval_fid.py) and a grid."""
    prepare_out_dir(args.out_dir)
    device, V, cargs, path = eval_setup(args)
    autocast = make_autocast(args.amp, device)
    shape = data_shape(cargs)
    t0 = time.time()
    imgs = []
    for i in range(0, args.num_samples, args.sample_batch):
        n = min(args.sample_batch, args.num_samples - i)
        imgs.append(to_uint8(draw_samples(V, cargs, n, shape, device, autocast, batch=n)))
        done = i + n
        el = time.time() - t0
        print(f"sampled {done}/{args.num_samples} | {done / el:.1f} img/s | ETA "
              f"{(args.num_samples - done) * el / done / 60:.1f} min", flush=True)
    images = np.concatenate(imgs) if imgs else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
    out = os.path.join(args.out_dir, "samples.npz")
    save_npz_atomic(out, images=images)
    if len(images):
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(grid, os.path.join(args.out_dir, "samples.png"))
    meta = {"ckpt": path, "n": int(len(images)), "tau_s": args.tau_s, "dt": args.dt, "sampler": args.sampler,
            "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(args.out_dir, "samples.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} ({images.shape})")
    return images


def center_mask(shape, frac, device):
    """A (C, H, W) 0/1 measurement mask A: ones outside a centred square of side frac * H (the hole)."""
    C, H, W = shape
    s = max(1, int(round(frac * H)))
    a = torch.ones(shape, device=device)
    top, left = (H - s) // 2, (W - s) // 2
    a[:, top:top + s, left:left + s] = 0
    return a


def cmd_inpaint(args):
    """Alg. 3 on data images with a centred hole: M chains per image without and with the repulsive interaction
    (same starting noise), saved as the paper's "with vs without interaction" figure (inpaint.png)."""
    prepare_out_dir(args.out_dir)
    device, V, cargs, path = eval_setup(args)
    torch.manual_seed(args.seed)
    x = eval_images(args, cargs, args.num_images or 4, device)
    A = center_mask(tuple(x.shape[1:]), args.hole, device)          # zeros inside the hole
    Bmask = 1 - A                                                   # interaction acts where nothing is observed
    y = A * x                                                       # y = A(x) (noise-free measurement)
    eps = lambda t: temperature(t, cargs.tau_star, cargs.eps_max)   # noqa: E731
    x_init = torch.randn(x.shape[0], args.chains, *x.shape[1:], device=device)
    kw = dict(n_chains=args.chains, tau_s=args.tau_s, dt=args.dt, eps=eps, zeta=args.zeta, x_init=x_init,
              clamp=(-1.0, 1.0))
    plain = inverse_langevin(V, y, A, **kw)
    inter = inverse_langevin(V, y, A, sigma=args.sigma_int, Bmask=Bmask, **kw)

    def spread(z):  # mean pairwise distance between the chains inside the hole
        d = [(Bmask * (z[:, i] - z[:, j])).flatten(1).norm(dim=1) for i in range(z.shape[1]) for j in range(i)]
        return float(torch.stack(d).mean()) if d else 0.0

    def fidelity(z):  # RMS error on the observed pixels
        return float(((A * (z - x[:, None])) ** 2).sum() / (A.sum() * z.shape[0] * z.shape[1])) ** 0.5

    res = {"ckpt": path, "spread_without": spread(plain), "spread_with": spread(inter),
           "fidelity_rmse_without": fidelity(plain), "fidelity_rmse_with": fidelity(inter),
           "zeta": args.zeta, "sigma": args.sigma_int, "tau_s": args.tau_s, "dt": args.dt}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    M = args.chains
    cols = 2 + 2 * M
    fig, axs = plt.subplots(x.shape[0], cols, figsize=(1.6 * cols, 1.7 * x.shape[0]), squeeze=False)
    show = lambda ax, im: ax.imshow(((im.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).cpu().numpy(),  # noqa
                                    cmap="gray" if im.shape[0] == 1 else None)
    for r in range(x.shape[0]):
        panels = [x[r], y[r]] + [plain[r, m] for m in range(M)] + [inter[r, m] for m in range(M)]
        titles = ["original", "masked"] + [f"no W #{m + 1}" for m in range(M)] + [f"with W #{m + 1}" for m in range(M)]
        for c, (im, tt) in enumerate(zip(panels, titles)):
            show(axs[r, c], im)
            axs[r, c].set_xticks([]), axs[r, c].set_yticks([])
            if r == 0:
                axs[r, c].set_title(tt, fontsize=8)
    fig.suptitle(f"Alg. 3 inpainting: without vs with interaction (spread {res['spread_without']:.2f} vs "
                 f"{res['spread_with']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "inpaint.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(args.out_dir, "inpaint.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    return res


# --- LID (Sec. 3.3, Appendix B): count the near-flat directions of the Hessian of V at a data point ---
def hessian_exact(V, x):
    """Full Hessian d^2 V / dx^2 at one point x (any shape, d = x.numel()), as a (d, d) float64 matrix."""
    shape = x.shape

    def f(z):
        return V(z.view(1, *shape)).float().sum()

    with math_sdpa():
        H = torch.autograd.functional.hessian(f, x.detach().float().reshape(-1), vectorize=True)
    H = H.double()
    return 0.5 * (H + H.T)                                          # symmetrise round-off


def lid_exact(V, xs, tau):
    """LID(x) = #{ |lambda_i(H(x))| < tau } from the exact spectrum (feasible for d up to a few thousand)."""
    lids, spectra = [], []
    for x in xs:
        ev = torch.linalg.eigvalsh(hessian_exact(V, x))
        spectra.append(ev.cpu())
        lids.append(int((ev.abs() < tau).sum()))
    return lids, spectra


def lid_slq(V, xs, tau, n_probe=8, n_lanczos=60, seed=0):
    """Partial-spectrum LID for large d: stochastic Lanczos quadrature (Hutchinson trace of a spectral indicator).

    #{|lambda| < tau} = tr 1(|H| < tau) ≈ d * mean_v sum_j (e1^T u_j)^2 1(|theta_j| < tau), where (theta_j, u_j) are
    the eigenpairs of the Lanczos tridiagonal matrix started at a Rademacher vector v / ||v||. Only Hessian-vector
    products are needed (one double backward each), batched over the images; full re-orthogonalisation."""
    x = xs.detach().float().clone().requires_grad_(True)
    B, d = x.shape[0], x[0].numel()
    with torch.enable_grad(), math_sdpa():
        g, = torch.autograd.grad(V(x).float().sum(), x, create_graph=True)

    def hvp(v):                                                     # H v for every image at once
        with torch.enable_grad():
            return torch.autograd.grad(g, x, grad_outputs=v.view_as(x).to(g.dtype), retain_graph=True)[0]

    gen = torch.Generator().manual_seed(seed)
    m = min(n_lanczos, d)
    est = torch.zeros(B, dtype=torch.float64)
    for _ in range(n_probe):
        v = (torch.randint(0, 2, (B, d), generator=gen) * 2 - 1).double().to(x.device)
        q = v / v.norm(dim=1, keepdim=True)
        Q, alpha, beta = [q], [], []
        for j in range(m):
            w = hvp(q.float()).flatten(1).double()
            a = (w * q).sum(1)
            alpha.append(a)
            Qs = torch.stack(Q)                                     # (j+1, B, d)
            w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", Qs, w), Qs)   # full re-orthogonalisation
            b = w.norm(dim=1)
            if j < m - 1:
                beta.append(b)
                q = torch.where(b[:, None] > 1e-10, w / b.clamp_min(1e-30)[:, None], torch.zeros_like(w))
                Q.append(q)
        T = torch.diag_embed(torch.stack(alpha, 1))
        if beta:
            off = torch.stack(beta, 1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, U = torch.linalg.eigh(T.cpu())
        est += d * ((U[:, 0, :] ** 2) * (theta.abs() < tau)).sum(1)
    return (est / n_probe).tolist()


def png_size(img_uint8):
    """Bytes of the lossless PNG encoding (the paper's proxy for image complexity)."""
    from PIL import Image
    im = Image.fromarray(img_uint8.squeeze(-1) if img_uint8.shape[-1] == 1 else img_uint8)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return len(buf.getvalue())


def cmd_lid(args):
    """LID of --num-images data images from the Hessian of V (exact or SLQ), Spearman vs PNG size (Table 2)."""
    from scipy.stats import spearmanr
    prepare_out_dir(args.out_dir)
    device, V, cargs, path = eval_setup(args)
    xs = eval_images(args, cargs, args.num_images or 4096, device)
    n = xs.shape[0]
    d = xs[0].numel()
    method = args.lid_method if args.lid_method != "auto" else ("exact" if d <= 1024 else "slq")
    t0 = time.time()
    if method == "exact":
        lids, _ = lid_exact(V, xs, args.lid_tau)
    else:
        lids = []
        for i in range(0, n, 16):
            lids += lid_slq(V, xs[i:i + 16], args.lid_tau, args.lid_probes, args.lid_lanczos, args.seed)
    sizes = [png_size(im) for im in to_uint8(xs)]
    varied = n > 2 and len(set(lids)) > 1 and len(set(sizes)) > 1   # Spearman is undefined on constant input
    rho = float(spearmanr(lids, sizes)[0]) if varied else float("nan")
    res = {"ckpt": path, "method": method, "tau": args.lid_tau, "d": d, "n": n, "spearman_lid_vs_png": rho,
           "lid": [float(v) for v in lids], "png_bytes": sizes, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(args.out_dir, "lid.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"LID ({method}, tau={args.lid_tau}) on {n} images: Spearman vs PNG size = {rho:.3f}")
    return res


def cmd_benchmark(args):
    """Throughput of our configuration vs the authors' recipe (fp32, math attention everywhere), same seed,
    same initial weights, same batches: phase-1 and phase-2 images/s, sampler images/s at K Heun steps, peak
    memory (CUDA), and the max |loss difference| between the two phase-1 loss curves."""
    device = pick_device(args.device)
    shape = data_shape(args)
    B = args.batch_size
    n1 = args.bench_steps
    n2 = max(1, args.bench_steps_main)
    gen = torch.Generator().manual_seed(args.seed)
    # synthetic batches in [-1, 1]: throughput does not depend on the pixels, and both configs see the same ones
    batches = [torch.rand(B, *shape, generator=gen) * 2 - 1 for _ in range(3 + n1)]
    torch.manual_seed(args.seed)
    ref = build_model(args)
    configs = {
        "authors_fp32_math": dict(amp="none", math=True, channels_last=False, compile=False),
        "ours": dict(amp=args.amp, math=False, channels_last=args.channels_last or device.type == "cuda",
                     compile=args.compile),
    }
    results = {}
    mkldnn_before = torch.backends.mkldnn.enabled
    for name, cfg in configs.items():
        torch.backends.mkldnn.enabled = mkldnn_before                # make_autocast may switch it off (CPU bf16)
        model = copy.deepcopy(ref).to(device)
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas))
        autocast = make_autocast(cfg["amp"], device)
        V_fast = torch.compile(model) if cfg["compile"] else None
        em = build_em(model, args, V_fast=V_fast, autocast=autocast)
        kern = math_sdpa() if cfg["math"] else contextlib.nullcontext()
        r = {"amp": cfg["amp"], "math_everywhere": cfg["math"], "channels_last": cfg["channels_last"],
             "compile": cfg["compile"]}

        def timed(fn, n, warm):
            for i in range(warm):
                fn(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t = time.time()
            out = [fn(warm + i) for i in range(n)]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            return out, time.time() - t, mem

        def step_fn(phase):
            def f(i):
                torch.manual_seed(step_seed(args.seed, i, 0))
                x1 = to_device(batches[i % len(batches)], device, cfg["channels_last"])
                return train_step(em, model, opt, x1, phase, args, 1, i)["loss"]
            return f

        with kern:
            losses, sec, mem = timed(step_fn("warmup"), n1, 3)
            r.update(phase1_img_s=n1 * B / sec, phase1_ms_iter=1000 * sec / n1, phase1_peak_gb=mem)
            r["phase1_losses"] = losses
            _, sec, mem = timed(step_fn("main"), n2, 1)
            r.update(phase2_img_s=n2 * B / sec, phase2_ms_iter=1000 * sec / n2, phase2_peak_gb=mem)
            model.eval()
            K = args.bench_sample_steps

            def samp(i):
                torch.manual_seed(i)
                return sde_sample(em.V_fast, torch.randn(B, *shape, device=device), em.eps, K * args.dt, args.dt,
                                  "heun", clamp=(-1, 1), autocast=autocast)

            _, sec, mem = timed(samp, 1, 1 if cfg["compile"] else 0)
            r.update(sampler_img_s=B / sec, sampler_heun_steps=K, sampler_peak_gb=mem)
        results[name] = r
        print(f"[{name}] phase1 {r['phase1_img_s']:.1f} img/s ({r['phase1_ms_iter']:.1f} ms/it) | phase2 "
              f"{r['phase2_img_s']:.1f} img/s | sampler ({K} Heun steps) {r['sampler_img_s']:.1f} img/s | peak "
              + (f"{r['phase1_peak_gb']:.2f}/{r['phase2_peak_gb']:.2f}/{r['sampler_peak_gb']:.2f} GB"
                 if device.type == "cuda" else "n/a (CPU)"), flush=True)
    torch.backends.mkldnn.enabled = mkldnn_before
    a, o = results["authors_fp32_math"], results["ours"]
    diff = [abs(x - y) for x, y in zip(a["phase1_losses"], o["phase1_losses"])]
    summary = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "batch": B, "params": count_params(ref), "shape": list(shape), "measured_phase1_steps": n1,
               "speedup_phase1": o["phase1_img_s"] / a["phase1_img_s"],
               "speedup_phase2": o["phase2_img_s"] / a["phase2_img_s"],
               "speedup_sampler": o["sampler_img_s"] / a["sampler_img_s"],
               "loss_max_abs_diff": max(diff), "loss_max_rel_diff": max(d / max(abs(x), 1e-12) for d, x in
                                                                        zip(diff, a["phase1_losses"])),
               "command": " ".join(sys.argv), "configs": results}
    print(f"speed-up ours/authors: phase1 x{summary['speedup_phase1']:.2f}, phase2 x{summary['speedup_phase2']:.2f}"
          f", sampler x{summary['speedup_sampler']:.2f} | loss curves: max |diff| {summary['loss_max_abs_diff']:.3g}"
          f" (rel {summary['loss_max_rel_diff']:.3g}) over {n1} steps")
    prepare_out_dir(args.out_dir)
    with open(os.path.join(args.out_dir, "benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    if args.mode == "benchmark" and args.dataset not in ("cifar10", "fake", "mnist", "celeba64", "folder"):
        die(f"unknown dataset {args.dataset!r}")
    return {"train": train, "sample": cmd_sample, "inpaint": cmd_inpaint, "lid": cmd_lid,
            "benchmark": cmd_benchmark}[args.mode](args)


if __name__ == "__main__":
    main()
