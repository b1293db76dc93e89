"""The kernels of ``kernels/*.cu`` compiled for the CPU and launched like CuPy's ``RawModule`` functions.

``module(source)`` compiles the CUDA C of one file with the host's C++ compiler and
``tests/cudaemu.h`` (CUDA's thread indices, barriers, warp collectives and atomics on coroutines) and
returns an object whose ``get_function(name)(grid, block, args)`` runs kernel ``name`` over ``grid``
blocks of ``block`` threads, as CuPy calls it; array arguments are passed by their addresses. So the
source the GPU compiles runs here, over the tables the backend builds, with the backend's launch sizes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

HEADER = Path(__file__).with_name("cudaemu.h")
_ONE_AT_A_TIME = threading.Lock()
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w\s]*?)\s+(\w+)((?:\s*\[[^\]]+\])+)\s*;")
_CTYPES = {"int": ctypes.c_int, "unsigned": ctypes.c_uint, "i64": ctypes.c_longlong, "long long": ctypes.c_longlong}
_BYTES = {"char": 1, "unsigned char": 1, "short": 2, "unsigned short": 2, "int": 4, "unsigned": 4, "unsigned int": 4,
          "float": 4, "i64": 8, "u64": 8, "long long": 8, "unsigned long long": 8, "double": 8}
SHARED_LIMIT = 48 * 1024  # static shared memory a block gets without opting in
_SCALARS = {"int": np.int32, "unsigned": np.uint32, "i64": np.int64, "long long": np.int64}  # what CuPy must be given


class LaunchError(RuntimeError):
    """A launch the GPU would refuse, or whose threads wait at a barrier some of them never reach."""


def compiler() -> str | None:
    """The host's C++ compiler, or None."""
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def unavailable() -> str | None:
    """Why the kernels cannot run here (a reason to skip), or None. ``GPUPAS_CUDAEMU=0`` turns them off (on a
    GPU machine, where tests/test_gpu.py runs them for real)."""
    if os.environ.get("GPUPAS_CUDAEMU") == "0":
        return "GPUPAS_CUDAEMU=0: the CUDA sources are not run on the CPU"
    if compiler() is None:
        return "no C++ compiler (c++, g++ or clang++) to build the CUDA sources for the CPU"
    return None


def kernels_of(source: str) -> dict[str, list[tuple[str, str]]]:
    """Each ``extern "C" __global__`` kernel of ``source``: its parameters as (type, name)."""
    out = {}
    for name, params in _KERNEL.findall(source):
        out[name] = []
        for p in (x.strip() for x in params.split(",")):
            typ, var = re.fullmatch(r"(.*?[\s*])(\w+)", p).groups()  # type: ignore[union-attr]
            out[name].append((" ".join(typ.replace("*", " * ").split()).replace(" *", "*"), var))
    return out


def shared_bytes(source: str) -> dict[str, int]:
    """Each kernel of ``source``: the bytes of the ``__shared__`` arrays its body declares (sizes from
    ``#define`` constants or numbers; a type or size it cannot read raises)."""
    defines = {k: int(v) for k, v in re.findall(r"^#define\s+(\w+)\s+(\d+)", source, re.M)}
    out = {}
    for m in _KERNEL.finditer(source):
        start = source.index("{", m.end())
        depth, end = 0, start
        for end in range(start, len(source)):
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                break
        total = 0
        for typ, _, dims in _SHARED.findall(source[start:end]):
            n = 1
            for d in re.findall(r"\[([^\]]+)\]", dims):
                n *= int(d) if d.strip().isdigit() else defines[d.strip()]
            total += _BYTES[" ".join(typ.split())] * n
        out[m[1]] = total
    return out


def _ctype(t: str) -> Any:
    return ctypes.c_void_p if "*" in t else _CTYPES[t.replace("const ", "").strip()]


