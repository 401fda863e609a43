"""Expert sites (issue 30): every expert projection of a transformers 5 MoE model is a site.

Tiny Qwen3-MoE, Mixtral and gpt-oss (transposed ``(E, in, out)`` experts with biases) under the three experts
implementations (``eager``, ``batched_mm``, ``grouped_mm``): the adapted experts module equals a float64
oracle loop over experts, the implementations agree, every trainable tensor reaches the output, training
lowers the loss, the block compiles without a graph break, save/load/merge round-trip, and no
``E × d_in × d_out`` tensor is made in the forward or the backward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers.integrations.moe as hf_moe
from torch.utils._python_dispatch import TorchDispatchMode

import aurora_fx
from aurora_fx.expert_routing import ExpertRouting, ExpertRoutingError
from aurora_fx.owners import WrappedOwner
from tests.models import MOE_BUILDERS, MOE_EXPERTS, randomize_adapters
from tests.reference import experts_reference

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
METHODS = ("lora", "aurora", "aroma")
RANKS = {"aurora": 2, "lora": 2, "aroma": 1}


@contextlib.contextmanager
def grouped_fallback(use: bool):
    """``grouped_mm`` through transformers' own fallback op (any dtype) instead of ``torch._grouped_mm``
    (which has no float64 kernel on CPU)."""
    saved = hf_moe._can_use_grouped_mm
    if use:
        hf_moe._can_use_grouped_mm = lambda *args: False
    try:
        yield
    finally:
        hf_moe._can_use_grouped_mm = saved


@pytest.fixture(autouse=True)
def _float64_grouped_mm(request):
    """Every test but the ``torch_kernel`` ones runs ``grouped_mm`` through the fallback op (float64 works)."""
    with grouped_fallback("torch_kernel" not in request.node.name):
        yield


def _adapted(name: str, method: str = "lora", dtype=torch.float64, pattern: str = "experts", **kw):
    torch.manual_seed(0)
    model = MOE_BUILDERS[name]().to(dtype)
    aurora_fx.apply(model, pattern, method=method, rank=RANKS[method], dropout=kw.pop("dropout", 0.0), **kw)
    randomize_adapters(model)
    return model


def _routing(tokens: int, dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 32, generator=gen, dtype=dtype)
    index = torch.stack([torch.randperm(MOE_EXPERTS, generator=gen)[:2] for _ in range(tokens)])
    index[:MOE_EXPERTS, 0] = torch.arange(MOE_EXPERTS)  # every expert is hit
    index[:MOE_EXPERTS, 1] = (torch.arange(MOE_EXPERTS) + 1) % MOE_EXPERTS
    weights = torch.rand(tokens, 2, generator=gen, dtype=dtype).softmax(-1)
    return hidden, index, weights


def _experts(model):
    return model.model.layers[0].mlp.experts


def test_sites_lists_each_expert_parameter_with_its_expert_count():
    table = aurora_fx.sites(MOE_BUILDERS["qwen3_moe"](), "experts")
    matched = table.matched
    assert [s.path for s in matched[:2]] == ["model.layers.0.mlp.experts.gate_up_proj",
                                             "model.layers.0.mlp.experts.down_proj"]
    assert {(s.kind, s.experts, s.ndim, s.reason) for s in matched} == {("expert", MOE_EXPERTS, 3, None)}
    assert (matched[0].in_features, matched[0].out_features) == (32, 48)
    assert f"{MOE_EXPERTS}×32→48" in str(table)
    oss = aurora_fx.sites(MOE_BUILDERS["gpt_oss"](), "experts").matched[0]
    assert (oss.layout, oss.in_features, oss.out_features) == ("in_out", 32, 48)  # stored (E, in, out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MOE_BUILDERS))
def test_the_adapted_experts_equal_the_oracle_loop_under_every_implementation(name, method):
    model = _adapted(name, method)
    experts = _experts(model)
    assert isinstance(experts, WrappedOwner) and isinstance(experts, type(experts).__mro__[2])
    hidden, index, weights = _routing(12)
    reference = experts_reference(experts, hidden, index, weights)
    with torch.no_grad():
        for impl in IMPLEMENTATIONS:
            model.set_experts_implementation(impl)
            got = experts(hidden, index, weights)
            assert (got - reference).abs().max().item() <= 1e-10, impl
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        logits = {}
        for impl in IMPLEMENTATIONS:
            model.set_experts_implementation(impl)
            logits[impl] = model(input_ids=ids).logits
        with aurora_fx.disable_adapters(model):
            plain = model(input_ids=ids).logits
    for impl in IMPLEMENTATIONS[1:]:
        assert (logits[impl] - logits["eager"]).abs().max().item() <= 1e-10, impl
    assert (plain - logits["eager"]).abs().max().item() > 1e-3  # the adapters do change the model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MOE_BUILDERS))
def test_grouped_mm_with_the_torch_kernel_in_float32(name, method):
    """The grouped fast path (LoRA, AuroRA: ``grouped_delta``) and AROMA's loop: outputs and gradients equal the
    per-expert loop behind transformers' fallback op."""
    model = _adapted(name, method, dtype=torch.float32)
    experts = _experts(model)
    hidden, index, weights = _routing(12, torch.float32)
    model.set_experts_implementation("grouped_mm")
    results = []
    for fallback in (False, True):
        with grouped_fallback(fallback):
            out = experts(hidden, index, weights)
            grads = torch.autograd.grad(out.square().sum(), [p for p in experts.parameters() if p.requires_grad])
        results.append((out.detach(), grads))
    with torch.no_grad():
        reference = experts_reference(experts, hidden, index, weights)
    def close(a, b):  # float32: relative to the largest value
        return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())

    assert close(results[0][0], reference) and close(results[0][0], results[1][0])
    assert all(close(fast, loop) for fast, loop in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_every_expert_tensor_reaches_the_output(method):
    model = _adapted("qwen3_moe", method, pattern="experts")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_adapter = {"aurora": 4, "lora": 2, "aroma": 2}[method]
    assert len(named) == 2 * 2 * MOE_EXPERTS * per_adapter  # 2 layers × (gate_up, down) × E experts
    hidden, index, weights = _routing(12)
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            outputs = [layer.mlp.experts(hidden, index, weights) for layer in model.model.layers]
        for name, p in named:
            layer = int(name.split(".")[2])
            saved = p.detach().clone()
            with torch.no_grad():
                p.add_(torch.randn_like(p))
                moved = (model.model.layers[layer].mlp.experts(hidden, index, weights) - outputs[layer]).abs().max()
                p.copy_(saved)
            assert moved.item() > 1e-6, f"{name} does not reach the output under {impl} ({method})"
    infos = aurora_fx.adapters(model)
    assert [(a.kind, a.details["experts"]) for a in infos] == [("expert", MOE_EXPERTS)] * 4
    assert sum(a.trainable_params for a in infos) == sum(p.numel() for _, p in named)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(MOE_BUILDERS))
