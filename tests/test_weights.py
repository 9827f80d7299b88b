"""fastinfluence.weights: each method against a hand-computed example, plus its invariants."""

import math
from types import SimpleNamespace

import pytest
import torch
from test_unlearn_data import VOCAB, answer_batches, tiny_llama

from fastinfluence import weights


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol
    )


# -- RapidUn --------------------------------------------------------------------------------


def rapidun_example():
    ff = torch.tensor([[1.0, 3, 5, 7, 9], [1, 1, 1, 1, 1]])  # mean over queries: 1 2 3 4 5
    fr = torch.zeros(1, 5)
    rr = torch.tensor([[4.0, 0, 2, 2]])
    rf = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]])  # mean: 1 0 0 0
    return ff, fr, rf, rr


def test_rapidun_matches_hand_computed_weights():
    w = weights.rapidun(*rapidun_example())
    # Forget: S = 1..5, median 3, MAD 1, z = (S-3)/1.4826, w = exp(clip(z/0.7, ln .2, ln 3)).
    s = 1.4826 * 0.7
    raw_f = [0.2, math.exp(-1 / s), 1.0, math.exp(1 / s), 3.0]
    # Retain: S = RR - RF = 3 0 2 2, median 2, MAD = median(1 2 0 0) = 0.5 (even count: mean of
    # the middle two), z = (S-2)/0.7413, /1.2 -> 1.124 -2.248 0 0, clipped -> ln3 ln.2 0 0.
    raw_r = [3.0, 0.2, 1.0, 1.0]
    assert close(w.forget, [x / (sum(raw_f) / 5) for x in raw_f])
    assert close(w.retain, [x / 1.3 for x in raw_r])


def test_rapidun_weights_have_mean_one_and_follow_the_clip():
    g = torch.Generator().manual_seed(0)
    ff, fr, rf, rr = (torch.randn(q, n, generator=g) for q, n in ((6, 40), (5, 40), (6, 30), (5, 30)))
    ff[:, 0] += 100.0  # an outlier pushed to w_max
    ff[:, 1] -= 100.0  # and one to w_min
    w = weights.rapidun(ff, fr, rf, rr, w_min=0.2, w_max=3.0)
    for v in w:
        assert abs(v.mean().item() - 1.0) < 1e-6
        assert v.max() / v.min() <= 15.0 + 1e-4
    assert close(w.forget.max() / w.forget.min(), 15.0, tol=1e-5)
    assert w.forget.argmax() == 0 and w.forget.argmin() == 1


def test_rapidun_constant_scores_give_unit_weights():
    w = weights.rapidun(torch.ones(2, 3), torch.ones(1, 3), torch.ones(2, 4), torch.ones(1, 4))
    assert (w.forget == 1).all() and (w.retain == 1).all()


def test_topk_median_aggregate_matches_hand_computed():
    scores = torch.tensor([[5.0, 1, 3], [2, 4, 0], [1, 2, 6]])
    # top-2 per row, rest zeroed: [5 0 3], [2 4 0], [0 2 6]; column medians 2 2 3.
    assert close(weights.aggregate_scores(scores, "topk_median", topk=2), [2.0, 2.0, 3.0])


def test_rapidun_accepts_score_results_with_a_full_matrix():
    ff, fr, rf, rr = rapidun_example()
    wrapped = [SimpleNamespace(matrix=m.numpy()) for m in (ff, fr, rf, rr)]  # as score(..., matrix_path=)
    assert close(weights.rapidun(*wrapped).forget, weights.rapidun(ff, fr, rf, rr).forget)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(fr=torch.zeros(1, 4)), r"fr has shape \(1, 4\), expected \(1, 5\)"),
        (dict(rf=torch.zeros(3, 4)), r"rf has shape \(3, 4\), expected \(2, 4\)"),
        (dict(ff=torch.tensor([[1.0, float("nan"), 0, 0, 0]] * 2)), "ff holds NaN or inf"),
        (dict(rr=torch.tensor([[1.0, float("inf"), 0, 0]])), "rr holds NaN or inf"),
        (dict(ff=torch.zeros(2, 0)), "non-empty"),
        (dict(aggregate="max"), "unknown aggregate"),
        (dict(ff=[[1.0]]), "score tensor or array, or a ScoreResult"),
    ],
)
def test_rapidun_rejects_bad_scores(change, match):
    args = dict(zip(("ff", "fr", "rf", "rr"), rapidun_example())) | change
    with pytest.raises((ValueError, TypeError), match=match):
        weights.rapidun(**args)


