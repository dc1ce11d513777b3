"""The committed stubs are exactly what `make protos` generates from protos/."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_match_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("build_protos", ROOT / "protos" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    generated = {p.name: p.read_text() for p in build.generate(tmp_path)}
    committed_dir = ROOT / "clients" / "python" / "arserve_client" / "v1"
    committed = {p.name: p.read_text() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(generated) == sorted(committed), "run `make protos`: stub files differ from protos/"
    for name, text in generated.items():
        assert committed[name] == text, f"{name} is stale: run `make protos`"


def test_every_rpc_and_field_is_commented():
    for proto in sorted((ROOT / "protos" / "arserve" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("option", "syntax", "//"))
            if s.startswith("rpc ") or is_field:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {s}"


def test_client_package_does_not_import_torch():
    import subprocess

    code = "import sys, arserve_client; from arserve_client.v1 import backbone_pb2; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
