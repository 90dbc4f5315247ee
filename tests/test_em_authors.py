"""Loading the Energy Matching authors' checkpoints (https://github.com/m1balcerak/EnergyMatching)
into our UNetViTPotential: the dummy-time folding, the key mapping against an independent
re-implementation of their EBViTModelWrapper.potential (written here from reading their code and
torchcfm's UNet, https://github.com/atong01/conditional-flow-matching, with their state-dict names),
and the refusal of files of the wrong kind. CPU, small widths, no download."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import energy_matching as em
import energy_matching_convert as emc
from energy_matching import is_authors_checkpoint, sinusoidal_embedding
from energy_matching_convert import (authors_arch, authors_checkpoint_as_ours, authors_names,
                                     authors_time_embedding, fold_time_bias,
                                     load_authors_checkpoint)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one intra-op thread


# ---- an independent re-implementation of the authors' potential, with their module names ----
def time_features(t, dim):
    """Sinusoidal features of times t (B,): cos then sin, frequencies 10000^(-i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class RefResBlock(nn.Module):
    def __init__(self, cin, cout, emb_ch):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.1),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]   # additive time term
        return self.skip_connection(x) + self.out_layers(h)


class RefAttention(nn.Module):
    """64 channels per head; qkv channels grouped per head first, then (q, k, v) inside a head."""

    def __init__(self, ch):
        super().__init__()
        self.heads = ch // 64
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        d = C // self.heads
        qkv = self.qkv(self.norm(x.reshape(B, C, H * W)))
        q, k, v = qkv.reshape(B * self.heads, 3 * d, H * W).split(d, dim=1)   # (B heads, d, T)
        w = torch.softmax(torch.einsum("bdt,bds->bts", q, k) / math.sqrt(d), dim=-1)
        a = torch.einsum("bts,bds->bdt", w, v).reshape(B, C, H * W)
        return x + self.proj_out(a).reshape(B, C, H, W)


class RefDown(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class RefUp(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class RefPatchEmbed(nn.Module):
    def __init__(self, C, dim, patch, side):
        super().__init__()
        self.patch_embed = nn.Conv2d(C, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (side // patch) ** 2, dim))

    def forward(self, u):
        return self.patch_embed(u).flatten(2).transpose(1, 2) + self.pos_embed


class RefEBViT(nn.Module):
    """UNet at the dummy time 0.5 -> patch embedding -> post-LN GELU transformer -> mean, linear."""

    def __init__(self, C=3, side=16, ch=64, mult=(1, 2), nres=2, attn_ds=(2,), dim=192, depth=2,
                 heads=4, patch=4, scale=1000.0):
        super().__init__()
        E, self.ch, self.scale = 4 * ch, ch, scale
        self.time_embed = nn.Sequential(nn.Linear(ch, E), nn.SiLU(), nn.Linear(E, E))
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(C, ch, 3, padding=1)])])
        chans, cur, ds = [ch], ch, 1
        for lvl, m in enumerate(mult):
            for _ in range(nres):
                blk = [RefResBlock(cur, m * ch, E)]
                cur = m * ch
                if ds in attn_ds:
                    blk.append(RefAttention(cur))
                self.input_blocks.append(nn.ModuleList(blk))
                chans.append(cur)
            if lvl < len(mult) - 1:
                self.input_blocks.append(nn.ModuleList([RefDown(cur)]))
                chans.append(cur)
                ds *= 2
        self.middle_block = nn.ModuleList([RefResBlock(cur, cur, E), RefAttention(cur),
                                           RefResBlock(cur, cur, E)])
        self.output_blocks = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(mult))):
            for i in range(nres + 1):
                blk = [RefResBlock(cur + chans.pop(), m * ch, E)]
                cur = m * ch
                if ds in attn_ds:
                    blk.append(RefAttention(cur))
                if lvl and i == nres:
                    blk.append(RefUp(cur))
                    ds //= 2
                self.output_blocks.append(nn.ModuleList(blk))
        self.out = nn.Sequential(nn.GroupNorm(32, cur), nn.SiLU(), nn.Conv2d(cur, C, 3, padding=1))
        self.patch_embed = RefPatchEmbed(C, dim, patch, side)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.1, activation="gelu",
                                           batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_linear = nn.Linear(dim, 1)

    @staticmethod
    def run(blk, h, emb):
        for m in blk:
            h = m(h, emb) if isinstance(m, RefResBlock) else m(h)
        return h

    def potential(self, x):
        emb = self.time_embed(time_features(torch.full((x.shape[0],), 0.5), self.ch))
        h, hs = x, []
        for blk in self.input_blocks:
            h = self.run(blk, h, emb)
            hs.append(h)
        h = self.run(self.middle_block, h, emb)
        for blk in self.output_blocks:
            h = self.run(blk, torch.cat([h, hs.pop()], dim=1), emb)
        tok = self.patch_embed(self.out(h))
        return self.final_linear(self.transformer_encoder(tok).mean(dim=1)).view(-1) * self.scale


def perturbed(module, seed):
    """Random values everywhere (zero-initialised convs too), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if v.dim() > 1 and k != "patch_embed.pos_embed":
            sd[k] = r / math.sqrt(v[0].numel())
        elif torch.all(v == 1):                        # norm gains
            sd[k] = 1 + 0.1 * r
        else:
            sd[k] = 0.1 * r
    return sd


def adam_and_sched_states(module):
    """Entries shaped like the authors' "optim" (Adam state_dict) and "sched" (LambdaLR state_dict),
    written out by hand: the first torch.optim.Adam costs seconds of one-off imports."""
    params = list(module.parameters())
    optim = {"state": {i: {"step": torch.tensor(147000.0), "exp_avg": torch.zeros_like(p),
                           "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
             "param_groups": [{"lr": 1.2e-3, "betas": (0.9, 0.95), "eps": 1e-8,
                               "weight_decay": 0, "amsgrad": False, "maximize": False,
                               "foreach": None, "capturable": False, "differentiable": False,
                               "fused": None, "initial_lr": 1.2e-3,
                               "params": list(range(len(params)))}]}
    sched = {"base_lrs": [1.2e-3], "last_epoch": 147000, "_step_count": 147001,
             "_last_lr": [1.2e-3], "_get_lr_called_within_step": False, "lr_lambdas": [None]}
    return optim, sched


def one_error_line(capsys, excinfo):
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- (a) the folding on one ResBlock ----
def test_fold_time_bias_on_one_resblock():
    torch.manual_seed(0)
    ch, cin, cout = 32, 32, 64
    time_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
    ref = RefResBlock(cin, cout, 4 * ch).eval()
    sd = {f"time_embed.{k}": v for k, v in perturbed(time_embed, 1).items()}
    sd.update({f"blk.{k}": v for k, v in perturbed(ref, 2).items()})
    time_embed.load_state_dict({k[len("time_embed."):]: v for k, v in sd.items()
                                if k.startswith("time_")})
    ref.load_state_dict({k[len("blk."):]: v for k, v in sd.items() if k.startswith("blk.")})
    # the embedding itself: the block's float64 sinusoid and time MLP against float32 ones here
    feats = time_features(torch.tensor([0.5]), ch)
    assert torch.allclose(sinusoidal_embedding(0.5, ch).float(), feats[0], atol=1e-6)
    emb = time_embed(feats)
    assert torch.allclose(authors_time_embedding(sd).float(), emb[0], atol=1e-5)
    # ours: same tensors by name, the constant emb_layers(emb) moved into conv1's bias
    ours = em.ResBlock(cin, cout, 0.1).eval()
    theirs = {"n1": "in_layers.0", "c1": "in_layers.2", "n2": "out_layers.0", "c2": "out_layers.3",
              "skip": "skip_connection"}
    mapped = {k: sd[f"blk.{theirs[k.split('.')[0]]}.{k.split('.')[1]}"] for k in ours.state_dict()}
    mapped["c1.bias"] = fold_time_bias(sd, "blk", authors_time_embedding(sd))
    ours.load_state_dict(mapped)
    x = torch.randn(3, cin, 8, 8)
    with torch.no_grad():
        direct, folded = ref(x, emb.expand(3, -1)), ours(x)
    assert (folded - direct).abs().max() <= 1e-5 * direct.abs().max()
    # the bias really carries the time term: without it the outputs differ
    ours.c1.bias.data = sd["blk.in_layers.2.bias"].clone()
    with torch.no_grad():
        assert (ours(x) - direct).abs().max() > 1e-3 * direct.abs().max()


# ---- (b) a whole network in the authors' layout, perturbed random weights ----
SMALL = dict(C=3, side=8, ch=64, mult=(1, 2), nres=2, attn_ds=(2,), dim=192, depth=2)   # size 0.5


@pytest.fixture(scope="module")
def refs():
    """Raw and EMA networks in the authors' layout with different perturbed weights (built once)."""
    torch.manual_seed(0)
    raw, ema = RefEBViT(**SMALL), RefEBViT(**SMALL)
    raw.load_state_dict(perturbed(raw, 10))
    ema.load_state_dict(perturbed(ema, 11))
    return raw.eval(), ema.eval()


