"""The authors' VPFB checkpoints -> our Phi network: one block for vpfb.py's checkpoint section.

At merge, paste everything below the import block into vpfb.py (section 5. Checkpoints) and drop
the `from vpfb import ...` line: every name it imports is defined in vpfb.py itself.
"""
import os

import torch

from vpfb import AUTHORS_UNET, AttnBlock, ResBlock, UNetPhi, die


# ---- The authors' checkpoints (https://github.com/ljun0004/VAPO, README "Checkpoints") ----
# Their main.py saves score_sde-style dicts: "model" = the state dict of nn.DataParallel(MyUnet),
# keys "module.model.<guided-diffusion UNet key>"; "ema" = {"decay", "num_updates",
# "shadow_params": EMA copies of model.parameters(), in that order}; "optimizer", "step",
# "sigma_max". Their UNet is our UNetPhi built with AUTHORS_UNET, and the names map as
#   time_embed.{0,2} -> temb.{0,2}   input_blocks.0.0 -> inp        label_emb -> cemb
#   input_blocks.k.j -> down.(k-1).j middle_block.j -> mid.j        output_blocks.k.j -> up.k.j
#   out.{0,2} -> out.{0,2}
# inside a ResBlock in_layers.{0,2} -> n1, c1; emb_layers.1 -> emb; out_layers.{0,3} -> n2, c2;
# skip_connection -> skip; inside attention norm, qkv, proj_out -> norm, qkv, proj (their 1-D
# convs (O, I, 1) are our 1x1 convs (O, I, 1, 1)). A resampling conv is "op" (down) or "conv"
# (up, where we keep nn.Upsample and the conv as two layers); with their conv_resample=False
# (the released nets) there is none. Registration order is the same in both nets, so their
# parameters() order - the order of shadow_params - is our named_parameters() order.
# They embed the raw t in [0, 1] (temb_type "time"); the third input column (1 - t) is unused.

_RES_NAMES = {"n1": "in_layers.0", "c1": "in_layers.2", "emb": "emb_layers.1",
              "n2": "out_layers.0", "c2": "out_layers.3", "skip": "skip_connection"}
_ATTN_NAMES = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_AUTHORS_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.",
                     "output_blocks.", "out.")


def is_authors_checkpoint(ck):
    """True for a dict as the authors' code writes it (score_sde style), False for ours."""
    return (isinstance(ck, dict) and "format" not in ck and isinstance(ck.get("model"), dict)
            and isinstance(ck.get("ema"), dict)
            and isinstance(ck["ema"].get("shadow_params"), (list, tuple)) and "step" in ck)


def _strip(key):
    """'module.model.out.2.weight' -> 'out.2.weight' (DataParallel, then their MyUnet wrapper)."""
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _listing(keys, n=6):
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def authors_names(net):
    """{our parameter name: the authors' name (no prefix)}, in our parameter order."""
    names = {}
    for key, _ in net.named_parameters():
        part = key.split(".")
        if part[0] == "temb":
            theirs = "time_embed." + ".".join(part[1:])
        elif part[0] == "cemb":
            theirs = "label_emb." + part[1]
        elif part[0] == "inp":
            theirs = "input_blocks.0.0." + part[1]
        elif part[0] == "out":
            theirs = key
        else:
            if part[0] == "mid":
                block, j, rest = "middle_block", int(part[1]), part[2:]
                layer = net.mid[j]
            else:
                i, j, rest = int(part[1]), int(part[2]), part[3:]
                layer = getattr(net, part[0])[i][j]
                block = f"input_blocks.{i + 1}" if part[0] == "down" else f"output_blocks.{i}"
            if isinstance(layer, ResBlock):
                theirs = f"{block}.{j}.{_RES_NAMES[rest[0]]}.{rest[1]}"
            elif isinstance(layer, AttnBlock):
                theirs = f"{block}.{j}.{_ATTN_NAMES[rest[0]]}.{rest[1]}"
            elif part[0] == "down":                       # strided conv: their Downsample.op
                theirs = f"{block}.0.op.{rest[0]}"
            else:                                         # conv after nn.Upsample: Upsample.conv
                theirs = f"{block}.{j - 1}.conv.{rest[0]}"
        names[key] = theirs
    return names


