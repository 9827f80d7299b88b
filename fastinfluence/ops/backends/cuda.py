"""The ``cuda`` backend: CUDA kernels from ``csrc/*.cu`` (jl_project, project, top-k selection).

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

from ..jl_project import KINDS, jl_scale
from ..score_topk import scores_and_aggregates
from ._marshal import DTYPE_CODES, jl_output, select_topk

# Sources: FASTINFLUENCE_CSRC, else csrc/ beside the package in a source checkout, else the
# copy an installed package carries (fastinfluence/csrc).
_HERE = Path(__file__).resolve()
CSRC = Path(
    os.environ.get("FASTINFLUENCE_CSRC")
    or next(
        (d for d in (_HERE.parents[3] / "csrc", _HERE.parents[2] / "csrc") if (d / "build_helpers.py").exists()),
        _HERE.parents[3] / "csrc",
    )
)
# Shared memory of the top-k kernel holds k (value, index) pairs: 1024 fits every GPU.
MAX_TOPK = 1024
# Chunk partial sums in flight (floats of workspace); bounds jl_project's extra memory.
_WORKSPACE_FLOATS = 1 << 24
_JL_CHUNK = 1024  # kJlChunk of csrc/jl_entries.h
_MAX_ROWS = 65535 * 32  # row tiles of 32 along a grid dimension of at most 65535 blocks
# project: padded ranks of csrc/project.cu (its KP) and its token tile (kProjectTokenTile).
PROJECT_RANK_TILES = (32, 64, 128)
PROJECT_TOKEN_TILE = 64
_PROJECT_CTAS_PER_SM = 2

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
                warnings.warn(
                    f"fastinfluence: {first_line}; jl_project and score_topk run on torch", RuntimeWarning, stacklevel=2
                )
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


def supports_jl_project(x: torch.Tensor, **_) -> bool | str:
    return True if x.dtype != torch.float64 else "float64 inputs (the kernel accumulates in float32)"


def jl_project(x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """CUDA ``ops.jl_project``: bit-identical to the host twin (float32/float16/bfloat16 inputs)."""
    if x.shape[0] > _MAX_ROWS:  # the grid's y dimension; rows are independent, so slicing changes no bit
        return torch.cat([jl_project(part, k, seed, kind, offset) for part in x.split(_MAX_ROWS)])
    x, out = jl_output(x, k)
    B, D = x.shape
    chunks = -(-D // _JL_CHUNK)
    window = max(1, min(chunks, _WORKSPACE_FLOATS // (B * k)))
    ws = torch.empty(window * B * k, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _extension().jl_project(
            x=x.data_ptr(),
            dtype=DTYPE_CODES[x.dtype],
            B=B,
            D=D,
            ldx=x.stride(0),
            out=out.data_ptr(),
            k=k,
            seed=seed,
            kind=KINDS[kind],
            offset=offset,
            scale=jl_scale(k),
            ws=ws.data_ptr(),
            ws_chunks=window,
            stream=_stream(x.device),
        )
    return out


def project_rank_tile(k_in: int, k_out: int) -> int | None:
    """The kernel's padded rank for (k_in, k_out): the smallest tile holding both, None above 128."""
    return next((kp for kp in PROJECT_RANK_TILES if max(k_in, k_out) <= kp), None)


