"""Compile every Triton kernel for a GPU without one: ``python -m fastinfluence.triton_kernels.compile_check``.

The interpreter that runs the CPU tests does not apply the GPU compiler's rules (tl.dot
shapes, layouts, register and shared-memory limits). This builds each kernel, in each
autotune config and each dtype (``--quick``: bfloat16, the first config and one constexpr variant of each
kernel), to a cubin for sm_90 with Triton's own ptxas, and prints registers, spilled bytes and shared
memory per variant. These are compile-time numbers only: no GPU runs the code.

A variant over sm_90's shared memory (232,448 bytes per block) is flagged ``OVER``; it is
a failure unless the kernel's own pruning drops that config for that dtype at run time
(``pruned``), and so is a config the pruning keeps whose shared memory exceeds its bound.
Variants that spill registers are flagged ``SPILL`` (not a failure: compare triton versions).
Exit status 1 when a variant fails to compile or is over the limit and not pruned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check builds GPU code: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from .ghost import _ghost_kernel  # noqa: E402
from .linear_cross_entropy import _forward_grad_kernel, _forward_kernel, _grad_logits_kernel  # noqa: E402
from .project import _project_kernel, _project_tokens_kernel  # noqa: E402
from .score_topk import SM90_SHARED_BYTES, _score_kernel, config_fits, shared_bytes_bound  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TL_DTYPES = {"bf16": triton.language.bfloat16, "fp16": triton.language.float16, "fp32": triton.language.float32}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _ptxas() -> str | None:
    """The ptxas Triton itself uses for sm_90 (None if this Triton does not say)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET.arch).path
    except (ImportError, AttributeError, RuntimeError):
        return None


@dataclass
class Case:
    """One kernel variant: pointer dtypes by argument, constexpr values, float scalars, and
    the strides that are 1 for contiguous inputs (the JIT specialises those to constants;
    it marks 16-aligned pointers and multiples of 16, as for Llama shapes, like ``aligned``)."""

    name: str
    kernel: object  # a JITFunction or an Autotuner around one
    pointers: dict[str, str]
    constexprs: dict[str, object]
    floats: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    aligned: tuple[str, ...] = ()
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})
    # (config, element size) -> (kept at run time on sm_90, shared-memory bound); None: no pruning by size
    fit: object = None
    full_only: bool = False  # skipped by --quick (another constexpr variant of a kernel checked already)


def _project_cases(dtype: str) -> list[Case]:
    p = f"*{dtype}"
    return [
        Case(
            f"project {dtype}",
            _project_kernel,
            dict(A=p, G=p, P_in=p, P_out=p, M="*u8", Phi="*fp32"),
            dict(HAS_MASK=True, HAS_BIAS=True, BKI=64, BKO=64),
            units=("s_ad", "s_gd", "s_pik", "s_pok", "s_mt", "s_fi"),
            aligned=(
                "T",
                "d_in",
                "d_out",
                "s_ab",
                "s_at",
                "s_gb",
                "s_gt",
                "s_pid",
                "s_pod",
                "s_mb",
                "s_fs",
                "s_fb",
                "s_fo",
            ),
        ),
        Case(
            f"project_tokens {dtype}",
            _project_tokens_kernel,
            dict(X=p, P=p, M="*u8", Out=p),
            dict(HAS_MASK=True, HAS_BIAS=True, BK=64),
            units=("s_xd", "s_pk", "s_mt", "s_ok"),
            aligned=("T", "d", "s_xb", "s_xt", "s_pd", "s_mb", "s_ob", "s_ot"),
        ),
        Case(
            f"ghost {dtype}",
            _ghost_kernel,
            dict(A1=p, G1=p, M1="*u8", A2=p, G2=p, M2="*u8", Out="*fp32"),
            dict(HAS_M1=True, HAS_M2=True, BIAS=True, DIAG=False),
            units=("s_a1d", "s_g1d", "s_m1t", "s_a2d", "s_g2d", "s_m2t"),
            aligned=(
                "d_in",
                "d_out",
                "s_a1b",
                "s_a1t",
                "s_g1b",
                "s_g1t",
                "s_m1b",
                "s_a2b",
                "s_a2t",
                "s_g2b",
                "s_g2t",
                "s_m2b",
            ),
        ),
        Case(
            f"score_topk {dtype}",
            _score_kernel,
            dict(Qf=p, Xf=p, QS="*fp32", XS="*fp32", Keys="*i32", Agg="*fp32"),
            dict(HAS_QS=True, HAS_XS=True),
            units=("s_qd", "s_xd", "s_an"),
            aligned=("D", "s_qq", "s_xn", "s_kq", "s_at", "s_ar"),
            fit=lambda config, size: (config_fits(config, size), shared_bytes_bound(config, size)),
        ),
    ]


