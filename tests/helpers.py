"""Helpers shared by tests: tiny models built from configs (nothing is downloaded), example
batches, slow per-example gradients, relative error."""

from __future__ import annotations

import contextlib

import torch
import transformers as tf

from fastinfluence.capture import select_layers
from fastinfluence.lm import IGNORE_INDEX

VOCAB = 64

# transformers before 4.46 (open-unlearning's pin is 4.45.1) casts a model's logits to float32
# inside its forward: a reference computed from the model's own logits then holds float32
# rounding even for a float64 model (relative 1e-7 on a loss, ~1e-6 after an exp), and the
# bounds of such comparisons are float32's there.
OLD_TRANSFORMERS = tuple(int(x) for x in tf.__version__.split(".")[:2]) < (4, 46)
REFERENCE_RTOL = 1e-5 if OLD_TRANSFORMERS else 1e-9


def _config(arch: str, layers: int = 2):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_key_value_heads=2, **common)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, max_position_embeddings=64, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32, **common)
    raise ValueError(arch)


ARCHS = ("llama", "gpt2", "gpt_neox", "opt", "qwen2")


def tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, lora: bool = False, layers: int = 2):
    torch.manual_seed(seed)
    # SDPA: transformers' eager attention turns fully masked (left-padding) rows into NaN
    # in float64, which then reaches every row through 0 * NaN.
    model = tf.AutoModelForCausalLM.from_config(_config(arch, layers), attn_implementation="sdpa").to(dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
        )
        for name, p in model.named_parameters():  # LoRA B starts at zero; make its gradients non-trivial
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        model = model.to(dtype)
    model.eval()
    return model


def make_examples(n: int, seed: int = 0, min_len: int = 5, max_len: int = 12):
    """Random (input_ids, labels) pairs of varied lengths; labels -100 on a random prompt prefix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (T,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, T - 1, (1,), generator=g))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def collate(examples, side: str = "right", ids=None):
    """Pad examples to one batch (``side``: right or left padding)."""
    T = max(len(i) for i, _ in examples)
    B = len(examples)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (i, l) in enumerate(examples):
        sl = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
        input_ids[b, sl], labels[b, sl], mask[b, sl] = i, l, 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if ids is not None:
        batch["ids"] = list(ids)
    return batch


def batches_of(examples, size: int, side: str = "right"):
    return [collate(examples[s : s + size], side) for s in range(0, len(examples), size)]


def slow_gradients(model, examples, include=None, exclude=None, include_bias=True):
    """(N, P) per-example gradients, one backward per example, of the selected layers' parameters.

    Each layer contributes [grad W | grad b] in (d_out, d_in [+1]) orientation (GPT-2
    Conv1D weights are transposed), flattened, in layer order: the layout ``exact_scores``
    and identity-projected features use.
    """
    layers = select_layers(model, include, exclude, include_bias)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    params = []
    for layer in layers:
        params.append(layer.module.weight)
        if layer.bias:
            params.append(layer.module.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    rows = []
    try:
        for ids, labels in examples:
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            target = labels[1:]
            # Written out here, independent of the library's loss: mean CE over answer tokens.
            loss = torch.nn.functional.cross_entropy(logits[target != IGNORE_INDEX], target[target != IGNORE_INDEX])
            grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
            parts = []
            for layer in layers:
                gw = grads[id(layer.module.weight)]
                if not isinstance(layer.module, torch.nn.Linear):  # Conv1D stores (d_in, d_out)
                    gw = gw.T
                if layer.bias:
                    gw = torch.cat([gw, grads[id(layer.module.bias)][:, None]], dim=1)
                parts.append(gw.flatten())
            rows.append(torch.cat(parts))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return torch.stack(rows), layers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (NaN anywhere in ``out`` gives NaN, which fails any bound)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and CI shares two cores between test runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


SMALL_VOCAB = 23


def small_model(arch: str, dtype=torch.float64):
    """Models narrow enough for an explicit Kronecker matrix per layer: odd widths on purpose
    (12, 19, 23); ``llama_bias`` has a bias on every Linear."""
    torch.manual_seed(0)
    if arch in ("llama", "llama_bias"):
        bias = arch == "llama_bias"
        cfg = tf.LlamaConfig(
            vocab_size=SMALL_VOCAB,
            hidden_size=12,
            intermediate_size=19,
            num_hidden_layers=1,
            num_attention_heads=3,
            num_key_value_heads=1,
            attention_bias=bias,
            mlp_bias=bias,
        )
    else:
        cfg = tf.GPT2Config(
            vocab_size=SMALL_VOCAB, n_embd=10, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()


def small_examples(n: int, seed: int, vocab: int = SMALL_VOCAB):
    """make_examples folded into the small vocabulary (labels keep their -100 prompt prefix)."""
    return [(i % vocab, torch.where(l == IGNORE_INDEX, l, i % vocab)) for i, l in make_examples(n, seed=seed)]


def save_word_model(directory, words: list[str], layers: int = 1):
    """A tiny Llama and a word-level tokenizer over ``words`` (after <pad>, <unk>, <eos>), saved in
    ``directory`` as ``from_pretrained`` reads them: a model directory for the CLI and the README."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(directory)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory
