"""The package's shape: imports point down, no cycles, nothing set at import, parts owned by objects."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import blip2

PACKAGE = Path(blip2.__file__).parent
# Each layer may import those below it, never those above (apps sit on top of everything).
LAYERS = ["native", "config", "hub", "checkpoint", "models", "inputs", "quant", "engine", "data", "apps"]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at any depth of its code)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else None
    return LAYERS.index(part) if part in LAYERS else None


def test_imports_point_down():
    wrong = []
    for module, targets in _imports().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "library code imports a layer above it:\n" + "\n".join(sorted(wrong))


def test_importing_sets_no_environment_and_starts_no_threads():
    code = ("import os, threading; before = dict(os.environ); n = threading.active_count(); import blip2; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "assert threading.active_count() == n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_an_installed_package_carries_every_kernel_source_and_data_file():
    """A wheel holds what package-data names: the C++ sources and headers the kernels compile from."""
    globs = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["blip2"]
    files = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(f.suffix == ".h" for f in files) and any(f.suffix == ".cpp" for f in files)
    assert [str(f) for f in files if not any(f.match(g) and len(f.parts) == len(Path(g).parts) for g in globs)] == []


def test_trainable_parameters_learn_through_the_whole_model(ckpt_root):
    # What fine-tuning builds on: chosen parameters load trainable (in memory of their own, not a map
    # of the file), the rest frozen, and a loss on the logits reaches them through the language model.
    from checkpoints import opt_inputs, pixels, rel_err, tiny_config, write_checkpoint

    cfg = tiny_config("opt")
    path = write_checkpoint(ckpt_root / "trainable-opt", cfg, seed=21)
    model = blip2.load(path, trainable=lambda name: name.startswith("qformer."))
    params = dict(model.model.named_parameters())
    assert all(p.requires_grad == name.startswith("qformer.") for name, p in params.items())
    frozen = blip2.load(path)
    ids, mask = opt_inputs(cfg, [[5, 6, 7], [8]])
    logits = model.model(pixels(2, 28), ids, mask)
    # the frozen model's linears are packed for oneDNN, whose float32 products round differently
    assert rel_err(logits.detach(), frozen.forward(pixels(2, 28), ids, mask)) < 1e-5
    logits.logsumexp(-1).mean().backward()
    grads = {name: p.grad for name, p in params.items() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    before = params["qformer.layernorm.weight"].detach().clone()
    with torch.no_grad():
        params["qformer.layernorm.weight"].add_(1.0)  # its own memory: the file is untouched
    again = blip2.load(path)
    assert torch.equal(again.model.get_parameter("qformer.layernorm.weight"), before)


def test_a_closed_model_leaves_no_image_workers_and_stays_usable(ckpt_root, tmp_path):
    import threading

    import numpy as np
    from PIL import Image

    from checkpoints import full_checkpoint

    path, _ = full_checkpoint(ckpt_root / "close-opt", "opt", seed=22)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(files[-1])

    def workers() -> set[int]:  # other models of the test session may hold workers of their own
        return {t.ident for t in threading.enumerate() if t.name.startswith("blip2-images")} - others

    others: set[int] = set()
    others = workers()
    with blip2.load(path) as model:
        first = model.caption(files, num_beams=1, max_new_tokens=3)
        assert workers()  # the stream's threads, made on first use
    assert not workers()
    assert model.caption(files, num_beams=1, max_new_tokens=3) == first  # a closed model makes new ones
    model.close()
    assert not workers()
