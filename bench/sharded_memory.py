"""Peak memory per rank of extraction on an FSDP2-sharded model at 1, 2 and 4 ranks, against the
whole model in one process. The model's weights dominate its memory (float32, about 400 MB);
each run is a fresh ``torchrun`` on gloo (CPU), each rank extracting its own batches into one store.

    python bench/sharded_memory.py [--ranks 1 2 4] [--out bench/results/sharded_memory_cpu.json]

Per rank: resident memory after imports, after the model is built (sharded: built on the meta
device, sharded, then materialised, so no rank ever holds the whole model), and the peak over
the extraction. The LM head is not captured: its loss runs inside the head's forward
(``sharding.head_call``), where the root module's parameters (embeddings, final norm, head)
are whole for the step, as FSDP2 keeps them for training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import commit

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS = 768, 12, 2048, 8192, 12
BATCHES, BATCH, SEQ = 2, 2, 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the launcher's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(out: Path, sharded: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastinfluence import GradientExtractor, ProjectionConfig
    from fastinfluence import distributed as dist
    from fastinfluence.store import write_store

    dist.init_from_env()
    rank, world = dist.rank_world()
    torch.set_num_threads(1)
    imported = _rss_mb()
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
    )
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
            rotary = type(model.model.rotary_emb)(cfg)  # buffers computed at init, not parameters
            model.model.rotary_emb.inv_freq.copy_(rotary.inv_freq)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.eval()
    built = _rss_mb()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(BATCHES * world):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "ids": [2 * i, 2 * i + 1]}
        )
    config = ProjectionConfig(rank_in=16, rank_out=16, include=[r"layers\.\d+\.mlp\.down_proj"])
    start = time.perf_counter()
    write_store(out / "store", GradientExtractor(model, config), batches)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    row = {
        "rank": rank,
        "world": world,
        "sharded": sharded,
        "params": params,
        "weights_mb": params * 4 / 2**20,
        "root_group_mb": sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n) * 4 / 2**20,
        "rss_after_imports_mb": round(imported, 1),
        "rss_after_model_mb": round(built, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "extract_seconds": round(seconds, 2),
        "examples_per_rank": BATCHES * BATCH,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world: int, sharded: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        # glibc raises its mmap threshold after freeing a large block, after which the blocks that
        # FSDP2 gathers and frees each step stay resident (+500 MB per rank here, not reused): a fixed
        # threshold returns them, as a GPU's caching allocator reuses them.
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        if world == 1 and not sharded:
            cmd = [sys.executable, __file__, "--child", tmp]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
            cmd += [__file__, "--child", tmp, "--sharded"]
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="bench/results/sharded_memory_cpu.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.sharded)
        return
    rows = run(1, sharded=False)
    for world in args.ranks:
        rows += run(world, sharded=True)
    for r in rows:
        print(
            f"{'sharded' if r['sharded'] else 'whole  '} world={r['world']} rank={r['rank']}: model "
            f"{r['rss_after_model_mb'] - r['rss_after_imports_mb']:7.1f} MB, peak {r['peak_rss_mb']:7.1f} MB "
            f"(after imports {r['rss_after_imports_mb']:.0f} MB), {r['extract_seconds']:.1f} s"
        )
    result = {
        "bench": "sharded_memory",
        "commit": commit(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "model": {"hidden": HIDDEN, "layers": LAYERS, "intermediate": INTERMEDIATE, "vocab": VOCAB},
        "batches_per_rank": BATCHES,
        "batch": BATCH,
        "seq": SEQ,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
