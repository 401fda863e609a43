"""Greedy generation in onnxruntime over an encoder-decoder graph written by ``to_onnx`` (T5, BART, Whisper, ...).

``to_onnx`` exports an encoder-decoder model with its cache off: one graph takes the encoder inputs and
the whole decoder prefix (``decoder_input_ids``, any length) and returns the logits. ``OnnxSeq2SeqGenerator``
runs HF ``generate``'s greedy loop over it: the decoder starts from ``decoder_start_token_id``, each step
appends the argmax of the last position, finished rows are padded. It recomputes the encoder and the
decoder prefix at every token (no KV cache): exact, and fine for short outputs; it is no serving engine.

Example:
    >>> aurora_fx.export.to_onnx(t5, "t5.onnx", example_kwargs={"input_ids": ids, "attention_mask": mask,
    ...                                                          "decoder_input_ids": ids[:, :1]})
    >>> gen = aurora_fx.export.OnnxSeq2SeqGenerator("t5.onnx", decoder_start_token_id=0, eos_token_id=1)
    >>> gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16)   # = t5.generate(...)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["OnnxSeq2SeqGenerator"]


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


class OnnxSeq2SeqGenerator:
    """Greedy generation over an encoder-decoder ONNX graph (see the module docstring).

    Args:
        path: The ``.onnx`` file written by ``to_onnx`` (inputs include ``decoder_input_ids``).
        decoder_start_token_id: The decoder's first token (``model.generation_config.decoder_start_token_id``).
        eos_token_id: Token (or tokens) that end a row; None generates ``max_new_tokens`` always.
        pad_token_id: Written after a row has ended (default: the first EOS, else 0).
    """

    def __init__(self, path: str | os.PathLike, decoder_start_token_id: int,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        if "decoder_input_ids" not in self.inputs:
            raise ValueError(f"{str(path)!r} takes no decoder_input_ids (inputs: {sorted(self.inputs)}); export "
                             f"an encoder-decoder model with aurora_fx.export.to_onnx and decoder_input_ids in "
                             f"example_kwargs")
        names = [o.name for o in self.session.get_outputs()]
        self.logits = names.index("logits") if "logits" in names else 0
        self.start = int(decoder_start_token_id)
        eos = [] if eos_token_id is None else eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos)
        self.pad = pad_token_id if pad_token_id is not None else (self.eos[0] if self.eos else 0)

    def generate(self, max_new_tokens: int = 20, **encoder_inputs: Any) -> torch.Tensor:
        """The decoder sequences ``(batch, 1 + new)``, starting with the start token, as HF ``generate`` returns them.

        Args:
            max_new_tokens: Tokens to generate at most.
            **encoder_inputs: The graph's encoder inputs (``input_ids``, ``attention_mask``, ``input_features``...).
        """
        feeds = {k: _array(v) for k, v in encoder_inputs.items() if k in self.inputs}
        batch = next(iter(feeds.values())).shape[0]
        tokens = np.full((batch, 1), self.start, dtype=np.int64)
        unfinished = np.ones(batch, dtype=bool)
        for _ in range(max_new_tokens):
            logits = self.session.run(None, {**feeds, "decoder_input_ids": tokens})[self.logits]
            new = np.where(unfinished, logits[:, -1].argmax(-1), self.pad)
            tokens = np.concatenate([tokens, new[:, None]], axis=1)
            unfinished &= ~np.isin(new, self.eos)
            if not unfinished.any():
                break
        return torch.from_numpy(tokens)
