"""The open-unlearning trainers on a mixture-of-experts model: the router auxiliary loss is left out by
default and added on request (``router_aux_loss``), as ``UnlearnTrainer`` does
(tests/test_moe_unlearn.py): references from the model's own logits and its own
``output_router_logits=True`` forward."""

from __future__ import annotations

import pytest
import transformers

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(
        "MoE models with fused experts and recorded router logits need transformers 5 (the open-unlearning pin "
        "runs 4.45.1, whose MoE classes have another layout)",
        allow_module_level=True,
    )

import open_unlearning_rendition as ou  # noqa: E402
import torch  # noqa: E402
from helpers import VOCAB, one_thread, rel_err  # noqa: E402
from test_moe import moe_model  # noqa: E402
from test_moe_unlearn import reference_nll  # noqa: E402
from test_open_unlearning import batch, make  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


DATA = ou.qa_items(6, seed=1, vocab=VOCAB), ou.qa_items(5, seed=2, vocab=VOCAB)
GAMMA, ALPHA = 0.7, 1.3


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_router_aux_loss_is_left_out_by_default_and_added_on_request(arch, tmp_path):
    model = moe_model(arch)
    model.config.output_router_logits = True  # the model's own config asks for it: still left out by default
    inputs = batch(*DATA)
    f, r = inputs["forget"], inputs["retain"]
    router = model.model.layers[1].mlp.get_submodule("router" if arch == "gpt_oss" else "gate").weight

    def reference(coef):
        # FIGradDiff's default reduction is the token mean over the batch, open-unlearning's outputs.loss
        fs, fc = reference_nll(model, f)
        rs, rc = reference_nll(model, r)
        loss = -GAMMA * fs.sum() / fc.sum() + ALPHA * rs.sum() / rc.sum()
        for b in (f, r) if coef else ():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
            loss = loss + coef * out.aux_loss
        return loss

    for option, coef in ((None, 0.0), (False, 0.0), (True, model.config.router_aux_loss_coef), (0.25, 0.25)):
        kwargs = {} if option is None else {"router_aux_loss": option}
        trainer = make("FIGradDiff", model, *DATA, tmp_path, gamma=GAMMA, alpha=ALPHA, **kwargs)
        assert (trainer.router_aux is None) == (not option)
        out, ref = trainer.compute_loss(model, inputs), reference(coef)
        # without the auxiliary loss float64 throughout; the model computes it in float32
        tol = 1e-12 if not coef else 2e-7
        assert rel_err(out, ref) <= tol, option
        g_out, g_ref = (torch.autograd.grad(x, router)[0] for x in (out, ref))
        assert rel_err(g_out, g_ref) <= tol * 100, option
        if coef:
            assert rel_err(out, reference(0.0)) > 1e-6  # the option changes the loss
            trainer.router_aux.remove()


def test_router_aux_loss_is_refused_for_models_without_one(tmp_path):
    with pytest.raises(ValueError, match=r"^router_aux_loss: DeepseekV3ForCausalLM has no router auxiliary loss"):
        make("FIGradDiff", moe_model("deepseek_v3"), *DATA, tmp_path, router_aux_loss=True)