def project_token_splits(T: int, B: int, n_sm: int) -> tuple[int, int]:
    """(splits, tokens_per_split): B * splits CTAs reach about two per SM when T allows.

    Every split is a nonempty multiple of ``PROJECT_TOKEN_TILE`` tokens (the last one may be
    shorter) and together they cover the T tokens exactly once.
    """
    tiles = -(-T // PROJECT_TOKEN_TILE)
    want = max(1, min(tiles, -(-_PROJECT_CTAS_PER_SM * n_sm // B), 65535))
    per = -(-tiles // want) * PROJECT_TOKEN_TILE
    return -(-T // per), per


def vector_rows(X: torch.Tensor) -> bool:
    """True when X (B, T, d) with unit stride along d can be staged with 16-byte copies."""
    size = X.element_size()
    aligned = X.data_ptr() % 16 == 0 and (X.shape[2] * size) % 16 == 0
    return aligned and all((s * size) % 16 == 0 or n == 1 for n, s in zip(X.shape[:2], X.stride()[:2]))


def padded_projection(P: torch.Tensor, d: int, kp: int, like: torch.Tensor) -> torch.Tensor:
    """P[:d] as a contiguous (d, kp) matrix in the dtype and on the device of ``like``, zero in
    columns >= k (the kernel's P layout; a bias row d of P_in is passed apart)."""
    out = torch.zeros(d, kp, dtype=like.dtype, device=like.device)
    out[:, : P.shape[1]] = P[:d]
    return out


def _project_on_kernel(A, G, P_in, P_out) -> bool:
    return (
        P_in is not None
        and P_out is not None
        and A.dtype == G.dtype
        and A.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and project_rank_tile(P_in.shape[1], P_out.shape[1]) is not None
        and A.shape[2] > 0
        and G.shape[2] > 0
        and A.device.type == "cuda"
        and torch.cuda.get_device_capability(A.device) >= (8, 0)
    )


def supports_project(A, G, P_in, P_out, **_) -> bool | str:
    if _project_on_kernel(A, G, P_in, P_out):
        return True
    return (
        "the CUDA project kernel needs both projections, one float32/float16/bfloat16 dtype for A and G, "
        "ranks <= 128, nonempty widths and compute capability >= 8.0"
    )


def project(A, G, P_in, P_out, mask=None):
    """CUDA ``ops.project``: phi (B, k_out, k_in) float32 on the tensor cores.

    A (B, T, d_in) and G (B, T, d_out) in one dtype, float32 (TF32 products, ~1e-3
    relative), float16 or bfloat16 (P rounded to that dtype, as the Triton kernel does);
    P_in (d_in[+1], k_in), P_out (d_out, k_out) with k_in, k_out <= 128; mask (B, T) bool.
    ``supports_project`` leaves to the registry's torch fallback: a None (identity)
    projection, float64 or mixed input dtypes, ranks above 128, empty widths, and GPUs older
    than compute capability 8.0. Token splits are summed afterwards in split order (deterministic).
    """
    B, T, d_in = A.shape
    d_out = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    if B == 0 or T == 0:
        return torch.zeros(B, k_out, k_in, device=A.device, dtype=torch.float32)
    kp = project_rank_tile(k_in, k_out)
    A = A if A.stride(2) == 1 else A.contiguous()
    G = G if G.stride(2) == 1 else G.contiguous()
    p_in, p_out = padded_projection(P_in, d_in, kp, A), padded_projection(P_out, d_out, kp, G)
    bias = P_in[d_in].to(device=A.device, dtype=torch.float32).contiguous() if P_in.shape[0] == d_in + 1 else None
    if mask is not None:
        mask = mask.to(device=A.device, dtype=torch.bool).view(torch.uint8)
    splits, per = project_token_splits(T, B, torch.cuda.get_device_properties(A.device).multi_processor_count)
    partial = torch.empty(splits, B, k_out, k_in, device=A.device, dtype=torch.float32)
    with torch.cuda.device(A.device):
        mask_sb, mask_st = mask.stride() if mask is not None else (0, 0)
        _extension().project(
            A=A.data_ptr(),
            a_sb=A.stride(0),
            a_st=A.stride(1),
            d_in=d_in,
            P_in=p_in.data_ptr(),
            a_vec=vector_rows(A),
            G=G.data_ptr(),
            g_sb=G.stride(0),
            g_st=G.stride(1),
            d_out=d_out,
            P_out=p_out.data_ptr(),
            g_vec=vector_rows(G),
            dtype=DTYPE_CODES[A.dtype],
            kp=kp,
            bias=0 if bias is None else bias.data_ptr(),
            mask=0 if mask is None else mask.data_ptr(),
            mask_sb=mask_sb,
            mask_st=mask_st,
            B=B,
            T=T,
            k_in=k_in,
            k_out=k_out,
            tokens_per_split=per,
            splits=splits,
            partial=partial.data_ptr(),
            stream=_stream(A.device),
        )
    return partial[0] if splits == 1 else partial.sum(0)


def supports_score_topk(k: int, **_) -> bool | str:
    return True if k <= MAX_TOPK else f"k = {k} > {MAX_TOPK} (the selection keeps k pairs in shared memory)"


def score_topk(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    """``ops.score_topk`` with the top-k selected by a warp per query row (k <= 1024)."""
    S, aggregates = scores_and_aggregates(query, train, query_scale, train_scale)
    with torch.cuda.device(S.device):
        top = select_topk(
            S, k, index_offset, prev, lambda **args: _extension().topk_merge(**args, stream=_stream(S.device))
        )
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
