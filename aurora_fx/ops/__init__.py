"""Custom ops. Importing this package registers them with ``torch.library``; ``fused`` picks the kernel."""

from aurora_fx.ops.aurora_delta import aurora_delta_add
from aurora_fx.ops.fused import aurora_delta, lora_delta, triton_available
from aurora_fx.ops.lora_delta import lora_delta_add

__all__ = ["aurora_delta_add", "lora_delta_add", "aurora_delta", "lora_delta", "triton_available"]