# -- IMU ------------------------------------------------------------------------------------

IMU_G = torch.tensor([[2.0, 0], [0, 1], [1, 1], [-1, 0]])


def imu_hand(keep):
    # mean g = (0.5, 0.5); F = mean g^2 + 0.01 = (1.51, 0.51); I_i = -(g_i / F) . (0.5, 0.5).
    I = [-0.5 * (g0 / 1.51 + g1 / 0.51) for g0, g1 in IMU_G.tolist()]
    assert I[3] > 0 and all(i < 0 for i in I[:3])
    w = [math.sqrt(-I[i]) if i in keep else 0.0 for i in range(4)]
    kept = sorted(w[i] for i in keep)
    pos = 0.93 * (len(kept) - 1)  # linear-interpolated 93rd percentile
    lo = math.floor(pos)
    cap = kept[lo] + (pos - lo) * (kept[min(lo + 1, len(kept) - 1)] - kept[lo])
    w = [min(x, cap) for x in w]
    return I, [x / (sum(w) / 4) for x in w]


def test_imu_matches_hand_computed_weights():
    out = weights.imu(IMU_G)
    I, w = imu_hand(keep=[0, 1, 2])
    assert close(out.influence, I) and close(out.weights, w)
    assert out.keep.tolist() == [True, True, True, False]


def test_imu_keep_fraction_keeps_the_largest_negative_influence():
    out = weights.imu(IMU_G, keep_fraction=0.5)  # one of three negative examples: the largest |I|
    assert out.keep.tolist() == [False, False, True, False]
    assert close(out.weights, [0.0, 0.0, 4.0, 0.0])


def test_imu_zeroes_examples_with_positive_influence():
    g = torch.randn(50, 12, generator=torch.Generator().manual_seed(1)) + 0.3
    r = torch.randn(20, 12, generator=torch.Generator().manual_seed(2))
    out = weights.imu(g, r)
    positive = out.influence >= 0
    assert positive.any() and (~positive).any()
    assert (out.weights[positive] == 0).all() and (out.weights[~positive] > 0).all()
    assert abs(out.weights.mean().item() - 1) < 1e-6


def test_imu_retain_gradients_enter_the_fisher():
    r = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    fisher = torch.cat([IMU_G, r]).pow(2).mean(0) + 0.01
    expected = -(IMU_G.double() / fisher.double()) @ IMU_G.double().mean(0)
    assert close(weights.imu(IMU_G, r).influence, expected)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(0, 3),), "forget_grads must be a non-empty"),
        ((torch.tensor([[1.0, float("nan")]]),), "forget_grads holds NaN"),
        ((IMU_G, torch.zeros(3, 5)), "D=2 columns, retain_grads 5"),
    ],
)
def test_imu_rejects_bad_gradients(args, match):
    with pytest.raises(ValueError, match=match):
        weights.imu(*args)


# -- low-influence skipping -----------------------------------------------------------------


def test_low_influence_by_threshold_and_by_quantile():
    s = torch.tensor([0.01, -2.0, 0.5, -0.02, 3.0])
    out = weights.low_influence(s, threshold=0.1)
    assert out.skip.tolist() == [True, False, False, True, False] and out.keep.tolist() == [1, 2, 4]
    assert close(out.compute_saved, 0.4)
    # |s| = .01 2 .5 .02 3; its 40% quantile (linear) is 0.02 + 0.6 * (0.5 - 0.02) = 0.308.
    q = weights.low_influence(s, quantile=0.4)
    assert close(q.threshold, 0.308) and q.skip.tolist() == out.skip.tolist()