def test_a_few_training_steps_lower_the_loss_with_dropout(name, impl):
    model = _adapted(name, "aurora", dtype=torch.float32, dropout=0.1)
    model.set_experts_implementation(impl)
    model.train()
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=3e-2)
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses


def test_the_batched_mm_block_compiles_without_a_graph_break():
    model = _adapted("qwen3_moe", "aurora", dtype=torch.float32)
    model.set_experts_implementation("batched_mm")
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 6, 32)
    expected = block(hidden)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(hidden)
    assert (got - expected).abs().max().item() <= 1e-5
    got.sum().backward()
    assert all(p.grad is not None for p in block.experts.adapter_gate_up_proj.parameters())


class _Allocations(TorchDispatchMode):
    """The element count of every tensor an op allocates (views, which share storage, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.sizes.append((t.numel(), str(func)))
        return out


def _largest_allocation(model, block_input, impl: str) -> tuple[int, str]:
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    with _Allocations() as seen:
        block(block_input).square().sum().backward()
    return max(seen.sizes)


@pytest.mark.parametrize("impl", ("eager", "grouped_mm"))
@pytest.mark.parametrize("method", ("lora", "aurora"))
def test_no_expert_sized_tensor_is_made_in_forward_or_backward_torch_kernel(method, impl):
    model = _adapted("qwen3_moe", method, dtype=torch.float32)
    expert_sized = MOE_EXPERTS * 32 * 24  # the smaller expert weight: down_proj (E, 32, 24)
    hidden = torch.randn(1, 8, 32, requires_grad=True)
    numel, op = _largest_allocation(model, hidden, impl)
    assert numel < expert_sized, f"{op} made a tensor of {numel} elements (E·d_in·d_out = {expert_sized})"


def test_the_allocation_probe_sees_a_weight_space_delta_torch_kernel():
    """The probe above would catch an adapter that forms ``E × d_in × d_out`` (PEFT's target_parameters)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(MOE_BUILDERS["qwen3_moe"](), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    inner = model.base_model.model
    numel, _ = _largest_allocation(inner, torch.randn(1, 8, 32, requires_grad=True), "grouped_mm")
    assert numel >= MOE_EXPERTS * 32 * 24


def test_an_operation_the_routing_cannot_follow_is_refused_by_name():
    weight = torch.randn(MOE_EXPERTS, 6, 5)
    family = _adapted("qwen3_moe").model.layers[0].mlp.experts.adapter_gate_up_proj
    with pytest.raises(ExpertRoutingError, match="einsum.*adapter would be skipped"), \
            ExpertRouting([(weight, family, "experts.w", False)]):
        torch.einsum("eoi,ti->teo", weight, torch.randn(3, 5))
    with pytest.raises(ExpertRoutingError, match="transposes dimensions"), \
            ExpertRouting([(weight, family, "experts.w", False)]):
        weight.transpose(0, 1)


def test_save_load_onto_a_fresh_model_gives_identical_outputs(tmp_path):
    model = _adapted("gpt_oss", "aurora")
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    aurora_fx.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = MOE_BUILDERS["gpt_oss"]().double()
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)