def _forward_grad_case(dtype: str, suffix: str, need_dh: bool, has_p: bool) -> Case:
    p = f"*{dtype}"
    return Case(
        f"lce forward_grad{suffix} {dtype}",
        _forward_grad_kernel,
        {"Hid": p, "W": p, "Bias": p, "Labels": "*i64", "Max": "*fp32", "Sum": "*fp32", "Target": "*fp32"}
        | {"Acc": "*fp32", "P": "*fp32", "AccP": "*fp32"},
        dict(SOFTCAP=True, HAS_BIAS=True, F32=dtype == "fp32", NEED_DH=need_dh, HAS_P=has_p, BM=64, BV=64),
        floats=("cap",),
        aligned=("H", "K", "NP", "HP", "KP", "v_per_split", "s_hn", "s_wv", "s_pv"),
        full_only=not (need_dh and has_p),
    )


def _lce_cases(dtype: str) -> list[Case]:
    p = f"*{dtype}"
    common = dict(Z=p, Bias=p, Labels="*i64")
    consts = dict(SOFTCAP=True, HAS_BIAS=True, BV=4096)
    return [
        Case(
            f"lce forward {dtype}",
            _forward_kernel,
            {**common, "Loss": "*fp32", "Lse": "*fp32"},
            consts,
            floats=("cap",),
            options={"num_warps": 8},
            aligned=("V", "s_zn"),
        ),
        Case(
            f"lce grad_logits {dtype}",
            _grad_logits_kernel,
            {**common, "Lse": "*fp32", "GradLoss": "*fp32"},
            consts,
            floats=("cap",),
            options={"num_warps": 8},
            aligned=("V", "s_zn"),
        ),
        # dh and G P_out (a captured head with its input gradient), dh alone, G P_out alone
        _forward_grad_case(dtype, "", True, True),
        _forward_grad_case(dtype, " dh", True, False),
        _forward_grad_case(dtype, " P_out", False, True),
    ]


def cases(dtypes=("bf16", "fp16", "fp32")) -> list[Case]:
    return [c for dtype in dtypes for c in _project_cases(dtype) + _lce_cases(dtype)]


def uncovered(checked: list[Case]) -> list[str]:
    """Launched kernels (``*_kernel``) of the modules that implement a registered op with no case here."""
    from fastinfluence.ops._backend import registered_ops

    from .. import triton_kernels

    have = {id(c.kernel) for c in checked}
    missing = set()
    for op in registered_ops():
        fn = getattr(triton_kernels, op, None)
        for name, obj in vars(sys.modules[fn.__module__]).items() if fn is not None else ():
            if name.endswith("_kernel") and isinstance(obj, (triton.JITFunction, Autotuner)) and id(obj) not in have:
                missing.add(f"{fn.__module__}.{name} (op {op})")
    return sorted(missing)


def _variants(case: Case, quick: bool):
    """(label, constexprs, options, config) per autotune config of the case's kernel."""
    configs = getattr(case.kernel, "configs", None)
    if not configs:
        yield "", case.constexprs, case.options, None
        return
    for config in configs[:1] if quick else configs:
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        yield str(config.kwargs), {**case.constexprs, **config.kwargs}, options, config


