"""What every peer runner shares: the model, the two data sets, timing and the result record.

Imports only torch, numpy and transformers, so it runs inside every peer's virtualenv.
Each runner is one process: ``python bench/peers/run_<tool>.py WORK SETTING OUT SET``, where
WORK holds ``model/`` (weights saved once) and ``data_<SET>.pt``, SETTING names what to
compute (``proj16``, ``proj64``, ``exact``; ``head16``: proj16 with the LM head captured too)
and OUT receives ``scores.npy`` and ``result.json``.

Two shapes: the toy (``MODEL``, a 4-layer Llama with vocabulary 512, both data sets in one
WORK) and the real shapes (``REAL``: a Qwen2-0.5B-shaped model cut to 2 layers at its real
vocabulary, or at 32,000 with twice the context; one WORK per workload, its own model).

Conventions shared by every tool so the scores mean the same thing:
- per-example loss: mean token cross-entropy over answer tokens (``labels != -100``,
  HF convention, shifted inside the model);
- layers: every Linear layer of the attention and MLP blocks (q, k, v, o, gate, up, down),
  not the embeddings; the LM head only under ``head*`` settings (a tied head: the head's
  share of the tied weight's gradient, i.e. the gradient of the head module's own matmul);
- score: the raw inner product of two examples' (projected) loss gradients, no preconditioner.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

LAYER_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "lm_head"
MODEL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build_model(seed: int = 0):
    """The tiny Llama every tool sees: built from a config, seeded, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation="eager")).eval()


# Real-shape workloads: Qwen2-0.5B's widths (hidden 896, MLP 4,864, 14 query / 2 key-value heads,
# tied head) cut to 2 decoder layers; fixed-length sequences whose last ``answer`` tokens carry labels.
QWEN2 = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2
)
REAL = {
    "qwen2": dict(vocab=151936, seq=512, answer=256, train=8, query=2),
    "v32k": dict(vocab=32000, seq=1024, answer=512, train=8, query=2),
}


def build_real_model(workload: str, seed: int = 0):
    """A real-shape workload's model: Qwen2 widths, its vocabulary, tied head, seeded random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=REAL[workload]["vocab"], tie_word_embeddings=True, **QWEN2)
    return Qwen2ForCausalLM(config).eval()


def real_data(workload: str, seed: int = 1) -> dict[str, list[dict]]:
    """Random tokens, ``seq`` long; the prompt (the first ``seq - answer``) carries label -100."""
    w = REAL[workload]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, w["vocab"], (w["train"] + w["query"], w["seq"]), generator=g)
    cut = w["seq"] - w["answer"]
    rows = [{"input_ids": r.tolist(), "labels": [-100] * cut + r[cut:].tolist()} for r in ids]
    return {"train": rows[: w["train"]], "query": rows[w["train"] :]}


def load_model(work: Path):
    """The saved model in float32; the toy Llama with eager attention (as it was always run), the real
    shapes with the model's default attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    toy = AutoConfig.from_pretrained(work / "model").model_type == "llama"
    kw = {"attn_implementation": "eager"} if toy else {}
    return AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, **kw).eval()


def captures_head(setting: str) -> bool:
    return setting.startswith("head")


def rank(setting: str) -> int:
    """The projection rank of a projected setting (``proj16``, ``head16``)."""
    return int(setting.removeprefix("proj").removeprefix("head"))


def layer_names(model, head: bool = False) -> list[str]:
    suffixes = LAYER_SUFFIXES + ((HEAD,) if head else ())
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]


def fixed_tokens(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Uniform random tokens, every token an answer token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def instructions(n: int, vocab: int, seed: int) -> list[dict]:
    """Instruction-like examples of tenfold varying length: prompt, separator, answer.

    The prompt is a task token, an argument run of 4-48 tokens and a separator; the answer is
    a deterministic function of the argument chosen by the task (copy, reverse, shift by one,
    every other token), 4-56 tokens, followed by an end token. Prompt tokens carry label -100.
    Total lengths range from about 12 to 110 tokens.
    """
    rng = np.random.default_rng(seed)
    sep, end, tasks = vocab - 1, vocab - 2, [vocab - 3, vocab - 4, vocab - 5, vocab - 6]
    out = []
    for _ in range(n):
        t = int(rng.integers(4))
        arg = rng.integers(0, vocab - 8, int(rng.integers(4, 49))).tolist()
        ans = [arg, arg[::-1], [(a + 1) % (vocab - 8) for a in arg], arg[::2] or arg][t][:56] + [end]
        prompt = [tasks[t]] + arg + [sep]
        out.append({"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans})
    return out


def datasets() -> dict[str, dict[str, list[dict]]]:
    V = MODEL["vocab_size"]
    return {
        "fixed": {"train": fixed_tokens(512, 64, V, 1), "query": fixed_tokens(64, 64, V, 2)},
        "variable": {"train": instructions(512, V, 3), "query": instructions(64, V, 4)},
    }


def pad(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded HF batch: input_ids, attention_mask, labels (-100 on pads)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        labels[i, :L] = torch.tensor(e["labels"])
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [pad(examples[i : i + size]) for i in range(0, len(examples), size)]


def example_losses(model, batch: dict) -> torch.Tensor:
    """(B,) mean answer-token cross-entropy of each example (the shared loss definition)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    n = (labels != -100).sum(1).clamp_min(1)
    return tok.sum(1) / n


def rss_mb(field: str = "VmRSS") -> float:
    """A memory line of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (this process's peak).

    VmHWM, not ``getrusage``'s ru_maxrss: Linux carries the parent's peak RSS across fork and exec
    into ru_maxrss (exec records the old address space's high-water mark), so a runner launched
    by a parent that had built the real-shape model read at least that parent's peak (1,495 MiB)
    whatever it used itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def measured(record: dict):
    """Wall time, process CPU time (all threads) and peak RSS of the block, into ``record``."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    record["wall_s"] = time.perf_counter() - t0
    record["cpu_s"] = time.process_time() - c0
    record["peak_rss_mb"] = rss_mb("VmHWM")


def main(run) -> None:
    """Runner entry: ``run(model, data, setting, workdir) -> (Q, N) scores`` plus notes."""
    work, setting, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dataset = sys.argv[4]
    torch.set_num_threads(int(os.environ.get("PEERS_THREADS", "1")))
    out.mkdir(parents=True, exist_ok=True)
    data = torch.load(work / f"data_{dataset}.pt")
    model = load_model(work)
    record: dict = {
        "setting": setting,
        "dataset": dataset,
        "threads": torch.get_num_threads(),
        "loaded_rss_mb": rss_mb(),  # the process with the model and the data loaded, before any work
    }
    try:
        with measured(record):
            scores, notes = run(model, data, setting, out / "tmp")
        np.save(out / "scores.npy", np.asarray(scores, dtype=np.float64))
        record.update(notes)
        record["ok"] = True
    except Exception as e:  # a peer that fails is recorded, not fatal to the benchmark
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    (out / "result.json").write_text(json.dumps(record, indent=1))