def authors_file(tmp_path, refs, prefix=""):
    """Write an authors'-layout training file (the keys their script saves); returns its path."""
    raw, ema = refs
    optim, sched = adam_and_sched_states(raw)
    ck = {"net_model": {prefix + k: v for k, v in raw.state_dict().items()},
          "ema_model": {prefix + k: v for k, v in ema.state_dict().items()},
          "sched": sched, "optim": optim, "step": 147000}
    path = str(tmp_path / "authors.pt")
    torch.save(ck, path)
    return path


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_authors_weights_roundtrip_and_potential_matches(tmp_path, refs):
    path, (raw, ema) = authors_file(tmp_path, refs), refs
    V = load_authors_checkpoint(path)                          # use_ema=True: "ema_model"
    assert isinstance(V, em.UNetViTPotential) and not V.training
    assert V.arch_kwargs["ch_mult"] == (1, 2) and V.arch_kwargs["attn_res"] == (4,)
    assert V.arch_kwargs["res_blocks"] == 2 and V.arch_kwargs["vit_depth"] == 2
    # every authors' tensor is used: all but the time layers by name, those via the folded biases
    sd = ema.state_dict()
    names, resblocks = authors_names(V)
    time_keys = {k for k in sd if k.startswith("time_embed.") or ".emb_layers." in k}
    assert set(names.values()) | time_keys == set(sd) and len(set(names.values())) == len(names)
    assert len(time_keys) == 4 + 2 * len(resblocks)
    for ours, theirs in names.items():
        if not theirs.endswith("in_layers.2.bias"):
            assert torch.equal(V.state_dict()[ours], sd[theirs]), ours
    # V(x) against the independent forward, and its gradient (the sampler's drift)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        v_ref, v_ours = ema.potential(x), V(x)
    err = rel_err(v_ours, v_ref)
    print(f"relative error of V (EMA weights): {err:.2e}")
    assert err < 1e-4
    g_ref = torch.autograd.grad(ema.potential(x.requires_grad_()).sum(), x)[0]
    g_ours = em.grad_V(V, x.detach())
    assert rel_err(g_ours, g_ref) < 1e-4
    # use_ema=False reads "net_model"
    V_raw = load_authors_checkpoint(path, use_ema=False)
    with torch.no_grad():
        assert rel_err(V_raw(x.detach()), raw.potential(x.detach())) < 1e-4
        assert rel_err(V(x.detach()), raw.potential(x.detach())) > 1e-2


