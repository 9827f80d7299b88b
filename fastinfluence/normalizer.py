"""Optimizer-aware gradient normalisation (TrackStar), Adafactor-style, folded into the projection.

For a captured layer, per-example gradient g = G^T A~: (d_out, d_in') with A~ the layer inputs
(a constant-1 column appended when the bias is captured, so d_in' = d_in + bias) and G the
output gradients. Its elementwise second moment V (d_out, d_in') is kept factorised, as
Adafactor keeps it: a row factor r (d_out,) and a column factor c (d_in',), the row and column
sums of V, with

    V ~ r c^T / S,   S = sum(r)          (the rank-one fit of least I-divergence)

The normalised gradient g / sqrt(V) is then, exactly,

    S^(1/2) diag(r)^-1/2 g diag(c)^-1/2 = (G diag(s_out))^T (A~ diag(s_in)),
    s_out = S^(1/4) r^-1/2,  s_in = S^(1/4) c^-1/2

a column scale of G and of A~. Scaling the columns of G and A~ before the factorised
projection is the same as scaling the rows of P_out and P_in once: ``GradientExtractor``
(and through it the training callback) folds s_out into P_out and s_in into P_in, so the
normalised features cost nothing per token; ``exact_scores`` and flat features scale A~ and G.

Damping: r and c become r + damping_ratio * mean(r) + eps (likewise c) before use; ``eps``
(default 1e-30, Adafactor's epsilon_1) keeps a zero row finite, ``damping_ratio`` (default 0)
flattens the normalisation towards the identity.

Where (r, c) come from:

- ``Normalizer.from_optimizer``: an Adam-family optimizer's ``exp_avg_sq`` v of the weight
  (bias-corrected by 1 - beta2^step when the state says so): r = v.sum(1), c = v.sum(0), the
  bias's v_b as the extra column (r += v_b, c gets sum(v_b)); or Adafactor's own row and column
  second moments (torch ``row_var`` / ``col_var``, transformers ``exp_avg_sq_row`` /
  ``exp_avg_sq_col``, means, turned into sums). A live optimizer or its ``state_dict()``.
- ``Normalizer.fit``: on data, in one extraction-like pass: r_o = mean_i sum_j g_ioj^2 and
  c_j = mean_i sum_o g_ioj^2 from the captured (A, G) without forming g where that is cheaper:
  per example, r = diag(G^T (A~ A~^T) G) and c = diag(A~^T (G G^T) A~) (T x T grams, the ghost
  trick, about 2 T^2 (d_in' + d_out)), else from dense g (T d_in' d_out). An MoE expert's g_i
  is the sum over example i's tokens routed to it (``ops.routed.token_grid`` lays them out per
  example), zero for an example that routes none there.

TrackStar's unit normalisation of the final feature is ``score(..., metric="cosine")``: it
divides by the norms of the (normalised, projected) features stored at extraction.

Which model: ``fit`` and ``from_optimizer`` record a sample of each layer's weights (64 entries,
saved with the factors), and ``check`` (``GradientExtractor(normalizer=)``, ``exact_scores(
normalizer=)``) refuses a model whose sampled weights lie farther than half their norm from
them: another model, never a dtype cast or a checkpoint of the same training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import distributed as dist
from .capture import CapturePass, Layer, select_layers, stored_transposed
from .config import ProjectionConfig
from .ops._common import augmented, example_chunks, masked
from .ops.routed import token_grid
from .sharding import whole

SOURCES = ("adam", "adafactor", "fitted", "given")
METHODS = ("auto", "ghost", "dense")
_FORMAT = "fastinfluence-normalizer"
_SAMPLES = 64  # weight entries recorded per layer
_OTHER_MODEL = 0.5  # relative distance of the sampled weights beyond which the model is another one
log = logging.getLogger(__name__)


def weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """(<= 64,) float64 entries of ``weight`` at a fixed stride: what a normaliser records of its model."""
    w = weight.detach().flatten()
    return w[:: max(1, w.numel() // _SAMPLES)][:_SAMPLES].to("cpu", torch.float64)


@dataclass(eq=False)
class Normalizer:
    """Per-layer second-moment row and column factors; the scales they give (module docstring).

    Attributes:
        factors: layer name -> (r (d_out,), c (d_in',)) non-negative float64 row and column sums
            of the gradient's second moment, in (d_out, d_in') orientation (GPT-2 Conv1D too).
        source: where they came from: ``adam``, ``adafactor``, ``fitted`` or ``given``.
        eps: absolute floor added to r and c (>= 0).
        damping_ratio: added to r and c in units of their mean (>= 0).
        weight_samples: layer name -> ``weight_sample`` of the weight the factors were made on
            (``fit`` and ``from_optimizer`` record them), or None: then any model is accepted.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str = "given"
    eps: float = 1e-30
    damping_ratio: float = 0.0
    weight_samples: dict[str, torch.Tensor] | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"Normalizer.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        for what in ("eps", "damping_ratio"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"Normalizer.{what} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.factors, Mapping) or not self.factors:
            raise ValueError("Normalizer.factors must map layer names to (r, c) tensors; got none")
        clean = {}
        for name, rc in self.factors.items():
            if not (isinstance(rc, (tuple, list)) and len(rc) == 2 and all(torch.is_tensor(t) for t in rc)):
                raise ValueError(f"Normalizer.factors[{name!r}] must be a pair of tensors (r, c)")
            r, c = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in rc)
            for side, t in (("r", r), ("c", c)):
                if t.dim() != 1 or t.numel() == 0:
                    raise ValueError(f"layer {name}: {side} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                    raise ValueError(
                        f"layer {name}: {side} holds negative or non-finite values; second moments are >= 0"
                    )
                floor = self.damping_ratio * float(t.mean()) + self.eps
                if float(t.min()) + floor <= 0:
                    raise ValueError(
                        f"layer {name}: {side} has zero entries and no damping reaches them (eps = 0, damping_ratio x "
                        "mean = 0), so their scale is infinite; set eps > 0 (Adafactor's 1e-30)"
                    )
            clean[name] = (r, c)
        self.factors = clean
        if self.weight_samples is not None:
            if not isinstance(self.weight_samples, Mapping) or not set(self.weight_samples) <= set(clean):
                raise ValueError("Normalizer.weight_samples must map layer names of its factors to weight samples")
            self.weight_samples = {
                n: torch.as_tensor(t).to("cpu", torch.float64) for n, t in self.weight_samples.items()
            }

    def __repr__(self) -> str:
        return (
            f"Normalizer(source={self.source!r}, layers={len(self.factors)}, eps={self.eps!r}, "
            f"damping_ratio={self.damping_ratio!r})"
        )

    # ------------------------------------------------------------------------- scales

    def shape(self, name: str) -> tuple[int, int]:
        r, c = self.factors[name]
        return len(r), len(c)

    def check(self, layers: list[Layer]) -> None:
        """Raise unless every layer has factors of its gradient's shape (d_out, d_in + bias)."""
        missing = [l.name for l in layers if l.name not in self.factors]
        if missing:
            have = ", ".join(list(self.factors)[:4]) + (", ..." if len(self.factors) > 4 else "")
            raise ValueError(
                f"the normalizer has no factors for layers {missing[:3]} (it covers {len(self.factors)} layers: "
                f"{have}); make it for the same layers (ProjectionConfig include/exclude) as the extraction"
            )
        for l in layers:
            want, got = (l.d_out, l.d_in + int(l.bias)), self.shape(l.name)
            if want != got:
                hint = (
                    "; the bias column differs: use the same include_bias for both"
                    if want[0] == got[0] and abs(want[1] - got[1]) == 1
                    else ""
                )
                raise ValueError(
                    f"layer {l.name}: the normalizer's factors are for a ({got[0]}, {got[1]}) gradient, "
                    f"this layer's is ({want[0]}, {want[1]}){hint}"
                )
        for l in layers:
            made_on = (self.weight_samples or {}).get(l.name)
            if made_on is None:
                continue
            now = weight_sample(whole(l.weight))  # the same entries: the shapes were checked above
            scale = max(float(made_on.norm()), float(now.norm()))
            distance = float((now - made_on).norm()) / scale if scale > 0 else 0.0
            if distance > _OTHER_MODEL:
                raise ValueError(
                    f"the normalizer was made on another model: the weights of layer {l.name} differ from those it "
                    f"was made on (relative distance {distance:.2f}); make it on this model (Normalizer.fit, or "
                    "Normalizer.from_optimizer with this model's optimizer state)"
                )

    def scales(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_in (d_in',), s_out (d_out,)) float64 on the CPU: s_out s_in^T = 1 / sqrt(V)."""
        if name not in self._cache:
            r, c = self.factors[name]
            r = r + (self.damping_ratio * r.mean() + self.eps)
            c = c + (self.damping_ratio * c.mean() + self.eps)
            quarter = r.sum() ** 0.25
            self._cache[name] = (quarter * c.rsqrt(), quarter * r.rsqrt())
        return self._cache[name]

    def fold(self, name: str, P_in: torch.Tensor, P_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(s_in) P_in, diag(s_out) P_out) in float64: projecting with them projects g / sqrt(V)."""
        s_in, s_out = self.scales(name)
        return s_in[:, None] * P_in.double(), s_out[:, None] * P_out.double()

    def scaled(
        self, layer: Layer, A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A~ diag(s_in), G diag(s_out)) from (B, T, d_in) inputs and (B, T, d_out) output gradients.

        A~ carries the bias column when ``layer.bias``: pass the result on with bias=False.
        """
        s_in, s_out = self.scales(layer.name)
        A = augmented(A, mask, layer.bias)
        return A * s_in.to(A.device, A.dtype), masked(G, mask) * s_out.to(G.device, G.dtype)

    def identity(self, names: Iterable[str]) -> str:
        """sha256 of what the features of layers ``names`` depend on: their factors, eps and damping."""
        h = hashlib.sha256(json.dumps([self.eps, self.damping_ratio]).encode())
        for name in names:
            h.update(name.encode())
            for t in self.factors[name]:
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the factors as safetensors (``Normalizer.load`` reads them back)."""
        tensors = {}
        for name, (r, c) in self.factors.items():
            tensors[f"{name}.r"], tensors[f"{name}.c"] = r.contiguous(), c.contiguous()
        for name, sample in (self.weight_samples or {}).items():
            tensors[f"{name}.weight_sample"] = sample.contiguous()
        meta = {
            "format": _FORMAT,
            "source": self.source,
            "eps": repr(self.eps),
            "damping_ratio": repr(self.damping_ratio),
            "layers": json.dumps(list(self.factors)),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, eps: float | None = None, damping_ratio: float | None = None) -> Normalizer:
        """The normalizer saved at ``path``; ``eps`` / ``damping_ratio`` override the saved ones."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no normalizer at {path}: write one with Normalizer.save")
        try:
            f = safe_open(str(path), "pt")
        except Exception as exc:  # safetensors raises its own error type for a file of another format
            why = str(exc).partition("\n")[0]
            raise ValueError(
                f"{path} is not a safetensors file ({why}); give a normalizer written by Normalizer.save"
            ) from None
        with f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} holds no normalizer (metadata {meta}); write one with Normalizer.save")
            factors = {n: (f.get_tensor(f"{n}.r"), f.get_tensor(f"{n}.c")) for n in json.loads(meta["layers"])}
            samples = {n: f.get_tensor(f"{n}.weight_sample") for n in factors if f"{n}.weight_sample" in f.keys()}
        if not samples:
            log.warning(
                "the normalizer %s records no weights of the model it was made on (saved by an older fastinfluence): "
                "it is used with any model unchecked; make it again and save it to have it checked",
                path,
            )
        return cls(
            factors,
            meta["source"],
            float(meta["eps"]) if eps is None else eps,
            float(meta["damping_ratio"]) if damping_ratio is None else damping_ratio,
            samples or None,
        )

    # ------------------------------------------------------------------------- makers

    @classmethod
    def from_optimizer(
        cls,
        model: nn.Module,
        optimizer,
        config: ProjectionConfig | None = None,
        param_names: list[str] | str | None = None,
        eps: float = 1e-30,
        damping_ratio: float = 0.0,
    ) -> Normalizer:
        """Factors from an optimizer's second moments for the layers ``config`` selects.

        Args:
            model: the model the optimizer trained (its parameter names and shapes).
            optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or its
                ``state_dict()`` (e.g. a Trainer checkpoint's ``optimizer.pt``).
            config: selects the layers and whether biases count (``include`` / ``exclude`` /
                ``include_bias``); the ranks are ignored. Default ``ProjectionConfig()``.
            param_names: for a state dict only: the parameter names in the optimizer's order, or
                ``"trainer"`` for the order of a transformers ``Trainer``'s default optimizer
                (its ``checkpoint-*/optimizer.pt``: the weight-decay group, then the rest).
                Default: the groups' ``param_names`` when the optimizer was built from
                ``model.named_parameters()``, else the model's trainable parameters in order
                (``AdamW(model.parameters())``); shapes are checked either way.
            eps, damping_ratio: see the class.
        """
        config = config or ProjectionConfig()
        layers = select_layers(model, config.include, config.exclude, config.include_bias)
        states = _states_by_name(model, optimizer, param_names)
        factors, kinds = {}, set()
        for layer in layers:
            if layer.routed:
                kinds.add("adam")
                factors[layer.name] = _expert_factors(model, layer, states)
                continue
            weight = _param_name(model, layer.module.weight)
            bias = _param_name(model, layer.module.bias) if layer.bias else None
            kind, r, c = _weight_factors(layer, weight, states)
            kinds.add(kind)
            if bias is not None:
                v_b = _bias_moment(layer, bias, states)
                r, c = r + v_b, torch.cat([c, v_b.sum().reshape(1)])
            factors[layer.name] = (r, c)
        samples = {layer.name: weight_sample(whole(layer.weight)) for layer in layers}
        return cls(factors, "adafactor" if kinds == {"adafactor"} else "adam", eps, damping_ratio, samples)

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        batches: Iterable[dict],
        config: ProjectionConfig | None = None,
        method: str = "auto",
        eps: float = 1e-30,
        damping_ratio: float = 0.0,
        progress: bool = False,
    ) -> Normalizer:
        """Factors fitted on data: r = mean_i of row sums of g_i∘g_i, c = mean_i of its column sums.

        Args:
            model: a causal LM (left unchanged).
            batches: HF-style batch dicts, as for ``GradientExtractor`` (per-example losses the same).
            config: selects the layers (``include`` / ``exclude`` / ``include_bias``).
            method: ``ghost`` (T x T grams), ``dense`` (forms g a few examples at a time) or
                ``auto`` (the cheaper per layer and batch).
            eps, damping_ratio: see the class.
            progress: show a bar, in examples.

        Under ``torch.distributed`` every rank passes the same batches; the ranks capture every
        ``world``-th batch each and sum their squares, so every rank gets the same factors (on an
        FSDP2-sharded model too).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        capture = CapturePass(model, config)
        dtype = capture.dtype
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=capture.device)  # noqa: E731
        sums = {l.name: [zeros(l.d_out), zeros(l.d_in + int(l.bias))] for l in capture.layers}

        def accumulate(layer: Layer, A, G, mask, B: int):
            if layer.routed:  # an expert's routed tokens, laid out per example (no token: zeros)
                A, G, mask = token_grid(A, G, mask, B)
            r, c = row_col_squares(augmented(A.to(dtype), mask, layer.bias), masked(G.to(dtype), mask), method)
            s = sums[layer.name]
            s[0], s[1] = s[0] + r.double(), s[1] + c.double()  # on the device: no sync per layer

        def start(batch):
            return lambda layer, A, G, mask: accumulate(layer, A, G, mask, batch.input_ids.shape[0])

        examples = len(capture.run(batches, start, "normalizer" if progress else None, shared=True))
        factors = {
            n: (dist.all_reduce_sum(r).cpu() / examples, dist.all_reduce_sum(c).cpu() / examples)
            for n, (r, c) in sums.items()
        }
        samples = {l.name: weight_sample(whole(l.weight)) for l in capture.layers}  # gathered when sharded
        return cls(factors, "fitted", eps, damping_ratio, samples)


def row_col_squares(A: torch.Tensor, G: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of g_i∘g_i summed over examples, g_i = G_i^T A_i, without forming g_i
    (``ghost``) or a few examples at a time (``dense``).

    A: (B, T, d_in') masked, augmented inputs; G: (B, T, d_out) masked output gradients.
    Returns (d_out,), (d_in',) in their dtype.
    """
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    if method == "auto":
        method = "ghost" if T * (d_in + d_out) <= d_in * d_out else "dense"
    if method == "ghost":
        K, L = A @ A.transpose(1, 2), G @ G.transpose(1, 2)  # (B, T, T)
        return (G * (K @ G)).sum((0, 1)), (A * (L @ A)).sum((0, 1))
    r, c = G.new_zeros(d_out), A.new_zeros(d_in)
    for rows in example_chunks(B, d_out, d_in):
        g2 = torch.einsum("bto,bti->boi", G[rows], A[rows]).square()
        r, c = r + g2.sum((0, 2)), c + g2.sum((0, 1))
    return r, c


