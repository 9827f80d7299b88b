"""Builds of the compiled kernels in ``csrc/``; used by setup.py and by the CUDA runtime build.

Two extension modules, both bound with pybind11 to raw pointers (no libtorch link, so one
build serves every torch version):

* ``fastinfluence.ops.backends._fi_cpu``: the C++/OpenMP host twins, built at install time.
  Any failure (no compiler, no OpenMP, no pybind11) leaves a pure-Python install whose ops
  run on torch.
* ``fastinfluence.ops.backends._fi_cuda``: the CUDA kernels, built with nvcc (through
  ninja when present) the first time they are used on a GPU machine and cached under a
  hash of the sources and the GPU architecture; ``FASTINFLUENCE_BUILD_CUDA=1`` builds it
  in setup.py instead (architectures from ``FASTINFLUENCE_CUDA_ARCH``, e.g. ``80;90``).

This file must not import torch: setup.py runs it in an isolated build environment.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext

CSRC = Path(__file__).resolve().parent
CPU_MODULE = "fastinfluence.ops.backends._fi_cpu"
CUDA_MODULE = "fastinfluence.ops.backends._fi_cuda"
HOST_SOURCES = ("host_bindings.cpp", "jl_project_host.cpp", "topk_host.cpp")
CUDA_SOURCES = ("cuda_bindings.cpp", "jl_project.cu", "project.cu", "topk.cu")
# -ffp-contract=off: the random entries must round exactly like the CUDA and torch code.
# -fno-math-errno -fno-trapping-math change no value; they let g++ vectorise the entries.
HOST_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden")
OPENMP_FLAG = "-fopenmp"
DEFAULT_CUDA_ARCHS = ("80", "90")


def _warn(message: str) -> None:
    print(f"WARNING: fastinfluence: {message}", file=sys.stderr)


def _pybind11_include() -> str | None:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def extension_modules() -> list[Extension]:
    """The extensions setup.py builds: the host twins, plus CUDA with FASTINFLUENCE_BUILD_CUDA=1."""
    include = _pybind11_include()
    if include is None:
        _warn("pybind11 is not installed; the C++ kernels are skipped and ops run on torch")
        return []
    rel = os.path.relpath(CSRC, Path.cwd())
    exts = [
        Extension(
            CPU_MODULE,
            sources=[os.path.join(rel, s) for s in HOST_SOURCES],
            include_dirs=[include, rel],
            extra_compile_args=[*HOST_FLAGS, OPENMP_FLAG],
            extra_link_args=[OPENMP_FLAG],
            language="c++",
            optional=True,  # a missing module is then skipped, not copied, by editable installs
        )
    ]
    if os.environ.get("FASTINFLUENCE_BUILD_CUDA") == "1":
        exts.append(Extension(CUDA_MODULE, sources=[os.path.join(rel, s) for s in CUDA_SOURCES], optional=True))
    return exts


class OptionalBuildExt(build_ext):
    """build_ext whose failures are warnings: the install always succeeds."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # e.g. no compiler at all
            _warn(f"compiled kernels not built ({type(exc).__name__}: {exc}); ops run on torch")

    def build_extension(self, ext):
        try:
            if ext.name == CUDA_MODULE:
                archs = os.environ.get("FASTINFLUENCE_CUDA_ARCH", ";".join(DEFAULT_CUDA_ARCHS))
                out = Path(self.get_ext_fullpath(ext.name))
                build_cuda(out, [a for a in archs.replace(",", ";").split(";") if a], Path(self.build_temp) / "cuda")
                return
            try:
                super().build_extension(ext)
            except Exception:
                cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so
                if OPENMP_FLAG not in ext.extra_compile_args or not shutil.which(cxx[0]):
                    raise  # no compiler at all: nothing to retry
                _warn(f"{ext.name}: build with OpenMP failed, retrying single-threaded")
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP_FLAG]
                ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP_FLAG]
                super().build_extension(ext)
        except Exception as exc:
            _warn(f"{ext.name} not built ({type(exc).__name__}: {exc}); its ops run on torch")


# ---------------------------------------------------------------------------------- CUDA


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def gencode_flags(archs: list[str]) -> list[str]:
    """``-gencode`` flags for compute capabilities such as ``["80", "90"]``."""
    flags = []
    for arch in archs:
        arch = arch.replace(".", "").strip()
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def cuda_cache_key(archs: list[str], nvcc: str) -> str:
    """Hash of everything the CUDA build depends on: sources, architectures, toolchain, Python."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".h", ".cu", ".cpp", ".py"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update("|".join([*archs, version, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]).encode())
    return h.hexdigest()[:16]


def _cuda_commands(out: Path, archs: list[str], build_dir: Path, nvcc: str) -> list[tuple[list[str], Path, list[Path]]]:
    include = _pybind11_include()
    if include is None:
        raise RuntimeError("pybind11 is needed to build the CUDA kernels (pip install pybind11)")
    cflags = [
        "-O3",
        "-std=c++17",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fvisibility=hidden",
        f"-I{CSRC}",
        f"-I{include}",
        f"-I{sysconfig.get_paths()['include']}",
        *gencode_flags(archs),
    ]
    commands, objects = [], []
    for src in CUDA_SOURCES:
        obj = build_dir / (Path(src).stem + ".o")
        commands.append(([nvcc, *cflags, "-c", str(CSRC / src), "-o", str(obj)], obj, [CSRC / src]))
        objects.append(obj)
    # nvcc links the CUDA runtime statically: the module needs only the driver (libcuda).
    commands.append(([nvcc, "-shared", *gencode_flags(archs), *map(str, objects), "-o", str(out)], out, objects))
    return commands


def build_cuda(out: Path, archs: list[str], build_dir: Path, verbose: bool = False) -> Path:
    """Compile the CUDA module to ``out`` for the given compute capabilities; ninja when present."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found; set CUDA_HOME or put nvcc on PATH")
    build_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    commands = _cuda_commands(out, archs, build_dir, nvcc)
    ninja = shutil.which("ninja")
    if ninja:
        lines = ["ninja_required_version = 1.3"]
        for i, (cmd, _target, _) in enumerate(commands):
            lines += [f"rule r{i}", f"  command = {shlex.join(cmd)}"]
        for i, (_, target, deps) in enumerate(commands):
            lines.append(f"build {target}: r{i} {' '.join(map(str, deps))}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        runs = [[ninja, "-C", str(build_dir)] + (["-v"] if verbose else [])]
    else:
        runs = [cmd for cmd, _, _ in commands]
    for cmd in runs:
        result = subprocess.run(cmd, capture_output=not verbose, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"CUDA build failed: {shlex.join(cmd)}\n{result.stdout or ''}{result.stderr or ''}")
    return out
