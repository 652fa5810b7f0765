"""The plugin SDK: plugins import only ``compatzoo.plugin``, the core names no plugin's
component and reads no plugin-specific attribute, and an upgrader can be fitted, applied
and scheduled from plain tensors with no run around it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import matplotlib.axes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compatzoo
from compatzoo.plugin import BackfillState, HopData, StoredGallery
from compatzoo.registry import get_registry

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FILES = sorted([*(ROOT / "plugins").rglob("*.py"),
                       *(ROOT / "tests" / "example_plugin").rglob("*.py")])
CORE_FILES = sorted((ROOT / "compatzoo").rglob("*.py"))
# Registered plugin names that are also ordinary words of the core's own code: cosine
# similarity, heads and schedules; ``reverse`` (the example plugin's scheduler) as an
# argument of sorting code.
GENERIC_WORDS = {"cosine", "reverse"}


def test_the_scan_sees_the_plugins():
    assert len(PLUGIN_FILES) > 20 and len(CORE_FILES) > 40


def imported_modules(path: Path) -> list[tuple[int, str]]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.append((node.lineno, node.module))
    return modules


def test_plugins_import_nothing_from_compatzoo_but_the_plugin_module():
    offending = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in PLUGIN_FILES for line, module in imported_modules(path)
                 if (module == "compatzoo" or module.startswith("compatzoo."))
                 and module != "compatzoo.plugin"]
    assert offending == []


def code_words(path: Path) -> list[tuple[int, str]]:
    """Identifiers and the words of string literals (docstrings excepted: they may cite
    a paper's method), i.e. everything the code could dispatch on."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words += [(node.lineno, w) for w in re.findall(r"[A-Za-z0-9_-]+", node.value)]
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            words.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            words.append((node.lineno, node.arg))
    return words


def test_the_core_refers_to_no_name_a_plugin_registers():
    names = {r.name for r in get_registry().records() if r.plugin != "core"}
    assert {"bct", "fastfill-sigma", "bict-mlp", "uncertainty", "least-squares"} <= names
    names -= GENERIC_WORDS
    found = [f"{path.relative_to(ROOT)}:{line}: {word}" for path in CORE_FILES
             for line, word in code_words(path)
             if word in names or word.replace("_", "-") in names]
    assert found == []


def defined_attributes(paths: list[Path]) -> set[str]:
    """Methods and class attributes of every class, and every ``self.<name> = ...``."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.Assign):
                        names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names |= {sub.attr for sub in ast.walk(target)
                              if isinstance(sub, ast.Attribute)
                              and isinstance(sub.value, ast.Name) and sub.value.id == "self"}
    return names


def test_the_core_reads_no_attribute_only_plugins_define():
    library = set().union(*(dir(x) for x in (torch.Tensor, nn.Module, np.ndarray, F,
                                             matplotlib.axes.Axes)))
    plugin_only = defined_attributes(PLUGIN_FILES) - defined_attributes(CORE_FILES) - library
    assert {"side_transformation", "sigma", "momentum_input", "next_side_model"} <= plugin_only
    reads = []
    for path in CORE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                reads.append((path, node.lineno, node.attr))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant)):
                reads.append((path, node.lineno, node.args[1].value))
    assert [f"{p.relative_to(ROOT)}:{line}: {name}" for p, line, name in reads
            if name in plugin_only] == []


# --------------------------------------------------------------------------- no orchestrator
D_OLD, D_NEW, CLASSES = 8, 12, 4


MAP = torch.randn(D_OLD, D_NEW, generator=torch.Generator().manual_seed(0))


def paired_features(n: int, seed: int):
    """Old features and new = the same smooth map of them for every sample."""
    old = torch.randn(n, D_OLD, generator=torch.Generator().manual_seed(seed))
    return old, torch.tanh(old @ MAP)


UPGRADERS = {
    "bict-mlp": {"hidden_dim": 64, "epochs": 8, "batch_size": 64, "lr": 0.5},
    "fct-transformation": {"side_info": "none", "inner_dim": 64, "epochs": 8, "batch_size": 64,
                           "lr": 5e-3, "warmup_epochs": 1},
    "fastfill": {"side_info": "none", "inner_dim": 64, "epochs": 8, "batch_size": 64,
                 "lr": 5e-3, "warmup_epochs": 1},
}


@pytest.mark.parametrize("name", sorted(UPGRADERS))
def test_an_upgrader_is_fitted_applied_and_scheduled_from_plain_tensors(name):
    torch.manual_seed(0)
    old, new = paired_features(512, seed=0)
    head = compatzoo.create_head("linear", embedding_dim=D_NEW, num_classes=CLASSES)
    with torch.no_grad():
        labels = head(new).argmax(dim=1)
    upgrader = compatzoo.create_upgrader(name, D_OLD, D_NEW, **UPGRADERS[name])
    gallery_old, gallery_new = paired_features(64, seed=1)

    def gallery_error() -> float:
        upgraded = upgrader.advance(StoredGallery(gallery_old)).features
        return float((1 - F.cosine_similarity(upgraded, gallery_new, dim=1)).mean())

    before = gallery_error()
    logs = upgrader.fit(HopData(old_features=old, new_features=new, labels=labels,
                                new_head=head, progress=False))
    assert len(logs) >= UPGRADERS[name]["epochs"]
    stored = StoredGallery(gallery_old)
    upgraded = upgrader.advance(stored)
    assert upgraded.features.shape == (64, D_NEW) and torch.equal(upgraded.previous, gallery_old)
    assert gallery_error() < 0.5 * before                      # it learned the map

    signals = upgrader.signals(stored)
    assert set(signals) == set(upgrader.publishes)
    state = BackfillState(old_features=gallery_old.numpy(), upgraded=upgraded.features.numpy(),
                          new_features=gallery_new.numpy(), new_head=head, signals=signals)
    schedulers = ["random", "oracle-distance"] + (["fastfill-sigma"] if signals else [])
    for scheduler in schedulers:
        order = compatzoo.create_scheduler(scheduler).order(state, seed=0)
        assert sorted(order.tolist()) == list(range(64))
    if signals:                                                # FastFill: sigma, largest first
        sigma = signals["sigma"][compatzoo.create_scheduler("fastfill-sigma").order(state)]
        assert np.all(np.diff(sigma) <= 0)


def test_the_readme_plugin_guide_registers_and_runs(monkeypatch):
    """The guide's code, exactly as printed, registers through a registry and its
    components work from plain tensors."""
    import sys
    import types

    from compatzoo.registry import Registry

    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("## Writing a plugin"):]
    code = guide[guide.index("# compatzoo_mymethod/plugin.py"):]
    code = code[:code.index("```")]
    module = types.ModuleType("compatzoo_mymethod_plugin")
    monkeypatch.setitem(sys.modules, module.__name__, module)   # as an installed module is
    exec(compile(code, "README.md", "exec"), module.__dict__)
    imported = [name for name in imported_modules_of(code) if name.startswith("compatzoo")]
    assert imported == ["compatzoo.plugin"]
    registry = Registry()
    registry.add_plugin(module, "mymethod", "compatzoo-mymethod", "0.1")
    assert registry.names("loss") == ["pull"] and registry.names("scheduler") == ["largest-shift"]

    loss = registry.get("loss", "pull").component(module.PullParams(margin=0.0))
    assert loss.required_inputs == {"old_features"}
    upgrader = registry.get("upgrader", "linear").component(
        module.LinearParams(epochs=40, batch_size=32, lr=0.05), input_dim=D_OLD, output_dim=D_NEW)
    old, new = paired_features(256, seed=0)
    linear_target = old @ MAP
    upgrader.fit(HopData(old_features=old, new_features=linear_target,
                         labels=torch.zeros(256, dtype=torch.long), progress=False))
    stored = StoredGallery(paired_features(32, seed=1)[0])
    upgraded = upgrader.advance(stored).features
    assert float((upgraded - stored.features @ MAP).pow(2).mean()) < 0.1
    state = BackfillState(old_features=stored.features.numpy(), signals=upgrader.signals(stored))
    order = registry.get("scheduler", "largest-shift").component().order(state)
    assert sorted(order.tolist()) == list(range(32))


def imported_modules_of(code: str) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules
