"""The shape the repository promises its readers (README, "Files"): one job per file (the method and
its run; the paper's experiments; the authors'-checkpoint converter), the two method files read
method first, keep one ENGINEERING divider, stay twins in their engineering names, flags and shared
definitions, and no file points outside the repository."""
import ast
import glob
import inspect
import io
import os
import re
import tokenize

import pytest

import energy_matching as em
import energy_matching_convert as emc
import energy_matching_experiments as emx
import vpfb
import vpfb_convert as vpc
import vpfb_experiments as vpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["energy_matching.py", "energy_matching_experiments.py", "energy_matching_convert.py",
         "vpfb.py", "vpfb_experiments.py", "vpfb_convert.py", "toy2d.py", "eval_fid.py"]
SIBLINGS = [(em, emx), (em, emc), (vpfb, vpx), (vpfb, vpc)]  # (method file, a file that extends it)
BANNERS = ["# ==== 1. The method ====", "# ==== 2. Networks ====",
           "# ==== ENGINEERING: nothing below this line is in the paper ====",
           "# ==== 3. Data ====", "# ==== 4. Training loop ====", "# ==== 5. Checkpoints ====",
           "# ==== 6. Sampling ====", "# ==== 7. Arguments and main ===="]
TWIN_NAMES = ["die", "pick_device", "resolve_args", "build_parser", "build_dataset",
              "save_checkpoint", "load_checkpoint", "read_checkpoint", "to_uint8", "cmd_train",
              "cmd_sample", "main", "Parser", "StepBatches", "step_seed", "ema_update",
              "setup_distributed", "allreduce_grads", "is_authors_checkpoint", "train_step",
              "build_net", "recipe_row", "dataset_row", "typed_flags", "check_memory", "Help",
              "build_method", "generate", "eval_setup", "net_from_checkpoint", "parse_args",
              "find_checkpoint", "run_lock", "atomic", "pick_threads", "next_batch", "Logger",
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


def test_test_files_lines_short():
    """The tests are read beside the code: the same 100-character lines."""
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        with open(path, encoding="utf-8") as f:
            long = [i for i, s in enumerate(f.read().splitlines(), 1) if len(s) > 100]
        assert not long, f"{os.path.basename(path)}: lines over 100 characters: {long[:10]}"


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


def test_the_python_files_are_the_ones_the_readme_lists():
    """README's file table names every Python file at the top of the repository, and no other."""
    here = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("## Files"):readme.index("## What every script does")]
    listed = sorted(set(re.findall(r"^\| `([\w.]+\.py)` \|", table, re.M)))
    assert here == listed == sorted(FILES), (here, listed)


def _defs(mod):
    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    return [n.name if hasattr(n, "name") else n.targets[0].id for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) or (
                isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name))]


@pytest.mark.parametrize("method,sibling", SIBLINGS, ids=lambda m: m.__name__)
def test_a_sibling_extends_never_copies(method, sibling):
    """The experiments and the converter import their method file and define none of its names
    again; the method files keep train and sample and no experiment."""
    copied = set(_defs(sibling)) & set(_defs(method)) - {"MODES", "MODE_SETTINGS", "build_parser",
                                                          "parse_args", "main"}
    assert not copied, f"{sibling.__name__} redefines {sorted(copied)}"
    assert list(method.MODES) == ["train", "sample"]
    if hasattr(sibling, "MODES"):
        assert not set(sibling.MODES) & set(method.MODES)
        assert sibling.build_parser().get_default("recipe") == "authors"


def _engineering(name):
    src = open(os.path.join(ROOT, name), encoding="utf-8").read()
    src = src[src.index("# ==== ENGINEERING"):]
    lines = src.splitlines()
    return {n.name: "\n".join(lines[n.lineno - 1 - len(n.decorator_list):n.end_lineno])
            for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


# Engineering both twins need in one form: byte-identical in the two files (a change to one is a
# change to both).
IDENTICAL = ["die", "load_npz", "face_crop", "image_folder", "StepBatches", "quiet_worker",
             "batch_iterator", "next_batch", "bf16_trunk", "engineer",
             "fast_trunk", "StopSignals", "pick_device", "pick_threads", "setup_distributed",
             "all_max", "count_params", "ema_decay_at", "ema_update", "allreduce_grads",
             "step_seed", "run_lock", "prepare_out_dir", "atomic", "write_json", "report",
             "to_uint8", "save_grid", "pyplot", "save_figure", "read_checkpoint", "load_states",
             "recipe_row", "_number", "Parser", "Help", "typed_flags", "check_memory",
             "args_to_dict", "_read_npz", "list_images", "check_image", "ImageFiles", "warmup_lr",
             "remove_temp_files", "strict_json", "sig", "ints", "device_spec", "refuse_to_replace",
             "machine_memory", "build_net", "train_step", "Logger", "save_checkpoint",
             "net_from_checkpoint", "main"]


def test_twins_share_their_common_engineering_byte_for_byte_in_one_order():
    """IDENTICAL is byte-identical in both method files, and the common definitions are in one
    order; the two experiment files' one shared helper (first_images) is byte-identical too."""
    a, b = _engineering("energy_matching.py"), _engineering("vpfb.py")
    differ = [n for n in IDENTICAL if a.get(n) is None or a.get(n) != b.get(n)]
    assert not differ, f"not byte-identical in the two method files: {differ}"
    common = [n for n in a if n in b]
    assert common == [n for n in b if n in a], "the shared definitions are in another order"
    assert inspect.getsource(emx.first_images) == inspect.getsource(vpx.first_images)


@pytest.mark.parametrize("name", ["energy_matching.py", "vpfb.py"])
def test_sections_1_2_hold_no_engineering_knobs(name):
    """bf16 autocast, channels-last and torch.compile are section 4's (engineer, compile_method):
    the method and its networks above the divider never name them."""
    src = open(os.path.join(ROOT, name), encoding="utf-8").read()
    top = src[:src.index("# ==== ENGINEERING")]
    for pat in [r"\bamp\b", r"autocast", r"channels.last", r"compile", r"bfloat16|\bbf16\b"]:
        hits = [i + 1 for i, s in enumerate(top.splitlines()) if re.search(pat, s, re.I)]
        assert not hits, f"{name}: {pat!r} above the divider, lines {hits}"
