"""Nothing arserve sends between processes is pickled: no module of the
server or the SDK imports pickle (or a pickle-based loader)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {("torch", "load"), ("torch", "save"), ("np", "load"), ("numpy", "load")}


def violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{name}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS:
            found.append(f"{name}:{node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
    return found


def test_no_module_uses_pickle():
    files = [*(ROOT / "services").rglob("*.py"), *(ROOT / "clients" / "python" / "arserve_client").rglob("*.py")]
    assert len(files) > 30  # the scan sees the code
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, found


def test_the_scan_catches_pickle():
    bad = "import pickle\nfrom cloudpickle import dumps\nx = torch.load(f)\nimport os\n"
    assert len(violations(bad, "bad.py")) == 3
