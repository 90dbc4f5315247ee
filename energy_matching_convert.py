"""energy_matching_convert.py -- an authors' Energy Matching training file
(https://github.com/m1balcerak/EnergyMatching) converted once into a checkpoint of ours, exactly
(V to float32 rounding: tests/test_em_authors.py).

    python energy_matching_convert.py cifar10_main_training_147000.pt runs/em_authors/ckpt_main.pt
    python energy_matching.py --mode sample --out-dir runs/em_authors --tau-s 3.25
    python energy_matching_experiments.py --mode inpaint --out-dir runs/em_authors
"""
import argparse
import copy
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from energy_matching import (AUTHORS_T, FORMAT, ResBlock, SelfAttention2d, UNetViTPotential,
                             args_to_dict, atomic, die, is_authors_checkpoint, parse_args,
                             read_checkpoint, sinusoidal_embedding)

# Their files are {"net_model", "ema_model", "sched", "optim", "step"}; both models are state dicts
# of EBViTModelWrapper: torchcfm's guided-diffusion UNet at a fixed dummy t = 0.5, PatchEmbed(4), a
# post-LN nn.TransformerEncoder, mean-pool, final_linear, times output_scale: the layers of
# UNetViTPotential in the same order. Only the names differ; the time layers map one to one onto a
# UNetViTPotential(time_layers=True) (--recipe authors trains that) or fold into conv1's biases.
AUTHORS_OUTPUT_SCALE = 1000.0    # not in their files; 1000 in their CIFAR-10 and ImageNet32 configs
_AUTHORS_RES = {"n1": "in_layers.0", "c1": "in_layers.2", "n2": "out_layers.0",
                "c2": "out_layers.3", "skip": "skip_connection", "emb": "emb_layers"}
_AUTHORS_ATTN = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_AUTHORS_VIT = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias"}
_AUTHORS_VIT.update({f"{o}.{p}": f"{t}.{p}" for p in ("weight", "bias") for o, t in (
    ("out", "self_attn.out_proj"), ("ln1", "norm1"), ("ln2", "norm2"), ("ff.0", "linear1"),
    ("ff.3", "linear2"))})