# ------------------------------------------------------------------------- optimizer state


def _param_name(model: nn.Module, p: torch.Tensor) -> str:
    for name, q in model.named_parameters(remove_duplicate=False):
        if q is p:
            return name
    raise ValueError("a captured layer's parameter is not among model.named_parameters()")


def trainer_param_names(model: nn.Module) -> list[str]:
    """The trainable parameters' names in the order of a transformers ``Trainer``'s default optimizer:
    its weight-decay group, then the others (as ``Trainer.create_optimizer`` builds them)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses nothing of the Trainer
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in trainable if n in decay] + [n for n, _ in trainable if n not in decay]


def _states_by_name(model: nn.Module, optimizer, param_names) -> dict[str, tuple[dict, dict]]:
    """parameter name -> (its optimizer state, its param group's hyperparameters)."""
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps the real one
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    if isinstance(optimizer, torch.optim.Optimizer):
        if param_names is not None:
            raise ValueError("param_names is for an optimizer state_dict; a live optimizer knows its parameters")
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        out = {}
        for group in optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        "the optimizer holds a parameter that is not in the model: pass the optimizer of this model"
                    )
                out[names[id(p)]] = (optimizer.state.get(p, {}), hyper)
        return out
    if not (isinstance(optimizer, Mapping) and "state" in optimizer and "param_groups" in optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer or its state_dict() (a dict with 'state' and "
            f"'param_groups'), got {type(optimizer).__name__}"
        )
    groups = optimizer["param_groups"]
    indices = [i for g in groups for i in g["params"]]
    if param_names == "trainer":
        param_names = trainer_param_names(model)
    elif isinstance(param_names, str):
        raise ValueError(f"param_names must be a list of names or 'trainer', got {param_names!r}")
    if param_names is None:
        if all("param_names" in g for g in groups):
            param_names = [n for g in groups for n in g["param_names"]]
        else:
            param_names = [n for n, p in model.named_parameters() if p.requires_grad]
            if len(param_names) != len(indices):
                raise ValueError(
                    f"the optimizer state covers {len(indices)} parameters but the model has {len(param_names)} "
                    "trainable ones, so which state belongs to which parameter is unknown: pass param_names= "
                    "(the names in the optimizer's order) or build the optimizer from model.named_parameters()"
                )
    if len(param_names) != len(indices):
        raise ValueError(f"param_names has {len(param_names)} names but the optimizer state {len(indices)} parameters")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in param_names if n not in params]
    if unknown:
        raise ValueError(f"the optimizer's parameters {unknown[:3]} are not in the model: pass this model's optimizer")
    position = {i: k for k, i in enumerate(indices)}
    out = {}
    for group in groups:
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for i in group["params"]:
            out[param_names[position[i]]] = (optimizer["state"].get(i, {}), hyper)
    return out


def _state(name: str, states: dict) -> tuple[dict, dict]:
    if name not in states or not states[name][0]:
        raise ValueError(
            f"the optimizer holds no state for {name} (frozen, not given to the optimizer, never stepped, or an "
            "optimizer without second moments such as SGD): choose layers it trained (ProjectionConfig "
            "include/exclude) or fit on data (Normalizer.fit)"
        )
    return states[name]


def _bias_correction(state: dict, hyper: dict) -> float:
    """1 - beta2^step for an Adam-family state (1 when the state does not say)."""
    betas, step = hyper.get("betas"), state.get("step")
    if betas is None or step is None:
        return 1.0
    step = float(whole(step) if isinstance(step, torch.Tensor) else step)
    return 1.0 - float(betas[1]) ** step if step > 0 else 1.0


def _checked(name: str, t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    t = whole(t.detach())  # a sharded model's state is a DTensor of this rank's rows: gathered (every rank calls)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"the optimizer's {what} for {name} has shape {tuple(t.shape)} but the parameter has {tuple(shape)}: "
            "the state is not this model's, or param_names is in the wrong order (a transformers Trainer "
            "checkpoint's optimizer.pt: param_names='trainer')"
        )
    return t.detach().to("cpu", torch.float64)


def _weight_factors(layer: Layer, name: str, states: dict) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, r (d_out,), c (d_in,)) row and column sums of the weight's second moment."""
    state, hyper = _state(name, states)
    shape = tuple(layer.weight.shape)
    transposed = stored_transposed(layer.module)  # GPT-2 Conv1D stores (d_in, d_out); a router (d_out, d_in)
    if "exp_avg_sq" in state:
        v = _checked(name, state["exp_avg_sq"], shape, "exp_avg_sq") / _bias_correction(state, hyper)
        v = v.T if transposed else v
        return "adam", v.sum(1), v.sum(0)
    for row_key, col_key in (("row_var", "col_var"), ("exp_avg_sq_row", "exp_avg_sq_col")):
        if row_key in state and col_key in state:
            # means over the other axis of the stored weight: rows (shape[0],), columns (shape[1],)
            rows = _checked(name, state[row_key].reshape(-1), shape[:1], row_key) * shape[1]
            cols = _checked(name, state[col_key].reshape(-1), shape[1:], col_key) * shape[0]
            return ("adafactor", cols, rows) if transposed else ("adafactor", rows, cols)
    raise ValueError(
        f"the optimizer state of {name} has {sorted(state)}: no second moment (Adam's exp_avg_sq, Adafactor's "
        "row/column factors); use an Adam-family or Adafactor optimizer, or fit on data (Normalizer.fit)"
    )


