"""The committed stubs are exactly what `make protos` generates from protos/, in two homes: the
public API in the SDK (`arserve_client.v1`), the internal contracts in the server (`arserve.pb.v1`);
the SDK's wheel ships only the former and works alone."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_STUBS = Path("clients/python/arserve_client/v1")
SERVER_STUBS = Path("services/pb/v1")
INTERNAL = ("tokenizer", "drafter", "backbone", "verifier", "diffusion_head")


def stub_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text()
            for folder in (CLIENT_STUBS, SERVER_STUBS) for p in (root / folder).iterdir() if p.is_file()}


def test_stubs_match_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("build_protos", ROOT / "protos" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.generate(tmp_path)
    generated, committed = stub_files(tmp_path), stub_files(ROOT)
    assert sorted(generated) == sorted(committed), "run `make protos`: stub files differ from protos/"
    for name, text in generated.items():
        assert committed[name] == text, f"{name} is stale: run `make protos`"
    # Each home holds its own: the SDK only the public API, the server every internal contract.
    assert {Path(n).name.split("_pb2")[0] for n in generated if n.startswith(str(CLIENT_STUBS))} == \
        {"__init__.py", "generation", "tensor"}
    assert {f"{s}_pb2.py" for s in INTERNAL} <= {Path(n).name for n in generated if n.startswith(str(SERVER_STUBS))}


def test_every_rpc_and_field_is_commented():
    for proto in sorted((ROOT / "protos" / "arserve" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("option", "syntax", "//"))
            if s.startswith("rpc ") or is_field:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {s}"


def test_client_package_does_not_import_torch():
    code = ("import sys, arserve_client; from arserve_client.v1 import generation_pb2, tensor_pb2; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# Run with `python -I -S`: no site-packages, no .pth (so no editable install of either package), no
# PYTHONPATH; sys.path is only the unpacked wheel and a folder holding grpc and protobuf alone.
ALONE = """
import sys
sys.path[:0] = sys.argv[1:3]
import arserve_client
from arserve_client import Client
assert arserve_client.__file__.startswith(sys.argv[1]), arserve_client.__file__
for name in ("arserve", "torch", "arserve_client.v1.backbone_pb2"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(name + " is importable beside the bare SDK")
with Client(sys.argv[3], timeout=60) as c:
    out = c.generate(prompt="The capital of France is", max_tokens=4, temperature=0.0)
print(",".join(map(str, out.token_ids)))
"""


def test_sdk_wheel_ships_the_public_api_only_and_serves(tmp_path, server, client):
    """`pip wheel clients/python` holds generation and tensor stubs and no internal one; unpacked
    alone beside grpc and protobuf, it calls a running server and gets what the in-tree SDK gets."""
    import google.protobuf
    import grpc
    import typing_extensions

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    subprocess.run(["cp", "-r", str(ROOT / "clients" / "python"), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "dist"), str(src)], check=True)
    (wheel,) = (tmp_path / "dist").glob("arserve_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("generation_pb2.py", "generation_pb2_grpc.py", "tensor_pb2.py"):
        assert f"arserve_client/v1/{stub}" in names
    leaked = sorted(n for n in names if Path(n).name.split("_pb2")[0] in INTERNAL)
    assert not leaked, f"internal stubs in the SDK's wheel: {leaked}"

    unpacked, deps = tmp_path / "wheel", tmp_path / "deps"
    zipfile.ZipFile(wheel).extractall(unpacked)
    deps.mkdir()
    for module in (Path(grpc.__file__).parent, Path(google.protobuf.__file__).parent.parent,
                   Path(typing_extensions.__file__)):
        (deps / module.name).symlink_to(module)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", ALONE, str(unpacked), str(deps), server.target],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    alone = [int(t) for t in run.stdout.strip().split(",")]
    in_tree = client.generate(prompt="The capital of France is", max_tokens=4, temperature=0.0).token_ids
    assert alone == in_tree and len(alone) == 4