def host_source(source: str) -> str:
    """``source`` for the host compiler: the emulation header first, each ``__shared__`` array a static
    registered for poisoning, and one ``emu_<kernel>(grid, block, args...)`` entry point per kernel."""
    body = _SHARED.sub(lambda m: f"static {m[1]} {m[2]}{m[3]}; static emu::Shared emu_shared_{m[2]}({m[2]}, "
                                 f"sizeof({m[2]}));", source)
    entries = []
    for name, params in kernels_of(source).items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        args = ", ".join(n for _, n in params)
        entries.append(f'extern "C" int emu_{name}(unsigned grid, unsigned block{", " if decl else ""}{decl}) '
                       f"{{\n    return emu::launch(grid, block, [&] {{ {name}({args}); }});\n}}")
    entries.append('extern "C" void emu_seed(unsigned long long s) { emu::seed = s; }')
    return f'#include "{HEADER}"\n#line 1 "kernel"\n{body}\n' + "\n".join(entries) + "\n"


class Module:
    """One ``.cu`` file compiled for the CPU: ``get_function`` as CuPy's ``RawModule`` has it."""

    def __init__(self, source: str, build_dir: Path):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
        text = host_source(source)
        key = hashlib.sha256((text + HEADER.read_text()).encode()).hexdigest()[:16]
        lib = Path(build_dir) / f"kernels-{key}.so"
        if not lib.exists():  # built under a temporary name and renamed: test processes may race
            with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
                src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
                src.write_text(text)
                got = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(out), str(src)],
                                     capture_output=True, text=True)
                if got.returncode:
                    raise RuntimeError(f"compiling the kernels for the CPU failed:\n{got.stderr}")
                os.replace(out, lib)
        self.lib = ctypes.CDLL(str(lib))
        self.lib.emu_seed.argtypes = [ctypes.c_ulonglong]
        self.params, self.shared = kernels_of(source), shared_bytes(source)

    def shuffle(self, seed: int) -> None:
        """Run the blocks, and the threads of a block between barriers, in orders drawn from ``seed`` (0: in
        index order)."""
        self.lib.emu_seed(seed)

    def get_function(self, name: str) -> Any:
        fn = getattr(self.lib, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, *(_ctype(t) for t, _ in self.params[name])]
        fn.restype = ctypes.c_int
        nparams = len(self.params[name])

        def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
            if len(args) != nparams or len(grid) != 1 or len(block) != 1:
                raise LaunchError(f"{name}: {len(args)} arguments for {nparams}, grid {grid}, block {block}")
            if self.shared[name] > SHARED_LIMIT:
                raise LaunchError(f"{name}: {self.shared[name]} bytes of static shared memory, over a block's "
                                  f"{SHARED_LIMIT}")
            for (typ, var), a in zip(self.params[name], args):  # CuPy passes a scalar at its NumPy width
                want = np.ndarray if "*" in typ else _SCALARS[typ.replace("const ", "").strip()]
                if not (isinstance(a, np.ndarray) if want is np.ndarray else isinstance(a, want)):
                    raise LaunchError(f"{name}: {typ} {var} given a {type(a).__name__}; pass a {want.__name__}")
            with _ONE_AT_A_TIME:  # the runner's state is the library's: launches from several threads wait in turn
                rc = fn(int(grid[0]), int(block[0]), *(_arg(a) for a in args))
            if rc == 1:
                raise LaunchError(f"{name}: threads wait at a barrier that some of them never reach")
            if rc:
                raise LaunchError(f"{name}: grid {grid} of blocks {block} is not a launch a GPU takes")

        return launch


_MODULES: dict[str, Module] = {}
SEED = 0x9E3779B97F4A7C15  # modules from module() run threads in shuffled orders: stricter than index order


def module(source: str) -> Module:
    """``source`` compiled once per process (into a folder under the system's temporary one), its threads
    run in orders drawn from ``SEED``."""
    if source not in _MODULES:
        build = Path(tempfile.gettempdir()) / f"gpupas-cudaemu-{os.getuid()}"
        build.mkdir(exist_ok=True)
        _MODULES[source] = Module(source, build)
        _MODULES[source].shuffle(SEED)
    return _MODULES[source]


def _arg(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return int(a)
