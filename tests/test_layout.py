"""The shape the repository promises its readers (README, "Files"): the two method files read method
first, keep one ENGINEERING divider, stay twins in their engineering names and flags, and no file points
outside the repository."""
import io
import os
import re
import tokenize

import pytest

import energy_matching as em
import vpfb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["energy_matching.py", "vpfb.py", "toy2d.py", "eval_fid.py"]
BANNERS = ["# ==== 1. The method ====", "# ==== 2. Networks ====",
           "# ==== ENGINEERING: nothing below this line is in the paper ====",
           "# ==== 3. Data ====", "# ==== 4. Training loop ====", "# ==== 5. Checkpoints ====",
           "# ==== 6. Experiment modes ====", "# ==== 7. Arguments and main ===="]
TWIN_NAMES = ["die", "pick_device", "resolve_args", "build_parser", "build_dataset",
              "save_checkpoint", "load_checkpoint", "read_checkpoint", "to_uint8", "cmd_train",
              "cmd_sample", "main", "Parser", "StepBatches", "step_seed", "ema_update",
              "setup_distributed", "allreduce_grads", "is_authors_checkpoint",
              "load_authors_checkpoint", "authors_checkpoint_as_ours", "train_step", "build_net",
              "build_method", "generate", "eval_setup", "net_from_checkpoint", "parse_args",
              "find_checkpoint", "RunLock", "atomic", "pick_threads", "next_batch", "Logger",
              "StopSignals", "AUTHORS", "RECIPES", "METHOD_FLAGS", "ARCH_KEYS", "MODE_SETTINGS"]
TWIN_FLAGS = ["--workers", "--ch-mult", "--res-blocks", "--sample-batch", "--amp", "--recipe",
              "--threads", "--seed", "--device", "--out-dir", "--ckpt", "--resume", "--data-dir",
              "--dataset", "--num-samples", "--log-every", "--save-every", "--sample-every",
              "--ema-decay", "--ema-warmup", "--no-ema-warmup", "--no-ema", "--lr", "--steps",
              "--batch-size", "--grad-clip", "--warmup", "--image-size", "--fake-size", "--compile",
              "--channels-last", "--arch", "--model-size", "--channels", "--betas", "--sampler",
              "--dropout"]


def _lines(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.mark.parametrize("name,cls", [("energy_matching.py", "class EnergyMatching"),
                                      ("vpfb.py", "class VPFB")])
def test_method_first_with_the_banners_in_order(name, cls):
    lines = _lines(name)
    at = [lines.index(b) if b in lines else -1 for b in BANNERS]
    assert -1 not in at, f"{name} lacks {BANNERS[at.index(-1)]!r}"
    assert at == sorted(at), f"{name}: banners out of order"
    assert sum(b.startswith("# ==== ENGINEERING") for b in lines) == 1
    first = next(i for i, s in enumerate(lines) if s.startswith(cls))
    assert at[0] < first < at[1] and first < 300, f"{cls} starts at line {first + 1}"


@pytest.mark.parametrize("name", FILES)
def test_lines_short_no_semicolons_no_paths_outside_the_repo(name):
    lines = _lines(name)
    long = [i + 1 for i, s in enumerate(lines) if len(s) > 100]
    assert not long, f"{name}: lines over 100 characters: {long[:10]}"
    toks = tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
    semis = [t.start[0] for t in toks if t.type == tokenize.OP and t.string == ";"]
    assert not semis, f"{name}: ';'-joined statements at lines {semis}"
    text = "\n".join(lines)
    for pat in [r"\.\./shared", r"REFERENCE_NOTES", r"\bAPI\.md", r"papers/\w+\.md"]:
        assert not re.search(pat, text), f"{name} points outside the repository ({pat})"


def test_twins_share_engineering_names_and_flags():
    for n in TWIN_NAMES:
        assert hasattr(em, n) and hasattr(vpfb, n), f"twin name {n} missing in one file"
    em_flags = {o for a in em.build_parser()._actions for o in a.option_strings}
    vp_flags = {o for a in vpfb.build_parser()._actions for o in a.option_strings}
    missing = [f for f in TWIN_FLAGS if f not in em_flags or f not in vp_flags]
    assert not missing, f"flags not in both twins: {missing}"
