"""The package's layers: stages above the f-DPG core above model plumbing above utilities.

Every import of every module under `fdpipe/` and `kernels/` (module level or inside a
function) is read from the source and checked against one rule: a module imports from its
own subpackage or from a lower layer, never from a higher layer or a sibling of its layer;
no stage imports another stage; the kernels package imports nothing from fdpipe.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Rank of each subpackage: a module may import from lower ranks and from its own subpackage.
LAYERS = {"stages": 4, "fdpg": 3, "models": 2, "training": 2, "common": 1}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved
    against `package` (the module's own package)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def violations(root: Path) -> list[str]:
    """Every import under `root`/fdpipe and `root`/kernels that breaks the layer rule."""
    found = {}   # one finding per import statement
    for path in sorted((root / "fdpipe").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        package = ".".join(parts[:-1])                      # fdpipe/fdpg/x.py and fdpipe/fdpg/__init__.py: fdpipe.fdpg
        own = parts[1] if len(parts) > 2 else None          # subpackage of this module (None: fdpipe/__init__)
        for line, name in imported_modules(path, package):
            bits = name.split(".")
            if bits[0] != "fdpipe" or len(bits) < 2 or bits[1] not in LAYERS:
                continue
            target = bits[1]
            where = f"{rel}.py:{line}"
            if own is None:
                found.setdefault(where, f"{where} imports {name} (the package root imports no layer)")
            elif target == own:
                if own == "stages" and len(bits) > 2 and bits[2] != parts[2]:
                    found.setdefault(where, f"{where} imports {name} (a stage never imports another stage)")
            elif LAYERS[target] >= LAYERS[own]:
                found.setdefault(where, f"{where} imports {name} ({target} is not below {own})")
    for path in sorted((root / "kernels").rglob("*.py")):
        for line, name in imported_modules(path, "fdpipe_kernels"):
            if name.split(".")[0] == "fdpipe":
                where = f"{path.relative_to(root)}:{line}"
                found.setdefault(where, f"{where} imports {name} (the kernels package stands alone)")
    return list(found.values())


def test_every_import_respects_the_layers():
    assert violations(REPO) == []


def test_every_module_belongs_to_a_layer():
    loose = [p.name for p in (REPO / "fdpipe").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "modules belong in a layer's subpackage"
    assert {p.name for p in (REPO / "fdpipe").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for name in ("fdpipe", "kernels"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    root = _copy_tree(tmp_path)
    assert violations(root) == []
    io = root / "fdpipe" / "common" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _late():\n    from fdpipe.stages import sft  # noqa\n")
    trainable = root / "fdpipe" / "models" / "trainable.py"
    trainable.write_text(trainable.read_text() + "\nfrom fdpipe.training import optim  # noqa\n")
    align = root / "fdpipe" / "stages" / "align.py"
    align.write_text(align.read_text() + "\nfrom fdpipe.stages.sft import completion_loss  # noqa\n")
    targets = root / "fdpipe" / "fdpg" / "targets.py"
    targets.write_text(targets.read_text() + "\nfrom ..stages import report  # noqa\n")
    bench = next((root / "kernels").rglob("reference.py"))
    bench.write_text(bench.read_text() + "\nimport fdpipe.common.io  # noqa\n")
    found = "\n".join(violations(root))
    assert "fdpipe/common/io.py" in found and "stages is not below common" in found
    assert "training is not below models" in found
    assert "a stage never imports another stage" in found
    assert "fdpipe/fdpg/targets.py" in found and "stages is not below fdpg" in found
    assert "the kernels package stands alone" in found
    assert len(violations(root)) == 5