def authors_arch(sd, image_size=32):
    """UNetPhi keyword arguments for the authors' net with (prefix-free) state dict sd.
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
    mult = tuple(c // base for c in out_ch)
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    kw = dict(AUTHORS_UNET)
    kw.update(scale_shift=emb_out == 2 * out_ch[0], stem_mult=stem.shape[0] != base,
              conv_resample=bool(gaps) and f"input_blocks.{gaps[0]}.0.op.weight" in sd)
    attn = tuple(image_size // 2 ** lv for lv, k in enumerate(first)
                 if f"input_blocks.{k}.1.qkv.weight" in sd)
    ncls = sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else 0
    return dict(in_ch=stem.shape[1], base=base, mult=mult, num_res=num_res, attn_res=attn,
                dropout=0.3, image_size=image_size, num_classes=ncls, **kw)


def authors_args(ck, image_size=32):
    """vpfb.py's architecture flags that describe an authors' checkpoint (for load_for_eval)."""
    kw = authors_arch({_strip(k): v for k, v in ck["model"].items()}, image_size)
    return {"model": "unet", "model_size": kw["base"], "recipe": "authors",
            "channel_mult": ",".join(str(m) for m in kw["mult"]), "num_res_blocks": kw["num_res"],
            "attn_res": ",".join(str(r) for r in kw["attn_res"]), "dropout": kw["dropout"],
            "class_cond": kw["num_classes"] > 0}


def authors_network(ck, use_ema=True, image_size=32, name="checkpoint"):
    """Our UNetPhi (eval mode, frozen) holding the weights of an authors' checkpoint dict `ck`:
    the EMA shadow_params (use_ema) or the raw model. Anything that does not fit: one line,
    exit 2."""
    if not is_authors_checkpoint(ck):
        found = _listing(sorted(ck)) if isinstance(ck, dict) else type(ck).__name__
        die(f"{name!r} is not an authors' VAPO checkpoint (expects model, ema.shadow_params, "
            f"step; found {found})")
    sd = {_strip(k): v for k, v in ck["model"].items()}
    try:
        kw = authors_arch(sd, image_size)
    except (KeyError, IndexError, ValueError, ZeroDivisionError, AttributeError):
        odd = [k for k in sd if not k.startswith(_AUTHORS_PREFIXES)] or list(sd)
        die(f"{name!r} is a score_sde-style checkpoint but not the authors' VAPO U-Net "
            f"(unmatched keys: {_listing(odd)})")
    net = UNetPhi(**kw)
    names = authors_names(net)
    known = set(names.values())
    unmatched = [k for k in sd if k not in known]
    missing = [theirs for theirs in names.values() if theirs not in sd]
    if unmatched or missing:
        die(f"{name!r} does not fit the authors' U-Net it describes (unmatched keys: "
            f"{_listing(unmatched) or 'none'}; missing: {_listing(missing) or 'none'})")
    theirs = sd
    if use_ema:
        # shadow_params[i] is the EMA of their i-th parameter; their parameter order is the order
        # of their state dict (no buffers) and, by construction, our named_parameters() order
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
    return net.eval().requires_grad_(False)


def load_authors_checkpoint(path, use_ema=True, image_size=32):
    """The authors' released Phi (Google Drive folders homotopy_cifar10 / homotopy_celeba,
    checkpoints/checkpoint_*.pth) as our time-varying UNetPhi in eval mode: net(x, t) is their
    potential at every t in [0, 1], x in [-1, 1] NCHW. EMA weights unless use_ema=False."""
    if not os.path.isfile(path):
        die(f"checkpoint {path!r} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"checkpoint {path!r} cannot be loaded with weights_only=True ({type(e).__name__})")
    return authors_network(ck, use_ema, image_size, name=path)
