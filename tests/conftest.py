"""Shared test set-up: repo root on sys.path, headless matplotlib, small CPU thread count."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """One intra-op thread for the tiny networks of the method tests (their modules use it through
    `pytestmark`): on a shared 2-core machine two OpenMP threads spin-waiting on each other made a
    tiny double backward ~100x slower (7 s vs 0.05 s). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tree(root):
    """Every path under the repository except git's, Python's and pytest's own caches."""
    skip = {".git", "__pycache__", ".pytest_cache"}
    out = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        out.update(os.path.relpath(os.path.join(d, x), root) for x in dirs + files)
    return out


@pytest.fixture(scope="session", autouse=True)
def working_tree_untouched():
    """Tests write into tmp_path only: the suite fails if it left anything in the repository."""
    before = _tree(ROOT)
    yield
    new = sorted(_tree(ROOT) - before)
    assert not new, f"the tests wrote into the working tree: {new[:10]}"