def test_ddp_and_compile_prefixes(tmp_path, refs):
    path, ema = authors_file(tmp_path, refs, prefix="module._orig_mod."), refs[1]
    V = load_authors_checkpoint(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(V(x), ema.potential(x)) < 1e-4


def test_full_size_layout_and_parameter_counts():
    """The authors' CIFAR-10 configuration, shapes only (meta tensors): the mapping covers it, and
    the parameter counts are 50.0M (theirs) vs 47.1M (ours, time layers folded)."""
    with torch.device("meta"):
        ref = RefEBViT(C=3, side=32, ch=128, mult=(1, 2, 2, 2), nres=2, attn_ds=(2,), dim=384,
                       depth=8)
        sd = ref.state_dict()
        kw = authors_arch(sd)
        ours = em.UNetViTPotential(**kw)
    assert kw["ch"] == 128 and kw["ch_mult"] == (1, 2, 2, 2) and kw["attn_res"] == (16,)
    assert kw["res_blocks"] == 2 and kw["vit_depth"] == 8 and kw["patch"] == 4
    assert kw["shape"] == (3, 32, 32)
    # (authors_to_ours is not run on meta tensors: their float64 kernels import torch._dynamo, ~8 s)
    names, resblocks = authors_names(ours)
    time_keys = {f"{r}.emb_layers.1.{p}" for r in resblocks for p in ("weight", "bias")}
    assert set(names.values()) | time_keys == {k for k in sd if not k.startswith("time_embed.")}
    assert all(sd[theirs].shape == ours.state_dict()[k].shape for k, theirs in names.items())
    assert all(sd[f"{r}.emb_layers.1.bias"].shape == sd[f"{r}.in_layers.2.bias"].shape
               for r in resblocks)
    n_ref, n_ours = em.count_params(ref), em.count_params(ours)
    assert round(n_ref / 1e6, 1) == 50.0 and round(n_ours / 1e6, 1) == 47.1
    assert n_ref - n_ours == sum(v.numel() for k, v in sd.items()
                                 if k.startswith("time_embed.") or ".emb_layers." in k) == 2_889_600
    # with their time layers (--recipe authors): every tensor of theirs, by name and shape
    with torch.device("meta"):
        timed = em.UNetViTPotential(**kw, time_layers=True)
    names, _ = authors_names(timed)
    assert set(names.values()) == set(sd) and em.count_params(timed) == n_ref
    assert all(sd[theirs].shape == timed.state_dict()[k].shape for k, theirs in names.items())


# ---- (c) files of the wrong kind: one line, exit 2 ----
def test_refuses_wrong_kinds(tmp_path, capsys):
    t = torch.zeros(2, 2)
    cases = {
        "ours": ({"format": "energy_matching/v1", "model": {"inp.weight": t},
                  "ema": {"inp.weight": t}, "opt": None, "step": 1, "args": {}}, "own format"),
        "vpfb": ({"model": {"module.all_modules.0.weight": t},
                  "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": [t]},
                  "optimizer": {}, "step": 3, "sigma_max": 50.0},
                 "not an authors' Energy Matching checkpoint"),
        "mlp": ({"net_model": {"time_embed.0.weight": t, "mlp.1.weight": t},
                 "ema_model": {"time_embed.0.weight": t, "mlp.1.weight": t}, "step": 1},
                "MLP-head"),
        "tensor": (t, "not an authors' Energy Matching checkpoint"),
    }
    for name, (obj, says) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(obj, path)
        with pytest.raises(SystemExit) as e:
            load_authors_checkpoint(path)
        assert says in one_error_line(capsys, e), name
    assert not is_authors_checkpoint(cases["ours"][0])
    assert not is_authors_checkpoint(cases["vpfb"][0])
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    for p in (str(bad), str(tmp_path / "missing.pt")):
        with pytest.raises(SystemExit) as e:
            load_authors_checkpoint(p)
        one_error_line(capsys, e)


def test_unmatched_keys_are_listed(tmp_path, capsys, refs):
    path = authors_file(tmp_path, refs)
    ck = torch.load(path, weights_only=True)
    ck["ema_model"]["label_emb.weight"] = torch.zeros(10, 256)     # a class-conditional extra
    del ck["ema_model"]["output_blocks.0.0.skip_connection.weight"]
    torch.save(ck, path)
    with pytest.raises(SystemExit) as e:
        load_authors_checkpoint(path)
    err = one_error_line(capsys, e)
    assert "label_emb.weight" in err and "output_blocks.0.0.skip_connection.weight" in err