def _expert_factors(model: nn.Module, layer, states: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, c) of one expert (``moe.ExpertLayer``) from Adam's exp_avg_sq of the fused (E, ., .)
    parameter: its slice e, in (d_out, d_in) orientation, and slice e of the fused bias's."""
    name = _param_name(model, layer.parameter)
    state, hyper = _state(name, states)
    if "exp_avg_sq" not in state:
        raise ValueError(
            f"the optimizer state of {name} has {sorted(state)}: an expert's normaliser takes Adam's exp_avg_sq "
            "of the fused parameter (not Adafactor's factors of a 3-D one); fit it on data (Normalizer.fit)"
        )
    v = layer.own(_checked(name, state["exp_avg_sq"], tuple(layer.parameter.shape), "exp_avg_sq"))
    v = v / _bias_correction(state, hyper)
    r, c = v.sum(1), v.sum(0)
    if layer.bias:
        bias = layer.bias_parameter
        bname = _param_name(model, bias)
        if bname not in states or not states[bname][0] or "exp_avg_sq" not in states[bname][0]:
            raise ValueError(
                f"the optimizer holds no exp_avg_sq for the bias {bname}: leave the bias out with "
                "ProjectionConfig(include_bias=False), or fit on data (Normalizer.fit)"
            )
        bstate, bhyper = states[bname]
        v_b = layer.own(_checked(bname, bstate["exp_avg_sq"], tuple(bias.shape), "exp_avg_sq"))
        v_b = v_b / _bias_correction(bstate, bhyper)
        r, c = r + v_b, torch.cat([c, v_b.sum().reshape(1)])
    return r, c


def _bias_moment(layer: Layer, name: str, states: dict) -> torch.Tensor:
    if name not in states or not states[name][0]:
        raise ValueError(
            f"the optimizer holds no state for the bias {name} (frozen or not given to it): leave the bias out "
            "with ProjectionConfig(include_bias=False), or fit on data (Normalizer.fit)"
        )
    state, hyper = _state(name, states)
    for key in ("exp_avg_sq", "variance"):
        if key in state:
            v = _checked(name, state[key], (layer.d_out,), key)
            return v / _bias_correction(state, hyper) if key == "exp_avg_sq" else v
    raise ValueError(
        f"the optimizer state of {name} has {sorted(state)}: no second moment of the bias; use "
        "ProjectionConfig(include_bias=False) or fit on data (Normalizer.fit)"
    )
