"""The package's middle layers: the kernel table is the one contract between compute, build and launches; the
import graph has no cycle and no module reaches into another's private names; launches are checked by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bla_tvm import kernels, runtime
from bla_tvm.layer import KernelSpec, LayerSpec

REPO = Path(__file__).resolve().parent.parent
SPEC = KernelSpec(16, 7, 9, 8, 8, "float32", 2, chunk_size=16)


def test_every_compute_takes_the_arguments_the_table_names():
    from bla_tvm import build, compute  # build first: it prepares nvcc before tvm loads

    assert build.builder("chunk_output", SPEC, "cpu") is build.scheduled_module

    for entry in kernels.TABLE:
        spec = SPEC.layer.kernel(1) if entry.phase == "decode" else SPEC
        if entry.implements is None:
            func = compute.prim_func(entry.name, spec, "cpu")
        else:  # a tile program: no TE compute, its own builder (CUDA, 16-bit inputs, L = 64)
            tile_spec = LayerSpec(64, 15, 20, 32, 48, "bfloat16").kernel(64)
            module, _ = build.builder(entry.name, tile_spec, "cuda")(entry.name, tile_spec, "cuda")
            func = module[entry.symbol]
        assert len(func.params) == len(entry.args), entry.name
        assert func.attrs["global_symbol"] == entry.symbol
    with pytest.raises(ValueError, match="kernel must be one of"):
        compute.prim_func("no_such_kernel", SPEC, "cpu")


def test_an_alternative_builder_is_one_registration(monkeypatch):
    from bla_tvm import build

    monkeypatch.setattr(build, "_BUILDERS", {})
    assert build.builder("chunk_output", SPEC, "cuda") is build.scheduled_module

    def tile_builder(kernel, spec, device_kind, config):
        raise NotImplementedError

    def applies(spec, arch):  # 16-bit inputs on sm_80 and newer
        return spec.dtype in ("float16", "bfloat16") and arch in (None, "sm_80", "sm_90")

    build.register_builder("chunk_output", "cuda", applies, tile_builder)
    bf16 = KernelSpec(**dict(SPEC.as_dict(), dtype="bfloat16"))
    assert build.builder("chunk_output", bf16, "cuda") is tile_builder
    assert build.builder("chunk_output", bf16, "cuda", "sm_80") is tile_builder
    assert build.builder("chunk_output", bf16, "cuda", "sm_75") is build.scheduled_module  # the arch is asked
    assert build.builder("chunk_output", SPEC, "cuda") is build.scheduled_module  # fp32: the default
    assert build.builder("chunk_output", bf16, "cpu") is build.scheduled_module
    with pytest.raises(ValueError, match="kernel must be one of"):
        build.register_builder("no_such_kernel", "cuda", applies, tile_builder)


def test_layer_spec_is_validated_once_with_clear_errors():
    with pytest.raises(ValueError, match="resolution must be odd or equal to window"):
        LayerSpec(16, 6, 9, 8, 8, "float32")
    with pytest.raises(TypeError, match="head_k must be an int"):
        LayerSpec(16, 7, 9, 8.0, 8, "float32")
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        LayerSpec(16, 7, 9, 8, 8, "float32", 0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LayerSpec(16, 7, 9, 8, 8, "int8")
    layer = LayerSpec.make(16, 7, None, 8, 8, "float32")
    assert layer.num_slots == 7 and layer.kernel(32).chunk_size == 32 and layer.kernel(32).layer == layer
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        layer.kernel(0)


def test_launch_checks_argument_names():
    fake = runtime.CompiledKernel(kernels.get("chunk_state"), SPEC, None, lambda *args: calls.append(args))
    calls = []
    x = torch.zeros(1)
    with runtime.record_launches() as launched:
        runtime.launch(fake, {"state_in": x, "unused": x}, k=x, v=x, contributions=x)
    assert len(calls) == 1 and len(calls[0]) == 4 and [launch.kernel for launch in launched] == [fake]
    with pytest.raises(TypeError, match="takes no argument"):
        runtime.launch(fake, {"state_in": x}, k=x, v=x, contributions=x, o=x)
    with pytest.raises(TypeError, match="argument 'v' is missing"):
        runtime.launch(fake, {"state_in": x}, k=x, contributions=x)


def package_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in ((REPO / "bla_tvm", "bla_tvm"), (REPO / "schedules", "bla_tvm.schedules")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the module, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target, []) if target in modules else (base, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(target, names) for target, names in found if target in modules]


def test_no_import_cycle_and_no_private_imports():
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        edges = imports_of(name, path, modules)
        private = [(target, n) for target, names in edges for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{name} imports private names {private}"
        graph[name] = {target for target, _ in edges if target != name and not name.startswith(target + ".")}

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        for nxt in graph.get(node, ()):
            if not nxt.startswith(node + "."):  # a package importing its own submodules is no cycle
                visit(nxt, path + [node])

    for name in graph:
        visit(name, [])


@pytest.mark.parametrize("first", ["bla_tvm.schedules", "bla_tvm.compute"])
def test_the_tvm_packages_import_before_the_build_layer(first):
    """Importing the schedules or the compute first (each imports tvm) leaves the build layer usable: each prepares
    the CUDA compiler before tvm loads, as ``bla_tvm.build`` does (on a machine without a GPU driver, a stand-in
    libcuda must be loaded before tvm)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {first}, bla_tvm.build"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after_tvm = subprocess.run([sys.executable, "-c", f"import tvm, {first}"], capture_output=True, text=True)
    assert after_tvm.returncode == 0, after_tvm.stderr[-2000:]  # imported after tvm: nothing to prepare, no error
