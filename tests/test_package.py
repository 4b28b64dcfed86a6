"""The shape of the package: no import circle between its modules, no module over ~350 lines, no side effect on import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tsdk_monai"
MAX_LINES = 350


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _exports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """package -> {name: the submodule its ``__init__`` imports it from}."""
    out: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        table: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsdk_monai"):
                for alias in node.names:
                    table[alias.asname or alias.name] = node.module
        out[name] = table
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions), an import of a name from a package
    resolved to the submodule that defines it (a package's ``__init__`` re-exporting its submodules is no circle)."""
    modules = _modules()
    exports = _exports(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsdk_monai"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:  # `from tsdk_monai.pkg import submodule`
                        deps.add(target)
                    elif node.module in exports and path.name != "__init__.py":
                        deps.add(exports[node.module].get(alias.name, node.module))
                    else:
                        deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tsdk_monai")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert "tsdk_monai.report" in graph and "tsdk_monai.layout" in graph["tsdk_monai.report"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    # the checker finds one when there is one
    assert _cycle({**graph, "tsdk_monai.layout": graph["tsdk_monai.layout"] | {"tsdk_monai.report"}})


def test_no_module_over_the_size_limit():
    sizes = {name: len(p.read_text().splitlines()) for name, p in _modules().items()}
    over = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_importing_the_package_changes_nothing_global():
    """No excepthook, warning filter or logging handler is installed by importing any of the package's modules."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = (
        "import sys, warnings, logging\n"
        "hook, filters, handlers = sys.excepthook, list(warnings.filters), list(logging.getLogger().handlers)\n"
        f"import importlib\n[importlib.import_module(m) for m in {names!r}]\n"
        "assert sys.excepthook is hook, 'excepthook changed'\n"
        "assert logging.getLogger().handlers == handlers, 'root logging handlers changed'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def _flips(node):
    if isinstance(node, dict):
        if node.get("_target_") in ("RandFlipd", "RandFlip", "monai.transforms.RandFlipd"):
            yield node
        for v in node.values():
            yield from _flips(v)
    elif isinstance(node, list):
        for v in node:
            yield from _flips(v)


def test_every_bundle_flips_left_right(tmp_path):
    """MONAI's readers put the image's x (width) on the first spatial axis, so a left-right flip is
    ``spatial_axis=0``; every bundle's flip is that one (an up-down flip would turn the fan of an ultrasound image
    upside down). Distillation and SSL flipped along axis 1 before bundle 0.4.0."""
    import json

    import numpy as np
    from monai.transforms import LoadImage
    from PIL import Image

    img = np.zeros((6, 10), np.uint8)  # 6 rows, 10 columns; bright left column
    img[:, 0] = 255
    Image.fromarray(img).save(tmp_path / "x.png")
    arr = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "x.png"))
    assert tuple(arr.shape) == (1, 10, 6) and float(arr[0, 0].min()) == 255.0  # axis 0 is x
    found = []
    for cfg in sorted((PACKAGE.parent / "bundles").glob("*/configs/*.json")):
        for flip in _flips(json.loads(cfg.read_text())):
            found.append((cfg.parent.parent.name, flip.get("spatial_axis")))
    assert {b for b, _ in found} >= {"tsdk_teacher", "tsdk_student", "tsdk_distill", "tsdk_ssl", "tsdk_synthesis"}
    assert all(axis == 0 for _, axis in found), found


def test_replacing_renames_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    """``utils.replacing``, the one write-then-rename of the package (atomic writers, checkpoint saver, ONNX export):
    the new bytes appear under the name only when the block completes; a failing block leaves the old file as it was
    and no temporary behind."""
    from tsdk_monai.utils import replacing

    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="export failed"):
        with replacing(target, suffix=".onnx") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.") and tmp.suffix == ".onnx"
            tmp.write_bytes(b"half")
            raise RuntimeError("export failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with replacing(target, suffix=".onnx") as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not before the block ends
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_files_written_through_a_rename_get_the_umask_mode(tmp_path):
    """Reports, markers, checkpoints and exported zips are written to a temporary file and renamed: they get the mode a
    plain ``open()`` would (0644 under umask 022), not ``mkstemp``'s 0600, which hid them from a shared machine's
    other users (a clinic's MONAI Label server reading an exported bundle, say)."""
    import os
    import stat

    import torch

    from tsdk_monai.handlers.checkpoint import AtomicDiskSaver
    from tsdk_monai.utils import atomic_copy, atomic_write_json

    before = os.umask(0o027)
    try:
        written = [atomic_write_json(tmp_path / "a.json", {"x": 1}), atomic_copy(tmp_path / "a.json", tmp_path / "b.json")]
        AtomicDiskSaver(tmp_path)({"w": torch.zeros(1)}, "c.pt")
        written.append(tmp_path / "c.pt")
    finally:
        os.umask(before)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        "a.json": "0o640", "b.json": "0o640", "c.pt": "0o640"}
    assert not list(tmp_path.glob(".*"))  # no temporary left
