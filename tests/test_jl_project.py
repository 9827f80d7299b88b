"""ops.jl_project: the Philox-defined random matrix, the host twin against the torch reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

from fastinfluence import ops
from fastinfluence.ops.jl_project import jl_entries, jl_project_reference, jl_scale, philox4x32_10

cpu = pytest.importorskip("fastinfluence.ops.backends.cpu")
host_built = pytest.mark.skipif(cpu._ext is None, reason="the C++ host kernels are not built")

KINDS = ["rademacher", "gaussian"]
# float32 sums of a few thousand products: relative error a few 1e-7; 1e-5 leaves margin.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _backend():
    ops.set_backend("auto")
    yield
    ops.set_backend("auto")


def test_philox_matches_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        words = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


def test_rademacher_entries_are_balanced_signs():
    R = jl_entries(512, 256, seed=3, kind="rademacher")
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.01  # 131072 signs: std of the mean 0.0028


def test_gaussian_entries_have_normal_moments():
    R = jl_entries(1024, 128, seed=5, kind="gaussian").double().flatten()
    z = (R - R.mean()) / R.std()
    assert abs(R.mean().item()) < 0.015 and abs(R.var().item() - 1) < 0.02
    assert abs((z**3).mean().item()) < 0.05 and abs((z**4).mean().item() - 3) < 0.1  # skew 0, kurtosis 3


def test_entries_depend_on_seed_and_kind_only():
    a = jl_entries(100, 50, seed=2**40 + 7, kind="gaussian", offset=300)
    assert torch.equal(a, jl_entries(400, 50, seed=2**40 + 7, kind="gaussian")[300:])
    assert not torch.equal(a, jl_entries(100, 50, seed=7, kind="gaussian", offset=300))


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_projection_preserves_inner_products_in_expectation(kind):
    torch.manual_seed(0)
    x, y = torch.randn(2, 48, dtype=torch.float64)
    k = 2048
    est = (jl_project_reference(x[None], k, 11, kind) @ jl_project_reference(y[None], k, 11, kind).T).item()
    sigma = math.sqrt(((x @ x) * (y @ y) + (x @ y) ** 2).item() / k)
    assert abs(est - (x @ y).item()) < 5 * sigma


@host_built
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0, 100_003])
def test_host_entries_equal_reference_bit_for_bit(kind, offset):
    D, k = 261, 37
    out = cpu.jl_project(torch.eye(D), k, 2**33 + 1, kind, offset)
    assert torch.equal(out, jl_entries(D, k, 2**33 + 1, kind, offset) * jl_scale(k))


@host_built
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_matches_reference(kind, dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 2051).to(dtype)  # three chunks of 1024 rows, the last partial
    out = cpu.jl_project(x, 67, 9, kind, 0)
    assert out.dtype == torch.float32 and out.shape == (5, 67)
    assert rel_err(out, jl_project_reference(x, 67, 9, kind)) < RTOL


@host_built
def test_host_reads_strided_rows():
    torch.manual_seed(2)
    x = torch.randn(6, 300)[::2, 5:290]
    assert torch.equal(cpu.jl_project(x, 40, 1, "gaussian", 0), cpu.jl_project(x.contiguous(), 40, 1, "gaussian", 0))


@host_built
@pytest.mark.parametrize("kind", KINDS)
def test_host_identical_across_thread_counts(kind):
    torch.manual_seed(3)
    x = torch.randn(35, 1500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.jl_project(x, 70, 4, kind, 0)
        torch.set_num_threads(2)
        two = cpu.jl_project(x, 70, 4, kind, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@host_built
@pytest.mark.parametrize("kind", KINDS)
def test_host_identical_across_batch_splits(kind):
    torch.manual_seed(4)
    x = torch.randn(37, 1100)
    whole = cpu.jl_project(x, 45, 8, kind, 0)
    parts = torch.cat(
        [
            cpu.jl_project(x[:1], 45, 8, kind, 0),
            cpu.jl_project(x[1:34], 45, 8, kind, 0),
            cpu.jl_project(x[34:], 45, 8, kind, 0),
        ]
    )
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("kind", KINDS)
def test_slices_with_offsets_sum_to_the_whole_projection(kind):
    torch.manual_seed(5)
    x = torch.randn(3, 700)
    whole = ops.jl_project(x, 33, seed=6, kind=kind)
    parts = sum(
        ops.jl_project(x[:, a:b], 33, seed=6, kind=kind, offset=a) for a, b in [(0, 129), (129, 500), (500, 700)]
    )
    assert rel_err(parts, whole) < RTOL


@host_built
def test_auto_backend_on_cpu_runs_the_host_twin():
    torch.manual_seed(6)
    x = torch.randn(4, 300)
    assert torch.equal(ops.jl_project(x, 20, seed=1), cpu.jl_project(x, 20, 1, "rademacher", 0))


def test_torch_backend_runs_the_reference():
    torch.manual_seed(7)
    x = torch.randn(4, 300)
    ops.set_backend("torch")
    assert torch.equal(ops.jl_project(x, 20, seed=1, kind="gaussian"), jl_project_reference(x, 20, 1, "gaussian"))


def test_float64_input_accumulates_in_float64():
    torch.manual_seed(8)
    x = torch.randn(3, 200, dtype=torch.float64)
    out = ops.jl_project(x, 16, seed=2)
    assert out.dtype == torch.float64
    ref = (x @ jl_entries(200, 16, 2).double()) / math.sqrt(16)
    assert rel_err(out, ref) < 1e-12


def test_empty_input_gives_zeros():
    assert torch.equal(ops.jl_project(torch.randn(3, 0), 5), torch.zeros(3, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(10)), r"\(B, D\).*x\[None\]"),
        (dict(x=torch.ones(2, 3, dtype=torch.int64)), "dtype"),
        (dict(k=0), "k must be"),
        (dict(kind="uniform"), "kind must be"),
        (dict(seed=-1), "seed must be"),
        (dict(offset=-3), "offset must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(x=torch.randn(2, 3), k=4, seed=0, kind="rademacher", offset=0) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        ops.jl_project(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_reference_entries_generated_on_the_gpu_equal_the_cpu_bits(kind):
    cpu = jl_entries(700, 96, seed=2**34 + 5, kind=kind, offset=131)
    gpu = jl_entries(700, 96, seed=2**34 + 5, kind=kind, offset=131, device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
