"""The ``cuda`` backend: CUDA kernels from ``csrc/*.cu`` (jl_project, top-k selection).

The extension ``_fi_cuda`` takes raw device pointers and stream handles, so it links no
libtorch. It is used prebuilt when ``FASTINFLUENCE_BUILD_CUDA=1`` compiled it at install
time; otherwise it is compiled with nvcc (through ninja) the first time a CUDA tensor needs
it, into ``$FASTINFLUENCE_CACHE_DIR`` (default ``~/.cache/fastinfluence``) under a hash of
the sources and the GPU architecture. ``python -m fastinfluence.ops.backends.cuda --build``
builds it ahead of time for the visible GPU.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..jl_project import KINDS, jl_project_reference, jl_scale
from ..score_topk import score_topk_reference
from ..score_topk import scores_and_aggregates
from .cpu import DTYPE_CODES, jl_output, select_topk

# Sources live next to the package in a source checkout; FASTINFLUENCE_CSRC overrides.
CSRC = Path(os.environ.get("FASTINFLUENCE_CSRC", Path(__file__).resolve().parents[3] / "csrc"))
# Shared memory of the top-k kernel holds k (value, index) pairs: 1024 fits every GPU.
MAX_TOPK = 1024
# Chunk partial sums in flight (floats of workspace); bounds jl_project's extra memory.
_WORKSPACE_FLOATS = 1 << 24
_JL_CHUNK = 1024  # kJlChunk of csrc/jl_entries.h
_MAX_ROWS = 65535 * 32  # row tiles of 32 along a grid dimension of at most 65535 blocks

_ext: ModuleType | None = None
_error: str | None = None


def _build_helpers() -> ModuleType:
    if not (CSRC / "build_helpers.py").exists():
        raise RuntimeError(f"CUDA sources not found at {CSRC}; set FASTINFLUENCE_CSRC to the csrc/ directory")
    spec = importlib.util.spec_from_file_location("fastinfluence_build_helpers", CSRC / "build_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastinfluence.ops.backends._fi_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(archs: list[str] | None = None, verbose: bool = False) -> Path:
    """Compile the CUDA module for ``archs`` (default: the current GPU) into the cache; its path."""
    helpers = _build_helpers()
    if archs is None:
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}"]
    nvcc = helpers.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found; set CUDA_HOME or put nvcc on PATH to build the CUDA kernels")
    cache = Path(os.environ.get("FASTINFLUENCE_CACHE_DIR", Path.home() / ".cache" / "fastinfluence"))
    folder = cache / "cuda" / helpers.cuda_cache_key(archs, nvcc)
    out = folder / ("_fi_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:  # one build per key, across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            helpers.build_cuda(out, archs, folder / "build", verbose=verbose)
    return out


def _extension() -> ModuleType:
    global _ext, _error
    if _ext is None and _error is None:
        try:
            _ext = importlib.import_module("fastinfluence.ops.backends._fi_cuda")
        except ImportError:
            try:
                _ext = _load_file(build())
            except Exception as exc:
                _error = f"the CUDA kernels could not be built: {exc}"
                first_line = _error.splitlines()[0]
                warnings.warn(f"fastinfluence: {first_line}; jl_project and score_topk run on torch", RuntimeWarning)
    if _ext is None:
        raise RuntimeError(_error)
    return _ext


def is_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"the CUDA kernels need CUDA tensors (inputs are on {device})"
    try:
        _extension()
    except RuntimeError as exc:
        return False, str(exc)
    return True, ""


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def jl_project(x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """CUDA ``ops.jl_project``: bit-identical to the host twin (float64 inputs run on torch)."""
    if x.dtype == torch.float64:
        return jl_project_reference(x, k, seed, kind, offset)
    if x.shape[0] > _MAX_ROWS:  # the grid's y dimension; rows are independent, so slicing changes no bit
        return torch.cat([jl_project(part, k, seed, kind, offset) for part in x.split(_MAX_ROWS)])
    x, out = jl_output(x, k)
    B, D = x.shape
    chunks = -(-D // _JL_CHUNK)
    window = max(1, min(chunks, _WORKSPACE_FLOATS // (B * k)))
    ws = torch.empty(window * B * k, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _extension().jl_project(x.data_ptr(), DTYPE_CODES[x.dtype], B, D, x.stride(0), out.data_ptr(), k, seed,
                                KINDS[kind], offset, jl_scale(k), ws.data_ptr(), window, _stream(x.device))
    return out


def score_topk(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    """``ops.score_topk`` with the top-k selected by a warp per query row (k <= 1024; larger k on torch)."""
    if k > MAX_TOPK:
        return score_topk_reference(query, train, k, query_scale, train_scale, index_offset, prev)
    S, aggregates = scores_and_aggregates(query, train, query_scale, train_scale)
    with torch.cuda.device(S.device):
        top = select_topk(S, k, index_offset, prev, lambda *args: _extension().topk_merge(*args, _stream(S.device)))
    return top, aggregates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the fastinfluence CUDA kernels into the cache")
    parser.add_argument("--build", action="store_true", help="compile now (default: for the visible GPU)")
    parser.add_argument("--arch", action="append", help="compute capability such as 90 (repeatable)")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    if args.arch is None and not torch.cuda.is_available():
        print("no CUDA device visible: pass --arch (e.g. --arch 90) to build without one", file=sys.stderr)
        return 1
    print(build(args.arch, verbose=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
