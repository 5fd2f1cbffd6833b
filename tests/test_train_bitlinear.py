"""BitLinear training under torch.compile: one graph (no breaks, so no host syncs such as .item()), the same
values and gradients as eager, and λ changes without recompiling."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from pybitnet.convert import set_quant_strength
from pybitnet.errors import ConfigError
from pybitnet.nn import BitLinear
from pybitnet.quant import fake_quantize_activations, fake_quantize_weight


def step(layer, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = (layer if forward is None else forward)(x)
    y.square().sum().backward()
    return y, layer.weight.grad, x.grad


def fresh(seed: int = 0) -> tuple[BitLinear, torch.Tensor]:
    torch.manual_seed(seed)
    return BitLinear(48, 40), torch.randn(3, 5, 48, requires_grad=True)


def test_forward_backward_compiles_to_one_graph_and_matches_eager():
    torch._dynamo.reset()
    layer, x = fresh()
    eager = step(layer, x)
    layer_c, x_c = fresh()
    counts = {"graphs": 0}

    def backend(gm, example_inputs):
        counts["graphs"] += 1
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    # fullgraph: a graph break (a host sync such as .item() or a data-dependent branch) would raise here;
    # AOTAutograd traces the backward of that one graph too
    compiled = torch.compile(layer_c, backend=backend, fullgraph=True)
    got = step(layer_c, x_c, compiled)
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(a, b)
    assert counts["graphs"] == 1
    set_quant_strength(layer_c, 0.5, act=0.25)  # a buffer update: same graph, no recompilation
    layer_c.weight.grad = x_c.grad = None
    step(layer_c, x_c, compiled)
    assert counts["graphs"] == 1


def test_straight_through_gradients_and_ternary_forward():
    layer, x = fresh(1)
    y, w_grad, x_grad = step(layer, x)
    wq = fake_quantize_weight(layer.weight.detach())
    xq = fake_quantize_activations(x.detach())
    torch.testing.assert_close(y, xq @ wq.T)
    g = 2 * y.detach()  # d(sum y^2)/dy
    torch.testing.assert_close(w_grad, g.reshape(-1, 40).T @ xq.reshape(-1, 48))  # STE: quantizers pass grads
    torch.testing.assert_close(x_grad, g @ wq)


def test_inductor_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    layer, x = fresh(2)
    eager = step(layer, x)
    layer_c, x_c = fresh(2)
    got = step(layer_c, x_c, torch.compile(layer_c, fullgraph=True))
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["mlp", "block"])
def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients(mode):
    """Recomputing each block's feed-forward (or the whole block) in the backward gives the same loss and
    gradients, bit for bit, and keeps fewer bytes for the backward."""
    from pybitnet.models.presets import preset
    from pybitnet.models.random_init import random_latent_model
    from pybitnet.models.transformer import set_activation_checkpointing

    model = random_latent_model(preset("tiny-bitnet", num_hidden_layers=2), seed=1).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.zero_grad()
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return (
            loss.detach(),
            [p.grad.clone() for p in model.parameters() if p.grad is not None],
            sum(kept.values()),
        )

    ref_loss, ref_grads, ref_bytes = step()
    set_activation_checkpointing(model, mode)
    loss, grads, nbytes = step()
    assert torch.equal(loss, ref_loss) and len(grads) == len(ref_grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert nbytes < ref_bytes
    with pytest.raises(ConfigError, match="activation checkpointing"):
        set_activation_checkpointing(model, "everything")
