"""The authors' VPFB network and checkpoints (https://github.com/ljun0004/VAPO): CPU, no download.

The reference below is our own functional re-implementation of their potential, written from
their architecture (guided-diffusion U-Net, configs/homotopy/cifar10.py) with their parameter
names, so the checks do not reuse the loader's name mapping: a state dict in their layout with
random values must load into AuthorsUNetPhi with every key used, and give the same Phi(x, t) at
several t.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vpfb
import vpfb_convert
from vpfb import is_authors_checkpoint
from vpfb_convert import load_authors_checkpoint

# a small net in the authors' form: base 32 (their GroupNorm always has 32 groups), stem 2 * base,
# two levels, attention at downsampling factor 2 (their "attention_resolutions": [2])
CFG = dict(in_ch=3, base=32, mult=(2, 3), num_res=1, attn_ds=(2,), conv=False, ncls=0, size=8)
TIMES = torch.tensor([1e-5, 0.3, 0.7, 1 - 1e-5])


def authors_layout(c):
    """[(their key, shape)] in their registration (= parameters()) order."""
    base, emb, out = c["base"], 4 * c["base"], []

    def res(p, cin, cout):
        out.extend([(f"{p}.in_layers.0.weight", (cin,)), (f"{p}.in_layers.0.bias", (cin,)),
                    (f"{p}.in_layers.2.weight", (cout, cin, 3, 3)),
                    (f"{p}.in_layers.2.bias", (cout,)),
                    (f"{p}.emb_layers.1.weight", (2 * cout, emb)),        # scale and shift
                    (f"{p}.emb_layers.1.bias", (2 * cout,)),
                    (f"{p}.out_layers.0.weight", (cout,)), (f"{p}.out_layers.0.bias", (cout,)),
                    (f"{p}.out_layers.3.weight", (cout, cout, 3, 3)),
                    (f"{p}.out_layers.3.bias", (cout,))])
        if cin != cout:
            out.extend([(f"{p}.skip_connection.weight", (cout, cin, 1, 1)),
                        (f"{p}.skip_connection.bias", (cout,))])

    def attn(p, ch):
        out.extend([(f"{p}.norm.weight", (ch,)), (f"{p}.norm.bias", (ch,)),
                    (f"{p}.qkv.weight", (3 * ch, ch, 1)), (f"{p}.qkv.bias", (3 * ch,)),
                    (f"{p}.proj_out.weight", (ch, ch, 1)), (f"{p}.proj_out.bias", (ch,))])

    def conv(p, ch):
        out.extend([(f"{p}.weight", (ch, ch, 3, 3)), (f"{p}.bias", (ch,))])

    out.extend([("time_embed.0.weight", (emb, base)), ("time_embed.0.bias", (emb,)),
                ("time_embed.2.weight", (emb, emb)), ("time_embed.2.bias", (emb,))])
    if c["ncls"]:
        out.append(("label_emb.weight", (c["ncls"] + 1, emb)))
    ch = base * c["mult"][0]
    out.extend([("input_blocks.0.0.weight", (ch, c["in_ch"], 3, 3)),
                ("input_blocks.0.0.bias", (ch,))])
    chans, k, ds = [ch], 1, 1
    for lv, m in enumerate(c["mult"]):
        for _ in range(c["num_res"]):
            res(f"input_blocks.{k}.0", ch, base * m)
            ch = base * m
            if ds in c["attn_ds"]:
                attn(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if lv < len(c["mult"]) - 1:
            if c["conv"]:
                conv(f"input_blocks.{k}.0.op", ch)
            chans.append(ch)
            k += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for lv, m in reversed(list(enumerate(c["mult"]))):
        for i in range(c["num_res"] + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), base * m)
            ch, j = base * m, 1
            if ds in c["attn_ds"]:
                attn(f"output_blocks.{k}.1", ch)
                j = 2
            if lv and i == c["num_res"]:
                if c["conv"]:
                    conv(f"output_blocks.{k}.{j}.conv", ch)
                ds //= 2
            k += 1
    out.extend([("out.0.weight", (ch,)), ("out.0.bias", (ch,)),
                ("out.2.weight", (c["in_ch"], ch, 3, 3)), ("out.2.bias", (c["in_ch"],))])
    return out


def random_weights(layout, seed):
    """Values that keep every layer active: weights ~ N(0, 1/fan_in), norms ~ 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout:
        if len(shape) == 1:                       # 1-D weights are GroupNorm gains
            sd[key] = float(key.endswith("weight")) + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def authors_phi(sd, c, x, t, y=None):
    """Their potential 1/2 |x - UNet(x, t)|^2, written out with torch.nn.functional."""
    def gn(h, p):
        return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def resblock(p, h, emb):
        a = conv(F.silu(gn(h, p + ".in_layers.0")), p + ".in_layers.2", padding=1)
        e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])
        scale, shift = e[:, :, None, None].chunk(2, dim=1)            # FiLM (scale-shift norm)
        a = gn(a, p + ".out_layers.0") * (1 + scale) + shift
        a = conv(F.silu(a), p + ".out_layers.3", padding=1)
        skip = conv(h, p + ".skip_connection") if p + ".skip_connection.weight" in sd else h
        return skip + a

    def attention(p, h):                                              # one head: q | k | v
        B, C, H, W = h.shape
        flat = h.reshape(B, C, H * W)
        qkv = F.conv1d(gn(flat, p + ".norm"), sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
        q, k, v = qkv.chunk(3, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(C), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v)
        a = F.conv1d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])
        return (flat + a).reshape(h.shape)

    half = c["base"] // 2                                             # embedding of the raw t
    ang = t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half) / half)[None]
    emb = torch.cat([ang.cos(), ang.sin()], 1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if c["ncls"]:
        y = torch.full((x.shape[0],), c["ncls"]) if y is None else y
        emb = emb + sd["label_emb.weight"][y]
    h = conv(x, "input_blocks.0.0", padding=1)
    hs, k = [h], 1
    for lv in range(len(c["mult"])):
        for _ in range(c["num_res"]):
            h = resblock(f"input_blocks.{k}.0", h, emb)
            if f"input_blocks.{k}.1.qkv.weight" in sd:
                h = attention(f"input_blocks.{k}.1", h)
            hs.append(h)
            k += 1
        if lv < len(c["mult"]) - 1:
            if c["conv"]:
                h = conv(h, f"input_blocks.{k}.0.op", stride=2, padding=1)
            else:
                h = F.avg_pool2d(h, 2)
            hs.append(h)
            k += 1
    h = attention("middle_block.1", resblock("middle_block.0", h, emb))
    h = resblock("middle_block.2", h, emb)
    k = 0
    for lv in reversed(range(len(c["mult"]))):
        for i in range(c["num_res"] + 1):
            h = resblock(f"output_blocks.{k}.0", torch.cat([h, hs.pop()], 1), emb)
            j = 1
            if f"output_blocks.{k}.1.qkv.weight" in sd:
                h = attention(f"output_blocks.{k}.1", h)
                j = 2
            if lv and i == c["num_res"]:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                if c["conv"]:
                    h = conv(h, f"output_blocks.{k}.{j}.conv", padding=1)
            k += 1
    u = conv(F.silu(gn(h, "out.0")), "out.2", padding=1)
    return 0.5 * (x - u).flatten(1).pow(2).sum(1)


def authors_file(path, c, seed=0):
    """A checkpoint as their main.py writes it: DataParallel(MyUnet) keys, EMA shadow list."""
    layout = authors_layout(c)
    model = random_weights(layout, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shadow = [model[k] + 0.05 * torch.randn(model[k].shape, generator=g) for k, _ in layout]
    ck = {"model": {"module.model." + k: v for k, v in model.items()},
          "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": shadow},
          "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4,
                                                        "params": list(range(len(layout)))}]},
          "step": 1000, "sigma_max": 0.01}
    torch.save(ck, path)
    return model, dict(zip([k for k, _ in layout], shadow)), shadow


