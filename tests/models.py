"""Small test models as code (no downloads): the model matrix of the core issue.

Each ``ModelCase`` builds a real transformers / timm model class from a tiny config, makes
inputs of a given batch and sequence size, names the pattern to adapt and how to read the
output tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 2, 100


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict[str, Any]]
    pattern: str
    output: Callable[[Any], torch.Tensor]
    sites: int  # how many sites the pattern matches


def _ids(batch: int, seq: int) -> dict[str, Any]:
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -1:] = 0  # one padded position
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_ids(batch: int, seq: int) -> dict[str, Any]:
    return {**_ids(batch, seq), "use_cache": False}


def _pixels(size: int) -> Callable[[int, int], dict[str, Any]]:
    return lambda batch, seq: {"pixel_values": torch.randn(batch, 3, size, size)}


def _timm_pixels(size: int) -> Callable[[int, int], dict[str, Any]]:
    return lambda batch, seq: {"x": torch.randn(batch, 3, size, size)}


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=2 * HIDDEN, vocab_size=VOCAB)).eval()


def roberta_cls() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
        vocab_size=VOCAB, num_labels=3)).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                                      bos_token_id=1, eos_token_id=2, n_positions=64)).eval()


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                               intermediate_size=2 * HIDDEN, image_size=32, patch_size=8,
                                               num_labels=3)).eval()


def timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, depth=2).eval()


def timm_resnet() -> nn.Module:
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()


class FunctionalMLP(nn.Module):
    """A module computing linear maps on its own parameters: F.linear and ``x @ W.T``."""

    def __init__(self, d: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.w_out = nn.Parameter(torch.randn(d, hidden) / hidden**0.5)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w_in, self.b_in))
        return self.norm(x + h @ self.w_out.T)


class FunctionalNet(nn.Module):
    """Two FunctionalMLP blocks and a Linear head (the root only routes)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FunctionalMLP(), FunctionalMLP()])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def functional() -> nn.Module:
    return FunctionalNet().eval()


CASES = {
    "bert": ModelCase("bert", bert, _ids, "query|value", lambda o: o.last_hidden_state, 4),
    "roberta_cls": ModelCase("roberta_cls", roberta_cls, _ids, "query|value", lambda o: o.logits, 4),
    "gpt2": ModelCase("gpt2", gpt2, _decoder_ids, "c_attn|attn.c_proj", lambda o: o.logits, 4),
    "llama": ModelCase("llama", llama, _decoder_ids, "q_proj|v_proj", lambda o: o.logits, 4),
    "vit": ModelCase("vit", vit, _pixels(32), "q_proj|v_proj", lambda o: o.logits, 4),
    "timm_vit": ModelCase("timm_vit", timm_vit, _timm_pixels(224), "attn.*proj|qkv", lambda o: o, 4),
    "timm_resnet": ModelCase("timm_resnet", timm_resnet, _timm_pixels(64), "^fc$", lambda o: o, 1),
    "functional": ModelCase("functional", functional, lambda b, s: {"x": torch.randn(b, s, 16)}, "w_in|w_out",
                            lambda o: o, 4),
}


DECODERS = {  # HF causal LMs for the KV-cache export: AuroRA on one projection, LoRA on another
    "gpt2": (gpt2, "attn.c_attn", "attn.c_proj"),
    "llama": (llama, "q_proj", "v_proj"),
    "qwen2": (qwen2, "q_proj", "v_proj"),
}


def run(case: ModelCase, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The case's output tensor for ``inputs``."""
    return case.output(model(**inputs))


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating inputs to ``dtype`` (ids and masks unchanged)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.3) -> None:
    """Non-zero adapter weights, so that every parity test means something (docs/methods.md §0)."""
    for name, p in model.named_parameters():
        if ".adapter" in name:
            p.normal_(0.0, std)


class RootFunctional(nn.Module):
    """A root whose own forward computes ``F.linear`` on its own weight, plus a Linear child."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 16) / 4)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(x, self.w)))


def root_functional() -> nn.Module:
    return RootFunctional().eval()


# -- mixture-of-experts (transformers 5 experts classes: 3-D expert parameters) ----------------------
MOE_EXPERTS = 4


def qwen3_moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=MOE_EXPERTS,
        num_experts_per_tok=2, norm_topk_prob=True)).eval()


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=MOE_EXPERTS, num_experts_per_tok=2)).eval()


def gpt_oss() -> nn.Module:
    """gpt-oss: transposed expert weights ``(E, in, out)`` with per-expert biases, interleaved gate/up."""
    from transformers import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=MOE_EXPERTS, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "sinks" in name or "router.bias" in name:
                p.normal_(0.0, 0.1)  # gpt-oss leaves these uninitialised (empty) in _init_weights
    return model


MOE_BUILDERS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "gpt_oss": gpt_oss}


def assert_every_trainable_tensor_is_live(model: nn.Module, output: Callable[[], torch.Tensor], what: str = "",
                                          expected: int | None = None) -> None:
    """Perturbing any single trainable tensor of ``model`` moves ``output()`` (the liveness check of the site kinds).

    ``expected``: how many trainable tensors there must be (None: any number above zero).
    """
    with torch.no_grad():
        reference = output()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert named and (expected is None or len(named) == expected), (len(named), expected)
    for name, p in named:
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(torch.randn_like(p))
            moved = (output() - reference).abs().max().item()
            p.copy_(saved)
        assert moved > 1e-6, f"{name} does not reach the output {what}"


def train_steps(model: nn.Module, loss: Callable[[], torch.Tensor], steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps on ``loss()`` over the trainable parameters, in train mode; the losses."""
    import aurora_fx

    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(value.item())
    return losses
