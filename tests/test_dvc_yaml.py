"""dvc.yaml tells the truth: each stage depends on every project file its command runs or reads.

A dependency left out of dvc.yaml is a silent bug: editing that file does not rerun the stage, so
the committed results no longer match the code. The checker reads the code the way Python runs it:
every `import` (at top level or inside a function) of a module under stages/, transitively, plus
the package's __init__.py, plus data files a module opens next to itself (`Path(__file__).with_name`).
"""

import ast
import re
from pathlib import Path

import yaml

from tests.helpers import ROOT

STAGE_COMMAND = re.compile(r"\bpython -m (stages(?:\.\w+)+)")


def module_file(root: Path, name: str) -> str | None:
    """`stages.data` -> 'stages/data.py' (or a package's __init__.py); None if it is not a project module."""
    for rel in (name.replace(".", "/") + ".py", name.replace(".", "/") + "/__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a module imports, anywhere in it; `from a import b` yields both `a` and `a.b`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, [package] * bool(node.level) + [node.module or ""]))  # `from . import x`
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def data_files(rel: str, tree: ast.AST) -> set[str]:
    """Files a module opens by a path next to itself: `Path(__file__).with_name("x")`, `... .parent / "x"`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name":
            target = node.args[0] if node.args else None
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and "__file__" in ast.unparse(node.left):
            target = node.right
        else:
            continue
        if isinstance(target, ast.Constant) and isinstance(target.value, str) and "__file__" in ast.unparse(node):
            found.add(str(Path(rel).parent / target.value))
    return found


def files_run_by(root: Path, module: str) -> set[str]:
    """Every project file `python -m <module>` imports or reads, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        # Importing `stages.data` first runs stages/__init__.py: every enclosing package counts.
        parts = name.split(".")
        for rel in filter(None, (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1))):
            if rel in seen:
                continue
            seen.add(rel)
            tree = ast.parse((root / rel).read_text())
            package = rel.rsplit("/", 1)[0].replace("/", ".") if "/" in rel else ""
            todo += [n for n in imported_names(tree, package) if n.split(".")[0] == parts[0]]
            seen |= {f for f in data_files(rel, tree) if (root / f).is_file()}
    return seen


def missing_deps(dvc_yaml: str, root: Path = ROOT) -> dict[str, list[str]]:
    """For each stage running `python -m stages.<name>`, the project files it runs but does not list in deps."""
    missing = {}
    for stage, spec in yaml.safe_load(dvc_yaml)["stages"].items():
        command = STAGE_COMMAND.search(" ".join(spec["cmd"]) if isinstance(spec["cmd"], list) else spec["cmd"])
        if command:
            absent = files_run_by(root, command.group(1)) - set(spec.get("deps", []))
            if absent:
                missing[stage] = sorted(absent)
    return missing


def test_every_stage_depends_on_the_code_it_runs():
    assert missing_deps((ROOT / "dvc.yaml").read_text()) == {}


# The download stage as dvc.yaml had it at commit ab2703b: stages/__init__.py (run_stage) and
# stages/files.py (imported by stages/data.py) were missing, so editing them reran nothing.
OLD_DOWNLOAD_STAGE = """
stages:
  download:
    cmd: python -m stages.download --out data/fashion-mnist
    deps:
      - stages/download.py
      - stages/data.py
      - stages/config.py
      - stages/fashion-mnist.sha256
"""


def test_the_checker_finds_what_the_old_dvc_yaml_left_out():
    missing = missing_deps(OLD_DOWNLOAD_STAGE)
    assert {"stages/__init__.py", "stages/files.py"} <= set(missing["download"])


def test_the_checker_follows_imports_in_functions_relative_imports_and_data_files(tmp_path):
    package = tmp_path / "stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text("import json\n\ndef run():\n    from stages import helper\n")
    (package / "helper.py").write_text("from .table import ROWS\n")
    (package / "table.py").write_text("from pathlib import Path\n\nROWS = Path(__file__).with_name('rows.txt')\n")
    (package / "rows.txt").write_text("1\n")
    (package / "unused.py").write_text("")
    expected = {"stages/__init__.py", "stages/main.py", "stages/helper.py", "stages/table.py", "stages/rows.txt"}
    assert files_run_by(tmp_path, "stages.main") == expected
    dvc_yaml = "stages:\n  s:\n    cmd: python -m stages.main\n    deps: [stages/main.py, stages/helper.py]\n"
    assert missing_deps(dvc_yaml, tmp_path) == {"s": ["stages/__init__.py", "stages/rows.txt", "stages/table.py"]}