def _dtype_size(case: Case) -> int:
    return _BYTES[case.name.rsplit(" ", 1)[-1]]


def judge_shared(case: Case, config, shared: int) -> tuple[str, bool]:
    """(flag for the printed line, failed) of one compiled variant's shared memory on sm_90."""
    kept, bound = case.fit(config, _dtype_size(case)) if case.fit and config is not None else (True, None)
    if bound is not None and shared > bound:
        return f"FAIL-BOUND (bound {bound}B underestimates)", True
    if shared <= SM90_SHARED_BYTES:
        return "", False
    if not kept:
        return f"OVER, pruned for this dtype (bound {bound}B)", False
    return f"OVER sm_90's {SM90_SHARED_BYTES}B and kept at run time", True


def _resources(ptx: str) -> tuple[str, int]:
    """(ptxas -v summary: registers and spilled bytes, spilled bytes or -1 when unknown)."""
    ptxas = _ptxas()
    if ptxas is None:
        return "", -1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        res = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True
        )
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    summary = f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}B"
    return summary, int(spills.group(1)) if spills else -1


def compile_case(case: Case, constexprs: dict, options: dict):
    fn = case.kernel.fn if isinstance(case.kernel, Autotuner) else case.kernel
    constexprs = {**{name: 1 for name in case.units}, **constexprs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = case.pointers[name]
        else:
            signature[name] = "fp32" if name in case.floats else "i32"
        if name in case.pointers or name in case.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="bfloat16 and the first autotune config of each kernel only"
    )
    parser.add_argument("--kernel", default="", help="only the cases whose name starts with this (e.g. score_topk)")
    parser.add_argument("--json", help="also write every variant's shared memory, registers and spills there")
    parser.add_argument("--note", default="", help="a line stored in the JSON file (what was measured, and how)")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}, shared memory limit {SM90_SHARED_BYTES}B")
    failed = spilled = over = 0
    variants = []
    for name in uncovered(cases(("bf16",))):
        failed += 1
        print(f"FAIL {name}: no compile case; add one to {__name__}")
    for case in cases(("bf16",) if args.quick else ("bf16", "fp16", "fp32")):
        if not case.name.startswith(args.kernel) or (args.quick and case.full_only):
            continue
        for label, constexprs, options, config in _variants(case, args.quick):
            try:
                compiled = compile_case(case, constexprs, options)
            except Exception as exc:  # report every failing variant, then fail
                failed += 1
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"FAIL {case.name} {label} {options}: {message}")
                variants.append({"case": case.name, "config": label, **options, "error": message})
                continue
            shared = compiled.metadata.shared
            flag, bad = judge_shared(case, config, shared)
            resources, spills = _resources(compiled.asm["ptx"])
            over += shared > SM90_SHARED_BYTES
            spilled += spills > 0
            flags = " ".join(f for f in (flag, "SPILL" if spills > 0 else "") if f)
            print(
                f"{'FAIL' if bad else 'ok  '} {case.name:<24} {label:<28} {options}  shared={shared}B {resources}"
                + (f"  {flags}" if flags else "")
            )
            failed += bad
            variants.append(
                {
                    "case": case.name,
                    "config": label,
                    **options,
                    "shared_bytes": shared,
                    "registers": int(m.group(1)) if (m := re.search(r"regs=(\d+)", resources)) else None,
                    "spill_store_bytes": spills if spills >= 0 else None,
                    "flags": flags,
                    "failed": bad,
                }
            )
    print(f"{spilled} variant(s) spill registers; {over} over sm_90's shared memory (failures above unless pruned)")
    print(f"{failed} variant(s) failed" if failed else "all variants compiled")
    if args.json:
        summary = {
            "triton": triton.__version__,
            "target": f"sm_{TARGET.arch}",
            **({"note": args.note} if args.note else {}),
            "shared_limit_bytes": SM90_SHARED_BYTES,
            "failed": failed,
            "spilling": spilled,
            "over_shared_limit": over,
            "variants": variants,
        }
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