def _short(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

def strip_prefixes(sd):
    """Keys without DataParallel/DDP "module." and torch.compile "_orig_mod." prefixes."""
    return {re.sub(r"^(module\.)+", "", k.replace("_orig_mod.", "")): v for k, v in sd.items()}

def authors_time_embedding(sd, t=AUTHORS_T):
    """emb = time_embed(sinusoid(t)) = Linear(SiLU(Linear(.))), (4 ch,): input of every ResBlock."""
    w0, b0, w2, b2 = (sd[f"time_embed.{k}"].double() for k in ("0.weight", "0.bias", "2.weight",
                                                                "2.bias"))
    e = sinusoidal_embedding(t, w0.shape[1]).to(w0.device)
    return F.linear(F.silu(F.linear(e, w0, b0)), w2, b2)

def fold_time_bias(sd, prefix, emb):
    """conv1's bias of the authors' ResBlock `prefix` with the time term folded in: their block adds
    c = emb_layers(emb) = Linear(SiLU(emb)) after conv1, a constant at fixed t, so conv(x) + b + c =
    conv(x) + (b + c) to float32 rounding. Computed in float64, stored in the file's dtype."""
    w, b = sd[f"{prefix}.emb_layers.1.weight"].double(), sd[f"{prefix}.emb_layers.1.bias"].double()
    bias = sd[f"{prefix}.in_layers.2.bias"]
    c = F.linear(F.silu(emb), w, b)
    if c.shape != bias.shape:    # 2 x channels: scale-shift norm (FiLM after GroupNorm), not a bias
        die(f"authors' ResBlock {prefix} uses scale-shift time conditioning (emb_layers gives "
            f"{c.shape[0]} values for {bias.shape[0]} channels); only the additive form folds")
    return (bias.double() + c).to(bias.dtype)

def authors_arch(sd):
    """UNetViTPotential keywords for an EBViTModelWrapper state dict, from key names and shapes."""
    ch, C = sd["input_blocks.0.0.weight"].shape[:2]
    dim, _, patch, _ = sd["patch_embed.patch_embed.weight"].shape
    side = math.isqrt(sd["patch_embed.pos_embed"].shape[1]) * patch   # square: N = (H / patch)^2
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    n_down = sum(f"input_blocks.{i}.0.op.weight" in sd for i in range(n_in))
    res_blocks = (n_in - 1 - n_down) // (n_down + 1)
    mult, attn = [], []
    for lvl in range(n_down + 1):
        first = 1 + lvl * (res_blocks + 1)                       # first ResBlock of the level
        mult.append(sd[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // ch)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attn.append(side // 2 ** lvl)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer_encoder.layers."))
    return dict(shape=(C, side, side), ch=ch, res_blocks=res_blocks, vit_depth=depth,
                dropout=0.1, output_scale=AUTHORS_OUTPUT_SCALE, ch_mult=tuple(mult),
                attn_res=tuple(attn), patch=patch)

def authors_names(net):
    """({our key: the authors' key} for every tensor of a UNetViTPotential, authors' ResBlocks)."""
    names, resblocks = {}, []

    def leaf(mod, ours, theirs, table=None):
        if isinstance(mod, ResBlock):
            resblocks.append(theirs)
            table = _AUTHORS_RES
        elif isinstance(mod, SelfAttention2d):
            table = _AUTHORS_ATTN
        for n in mod.state_dict():
            head, _, rest = n.partition(".")
            names[f"{ours}.{n}"] = f"{theirs}.{table[head]}.{rest}" if table else f"{theirs}.{n}"

    def seq(mods, ours, theirs):   # our nn.Upsample + Conv2d is their single Upsample(.conv)
        for i, m in enumerate(mods):
            up = i > 0 and isinstance(mods[i - 1], nn.Upsample)
            leaf(m, f"{ours}.{i}", f"{theirs}.{i - 1}.conv" if up else f"{theirs}.{i}")

    if net.time_layers:
        leaf(net.time_embed, "time_embed", "time_embed")
    leaf(net.inp, "inp", "input_blocks.0.0")
    for i, m in enumerate(net.down):             # their input_blocks[0] is our inp, so index + 1
        if isinstance(m, nn.Conv2d):
            leaf(m, f"down.{i}", f"input_blocks.{i + 1}.0.op")        # Downsample(conv, stride 2)
        else:
            seq(m, f"down.{i}", f"input_blocks.{i + 1}")
    seq(net.mid, "mid", "middle_block")
    for i, m in enumerate(net.up):
        seq(m, f"up.{i}", f"output_blocks.{i}")
    seq(net.out, "out", "out")
    leaf(net.patch, "patch", "patch_embed.patch_embed")
    names["pos"] = "patch_embed.pos_embed"
    for i, blk in enumerate(net.blocks):
        for n in blk.state_dict():
            names[f"blocks.{i}.{n}"] = f"transformer_encoder.layers.{i}.{_AUTHORS_VIT[n]}"
    leaf(net.head, "head", "final_linear")
    return names, resblocks

def authors_to_ours(sd, net, name="checkpoint"):
    """Our state dict for `net` from the authors' prefix-free `sd`: tensor for tensor (exact) when
    net has time layers, else with the time layers folded into conv1's biases."""
    names, resblocks = authors_names(net)
    time_keys = [f"time_embed.{i}" for i in (0, 2)] + [f"{r}.emb_layers.1" for r in resblocks]
    expected = set(names.values()) | {f"{k}.{p}" for k in time_keys for p in ("weight", "bias")}
    extra, missing = set(sd) - expected, expected - set(sd)
    if extra or missing:
        die(f"{name}: the authors' weights do not map onto UNetViTPotential; unmatched keys in the "
            f"file: [{_short(extra)}]; missing: [{_short(missing)}]")
    if net.time_layers:                               # their time layers are ours: every tensor
        out = {k: sd[v] for k, v in names.items()}
    else:
        emb = authors_time_embedding(sd)
        out = {k: fold_time_bias(sd, v[:-len(".in_layers.2.bias")], emb)  # ResBlock conv1 bias
               if v.endswith(".in_layers.2.bias") else sd[v] for k, v in names.items()}
    want = net.state_dict()
    bad = [f"{k} {tuple(out[k].shape)} vs ours {tuple(want[k].shape)}" for k in want
           if out[k].shape != want[k].shape]
    if bad:
        die(f"{name}: tensor shapes differ from the rebuilt UNetViTPotential: {_short(bad, 4)}")
    return out

def ours_to_authors(sd, net):
    """The authors' state dict from ours (`sd` of `net`): tensor for tensor with time layers; from
    the folded form, time layers of zeros (emb_layers(emb) = 0 exactly: the biases carry it)."""
    names, resblocks = authors_names(net)
    out = {v: sd[k] for k, v in names.items()}
    if not net.time_layers:
        ch, z = net.inp.out_channels, sd["inp.weight"].new_zeros
        shapes = {"time_embed.0": (4 * ch, ch), "time_embed.2": (4 * ch, 4 * ch)}
        shapes.update({f"{r}.emb_layers.1": (out[f"{r}.in_layers.2.bias"].shape[0], 4 * ch)
                       for r in resblocks})
        for k, (o, i) in shapes.items():
            out[f"{k}.weight"], out[f"{k}.bias"] = z(o, i), z(o)
    return out

@torch.no_grad()
def fold_time_layers(net):
    """A UNetViTPotential with time layers -> a copy in the folded form (for sampling): conv1's
    bias + emb_layers(time_embed(sinusoid(t))), computed in float64 (fold_time_bias)."""
    if not net.time_layers:
        return net
    sd = ours_to_authors(net.state_dict(), net)
    emb = authors_time_embedding(sd, net.time_t)
    folded = copy.deepcopy(net)
    blocks = [m for m in folded.modules() if isinstance(m, ResBlock)]    # authors_names' order
    for blk, prefix in zip(blocks, authors_names(net)[1]):
        blk.c1.bias.copy_(fold_time_bias(sd, prefix, emb))
        del blk.emb
    del folded.time_embed, folded.t_feat
    folded.time_layers = False
    return folded

def authors_net(ck, key="ema_model", name="checkpoint"):
    """(an untrained UNetViTPotential shaped like ck[key], ck[key] unprefixed); else exit 2."""
    if not is_authors_checkpoint(ck):
        own = isinstance(ck, dict) and "format" in ck
        die(f"{name} is not an authors' Energy Matching checkpoint (a dict with 'net_model' and "
            f"'ema_model' state dicts)" + ("; it is in this file's own format" if own else ""))
    sd = strip_prefixes(ck[key])
    if any(k.startswith("mlp.") for k in sd):
        die(f"{name} holds the authors' MLP-head potential (EBMLPModelWrapper); only the UNet+ViT "
            f"one (EBViTModelWrapper) maps onto UNetViTPotential")
    try:
        kw = authors_arch(sd)
        net = UNetViTPotential(**kw)
    except (KeyError, ValueError, IndexError, ZeroDivisionError, RuntimeError) as e:
        die(f"{name}: cannot rebuild the authors' architecture from its keys "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    net.arch_kwargs = kw                 # so callers can rebuild the run's shape/model flags
    return net, sd

def load_authors_checkpoint(path, use_ema=True, device="cpu"):
    """Our UNetViTPotential (eval) from an authors' CIFAR-10 training file: V(x) = their
    potential(x, t), any t, to float32 rounding; use_ema: "ema_model", else "net_model"."""
    net, sd = authors_net(read_checkpoint(path), "ema_model" if use_ema else "net_model", path)
    net.load_state_dict(authors_to_ours(sd, net, path))
    return net.to(device).eval()

def authors_checkpoint_as_ours(ck, name="checkpoint"):
    """An authors' file as our checkpoint dict: args = --recipe authors defaults + the arch read
    from the keys; "opt" None (their Adam state indexes their parameter list: fresh Adam)."""
    net, sd_ema = authors_net(ck, "ema_model", name)
    kw = net.arch_kwargs
    if kw["shape"][0] != 3 or kw["attn_res"] != (16,) or kw["patch"] != 4:
        die(f"{name}: an authors' network with {kw['shape'][0]} channels, attention at "
            f"{kw['attn_res']}, patch {kw['patch']} has no flags here (3, (16,), 4)")
    args = parse_args(["--recipe", "authors", "--dataset", "cifar10", "--arch", "unetvit",
                       "--tau-s", "3"])
    args.image_size, args.model_size, args.res_blocks = kw["shape"][1], kw["ch"], kw["res_blocks"]
    args.ch_mult, args.vit_depth = ",".join(map(str, kw["ch_mult"])), kw["vit_depth"]
    args.dropout, args.output_scale = kw["dropout"], kw["output_scale"]
    if args.time_layers:                 # --recipe authors trains their time layers: keep them
        net = UNetViTPotential(**kw, time_layers=True)
    step = int(ck.get("step") or 0)
    return {"format": FORMAT, "model": authors_to_ours(strip_prefixes(ck["net_model"]), net, name),
            "ema": authors_to_ours(sd_ema, net, name), "opt": None, "step": step,
            "phase": "authors", "phase_start": step, "args": args_to_dict(args)}


def main(argv=None):
    p = argparse.ArgumentParser(description="An authors' Energy Matching file -> ours.")
    p.add_argument("theirs", help="their training file (e.g. cifar10_main_training_147000.pt)")
    p.add_argument("out", help="our checkpoint to write (e.g. runs/em_authors/ckpt_main.pt)")
    a = p.parse_args(argv)
    ck = authors_checkpoint_as_ours(read_checkpoint(a.theirs), a.theirs)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with atomic(a.out) as tmp:
        torch.save(ck, tmp)
    print(f"wrote {a.out} (step {ck['step']}; EMA and raw weights of {a.theirs})")
    return ck

if __name__ == "__main__":
    main()
