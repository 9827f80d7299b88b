"""Triton project_layers (all layers of a backward pass in one launch) against the reference."""
import pytest
import torch

from test_triton_support import DEVICES, DTYPES, TOL, randn, rel_err

from fastinfluence.triton_kernels import project_layers
from fastinfluence.triton_kernels.project_layers import project_layers_reference


def _layers(device, dtype, B, T, dims, seed=0):
    """Per layer (d_in, d_out, k_in, k_out, bias): A, G, P_in, P_out; a shared mask with NaN padding."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    As, Gs, P_ins, P_outs = [], [], [], []
    for d_in, d_out, k_in, k_out, bias in dims:
        A = randn(B, T, d_in, dtype=dtype, device=device, generator=g)
        A[~mask] = float("nan")
        As.append(A)
        Gs.append(randn(B, T, d_out, dtype=dtype, device=device, generator=g))
        P_ins.append(randn(d_in + int(bias), k_in, device=device, generator=g, scale=k_in**-0.5))
        P_outs.append(randn(d_out, k_out, device=device, generator=g, scale=k_out**-0.5))
    return As, Gs, P_ins, P_outs, mask


def _reference(As, Gs, P_ins, P_outs, mask):
    return project_layers_reference(*([t.double() for t in ts] for ts in (As, Gs, P_ins, P_outs)), mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_layers_match_the_reference_concatenated(device, dtype, poisoned):
    # Widths and ranks differ per layer and are not powers of two; one layer has a bias row.
    dims = [(40, 23, 17, 33, True), (16, 50, 64, 16, False), (24, 24, 20, 20, False)]
    layers = _layers(device, dtype, B=3, T=37, dims=dims)
    out = project_layers(*layers)
    assert out.shape == (3, 33 * 17 + 16 * 64 + 20 * 20) and out.dtype == torch.float32
    assert rel_err(out, _reference(*layers)) <= TOL[device, dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_aligned_layers_with_ranks_16_to_128(device, poisoned):
    # Every size a multiple of 8: the 16-byte vector path on a GPU.
    dims = [(32, 48, 16, 128, True), (64, 32, 128, 16, False)]
    layers = _layers(device, torch.bfloat16, B=2, T=24, dims=dims, seed=1)
    assert rel_err(project_layers(*layers), _reference(*layers)) <= TOL[device, torch.bfloat16]


def test_identity_projection_runs_on_the_reference():
    As, Gs, P_ins, P_outs, mask = _layers("cpu", torch.float32, B=2, T=5, dims=[(6, 4, 3, 2, False)] * 2)
    P_outs[1] = None
    out = project_layers(As, Gs, P_ins, P_outs, mask)
    assert torch.equal(out, project_layers_reference(As, Gs, P_ins, P_outs, mask))
    assert out.shape == (2, 2 * 3 + 4 * 3)


def test_layers_of_different_batches_are_rejected():
    As, Gs, P_ins, P_outs, mask = _layers("cpu", torch.float32, B=2, T=5, dims=[(6, 4, 3, 2, False)] * 2)
    Gs[1] = Gs[1][:, :4]
    with pytest.raises(ValueError, match="layer 1 has A"):
        project_layers(As, Gs, P_ins, P_outs, mask)
    with pytest.raises(ValueError, match="one A, G, P_in and P_out per layer"):
        project_layers(As, Gs[:1], P_ins, P_outs, mask)


@pytest.mark.gpu
def test_llama_attention_and_mlp_layers_in_one_launch_on_gpu(poisoned):
    dims = [(4096, 4096, 64, 64, False), (4096, 1024, 64, 64, False), (4096, 14336, 64, 64, False), (14336, 4096, 64, 64, True)]
    layers = _layers("cuda", torch.bfloat16, B=2, T=500, dims=dims, seed=2)
    assert rel_err(project_layers(*layers), _reference(*layers)) <= TOL["cuda", torch.bfloat16]
