"""Exporters: ONNX (``to_onnx``, ``to_onnx_swappable``) and HF PEFT LoRA folders (``to_peft``).

ONNX carries the adapters baked in, or as swappable inputs; PEFT folders serve stacks that only
take LoRA.
"""

from aurora_fx.export.decoder import OnnxGenerator, to_onnx_decoder
from aurora_fx.export.onnx import ExportResult, ExportVerificationError, run_onnx, to_onnx
from aurora_fx.export.peft_lora import PeftExport, SiteExport, to_peft
from aurora_fx.export.seq2seq import OnnxSeq2SeqGenerator
from aurora_fx.export.swappable import SwappableSession, save_adapter_weights, to_onnx_swappable

__all__ = [
    "to_onnx",
    "to_onnx_decoder",
    "OnnxGenerator",
    "OnnxSeq2SeqGenerator",
    "to_peft",
    "PeftExport",
    "SiteExport",
    "to_onnx_swappable",
    "save_adapter_weights",
    "SwappableSession",
    "ExportResult",
    "ExportVerificationError",
    "run_onnx",
]
