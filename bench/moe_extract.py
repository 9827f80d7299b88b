"""MoE extraction against a padded-grid baseline and the model's own training step.

One MoE model (Mixtral config: 8 experts, top-2, every block captured: attention, routers, each
expert's ``gate_up_proj`` and ``down_proj``, the LM head), instruction-like batches (the first
half of each sequence is the prompt, labels -100). Timed in interleaved rounds, one thread,
medians:

- ``train_<impl>``: the model's plain training step on the batch (forward + backward + AdamW
  step), with ``experts_implementation`` ``grouped_mm`` (the default) and ``eager``;
- ``ours``: ``GradientExtractor.extract`` (experts as ragged routed layers, ``ops.routed``);
- ``padded_grid``: the baseline of a hook-on-Linear tool that makes each expert a module
  (the idea of Bergson PR #360, written here in plain torch): each expert's routed tokens are
  gathered into a zero-padded (B, L_e, d) grid, L_e = the most tokens one example sends to
  expert e, the expert runs on the grid, and the per-example projected gradient is
  (G P_out)^T (A P_in) summed over the grid's rows. Attention, routers and the head are
  captured by the same ``GradientExtractor`` (experts excluded), so only the experts differ.

Both feature sets are checked equal (float64 on a small model, before any timing; float32 at
the benchmark shape). Peak memory: each variant runs once in its own subprocess, which reports
its peak RSS and the RSS it had before the step.

    python bench/moe_extract.py [--out bench/results/moe_extract_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import commit, interleaved_medians, rel_err
from torch import nn

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.moe import EXCLUDE_EXPERTS, is_experts

IMPLS = ("grouped_mm", "eager")


def mixtral(args, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(args.seed)
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def instruction_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """Token ids drawn Zipf-like (frequent tokens dominate, as in text); the first half of each
    sequence is the prompt (no loss), the second half the response."""
    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(freq, batch * seq, replacement=True, generator=g).view(batch, seq)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ---------------------------------------------------------------------------------------
# The baseline: each expert a module, its routed tokens padded into a (B, L, d) grid
# ---------------------------------------------------------------------------------------


class ExpertLinear(nn.Module):
    """Expert e's slice of a fused (E, d_out, d_in) parameter as a Linear (a view, not a copy)."""

    def __init__(self, experts: nn.Module, param: str, expert: int):
        super().__init__()
        self.__dict__["experts"] = experts  # not a submodule
        self.param, self.expert = param, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(self.experts, self.param)[self.expert])


