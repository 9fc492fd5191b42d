"""Tree-size figures of a checkout: library modules, those over 300 lines, the longest functions and
those with the most arguments, the README's lines, and docs/ as git holds it.

    python benchmarks/tree_size.py            # this checkout
    python benchmarks/tree_size.py OTHER_DIR  # another (e.g. a `git worktree add` of an older commit)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    modules = sorted(root.glob("fedse/**/*.py"))
    lines = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in modules}
    big = sorted(((n, k) for k, n in lines.items() if n > 300), reverse=True)
    functions = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
                functions.append((node.end_lineno - node.lineno + 1, args, f"{path.relative_to(root)}:{node.name}"))
    files = subprocess.run(["git", "-C", str(root), "ls-files", "docs"], capture_output=True, text=True).stdout.split()
    size = sum((root / f).stat().st_size for f in files if (root / f).is_file())
    print(f"library modules: {len(modules)}, over 300 lines: {len(big)}: " + ", ".join(f"{k} {n}" for n, k in big))
    print(
        "longest functions (lines): " + ", ".join(f"{name} {n}" for n, _, name in sorted(functions, reverse=True)[:5])
    )
    most = sorted(functions, key=lambda f: -f[1])[:3]
    print("most arguments: " + ", ".join(f"{name} {a}" for _, a, name in most))
    print(f"README.md: {len((root / 'README.md').read_text().splitlines())} lines")
    print(f"docs/ in git: {len(files)} files, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