def test_low_influence_counts_saved_tokens_and_reads_matrices():
    scores = torch.tensor([[0.0, 1.0, 0.2], [0.0, 3.0, -0.2]])  # mean over queries: 0 2 0
    out = weights.low_influence(scores, threshold=0.0, tokens=torch.tensor([10, 5, 25]))
    assert out.skip.tolist() == [True, False, True] and close(out.compute_saved, 35 / 40)


def test_low_influence_needs_exactly_one_criterion():
    with pytest.raises(ValueError, match="exactly one of quantile= or threshold="):
        weights.low_influence(torch.ones(3))
    with pytest.raises(ValueError, match="exactly one"):
        weights.low_influence(torch.ones(3), quantile=0.5, threshold=1.0)


# -- loss-based reweighting -----------------------------------------------------------------


def test_loss_reweight_favours_low_loss_examples():
    # softmax(-[0, ln 2]) = [2/3, 1/3]; times N = 2.
    assert close(weights.loss_reweight(torch.tensor([0.0, math.log(2)])), [4 / 3, 2 / 3])
    # tau = 2 halves the log-ratio: exp(-ln2/2) = 1/sqrt2.
    w = weights.loss_reweight(torch.tensor([0.0, math.log(2)]), tau=2.0)
    assert close(w[1] / w[0], 1 / math.sqrt(2))


def test_loss_reweight_rejects_nan_losses():
    with pytest.raises(ValueError, match="finite"):
        weights.loss_reweight(torch.tensor([1.0, float("nan")]))


# -- SIMU -----------------------------------------------------------------------------------


class TinyMLP(torch.nn.Module):
    """y = down(relu(up(x))) with hand-set weights: neuron j has a_j = relu(up_j . x), dL/da_j = down_j."""

    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(2, 3, bias=False)
        self.down_proj = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.up_proj.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
            self.down_proj.weight.copy_(torch.tensor([[1.0, -2, 0.5]]))

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


@pytest.mark.parametrize(
    "fraction, dual, expected",
    [(1 / 3, False, [False, True, False]), (2 / 3, False, [False, True, False]), (2 / 3, True, [False, True, True])],
)
def test_simu_mask_matches_hand_computed_attribution(fraction, dual, expected):
    # forget x = (1, 2): a = (1, 2, 3), |a * g| = (1, 4, 1.5); retain x = (3, 0): a = (3, 0, 3), |a * g| = (3, 0, 1.5).
    # Top third: forget {1}, retain {0}. Top two thirds: forget {1, 2}, retain {0, 2}; neuron 2 is "dual".
    model, loss = TinyMLP(), lambda m, b: m(b["x"]).sum(-1)
    attr = weights.neuron_attribution(model, [{"x": torch.tensor([[1.0, 2.0]])}], loss)
    assert attr[""].tolist() == [1.0, 4.0, 1.5]
    masks = weights.simu_mask(
        model,
        [{"x": torch.tensor([[1.0, 2.0]])}],
        [{"x": torch.tensor([[3.0, 0.0]])}],
        forget_fraction=fraction,
        retain_fraction=fraction,
        dual=dual,
        loss_fn=loss,
    )
    assert masks[""].tolist() == expected


def test_simu_mask_selects_forget_neurons_per_block():
    model = tiny_llama(seed=0)
    forget, retain = answer_batches(model, 4, seed=1), answer_batches(model, 4, seed=2)
    masks = weights.simu_mask(model, forget, retain, forget_fraction=0.25, retain_fraction=0.25)
    dual = weights.simu_mask(model, forget, retain, forget_fraction=0.25, retain_fraction=0.25, dual=True)
    assert sorted(masks) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == (48,)
        assert dual[name].sum() == 12 and (dual[name] | m).equal(dual[name]) and m.sum() <= 12


def test_simu_attribution_is_zero_for_a_silenced_neuron():
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[7] = 0.0  # a_7 = silu(gate) * up = 0
    attr = weights.neuron_attribution(model, answer_batches(model, 4, seed=1), lambda m, b: _nll(m, b))
    assert attr["model.layers.0.mlp"][7] == 0 and (attr["model.layers.0.mlp"] > 0).sum() == 47


