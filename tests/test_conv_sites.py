"""Convolution sites (issue 31): ``nn.Conv1d`` / ``nn.Conv2d`` adapted as linear maps on their input patches.

A float64 reference that unfolds the input into patches and applies each adapter's functional oracle; timm
``resnet18`` and ``convnext_atto`` end to end (sites, liveness, training, save/load, merge, ONNX, PEFT).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aurora_fx
from aurora_fx.owners import WrappedOwner, owner_state
from tests.conftest import ORT_ATOL
from tests.models import assert_every_trainable_tensor_is_live, randomize_adapters, train_steps

METHODS = ("lora", "aurora", "aroma")
RANKS = {"lora": 2, "aurora": 2, "aroma": 1}


class Convs(nn.Module):
    """A Conv1d and two Conv2d (stride, padding, dilation, 'same'), as a tiny model."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(6, 4, 3, padding="same")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c1(x1), self.c3(torch.tanh(self.c2(x2)))


def _reference(conv: nn.Module, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x) + Δ``: the adapter's functional oracle on every unfolded patch (float64)."""
    base = owner_state(conv).original(x)
    dims = x.dim() - 2
    x2 = x.unsqueeze(-2) if dims == 1 else x
    kernel = (1, *conv.kernel_size) if dims == 1 else conv.kernel_size
    stride = (1, *conv.stride) if dims == 1 else conv.stride
    dilation = (1, *conv.dilation) if dims == 1 else conv.dilation
    padding = conv.padding if conv.padding != "same" else tuple(d * (k - 1) // 2 for d, k in
                                                                 zip(conv.dilation, conv.kernel_size, strict=True))
    padding = (0, *padding) if dims == 1 else padding
    patches = F.unfold(x2, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    delta = adapter.oracle_delta(patches).transpose(1, 2).reshape(base.shape)
    return base + delta


@pytest.mark.parametrize("method", METHODS)
def test_conv_sites_equal_the_patch_oracle_in_float64(method):
    torch.manual_seed(0)
    model = aurora_fx.apply(Convs().double(), "c", method=method, rank=RANKS[method], dropout=0.0)
    randomize_adapters(model)
    x1, x2 = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 13, 9, dtype=torch.float64)
    h = torch.tanh(model.c2(x2))
    with torch.no_grad():
        for conv, x in ((model.c1, x1), (model.c2, x2), (model.c3, h)):
            assert isinstance(conv, WrappedOwner)
            assert (conv(x) - _reference(conv, conv.adapter, x)).abs().max().item() <= 1e-10
            assert (conv(x) - owner_state(conv).original(x)).abs().max().item() > 1e-3


def test_sites_of_resnet18_list_its_convolutions_and_refuse_a_depthwise_one():
    timm = pytest.importorskip("timm")
    table = aurora_fx.sites(timm.create_model("resnet18", pretrained=False, num_classes=10))
    stem, first = table.get("conv1"), table.get("layer1.0.conv1")
    assert (stem.kind, stem.in_features, stem.out_features, stem.reason) == ("conv", 3 * 7 * 7, 64, None)
    assert (first.in_features, first.out_features) == (64 * 9, 64) and "conv    576→64" in str(table)
    dw = aurora_fx.sites(timm.create_model("convnext_atto", pretrained=False)).get("stages.0.blocks.0.conv_dw")
    assert dw.kind == "conv" and "grouped convolution (groups=40" in dw.reason
    with pytest.raises(ValueError, match="conv_dw.*grouped convolution"):
        aurora_fx.apply(timm.create_model("convnext_atto", pretrained=False), "conv_dw")


def _resnet(method: str, pattern: str = r"layer1\.0\.conv|downsample\.0|^conv1$", head: bool = True):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _live_blocks(timm.create_model("resnet18", pretrained=False, num_classes=5).eval())
    aurora_fx.apply(model, pattern, method=method, rank=RANKS[method], dropout=0.0,
                    trainable_modules="^fc$" if head else None)
    randomize_adapters(model, std=0.05)
    return model


