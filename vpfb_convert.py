"""vpfb_convert.py -- an authors' VPFB checkpoint (https://github.com/ljun0004/VAPO, README
"Checkpoints") converted once into a checkpoint of ours, exactly (tests/test_vp_authors.py).

    python vpfb_convert.py checkpoint_26.pth runs/vapo/ckpt_main.pt     # their EMA and raw weights
    python vpfb.py --mode sample --ckpt runs/vapo/ckpt_main.pt          # then any mode of ours
    python vpfb_experiments.py --mode ood --ckpt runs/vapo/ckpt_main.pt

Their file does not say the image size the attention resolutions were placed by: --image-size.
"""
import argparse
import os

import torch

from vpfb import (FORMAT, AuthorsUNetPhi, args_to_dict, atomic, die, is_authors_checkpoint,
                  parse_args, read_checkpoint)

# score_sde-style dicts: "model" = the state dict of nn.DataParallel(MyUnet), keys "module.model."
# + a guided-diffusion UNet key; "ema" = {"shadow_params": EMA copies of model.parameters() in
# order, ...}; "optimizer", "step". Their UNet is our AuthorsUNetPhi; names map part by
# part (_AUTHORS_NAMES; input_blocks.k = down.(k-1), their 1-D convs = our 1x1 convs); resampling
# convs are "op" (down) or "conv" (up; our nn.Upsample and conv are two layers), none in the
# released nets. Both nets register their parameters in the same order, so shadow_params[i] is our
# i-th parameter. They embed the raw t.

_AUTHORS_NAMES = {"temb": "time_embed", "cemb": "label_emb", "inp": "input_blocks.0.0",
                  "down": "input_blocks", "mid": "middle_block", "up": "output_blocks",
                  "n1": "in_layers.0", "c1": "in_layers.2", "emb": "emb_layers.1",
                  "n2": "out_layers.0", "c2": "out_layers.3", "skip": "skip_connection",
                  "proj": "proj_out"}                   # the rest (out, norm, qkv, 0, ...) as ours
_AUTHORS_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.",
                     "output_blocks.", "out.")

