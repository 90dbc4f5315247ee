"""VPFB's --recipe authors against the authors' own training code, step for step (not run by CI:
it needs their code, https://github.com/ljun0004/VAPO at c50f908, and the packages it imports).

Both sides start from the same weights (theirs, read into our AuthorsUNetPhi by vpfb.py's
converter), see the same batches, the same t and the same noise (both draw them from one seeded
generator, in their order: t first, then the noise), the same learning rate per step, and train
--steps steps: their loss, Adam, 'std' clipping and EMA (losses.get_step_fn) against VPFB(phi,
**AUTHORS), build_optimizer, train_step, ema_update. Prints the loss of each step on both sides and
the largest parameter and EMA differences, each as ||ours - theirs|| / ||theirs - start|| per
tensor (float32 round-off that Adam's per-element scaling amplifies where gradients are tiny: the
losses agree to ~1e-6); exits 1 when they exceed --tol.

    python tests/side_by_side_vpfb.py --authors-code path/to/VAPO [--shims DIR] [--steps 10]

--shims: a folder of import-only stand-ins for the packages their modules import at module level
but these code paths never call (absl, ml_collections, tensorflow, ...), appended to sys.path.
At --model-size 32 their GroupNorm(32, ch) needs no patch: their files run unmodified.
"""
import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vpfb  # noqa: E402
import vpfb_convert  # noqa: E402