def _live_blocks(model: nn.Module) -> nn.Module:
    """timm zero-initialises each block's last BatchNorm scale (the branch outputs 0 at init): set them all to 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_conv_adapter_tensor_reaches_the_output(method):
    model = _resnet(method, head=False)
    x = torch.randn(2, 3, 32, 32)
    per_site = {"aurora": 4, "lora": 2, "aroma": 2}[method]  # 6 sites: conv1, layer1.0.conv1/2, 3 downsamples
    assert_every_trainable_tensor_is_live(model, lambda: model(x), f"({method})", expected=6 * per_site)


@pytest.mark.parametrize("name", ("resnet18", "convnext_atto"))
@pytest.mark.parametrize("method", ("lora", "aurora"))
def test_a_few_steps_lower_the_loss(name, method):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4)
    pattern = r"conv|downsample\.0" if name == "resnet18" else r"stem\.0|downsample\.1"  # convnext: its k×k convs
    aurora_fx.apply(model, pattern, method=method, rank=4, dropout=0.05, trainable_modules=r"^(fc|head\.fc)$")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    losses = train_steps(model, lambda: F.cross_entropy(model(x), y), steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses


def test_save_load_and_exact_merge(tmp_path):
    timm = pytest.importorskip("timm")
    model = _resnet("lora")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    aurora_fx.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = _live_blocks(timm.create_model("resnet18", pretrained=False, num_classes=5).eval())
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        aurora_fx.merge(fresh)
        assert not any(isinstance(m, WrappedOwner) for m in fresh.modules())
        assert (fresh(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ("lora", "aurora"))
def test_to_onnx_of_conv_adapters_verifies_in_onnxruntime(method, tmp_path):
    model = _resnet(method)
    result = aurora_fx.export.to_onnx(model, tmp_path / "r.onnx", example_inputs=(torch.randn(2, 3, 32, 32),))
    assert max(result.max_abs_diff.values()) <= ORT_ATOL


@pytest.mark.slow
def test_to_peft_of_conv_lora_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    timm = pytest.importorskip("timm")
    model = _resnet("lora", pattern=r"layer1\.0\.conv|^conv1$", head=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    aurora_fx.export.to_peft(model, tmp_path)
    torch.manual_seed(0)
    base = _live_blocks(timm.create_model("resnet18", pretrained=False, num_classes=5).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected adapter keys
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 3  # conv1 at the root only, not every *.conv1
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max().item() <= 1e-5


def test_a_dilated_conv_is_refused_by_to_peft_by_name(tmp_path):
    model = aurora_fx.apply(Convs(), "c2", method="lora", rank=2)
    with pytest.raises(ValueError, match="dilation.*PEFT's conv LoRA"):
        aurora_fx.export.to_peft(model, tmp_path)


def test_an_aroma_conv_adapter_merges_pieces():
    model = _resnet("aroma", pattern=r"layer1\.0\.conv1")
    controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0))
    controller._merge(controller.tracks[0], torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        merged = copy.deepcopy(model)
        aurora_fx.merge(merged)
        assert (merged(x) - expected).abs().max().item() <= 1e-5
    assert controller.ranks()["layer1.0.conv1"] == 2


def _unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


UNET_PATTERN = r"to_[qkv]$|to_out\.0$|resnets\.\d+\.conv[12]$"


def _unet_inputs() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([1, 10]), torch.randn(2, 5, 16, generator=gen)


def test_a_diffusers_unet_adapts_attention_linears_and_resnet_convs_end_to_end(tmp_path):
    model = _unet()
    kinds = {s.kind for s in aurora_fx.sites(model, UNET_PATTERN).matched}
    assert kinds == {"linear", "conv"}
    aurora_fx.apply(model, UNET_PATTERN, method="lora", rank=4, dropout=0.0)
    sample, steps, context = _unet_inputs()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, lambda: F.mse_loss(model(sample, steps, encoder_hidden_states=context).sample, target),
                         steps=6, lr=1e-2)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        expected = model(sample, steps, encoder_hidden_states=context).sample
    aurora_fx.save_adapters(model, tmp_path)
    fresh = aurora_fx.load_adapters(_unet(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(sample, steps, encoder_hidden_states=context).sample, expected)
        aurora_fx.merge(fresh)
        assert (fresh(sample, steps, encoder_hidden_states=context).sample - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_a_unet_lora_folder_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = aurora_fx.apply(_unet(), UNET_PATTERN, method="lora", rank=4, dropout=0.0)
    randomize_adapters(model, std=0.05)
    sample, steps, context = _unet_inputs()
    with torch.no_grad():
        expected = model(sample, steps, encoder_hidden_states=context).sample
    aurora_fx.export.to_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_unet(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (loaded(sample, steps, encoder_hidden_states=context).sample - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_a_unet_with_aurora_on_convs_and_attention_exports_to_onnx(tmp_path):
    """(Also the output named like an input: the UNet takes ``sample`` and returns ``sample``.)"""
    model = aurora_fx.apply(_unet(), UNET_PATTERN, method="aurora", dropout=0.0)
    randomize_adapters(model, std=0.05)
    result = aurora_fx.export.to_onnx(model, tmp_path / "unet.onnx", example_inputs=_unet_inputs(), dynamic=False)
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    assert "sample_out" in result.output_names


def _convnext(method: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    aurora_fx.apply(model, r"stem\.0|downsample\.1", method=method, rank=RANKS[method], dropout=0.0)
    randomize_adapters(model, std=0.05)
    return model


def _unet_adapted(method: str) -> nn.Module:
    model = aurora_fx.apply(_unet(), UNET_PATTERN, method=method, rank=RANKS[method], dropout=0.0)
    randomize_adapters(model, std=0.05)
    return model


LIVE = {"convnext_atto": (_convnext, lambda: (torch.randn(1, 3, 32, 32),)),
        "unet": (_unet_adapted, _unet_inputs)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(LIVE))
def test_every_adapter_tensor_is_live_in_convnext_and_the_unet(name, method):
    build, inputs = LIVE[name]
    model, args = build(method), inputs()

    def out():
        result = model(*args)
        return result.sample if hasattr(result, "sample") else result

    assert_every_trainable_tensor_is_live(model, out, f"({name}, {method})")


@pytest.mark.slow
def test_convnext_save_load_merge_and_onnx(tmp_path):
    timm = pytest.importorskip("timm")
    model = _convnext("lora")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    aurora_fx.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    result = aurora_fx.export.to_onnx(fresh, tmp_path / "c.onnx", example_inputs=(x,))
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    with torch.no_grad():
        aurora_fx.merge(fresh)
        assert (fresh(x) - expected).abs().max().item() <= 1e-5