def _nll(model, batch):
    from fastinfluence.losses import sequence_nll

    return sequence_nll(model, batch).mean


def test_simu_mask_rejects_models_without_mlp_blocks():
    with pytest.raises(ValueError, match="found no MLP block"):
        weights.simu_mask(torch.nn.Linear(3, 3), [], [])


def test_imu_on_exact_lm_head_features_matches_autograd_gradients():
    """IMU fed by GradientExtractor (ranks >= the LM head's widths: exact) equals IMU on autograd gradients."""
    from fastinfluence import GradientExtractor, ProjectionConfig
    from fastinfluence.losses import sequence_nll

    model = tiny_llama(seed=4)
    batches = answer_batches(model, 6, seed=12, batch_size=3)
    features = GradientExtractor(model, ProjectionConfig(include=[r"lm_head"], rank_in=32, rank_out=VOCAB)).extract(
        batches
    )
    rows = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            rows.append(torch.autograd.grad(sequence_nll(model, one).mean.sum(), model.lm_head.weight)[0].flatten())
    expected = weights.imu(torch.stack(rows))
    out = weights.imu(features.data)
    assert torch.allclose(out.influence, expected.influence, rtol=1e-4, atol=1e-8)
    assert out.keep.equal(expected.keep) and torch.allclose(out.weights, expected.weights, rtol=1e-4)


def test_low_influence_quantile_zero_skips_nothing():
    from fastinfluence import weights

    r = weights.low_influence(torch.tensor([0.1, -2.0, 0.5, 3.0]), quantile=0.0)
    assert not r.skip.any() and r.keep.tolist() == [0, 1, 2, 3] and r.compute_saved == 0.0


def test_rapidun_warns_when_most_scores_are_tied():
    # More than half the forget scores tied at the median: MAD = 0, the floor sets z.
    ff = torch.tensor([[0.0, 0, 0, 0, 0, 1e-10, -2e-10]])
    fr, rf, rr = torch.zeros(1, 7), torch.zeros(1, 3), torch.tensor([[1.0, 2, 3]])
    with pytest.warns(UserWarning, match="below the floor"):
        w = weights.rapidun(ff, fr, rf, rr)
    assert w.forget[5] > w.forget[0] > w.forget[6]


def test_rapidun_weights_do_not_depend_on_the_scores_scale():
    # Dot products of a well-fitted model are tiny (~1e-10); an absolute MAD floor would
    # turn every weight into 1. The weights of scaled scores must be the same.
    g = torch.Generator().manual_seed(0)
    mats = [
        torch.randn(3, 8, generator=g),
        torch.randn(2, 8, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(2, 6, generator=g),
    ]
    ref = weights.rapidun(*mats)
    assert ref.forget.std() > 0.1 and ref.retain.std() > 0.1
    for scale in (1e-10, 1e6):
        w = weights.rapidun(*[m * scale for m in mats])
        assert close(w.forget, ref.forget, 1e-5) and close(w.retain, ref.retain, 1e-5)


def test_every_weights_function_reads_numpy_arrays_and_memmaps(tmp_path):
    import numpy as np

    g = torch.Generator().manual_seed(1)
    mats = [
        torch.randn(3, 8, generator=g),
        torch.randn(2, 8, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(2, 6, generator=g),
    ]

    def memmap(name, t):  # what score(..., matrix_path=...).matrix returns
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=tuple(t.shape))
        m[:] = t.numpy()
        m.flush()
        return np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="r")

    ref = weights.rapidun(*mats)
    for convert in (lambda n, t: t.numpy(), memmap):
        arrays = [convert(f"m{i}", m) for i, m in enumerate(mats)]
        w = weights.rapidun(*arrays)
        assert close(w.forget, ref.forget, 1e-5) and close(w.retain, ref.retain, 1e-5)
        assert close(weights.aggregate_scores(weights._matrix("x", arrays[0])), mats[0].mean(0))
        li = weights.low_influence(arrays[0], quantile=0.5, tokens=np.arange(1, 9))
        assert li.skip.tolist() == weights.low_influence(mats[0], quantile=0.5).skip.tolist()
        assert weights.low_influence(arrays[0][0], threshold=0.5).skip.tolist() == (mats[0][0].abs() <= 0.5).tolist()
        assert close(weights.imu(arrays[0], arrays[1]).weights, weights.imu(mats[0], mats[1]).weights, 1e-5)
        assert close(weights.loss_reweight(arrays[0][0]), weights.loss_reweight(mats[0][0]), 1e-5)


