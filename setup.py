"""Build hook: generate the gRPC/protobuf modules in cluster/rpc/pb from protos/*.proto.

Every build (`pip install .`, `pip install -e .`, a wheel) runs it, so generated code is never committed or
edited by hand. `python setup.py build_protos` (what `make protos` runs) does only this step.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
OUT = ROOT / "cluster" / "rpc" / "pb"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    OUT.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p) for p in PROTOS.glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={OUT}", f"--pyi_out={OUT}"]
    if protoc.main([*args, f"--grpc_python_out={OUT}", *files]) != 0:
        raise RuntimeError("protoc failed on " + " ".join(files))
    # protoc writes top-level imports (`import cluster_pb2`); the modules live in a package
    for module in OUT.glob("*_pb2*.py"):
        text = module.read_text()
        module.write_text(re.sub(r"^import (\w+_pb2)", r"from . import \1", text, flags=re.M))
    (OUT / "__init__.py").write_text('"""Generated from protos/*.proto by setup.py; do not edit."""\n')


class BuildProtos(Command):
    description = "generate cluster/rpc/pb from protos/*.proto"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_protos()


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPy, "build_protos": BuildProtos})