# ---- load_checkpoint's dispatch: an authors' file as our checkpoint dict, and --mode sample ----
def eval_net(path, use_ema=True, *flags):
    """The network a sampling mode builds from `path`, and its settled args."""
    args = em.parse_args(["--mode", "sample", "--ckpt", path, "--device", "cpu", *flags]
                         + ([] if use_ema else ["--no-ema"]))
    return em.net_from_checkpoint(args.ck_, args, torch.device("cpu")), args


def test_as_our_checkpoint_feeds_model_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    kw = dict(C=3, side=32, ch=32, mult=(1, 2), nres=1, attn_ds=(2,), dim=96, depth=1)  # size 0.25
    raw, ema = RefEBViT(**kw), RefEBViT(**kw)
    raw.load_state_dict(perturbed(raw, 20))
    ema.load_state_dict(perturbed(ema, 21))
    ck = {"net_model": raw.state_dict(), "ema_model": ema.state_dict(), "step": 145000}
    ours = authors_checkpoint_as_ours(ck, "authors.pt")
    a = ours["args"]
    assert (a["tau_star"], a["eps_max"], a["dt"], a["ch_mult"], a["res_blocks"]) == (
        1.0, 0.01, 0.01, "1,2", 1)
    assert ours["opt"] is None and ours["step"] == 145000
    path = str(tmp_path / "converted.pt")
    torch.save(ours, path)                          # what load_checkpoint would return in memory
    x = torch.randn(2, 3, 32, 32)
    for use_ema, ref in ((True, ema.eval()), (False, raw.eval())):
        V, _ = eval_net(path, use_ema)
        with torch.no_grad():
            assert rel_err(V(x), ref.potential(x)) < 1e-4