@pytest.mark.parametrize("method", ("lora", "aroma"))
@pytest.mark.parametrize("name", ("qwen3_moe", "gpt_oss"))
def test_merge_then_unload_is_exact(name, method):
    model = _adapted(name, method)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        aurora_fx.merge(model)
        assert not any(isinstance(m, WrappedOwner) for m in model.modules())
        assert (model(input_ids=ids).logits - expected).abs().max().item() <= 1e-10


def test_aroma_controller_tracks_every_expert_on_its_own():
    model = _adapted("qwen3_moe", "aroma", dtype=torch.float32)
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-3)
    controller = aurora_fx.AromaController(model, optimizer)
    sites = [t.path for t in controller.tracks]
    assert len(sites) == 2 * 2 * MOE_EXPERTS
    assert sites[:2] == ["model.layers.0.mlp.experts.gate_up_proj.0", "model.layers.0.mlp.experts.gate_up_proj.1"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ("lora", "aurora"))
def test_an_expert_adapted_decoder_exports_to_onnx_with_the_adapters_inside(method, tmp_path):
    from tests.conftest import ORT_ATOL

    model = _adapted("qwen3_moe", method, dtype=torch.float32)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad(), aurora_fx.disable_adapters(model):
        base = model(input_ids=ids).logits
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base).abs().max().item() > 1e-2  # the experts' adapters matter
    result = aurora_fx.export.to_onnx_decoder(model, tmp_path)
    assert max(result.max_abs_diff.values()) <= ORT_ATOL  # ORT against the adapted model, KV cache steps included
    assert any("'batched_mm'" in n for n in result.notes)