def _listing(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

def authors_names(net):
    """{our parameter name: the authors' name (no prefix)}, in our parameter order."""
    names = {}
    for key, _ in net.named_parameters():
        part = key.split(".")
        if part[0] == "down":                      # their input_blocks.0 is our stem `inp`
            part[1] = str(int(part[1]) + 1)
            if len(part) == 4:                     # strided conv: their Downsample.op
                part.insert(3, "op")
        elif part[0] == "up" and len(part) == 4:   # conv after nn.Upsample: their Upsample.conv
            part[2:3] = [str(int(part[2]) - 1), "conv"]
        names[key] = ".".join(_AUTHORS_NAMES.get(p, p) for p in part)
    return names

def authors_arch(sd, image_size=32):
    """AuthorsUNetPhi keyword arguments for the authors' net with (prefix-free) state dict sd.
    attn_res is in pixels for a nominal image_size: the net itself is fully convolutional."""
    base = sd["time_embed.0.weight"].shape[1]             # their embedding width = base channels
    stem = sd["input_blocks.0.0.weight"]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    res = [k for k in blocks if f"input_blocks.{k}.0.in_layers.2.weight" in sd]
    n_in = max(res) + 1                                   # the last level has no down-sampling
    gaps = sorted(set(range(1, n_in)) - set(res))
    num_res = gaps[0] - 1 if gaps else len(res)
    levels = n_in // (num_res + 1)
    if num_res < 1 or levels * (num_res + 1) != n_in or len(res) != levels * num_res:
        raise ValueError("input blocks do not form a U-Net")
    first = [1 + lv * (num_res + 1) for lv in range(levels)]
    out_ch = [sd[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0] for k in first]
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    kw = dict(scale_shift=emb_out == 2 * out_ch[0],
              conv_resample=bool(gaps) and f"input_blocks.{gaps[0]}.0.op.weight" in sd)
    attn = tuple(image_size // 2 ** lv for lv, k in enumerate(first)
                 if f"input_blocks.{k}.1.qkv.weight" in sd)
    ncls = sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else 0
    return dict(in_ch=stem.shape[1], base=base, mult=tuple(c // base for c in out_ch),
                num_res=num_res, attn_res=attn, dropout=0.3, image_size=image_size,
                num_classes=ncls, **kw)

def authors_network(ck, use_ema=True, image_size=32, name="checkpoint"):
    """Our AuthorsUNetPhi (eval mode, frozen) holding the weights of an authors' checkpoint dict
    `ck`: the EMA shadow_params (use_ema) or the raw model. What does not fit: one line, exit 2."""
    if not is_authors_checkpoint(ck):
        found = _listing(sorted(ck)) if isinstance(ck, dict) else type(ck).__name__
        die(f"{name!r} is not an authors' VAPO checkpoint (expects model, ema.shadow_params, "
            f"step; found {found})")
    sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in ck["model"].items()}
    try:
        kw = authors_arch(sd, image_size)
        net = AuthorsUNetPhi(**kw)
    except (KeyError, IndexError, ValueError, ZeroDivisionError, AttributeError):
        odd = [k for k in sd if not k.startswith(_AUTHORS_PREFIXES)] or list(sd)
        die(f"{name!r} is a score_sde-style checkpoint but not the authors' VAPO U-Net "
            f"(unmatched keys: {_listing(odd)})")
    names = authors_names(net)
    known = set(names.values())
    unmatched = [k for k in sd if k not in known]
    missing = [theirs for theirs in names.values() if theirs not in sd]
    if unmatched or missing:
        die(f"{name!r} does not fit the authors' U-Net it describes (unmatched keys: "
            f"{_listing(unmatched) or 'none'}; missing: {_listing(missing) or 'none'})")
    theirs = sd
    if use_ema:                                   # shadow_params[i]: the EMA of parameter i
        shadow, order = list(ck["ema"]["shadow_params"]), list(names.values())
        if len(shadow) != len(order):
            die(f"{name!r}: {len(shadow)} EMA shadow_params for {len(order)} parameters")
        if list(sd) != order:
            die(f"{name!r}: the model's tensors are not in the authors' parameter order")
        theirs = dict(zip(order, shadow))
    ours = {}
    for key, p in net.named_parameters():
        v = theirs[names[key]]
        if not torch.is_tensor(v) or v.numel() != p.numel() or v.shape[:2] != p.shape[:2]:
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            die(f"{name!r}: {names[key]} has shape {shape}, the network needs {tuple(p.shape)}")
        ours[key] = v.reshape(p.shape).float()            # (O, I, 1) 1-D conv -> (O, I, 1, 1)
    net.load_state_dict(ours, strict=True)
    net.arch_kwargs = kw                 # so callers can rebuild the run's network flags
    return net.eval().requires_grad_(False)

def load_authors_checkpoint(path, use_ema=True, image_size=32):
    """The authors' released Phi (their checkpoints/checkpoint_*.pth) as our AuthorsUNetPhi (eval):
    net(x, t) is their potential, x in [-1, 1] NCHW. EMA weights unless use_ema=False."""
    return authors_network(read_checkpoint(path), use_ema, image_size, name=path)


def authors_checkpoint_as_ours(ck, name="checkpoint", image_size=32):
    """An authors' file as our checkpoint dict: args = --recipe authors + the U-Net read from its
    keys; "opt" None (their Adam state indexes their parameter list: a fresh Adam)."""
    ema, raw = (authors_network(ck, use, image_size, name) for use in (True, False))
    kw = ema.arch_kwargs
    if not kw["scale_shift"] or kw["conv_resample"]:
        die(f"{name}: an authors' U-Net variant (scale_shift {kw['scale_shift']}, conv_resample "
            f"{kw['conv_resample']}) that --unet authors does not build")
    args = parse_args(["--recipe", "authors", "--arch", "unet", "--image-size", str(image_size),
                       "--device", "cpu"])
    args.model_size, args.ch_mult = kw["base"], ",".join(map(str, kw["mult"]))
    args.res_blocks, args.attn_res = kw["num_res"], ",".join(map(str, kw["attn_res"]))
    args.channels, args.dropout, args.unet = kw["in_ch"], kw["dropout"], "authors"
    args.class_cond, args.num_classes = kw["num_classes"] > 0, kw["num_classes"] or None
    step = int(ck.get("step") or 0)
    return {"format": FORMAT, "model": raw.state_dict(), "ema": ema.state_dict(), "opt": None,
            "step": step, "phase": "authors", "phase_start": step, "ema_n": step,
            "args": args_to_dict(args)}


def main(argv=None):
    p = argparse.ArgumentParser(description="An authors' VAPO checkpoint -> a checkpoint of ours.")
    p.add_argument("theirs", help="their checkpoint_*.pth")
    p.add_argument("out", help="our checkpoint to write (e.g. runs/vapo/ckpt_main.pt)")
    p.add_argument("--image-size", type=int, default=32, help="the images their net was trained on")
    a = p.parse_args(argv)
    ck = authors_checkpoint_as_ours(read_checkpoint(a.theirs), a.theirs, a.image_size)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with atomic(a.out) as tmp:
        torch.save(ck, tmp)
    print(f"wrote {a.out} (step {ck['step']}; EMA and raw weights of {a.theirs})")
    return ck

if __name__ == "__main__":
    main()