def their_pieces(a):
    """Their config, network, optimiser, EMA and one-step function at our small size."""
    from configs.homotopy import cifar10 as cfg_mod
    import losses
    import methods
    from models import unet  # noqa: F401  (registers their 'unet')
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage
    config = cfg_mod.get_config()
    config.data.channels, config.data.image_size, config.data.image_size_ori = 1, a.size, a.size
    config.data.dim = a.size * a.size
    config.training.batch_size = config.training.small_batch_size = a.batch
    config.model.nf, config.model.num_res_blocks = a.model_size, 1
    config.model.attention_resolutions, config.model.dropout = [], 0.0
    config.model.channel_mult = [int(m) for m in a.ch_mult.split(",")]
    config.optim.lr, config.optim.warmup = a.lr, a.warmup
    config.device = torch.device("cpu")
    net = mutils.create_model(config)
    ema = ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
    opt = losses.get_optimizer(config, net.parameters())
    state = dict(optimizer=opt, model=net, ema=ema, step=0, sigma_max=config.training.sigma_max,
                 t_eval=0)
    step_fn = losses.get_step_fn(methods.Homotopy(config=config), train=True,
                                 optimize_fn=losses.optimization_manager(config), sampling_fn=None,
                                 reduce_mean=config.training.reduce_mean, method_name="homotopy")
    return config, state, step_fn


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-code", required=True, help="a checkout of ljun0004/VAPO")
    p.add_argument("--shims", default=None, help="import-only stand-ins, appended to sys.path")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--model-size", type=int, default=32)
    p.add_argument("--ch-mult", default="1,2")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--tol", type=float, default=5e-3,
                   help="largest difference allowed, relative to how far a tensor moved")
    a = p.parse_args()
    sys.path.insert(0, os.path.abspath(a.authors_code))
    if a.shims:
        sys.path.append(os.path.abspath(a.shims))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config, state, step_fn = their_pieces(a)
    theirs = state["model"]

    # ours: their initial weights through the converter, the authors' recipe from our parser
    ck = {"model": {k: v.clone() for k, v in theirs.state_dict().items()}, "step": 0,
          "ema": {"shadow_params": [q.detach().clone() for q in theirs.parameters()]}}
    conv = vpfb_convert.authors_network(ck, use_ema=False, image_size=a.size)
    net = vpfb.AuthorsUNetPhi(**{**conv.arch_kwargs, "dropout": 0.0})   # their file: no dropout
    net.load_state_dict(conv.state_dict())
    names = vpfb_convert.authors_names(net)                  # our key -> their key
    args = vpfb.parse_args(["--recipe", "authors", "--lr", str(a.lr), "--out-dir", "/tmp/_unused"])
    method = vpfb.build_method(net, args)
    opt, ema = vpfb.build_optimizer(net, args), copy.deepcopy(net)
    clip = args.grad_clip if args.clip_mode == "norm" else 0.0     # 'std' clips inside Adam
    t0, t1 = config.training.t_start, config.training.t_end
    print(f"their net {sum(q.numel() for q in theirs.parameters())} parameters, ours "
          f"{vpfb.count_params(net)}; --recipe authors: lr {a.lr}, warm-up {a.warmup}, "
          f"betas {args.betas}, clip {args.clip_mode} {args.grad_clip}, EMA {args.ema_decay}")

    g = torch.Generator().manual_seed(1)
    data = torch.rand(64, 1, a.size, a.size, generator=g) * 2 - 1
    their_params, gmax = dict(theirs.named_parameters()), {}
    for s in range(a.steps):
        batch = data[torch.randint(0, len(data), (a.batch,), generator=g)]
        torch.manual_seed(100 + s)                   # their draws: t ~ U(t_start, t_end), then z
        out = step_fn(state, batch)
        torch.manual_seed(100 + s)                   # ours: the same numbers, passed explicitly
        t = t0 + torch.rand(a.batch) * (t1 - t0)
        eps = torch.randn(a.batch, a.size * a.size).reshape(batch.shape)
        lr = a.lr * min(s / a.warmup, 1.0)           # their warm-up: lr 0 at their step 0
        logs, ok, _ = vpfb.train_step(method, net, opt, dict(xbar=batch, eps=eps, t=t), lr, clip)
        vpfb.ema_update(ema, net, vpfb.ema_decay_at(args.ema_decay, s, args.ema_warmup))
        for k, q in net.named_parameters():                 # their gradient, largest so far
            tg = their_params["module.model." + names[k]].grad
            gmax[k] = max(gmax.get(k, 0.0), float(tg.abs().max()) if tg is not None else 0.0)
        print(f"step {s + 1}: loss theirs {float(out[0].detach()):+.7f} ours {logs['loss']:+.7f} "
              f"(Pearson {float(out[1].detach()):+.5f} / {logs['cov']:+.5f})")

    # A tensor whose exact gradient is 0 (a conv bias just before a GroupNorm of one channel per
    # group: the norm removes it) gets round-off gradients that Adam scales up to steps of lr, on
    # each side its own: such tensors are listed and left out of the comparison.
    null = {k for k, v in gmax.items() if v < 1e-6 * max(gmax.values())}
    ours = dict(net.named_parameters())

    def worst(pairs):               # ||ours - theirs|| / ||theirs - start||, tensor by tensor
        rel, at = 0.0, None
        for key, q, tq in pairs:
            if key not in null:
                tq, q0 = tq.detach().reshape(q.shape), start[key]
                rel, at = max((rel, at), (float((q.detach() - tq).norm()
                                                / ((tq - q0).norm() + 1e-30)), key))
        return rel, at
    start = {k: ck["model"]["module.model." + names[k]].reshape(q.shape) for k, q in ours.items()}
    shadow = dict(zip([n.removeprefix("module.model.") for n, _ in theirs.named_parameters()],
                      state["ema"].shadow_params))
    p_rel, p_at = worst((k, q, their_params["module.model." + names[k]]) for k, q in ours.items())
    e_rel, e_at = worst((k, q, shadow[names[k]]) for k, q in ema.named_parameters())
    print(f"after {a.steps} steps, the largest ||ours - theirs|| / ||theirs - start|| of a tensor: "
          f"parameters {p_rel:.2e} ({p_at}), EMA {e_rel:.2e} ({e_at}). Left out, exact gradient "
          f"0: {sorted(null) or 'none'}")
    if not (p_rel < a.tol and e_rel < a.tol):
        print("FAIL")
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    np.random.seed(0)
    main()
