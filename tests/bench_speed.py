"""Speed of both methods in one command: one JSON line per measurement (pytest does not collect it).

    python tests/bench_speed.py --device cpu --size small      # a CPU, about two minutes
    python tests/bench_speed.py --device cuda --size cifar10   # the CIFAR-10 nets, batch 128

Each line: {"what", "form", "device", "batch", "ms_per_step", "img_per_s", "ops_per_step",
"peak_mem_gib", ...}. `what`: em_phase1 and em_phase2 (training steps of the authors' recipe;
phase 2 = a step with a chain of 0 steps, timed, plus the recipe's 200 chain steps of one grad V
each, timed as em_sampler), em_sampler (one evaluation of grad V inside Heun and the chains;
img/s of a whole tau_s = 3 run), vpfb_train
(Eq. 27, the authors' recipe and U-Net), vpfb_ode (one evaluation of grad Phi inside the ODE).
`form`: eager (fp32), bf16 (the network trunk under autocast; CUDA only) and compiled (--compile:
the loss through torch.func, then torch.compile). ops_per_step: the aten operations one step
dispatches, forward and backward (eager forms; a compiled graph runs as a few fused kernels)."""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import energy_matching as em  # noqa: E402
import vpfb  # noqa: E402

SIZES = {   # network flags per size: (Energy Matching, VPFB), authors' recipe for both
    "tiny": (["--image-size", "8", "--model-size", "8", "--ch-mult", "1,2", "--res-blocks", "1",
              "--vit-depth", "1"],
             ["--image-size", "8", "--model-size", "32", "--ch-mult", "1,2", "--res-blocks", "1"]),
    "small": (["--image-size", "32", "--model-size", "32", "--vit-depth", "2"],
              ["--image-size", "32", "--model-size", "32", "--res-blocks", "1"]),
    "cifar10": ([], []),                                   # the recipes' own: 47.1M and 55.7M
}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (autograd's backward included)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, warmup, device):
    """(ms per call, peak GiB or None) of `steps` calls after `warmup` untimed ones."""
    for i in range(warmup):
        fn(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    sync(device)
    ms = 1000 * (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return ms, peak


def count_ops(fn):
    with OpCounter() as c:
        fn(0)
    return c.n


def setup(mod, argv, form, device, backend):
    """(args, net, method) as the command line builds them, in the given form. --out-dir: an
    empty folder (nothing is written; the default runs/em_cifar10 may hold a user's run, which
    parse_args refuses to replace)."""
    empty = tempfile.mkdtemp()
    try:
        args = mod.parse_args(argv + ["--device", str(device), "--amp",
                                      "bf16" if form == "bf16" else "none", "--workers", "0",
                                      "--out-dir", empty])
    finally:
        os.rmdir(empty)
    torch.manual_seed(0)
    net = mod.build_net(args, device)
    phi = net if mod is em else vpfb.Conditioned(net)
    method = mod.build_method(phi, args)
    if form == "compiled":
        mod.compile_method(method, backend)
    return args, net, method


def bench(a):
    device = torch.device(a.device)
    em_argv, vp_argv = SIZES[a.size]
    rows = []

    def emit(what, form, args, ms, peak, ops, batch, **extra):
        row = {"what": what, "form": form, "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "batch": batch, "ms_per_step": round(ms, 3),
               "img_per_s": round(batch * 1000 / ms, 2), "ops_per_step": ops,
               "peak_mem_gib": None if peak is None else round(peak, 3), "size": a.size, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for form in a.forms.split(","):
        if form == "bf16" and device.type != "cuda":
            print(json.dumps({"what": "all", "form": "bf16", "skipped": "the bf16 trunk runs on "
                              "CUDA only"}), flush=True)
            continue
        count = form != "compiled"
        if "em" in a.methods:
            args, net, method = setup(em, em_argv + ["--batch-size", str(a.batch)], form, device,
                                      a.compile_backend)
            B, shape = a.batch, (args.channels, args.image_size, args.image_size)
            g = torch.Generator().manual_seed(0)
            data = [(torch.rand(B, *shape, generator=g) * 2 - 1).to(device) for _ in range(2)]
            opt = em.build_optimizer(net, args)

            def step(i, phase="warmup"):
                torch.manual_seed(i)
                em.train_step(method, net, opt, dict(x1=data[i % 2], phase=phase), args.lr,
                              args.grad_clip)

            ms, peak = timed(step, a.steps, a.warmup, device)
            emit("em_phase1", form, args, ms, peak, count_ops(step) if count else None, B,
                 params=em.count_params(net))
            net.eval()                         # grad V of a batch: one sampler evaluation
            Vs = torch.compile(net, backend=a.compile_backend) if form == "compiled" else net
            x = torch.randn(B, *shape, device=device)
            ev, peak = timed(lambda i: em.grad_V(Vs, x), a.steps, a.warmup, device)
            heun = 2 * round(3.0 / args.dt)                       # tau_s = 3 after phase 2
            emit("em_sampler", form, args, ev, peak, count_ops(lambda i: em.grad_V(net, x))
                 if count else None, B, evals_per_sample_run=heun,
                 img_per_s_whole_run=round(B * 1000 / (ev * heun), 3))
            net.train()                        # phase 2 = a step without chain + the chain's
            method.n_langevin = 0              # steps, each one grad V of the CD batch
            ms, peak = timed(lambda i: step(i, "main"), a.steps, a.warmup, device)
            emit("em_phase2", form, args, ms + args.n_langevin * ev, peak, None, B,
                 ms_without_chain=round(ms, 3), langevin_steps=args.n_langevin,
                 ms_per_langevin_step=round(ev, 3))
        if "vpfb" in a.methods:
            args, net, method = setup(vpfb, vp_argv + ["--batch-size", str(a.batch)], form,
                                      device, a.compile_backend)
            B, shape = a.batch, (args.channels, args.image_size, args.image_size)
            g = torch.Generator().manual_seed(0)
            data = [(torch.rand(B, *shape, generator=g) * 2 - 1).to(device) for _ in range(2)]
            opt = vpfb.build_optimizer(net, args)

            def vstep(i):
                torch.manual_seed(i)
                vpfb.train_step(method, net, opt, dict(xbar=data[i % 2]), args.lr,
                                args.grad_clip if args.clip_mode == "norm" else 0.0)

            ms, peak = timed(vstep, a.steps, a.warmup, device)
            emit("vpfb_train", form, args, ms, peak, count_ops(vstep) if count else None, B,
                 params=vpfb.count_params(net))
            net.eval()
            phis = vpfb.Conditioned(torch.compile(net, backend=a.compile_backend)
                                    if form == "compiled" else net)
            sampler = vpfb.build_method(phis, args)
            x = torch.randn(B, *shape, device=device)
            ms, peak = timed(lambda i: sampler.grad_phi(x, 0.5), a.steps, a.warmup, device)
            emit("vpfb_ode", form, args, ms, peak, count_ops(lambda i: vpfb.build_method(
                vpfb.Conditioned(net), args).grad_phi(x, 0.5)) if count else None, B)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="small", choices=SIZES, help="network and image size")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 128 cifar10, else 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiled: more)")
    p.add_argument("--forms", default="eager,bf16,compiled", help="comma list")
    p.add_argument("--methods", default="em,vpfb", help="comma list")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    a = p.parse_args(argv)
    a.batch = a.batch or (128 if a.size == "cifar10" else 8)
    torch.set_num_threads(a.threads)
    return bench(a)


if __name__ == "__main__":
    main()