def refused(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("c", [CFG, dict(CFG, conv=True, mult=(1, 2), attn_ds=(1, 2), ncls=3)],
                         ids=["released", "conv-resample+classes"])
def test_authors_state_dict_round_trip_matches_reference(tmp_path, c):
    path = str(tmp_path / "checkpoint_1.pth")
    model, ema, _ = authors_file(path, c)
    torch.manual_seed(0)
    x = torch.randn(len(TIMES), c["in_ch"], c["size"], c["size"])
    t = TIMES                                                         # one image at each t
    refs = {}
    for use_ema, weights in [(True, ema), (False, model)]:
        net = load_authors_checkpoint(path, use_ema=use_ema, image_size=c["size"])
        assert not net.training
        assert sum(1 for _ in net.parameters()) == len(weights)        # every key has a place
        assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for v in weights.values())
        with torch.no_grad():
            ours, refs[use_ema] = net(x, t), authors_phi(weights, c, x, t)
        assert torch.allclose(ours, refs[use_ema], rtol=1e-4, atol=0), (t, ours, refs[use_ema])
    assert not torch.allclose(refs[True], refs[False], rtol=1e-3)       # EMA and raw weights differ


def test_ema_shadow_params_follow_the_authors_parameter_order(tmp_path):
    path = str(tmp_path / "ck.pth")
    _, _, shadow = authors_file(path, CFG, seed=3)
    net = load_authors_checkpoint(path, image_size=CFG["size"])
    params = list(net.parameters())
    assert len(params) == len(shadow)
    for p, s in zip(params, shadow):                                  # i-th parameter <- shadow[i]
        assert torch.equal(p.detach(), s.reshape(p.shape))


