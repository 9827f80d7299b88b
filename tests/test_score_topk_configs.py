"""The score_topk configs the Triton autotuner may pick fit the device's shared memory in every dtype."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def st(monkeypatch):
    from fastinfluence.triton_kernels import _common

    score_topk = importlib.import_module("fastinfluence.triton_kernels.score_topk")  # the module, not the function

    # Under the interpreter every Q runs with BQ=16; pruning is checked as on a GPU.
    monkeypatch.setattr(score_topk, "_query_block", lambda Q: _common.block(Q, hi=128))
    return score_topk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Q", [1, 20, 64, 100, 4096])
def test_kept_configs_fit_sm90_and_keep_their_order(st, dtype, Q):
    train = torch.empty(3, 5, dtype=dtype)
    kept = st._configs_for_q(st._GPU_CONFIGS, {"Q": Q, "Xf": train})
    listed = [c for c in st._GPU_CONFIGS if c.kwargs["BQ"] == st._query_block(Q)]
    assert kept, f"no config for Q={Q} {dtype}"
    assert all(st.shared_bytes_bound(c, train.element_size()) <= st.SM90_SHARED_BYTES for c in kept)
    assert kept == [c for c in listed if c in kept]  # listed order: FASTINFLUENCE_TRITON_AUTOTUNE=0 takes kept[0]
    if dtype != torch.float32:
        assert kept == listed  # 2-byte tiles: every listed config fits
    else:
        assert len(kept) < len(listed)  # the largest float32 tiles of every query block are dropped


def test_a_smaller_device_still_gets_its_smallest_config(st, monkeypatch):
    monkeypatch.setattr(st, "_shared_limit", lambda device: 48 * 1024)
    kept = st._configs_for_q(st._GPU_CONFIGS, {"Q": 128, "Xf": torch.empty(1, 1)})
    listed = [c for c in st._GPU_CONFIGS if c.kwargs["BQ"] == 128]
    assert kept == [min(listed, key=lambda c: st.shared_bytes_bound(c, 4))]


def test_bound_counts_stages_tiles_and_element_size(st):
    import triton

    config = triton.Config({"BQ": 32, "BN": 128, "BD": 64}, num_warps=4, num_stages=3)
    assert st.shared_bytes_bound(config, 2) == 3 * (32 + 128) * 64 * 2
    assert st.config_fits(config, 4) and not st.config_fits(config, 4, limit=3 * 160 * 64 * 4 - 1)