def test_an_authors_file_is_converted_once_then_sampled_end_to_end(tmp_path, capsys):
    """`--ckpt <authors' file>`: one line naming energy_matching_convert.py; the converted file
    samples with their settings (EMA weights, Heun) and the tau_s given on the command line
    (their README: --tau-s 3.25)."""
    torch.manual_seed(0)
    kw = dict(C=3, side=16, ch=32, mult=(2,), nres=1, attn_ds=(1,), dim=96, depth=1)  # size 0.25
    raw, ema = RefEBViT(**kw), RefEBViT(**kw)
    raw.load_state_dict(perturbed(raw, 30))
    ema.load_state_dict(perturbed(ema, 31))
    path = str(tmp_path / "cifar10_main_training_147000.pt")
    torch.save({"net_model": raw.state_dict(), "ema_model": ema.state_dict(), "step": 147000}, path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        em.main(["--mode", "sample", "--ckpt", path, "--device", "cpu", "--out-dir", str(out)])
    assert f"python energy_matching_convert.py {path} OUT.pt" in one_error_line(capsys, e)
    theirs, path = path, str(tmp_path / "converted" / "ckpt_main.pt")
    emc.main([theirs, path])
    # in-process main() (a subprocess would spend ~8 s importing torch): the command line's path
    em.main(["--mode", "sample", "--ckpt", path, "--dataset", "fake", "--num-samples", "3",
             "--tau-s", "0.05", "--dt", "0.01", "--device", "cpu", "--threads", "1",
             "--out-dir", str(out)])
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    meta = json.loads((out / "samples.json").read_text())
    st = meta["settings"]
    assert st["tau_s"] == 0.05 and st["weights"] == "ema" and st["sampler"] == "heun"
    assert meta["from"]["tau_s"] == "flag" and meta["from"]["eps_max"] == "checkpoint"
    # the converted checkpoint in memory: finite samples from the same EMA potential
    V, args = eval_net(path, True, "--tau-s", "0.05")
    ck = args.ck_
    assert ck["phase"] == "authors" and ck["step"] == 147000 and args.recipe == "authors"
    x, _ = em.generate(em.build_method(V, args), 2, (3, 16, 16), "cpu", 2)
    assert torch.isfinite(x).all()
    x0 = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(V(x0), ema.eval().potential(x0)) < 1e-4


# ---- (c) their time layers as trained parameters (--recipe authors), the converter both ways ----
TINY = dict(shape=(3, 8, 8), ch=32, res_blocks=1, vit_depth=1, ch_mult=(1, 2), attn_res=(4,),
            dropout=0.0)


def perturb_(net, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def test_time_layers_are_their_parameters_and_map_both_ways_exactly():
    """UNetViTPotential(time_layers=True) has every tensor of their EBViTModelWrapper, time layers
    included: ours -> theirs -> ours is the identity tensor for tensor, and so is the folded form
    (its time layers are zeros in their layout). Folding changes V by float32 rounding only."""
    torch.manual_seed(0)
    net = perturb_(em.UNetViTPotential(**TINY, time_layers=True)).eval()
    flat = em.UNetViTPotential(**TINY).eval()
    sd = net.state_dict()
    theirs = emc.ours_to_authors(sd, net)
    names, resblocks = authors_names(net)
    assert {k for k in theirs if k.startswith("time_embed.") or ".emb_layers." in k} == \
        {f"time_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} | \
        {f"{r}.emb_layers.1.{p}" for r in resblocks for p in ("weight", "bias")}
    assert len(theirs) == len(sd) and set(theirs) == set(names.values())
    back = emc.authors_to_ours(theirs, net)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    n_time = sum(v.numel() for k, v in theirs.items() if "time_embed" in k or "emb_layers" in k)
    assert em.count_params(net) - em.count_params(flat) == n_time > 0
    # the folded form: the same V; its authors' layout has zero time layers and maps back exactly
    folded = emc.fold_time_layers(net)
    assert not folded.time_layers and em.count_params(folded) == em.count_params(flat)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(folded(x), net(x)) < 1e-5
        assert rel_err(flat(x), net(x)) > 1e-2             # a different network: the test bites
    fsd = folded.state_dict()
    f_theirs = emc.ours_to_authors(fsd, folded)
    assert set(f_theirs) == set(theirs)
    assert all(f_theirs[k].abs().max() == 0 for k in f_theirs if "emb_layers" in k)
    f_back = emc.authors_to_ours(f_theirs, folded)
    assert all(torch.equal(f_back[k], v) for k, v in fsd.items())
    # their layout with time layers -> the folded net through the converter: the same V again
    flat.load_state_dict(emc.authors_to_ours(theirs, flat))
    with torch.no_grad():
        assert rel_err(flat(x), net(x)) < 1e-5


def test_time_layers_are_trained_under_the_authors_recipe(tmp_path):
    """--recipe authors builds the UNet+ViT with their time layers, and a training step moves them
    (Adam on time_embed / emb_layers, not on the bias they add up to); --recipe paper folds them."""
    args = em.parse_args(["--dataset", "fake", "--image-size", "8", "--out-dir", str(tmp_path)])
    assert args.time_layers is True and args.ot_replace is True
    paper = em.parse_args(["--recipe", "paper", "--dataset", "fake", "--out-dir", str(tmp_path)])
    assert paper.time_layers is False and paper.ot_replace is False
    args.model_size, args.res_blocks, args.vit_depth, args.ch_mult = 32, 1, 1, "1,2"
    net = perturb_(em.build_net(args))          # off the zero-initialised output layers
    assert net.time_layers and hasattr(net, "time_embed")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    method, opt = em.build_method(net, args), em.build_optimizer(net, args)
    torch.manual_seed(0)
    x1 = torch.rand(4, 3, 8, 8) * 2 - 1
    logs, ok, _ = em.train_step(method, net, opt, dict(x1=x1), 1e-3, 1.0)
    assert ok
    time_keys = [k for k in before if k.startswith("time_embed.") or ".emb." in k]
    assert len(time_keys) == 4 + 2 * sum(isinstance(m, em.ResBlock) for m in net.modules())
    moved = [k for k in time_keys if not torch.equal(before[k], net.state_dict()[k])]
    assert moved == time_keys