def test_authors_network_has_their_parameter_count_and_default_is_unchanged():
    with torch.device("meta"):
        theirs = vpfb.AuthorsUNetPhi(3, 128, (2, 2, 2), 4, (16,), 0.3, 32)
        ours = vpfb.UNetPhi()
    assert sum(p.numel() for p in theirs.parameters()) == 55_676_419     # their code's count, 55.7M
    assert sum(p.numel() for p in ours.parameters()) == 53_634_563       # our default, as before
    torch.manual_seed(0)                                # default forward, pinned (since vpfb/v2: t)
    net = vpfb.UNetPhi(3, 16, (1, 2), 1, (8,), 0.0, 16, 3).eval()
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        out = net(x, t).tolist() + net(x, t, torch.tensor([0, 2])).tolist()
    assert out == pytest.approx([502.74182, 506.78769, 496.55551, 524.04486], rel=1e-5)


def test_authors_network_trains_double_backward_and_starts_at_half_norm():
    net = vpfb.AuthorsUNetPhi(3, 32, (1, 2), 1, (4,), 0.0, 8)
    x, t = torch.randn(2, 3, 8, 8, requires_grad=True), torch.rand(2)
    phi = net(x, t)
    assert torch.allclose(phi, 0.5 * x.detach().flatten(1).pow(2).sum(1))  # zero output conv
    g = torch.autograd.grad(phi.sum(), x, create_graph=True)[0]
    g.pow(2).sum().backward()                           # the loss differentiates grad_x Phi
    assert net.temb[0].weight.grad is not None


def test_refuses_checkpoints_of_another_kind(tmp_path, capsys):
    ours = tmp_path / "ours.pt"
    torch.save({"format": "vpfb-1", "model": {}, "ema": {}, "step": 3}, ours)
    assert not is_authors_checkpoint(torch.load(ours, weights_only=True))
    err = refused(capsys, lambda: load_authors_checkpoint(str(ours)))
    assert "not an authors' VAPO checkpoint" in err
    em = tmp_path / "em.pt"
    torch.save({"net_model": {"a": torch.zeros(1)}, "ema_model": {}, "step": 1}, em)
    refused(capsys, lambda: load_authors_checkpoint(str(em)))
    ncsn = tmp_path / "ncsnpp.pth"                        # a score_sde file of another network
    torch.save({"model": {"module.all_modules.0.weight": torch.zeros(3)}, "optimizer": {},
                "step": 1,
                "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": [torch.zeros(3)]}}, ncsn)
    assert "all_modules.0.weight" in refused(capsys, lambda: load_authors_checkpoint(str(ncsn)))
    refused(capsys, lambda: load_authors_checkpoint(str(tmp_path / "missing.pth")))


def test_refuses_an_authors_file_that_does_not_fit(tmp_path, capsys):
    path = str(tmp_path / "ck.pth")
    authors_file(path, CFG)
    ck = torch.load(path, weights_only=True)
    assert is_authors_checkpoint(ck)
    ck["model"]["module.model.extra.weight"] = torch.zeros(2)
    torch.save(ck, path)
    assert "extra.weight" in refused(capsys, lambda: load_authors_checkpoint(path))
    del ck["model"]["module.model.extra.weight"]
    ck["ema"]["shadow_params"] = ck["ema"]["shadow_params"][:-1]
    torch.save(ck, path)
    assert "shadow_params" in refused(capsys, lambda: load_authors_checkpoint(path))


SMALL = ["--dataset", "fake", "--image-size", "8", "--fake-size", "8", "--sampler", "euler",
         "--ode-steps", "2", "--num-samples", "4", "--sample-batch", "4", "--threads", "1"]


