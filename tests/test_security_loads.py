"""No code in the repository unpickles arbitrary objects: every ``torch.load`` passes ``weights_only=True``, and no
other pickle-based loader (``pickle.load(s)``, ``np.load(allow_pickle=True)``, joblib, dill) is used. A pickled
checkpoint, training state or reward file from outside could otherwise run code on load."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = {"__pycache__", "build", "dist", "runs", "node_modules", "site-packages"}
_UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"),
                 ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"), ("pandas", "read_pickle")}


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in _SKIP for p in parts[:-1]):
            continue
        yield path


def _dotted(node):
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return tuple(reversed(names))


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _problems(source: str, where: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        line = f"{where}:{node.lineno}"
        if name[-2:] == ("torch", "load") or name == ("load",) and "from torch import load" in source:
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                out.append(f"{line}: torch.load without weights_only=True")
        elif name[-2:] in _UNSAFE_CALLS:
            out.append(f"{line}: {'.'.join(name)} unpickles arbitrary objects")
        elif name[-1:] == ("load",) and name[-2:-1] in (("np",), ("numpy",)):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                out.append(f"{line}: np.load with allow_pickle")
    return out


def test_the_checker_catches_unsafe_loads():
    bad = ("import torch, pickle, numpy as np\n"
           "torch.load(p)\n"
           "torch.load(\n    p,\n    weights_only=False)\n"
           "torch.load(p, weights_only=flag)\n"
           "pickle.loads(b)\n"
           "np.load(p, allow_pickle=True)\n"
           "torch.load(p, map_location='cpu', weights_only=True)\n")
    found = _problems(bad, "x.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "6", "7", "8"], found


def test_every_load_in_the_repository_is_safe():
    sources = list(_sources())
    assert any(p.name == "pretrain_common.py" for p in sources)  # the walk reaches the package code
    problems = [p for path in sources for p in _problems(path.read_text(encoding="utf-8"),
                                                         str(path.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)
