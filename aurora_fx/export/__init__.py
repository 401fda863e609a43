"""Exporters: ONNX with the adapters baked in (``to_onnx``)."""

from aurora_fx.export.onnx import ExportResult, ExportVerificationError, run_onnx, to_onnx

__all__ = ["to_onnx", "ExportResult", "ExportVerificationError", "run_onnx"]
