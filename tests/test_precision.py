"""The low-precision path against float32 on the tiny components: the seed, its gradient and the
loss stay float32, the networks run in bfloat16 or float16, and the results agree within stated
tolerances. The default on the CPU stays float32."""

from __future__ import annotations

import pytest
import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.optimize import seed_objective
from seedselect_cli.core.sampling import ddim_schedule, encode_prompt
from seedselect_cli.models import load_models, resolve_dtype
from tests.conftest import make_config
from tests.test_optimize import random_target, seeds

# Stated tolerances: loss within 1 % (relative), each seed's gradient within 10 % in norm and
# pointing the same way (cosine similarity above 0.99).
LOSS_RTOL, GRAD_RTOL, GRAD_COS = 0.01, 0.10, 0.99


def loss_and_grad(dtype: torch.dtype):
    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), dtype)
    z = seeds(3, 31).requires_grad_(True)
    terms = seed_objective(models, z, random_target(30), encode_prompt(models, "a red disc"),
                           ddim_schedule(models, 4), make_config().objective())
    terms.total.sum().backward()
    return terms, z.grad


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_losses_and_gradients_match_float32(dtype):
    reference, reference_grad = loss_and_grad(torch.float32)
    terms, grad = loss_and_grad(dtype)
    assert terms.total.dtype == torch.float32 and grad.dtype == torch.float32  # seed and loss in float32
    torch.testing.assert_close(terms.total, reference.total, rtol=LOSS_RTOL, atol=0)
    for ours, theirs in zip(grad.flatten(1), reference_grad.flatten(1)):
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > GRAD_COS
        assert ((ours - theirs).norm() / theirs.norm()) < GRAD_RTOL


def test_the_default_dtype_is_float32_on_the_cpu_and_bfloat16_on_a_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