class PaddedGrid:
    """Runs every experts module of ``model`` on per-expert padded grids while active, and hands
    each expert Linear's projected per-example gradient (B, k_out, k_in) to ``phi[name]``.

    The hooks are those of a hook-on-Linear tool: a forward hook on each expert module keeps its
    input grid A (B, L, d_in) and hooks its output; the output's gradient G (B, L, d_out) gives
    (G P_out)^T (A P_in). Padding rows have A = 0 and G = 0, so they add nothing."""

    def __init__(self, model: nn.Module, projections):
        self.model, self.projections, self.phi = model, projections, {}
        self.blocks = []  # (experts module, name, [(up module, down module)] per expert)
        for name, m in model.named_modules():
            if is_experts(m):
                if m.is_transposed or not m.has_gate or getattr(m, "has_bias", False):
                    raise ValueError(f"{name}: the baseline covers gated, untransposed experts without bias")
                E = m.down_proj.shape[0]
                mods = [(ExpertLinear(m, "gate_up_proj", e), ExpertLinear(m, "down_proj", e)) for e in range(E)]
                for e, (up, down) in enumerate(mods):
                    for lin in (up, down):
                        lin.layer_name = f"{name}.{e}.{lin.param}"
                        lin.register_forward_hook(self._hook)
                self.blocks.append((m, name, mods))
        self.B = None
        self.cells = self.routed = 0  # grid rows (B x L_e, summed over experts and blocks) and routed tokens

    def _hook(self, module, inputs, output):
        A = inputs[0].detach()
        name = module.layer_name

        def on_grad(G):
            P_in, P_out = self.projections(name, A.device, A.dtype)
            self.phi[name] = torch.bmm((G.detach() @ P_out).transpose(1, 2), A @ P_in)

        output.register_hook(on_grad)

    def _forward(self, experts, mods):
        def forward(hidden, top_k_index, top_k_weights, *args, **kwargs):
            N, H = hidden.shape
            B = self.B
            T = N // B
            out = torch.zeros_like(hidden)
            for e, (up, down) in enumerate(mods):
                token, slot_k = torch.where(top_k_index == e)  # token ascending, so examples are sorted
                example = token // T
                counts = torch.bincount(example, minlength=B)
                slot = torch.arange(len(token)) - (counts.cumsum(0) - counts)[example]
                L = max(int(counts.max()) if len(token) else 0, 1)
                self.cells, self.routed = self.cells + B * L, self.routed + len(token)
                grid = hidden.new_zeros(B, L, H)
                grid[example, slot] = hidden[token]
                weight = top_k_weights.new_zeros(B, L)
                weight[example, slot] = top_k_weights[token, slot_k]
                h = down(experts._apply_gate(up(grid))) * weight.unsqueeze(-1).to(hidden.dtype)
                out.index_add_(0, token, h[example, slot])
            return out

        return forward

    @contextmanager
    def active(self, B: int):
        self.B, self.phi = B, {}
        for m, _, mods in self.blocks:
            m.forward = self._forward(m, mods)
        try:
            yield
        finally:
            for m, _, _ in self.blocks:
                del m.forward


class Baseline:
    """Padded-grid experts + the same extractor (experts excluded) for every other layer, rows
    assembled in ``ours``' layout."""

    def __init__(self, model: nn.Module, ours: GradientExtractor):
        self.rest = GradientExtractor(model, dataclasses.replace(ours.config, exclude=[EXCLUDE_EXPERTS]))
        self.ours, self.grid = ours, PaddedGrid(model, ours.projections)

    def extract(self, batch: dict) -> torch.Tensor:
        B = batch["input_ids"].shape[0]
        if not bool(batch["attention_mask"].all()):
            raise ValueError("the padded-grid baseline here takes unpadded batches")
        with self.grid.active(B):
            rest = self.rest.extract([batch]).data
        rows = torch.empty(B, self.ours.dim, dtype=rest.dtype)
        for name, sl in self.rest.layout.items():
            rows[:, self.ours.layout[name].start : self.ours.layout[name].stop] = rest[:, sl.start : sl.stop]
        for name, phi in self.grid.phi.items():
            sl = self.ours.layout[name]
            rows[:, sl.start : sl.stop] = phi.reshape(B, -1).to(rows.dtype)
        if len(self.grid.phi) + len(self.rest.layout) != len(self.ours.layout):
            raise RuntimeError("the baseline did not capture every layer ours captures")
        return rows


# ---------------------------------------------------------------------------------------


def equality_check() -> dict:
    """Float64, small model: the baseline's features equal ours (every layer, experts included)."""
    small = argparse.Namespace(
        vocab=64, hidden=32, intermediate=48, layers=2, experts=8, top_k=2, seq=24, seed=1, rank=8
    )
    model = mixtral(small, torch.float64)
    batch = instruction_batch(small.vocab, 3, small.seq, seed=2)
    ours = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8, dtype="float64"))
    base = Baseline(model, ours)
    a, b = ours.extract([batch]).data, base.extract(batch)
    experts = [l.name for l in ours.layers if l.routed]
    cols = torch.cat([torch.arange(ours.layout[n].start, ours.layout[n].stop) for n in experts])
    err, err_experts = rel_err(b, a), rel_err(b[:, cols], a[:, cols])
    if not err < 1e-12:
        raise SystemExit(f"padded-grid baseline differs from ours in float64: relative error {err:.2e}")
    return {
        "dtype": "float64",
        "layers": len(ours.layers),
        "expert_layers": len(experts),
        "rel_err": err,
        "rel_err_expert_blocks": err_experts,
    }