# -- orientation of plain score matrices ----------------------------------------------------


def _four(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(q, n, generator=g, dtype=torch.float64) for q, n in shapes]


def _results(ff, fr, rf, rr):
    """ScoreResult-like objects carrying their sides' ids (forget queries fq, retain queries rq, ...)."""
    sides = {"ff": ("fq", "ft"), "fr": ("rq", "ft"), "rf": ("fq", "rt"), "rr": ("rq", "rt")}
    mats = dict(zip(sides, (ff, fr, rf, rr)))
    return [
        SimpleNamespace(
            matrix=m.numpy(),
            query_ids=[f"{sides[n][0]}{i}" for i in range(m.shape[0])],
            train_ids=[f"{sides[n][1]}{i}" for i in range(m.shape[1])],
        )
        for n, m in mats.items()
    ]


@pytest.mark.parametrize(
    "shapes", [[(4, 4)] * 4, [(3, 5)] * 4, [(3, 3), (2, 3), (3, 5), (2, 5)]], ids=["square", "equal", "ff-square"]
)
def test_rapidun_refuses_plain_matrices_whose_shapes_fit_another_orientation(shapes):
    ff, fr, rf, rr = _four(shapes)
    with pytest.raises(ValueError, match="fit more than one orientation.*pass rows='queries'"):
        weights.rapidun(ff, fr, rf, rr)
    named = weights.rapidun(ff, fr, rf, rr, rows="queries")
    by_ids = weights.rapidun(*_results(ff, fr, rf, rr))  # ScoreResults carry their orientation
    transposed = weights.rapidun(ff.T, fr.T, rf.T, rr.T, rows="train")
    for a, b, c in zip(named, by_ids, transposed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not torch.allclose(named.forget, torch.ones_like(named.forget))  # the weights are not trivial


def test_rapidun_shapes_that_fit_one_orientation_need_no_label_and_a_transposed_set_is_named():
    ff, fr, rf, rr = _four([(3, 6), (2, 6), (3, 5), (2, 5)], seed=1)
    plain = weights.rapidun(ff, fr, rf, rr)
    torch.testing.assert_close(plain.forget, weights.rapidun(ff, fr, rf, rr, rows="queries").forget, rtol=0, atol=0)
    with pytest.raises(ValueError, match="if the plain matrices are \\(train, queries\\), pass rows='train'"):
        weights.rapidun(ff.T, fr.T, rf.T, rr.T)
    with pytest.raises(ValueError, match="rows must be one of \\('queries', 'train'\\)"):
        weights.rapidun(ff, fr, rf, rr, rows="query")


def test_low_influence_refuses_a_matrix_whose_shape_cannot_tell_its_orientation():
    (m,) = _four([(4, 4)], seed=2)
    with pytest.raises(ValueError, match="is square \\(4, 4\\).*pass rows='queries'"):
        weights.low_influence(m, quantile=0.5)
    assert weights.low_influence(m, quantile=0.5, rows="queries").keep.tolist() == (
        weights.low_influence(m.mean(0), quantile=0.5).keep.tolist()
    )
    assert weights.low_influence(m.T, quantile=0.5, rows="train").keep.tolist() == (
        weights.low_influence(m.mean(0), quantile=0.5).keep.tolist()
    )
    (wide,) = _four([(6, 3)], seed=3)  # 6 queries x 3 train: tokens of 6 examples fit it transposed only
    with pytest.raises(ValueError, match="tokens has 6 entries, the rows of the \\(6, 3\\) score matrix"):
        weights.low_influence(wide, quantile=0.5, tokens=torch.ones(6))
    assert len(weights.low_influence(wide, quantile=0.5, tokens=torch.ones(3)).skip) == 3
