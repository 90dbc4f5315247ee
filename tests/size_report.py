"""Where the lines of the two method files go (issue 28's size targets), printed, not asserted.

    python tests/size_report.py

For each method file: its length, sections 1-2 (above the ENGINEERING divider), and the lines below
the divider split into code, docstrings, comments and blank lines; how many code lines belong to
the definitions both twins hold byte-identical (tests/test_layout.py's IDENTICAL list); and the
largest of the other definitions. Last, the twins' engineering diff per definition. Not collected
by pytest (no test_ prefix)."""
import ast
import difflib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from test_layout import IDENTICAL  # noqa: E402  (the list the layout test holds the twins to)

TARGETS = {"energy_matching.py": 1400, "vpfb.py": 1550}   # issue 28's, whole file (wc -l)


def definitions(tree, lines, start):
    """{name: (first line, last line)} of the top-level definitions from line `start` (1-based)."""
    out = {}
    for n in tree.body:
        if n.lineno < start:
            continue
        name = getattr(n, "name", None)
        if name is None and isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
            name = n.targets[0].id
        first = n.lineno - len(getattr(n, "decorator_list", []))
        out[name or lines[first - 1].strip()] = (first, n.end_lineno)    # an import: its text
    return out


def kinds(tree, lines):
    """'code' / 'doc' / 'comment' / 'blank' of each line (1-based dict)."""
    doc = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n):
            doc.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return {i: "blank" if not s.strip() else "doc" if i in doc else
            "comment" if s.strip().startswith("#") else "code"
            for i, s in enumerate(lines, 1)}


def report(name):
    lines = open(os.path.join(ROOT, name), encoding="utf-8").read().splitlines()
    div = next(i for i, s in enumerate(lines, 1) if s.startswith("# ==== ENGINEERING"))
    tree = ast.parse("\n".join(lines))                       # parsed once, read twice
    kind, defs = kinds(tree, lines), definitions(tree, lines, div)
    below = [kind[i] for i in range(div, len(lines) + 1)]
    count = {k: below.count(k) for k in ("code", "doc", "comment", "blank")}
    code = {d: sum(kind[i] == "code" for i in range(a, b + 1)) for d, (a, b) in defs.items()}
    shared = sum(c for d, c in code.items() if d in IDENTICAL)
    whole = sum(b - a + 2 for d, (a, b) in defs.items() if d in IDENTICAL)   # + its blank line
    print(f"{name}: {len(lines)} lines (target {TARGETS[name]}); sections 1-2 {div - 1}; below "
          f"the divider {len(lines) - div + 1}: " + ", ".join(f"{v} {k}" for k, v in count.items()))
    print(f"  below the divider the target leaves {TARGETS[name] - div + 1} lines; the code alone "
          f"is {count['code']}")
    print(f"  the {len(IDENTICAL)} byte-identical definitions: {shared} code lines, {whole} with "
          f"their prose (the file without them: {len(lines) - whole})")
    top = sorted(((c, d) for d, c in code.items() if d not in IDENTICAL), reverse=True)[:10]
    print("  largest other definitions (code lines): " + ", ".join(f"{d} {c}" for c, d in top))
    return {d: lines[a - 1:b] for d, (a, b) in defs.items()}


if __name__ == "__main__":
    em, vp = report("energy_matching.py"), report("vpfb.py")
    rows = []
    for d in sorted(set(em) | set(vp)):
        n = sum(s[:1] in "+-" for s in difflib.ndiff(em.get(d, []), vp.get(d, [])))
        if n:
            rows.append((n, d + ("" if d in em and d in vp else " (EM)" if d in em else " (VPFB)")))
    print(f"twins' engineering diff by definition ({sum(n for n, _ in rows)} lines; README's "
          f"whole-file diff also counts the comments between definitions): "
          + ", ".join(f"{d} {n}" for n, d in sorted(rows, reverse=True)))