def setup(args):
    model = mixtral(args)
    batches = [instruction_batch(args.vocab, args.batch, args.seq, seed=10 + i) for i in range(2)]
    return model, batches


def variants(args, model, batches):
    """name -> a step closure; each step takes the next batch in turn."""
    turn = {"i": 0}

    def next_batch():
        turn["i"] += 1
        return batches[turn["i"] % len(batches)]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train(impl):
        def step():
            model.set_experts_implementation(impl)
            opt.zero_grad(set_to_none=True)
            model(**next_batch()).loss.backward()
            opt.step()

        return step

    ours = GradientExtractor(model, ProjectionConfig(rank_in=args.rank, rank_out=args.rank))
    base = Baseline(model, ours)
    fns = {f"train_{impl}": train(impl) for impl in IMPLS}
    fns["ours"] = lambda: ours.extract([next_batch()])
    fns["padded_grid"] = lambda: base.extract(next_batch())
    return fns, ours, base, opt


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(args) -> None:
    """One variant, one process: its RSS before the steps and the peak RSS during two steps (the
    high-water mark reset after setup, so imports and model building do not count)."""
    torch.set_num_threads(1)
    model, batches = setup(args)
    fns, *_ = variants(args, model, batches)
    fn = fns[args.child]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mib("VmRSS")
    fn()
    fn()
    print(json.dumps({"rss_before_mib": before, "peak_rss_mib": _status_mib("VmHWM")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_extract_cpu.json")
    args = ap.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(1)
    check = equality_check()
    print("float64 equality:", check, flush=True)
    model, batches = setup(args)
    fns, ours, base, _ = variants(args, model, batches)
    feats = ours.extract(batches[:1]).data, base.extract(batches[0])
    check32 = rel_err(feats[1], feats[0])
    grid = {"grid_rows": base.grid.cells, "routed_tokens": base.grid.routed}
    grid["rows_per_routed_token"] = grid["grid_rows"] / grid["routed_tokens"]
    medians = interleaved_medians(fns, args.reps, warmup=1)
    print("medians:", medians, flush=True)

    memory = {}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "out", "reps")]
    for name in fns:
        run = subprocess.run(
            [sys.executable, __file__, f"--child={name}", *flags], capture_output=True, text=True, check=True
        )
        memory[name] = json.loads(run.stdout.strip().splitlines()[-1])
        memory[name]["step_extra_mib"] = memory[name]["peak_rss_mib"] - memory[name]["rss_before_mib"]
        print(name, memory[name], flush=True)

    experts = [l for l in ours.layers if l.routed]
    result = {
        "bench": "moe_extract",
        "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread, shared with other jobs)",
        "load_average": os.getloadavg(),
        "commit": commit(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": {
            "arch": "mixtral",
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "experts": args.experts,
            "top_k": args.top_k,
            "vocab": args.vocab,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "batch": args.batch,
        "seq": args.seq,
        "prompt_tokens": args.seq // 2,
        "rank": [args.rank, args.rank],
        "captured_layers": len(ours.layers),
        "expert_layers": len(experts),
        "feature_dim": ours.dim,
        "equality_float64_small": check,
        "rel_err_float32_bench_shape": check32,
        "padded_grid_rows": grid,
        "seconds": medians,
        "ratio_ours_over_train": {impl: medians["ours"] / medians[f"train_{impl}"] for impl in IMPLS},
        "ratio_padded_grid_over_train": {impl: medians["padded_grid"] / medians[f"train_{impl}"] for impl in IMPLS},
        "speedup_ours_vs_padded_grid": medians["padded_grid"] / medians["ours"],
        "memory": memory,
        "reps": args.reps,
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