def test_an_authors_file_is_converted_once_then_sampled(tmp_path, capsys):
    """--ckpt <their file>: one line naming vpfb_convert.py; the converted file samples with their
    net, EMA weights (raw: --no-ema)."""
    path = str(tmp_path / "checkpoint_1000.pth")
    authors_file(path, CFG)
    err = refused(capsys, lambda: vpfb.main(["--mode", "sample", "--ckpt", path] + SMALL))
    assert f"python vpfb_convert.py {path} OUT.pt" in err
    ours = str(tmp_path / "converted" / "ckpt_main.pt")
    vpfb_convert.main([path, ours, "--image-size", "8"])
    images = {}
    for flags in ([], ["--no-ema"]):
        out = tmp_path / ("raw" if flags else "ema")
        vpfb.main(["--mode", "sample", "--ckpt", ours, "--out-dir", str(out)] + SMALL + flags)
        images[bool(flags)] = np.load(out / "samples.npz")["images"]   # written only if finite
        assert images[bool(flags)].shape == (4, 8, 8, 3)
    assert not np.array_equal(images[True], images[False])


def test_recipe_authors_builds_their_net_and_checkpoints_keep_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = ["--model-size", "32", "--ch-mult", "1,2", "--res-blocks", "1", "--dropout", "0",
             "--batch-size", "4", "--steps", "1", "--save-every", "1", "--log-every", "1",
             "--sample-every", "0", "--workers", "0"]
    args = vpfb.parse_args(SMALL + flags + ["--recipe", "authors", "--out-dir", out])
    assert args.attn_res == "4"                                 # their attention_resolutions [2]
    net = vpfb.build_net(args)
    assert isinstance(net.mid[0], vpfb.FiLMResBlock) and net.mid[1].heads == 1
    vpfb.main(SMALL + flags + ["--recipe", "authors", "--out-dir", out])
    a = vpfb.parse_args(["--mode", "sample", "--recipe", "paper", "--out-dir", out])
    net = vpfb.net_from_checkpoint(a.ck_, a, torch.device("cpu"))   # its settings beat the recipe
    assert a.unet == "authors" and isinstance(net, vpfb.AuthorsUNetPhi) and a.cov_form == "corr"
    assert a.sources_["unet"] == a.sources_["cov_form"] == "checkpoint"
    # their own file, converted: --resume --ckpt starts from their weights and step, a fresh Adam
    theirs = str(tmp_path / "checkpoint_1.pth")
    authors_file(theirs, CFG)
    vpfb_convert.main([theirs, str(tmp_path / "theirs.pt"), "--image-size", "8"])
    theirs = str(tmp_path / "theirs.pt")
    capsys.readouterr()
    vpfb.main(["--resume", "--ckpt", theirs, "--steps", "1", "--batch-size", "4", "--workers", "0",
               "--sample-every", "0", "--num-samples", "0", "--log-every", "1", "--image-size",
               "8", "--dataset", "fake", "--fake-size", "8", "--threads", "1",
               "--out-dir", str(tmp_path / "fine")])
    said = capsys.readouterr().out
    assert f"starting from {theirs} at step 1000" in said and "step 1001/1001" in said
    ck = vpfb.load_checkpoint(str(tmp_path / "fine" / "ckpt_main.pt"))
    assert ck["step"] == 1001 and ck["args"]["unet"] == "authors" and ck["opt"]["state"]


def test_recipe_authors_checkpoints_from_before_net_keep_our_unet(tmp_path, capsys):
    """A --recipe authors run saved before --net (now --unet) existed has OUR U-Net: it reloads as
    ours and resumes as ours (the checkpoint beats the recipe); a typed --unet authors is refused
    in one line."""
    out = str(tmp_path / "old")
    flags = ["--model-size", "32", "--ch-mult", "1,2", "--res-blocks", "1", "--dropout", "0",
             "--batch-size", "4", "--steps", "1", "--save-every", "1", "--log-every", "1",
             "--sample-every", "0", "--workers", "0", "--recipe", "authors", "--out-dir", out]
    vpfb.main(SMALL + flags + ["--unet", "ours"])
    ck = torch.load(f"{out}/ckpt_main.pt", weights_only=True)
    del ck["args"]["unet"]                                      # as written before --net existed
    torch.save(ck, f"{out}/ckpt_main.pt")
    a = vpfb.parse_args(["--mode", "sample", "--out-dir", out])
    net = vpfb.net_from_checkpoint(a.ck_, a, torch.device("cpu"))
    assert a.unet == "ours" and a.recipe == "authors" and type(net) is vpfb.UNetPhi
    vpfb.main(SMALL + flags + ["--steps", "2", "--resume"])
    assert vpfb.load_checkpoint(f"{out}/ckpt_main.pt")["args"]["unet"] == "ours"
    err = refused(capsys, lambda: vpfb.main(SMALL + flags + ["--steps", "3", "--resume", "--unet",
                                                             "authors"]))
    assert "--unet authors (checkpoint: ours)" in err
