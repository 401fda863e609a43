"""The folder around a decoder graph: what onnxruntime-genai and optimum load with no edits.

``to_onnx_decoder`` writes, beside the graph:

* ``genai_config.json`` for onnxruntime-genai (``og.Model(folder)``): the model type where genai knows
  the architecture, else ``decoder``; context length, vocabulary, bos/eos/pad token ids; the decoder's
  file name, input and output names (``past_key_values.%d.key``, ``present.%d.key``, ...), layer, head
  and KV-head counts; and search defaults from the model's generation config. It states
  ``past_present_share_buffer: false``: the graph concatenates the past and the new entries, so the
  cache cannot be one preallocated buffer.
* ``config.json`` and ``generation_config.json`` of the base (optimum's ``ORTModelForCausalLM`` infers
  the library and the architecture from them);
* the tokenizer's files, when a tokenizer is given.

Every file is written atomically, with the ordinary file mode (readable by a server running as another
user).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from aurora_fx.atomic import atomic_write_bytes

__all__ = ["GENAI_TYPES", "genai_config", "write_serving_files"]

# HF model types that onnxruntime-genai 0.18 has a name for; others are its generic "decoder".
GENAI_TYPES = frozenset({"chatglm", "gemma", "gemma2", "gemma3_text", "granite", "internlm2", "llama", "mistral",
                         "nemotron", "olmo", "phi", "phi3", "qwen2", "qwen3", "smollm3"})

# HF generation-config fields and genai's search options of the same meaning (genai name, default).
_SEARCH = {"do_sample": ("do_sample", False), "num_beams": ("num_beams", 1), "temperature": ("temperature", 1.0),
           "top_k": ("top_k", 50), "top_p": ("top_p", 1.0), "repetition_penalty": ("repetition_penalty", 1.0),
           "length_penalty": ("length_penalty", 1.0), "no_repeat_ngram_size": ("no_repeat_ngram_size", 0),
           "min_length": ("min_length", 0), "num_return_sequences": ("num_return_sequences", 1)}


def _first(value: Any) -> int | None:
    return value[0] if isinstance(value, list | tuple) and value else value if isinstance(value, int) else None


def _search(model: nn.Module, context: int) -> dict[str, Any]:
    """The search defaults for genai, from the model's generation config (HF defaults where unset)."""
    gen = getattr(model, "generation_config", None)
    options = {"past_present_share_buffer": False,
               "early_stopping": bool(getattr(gen, "early_stopping", False) is True)}
    for hf_name, (name, default) in _SEARCH.items():
        value = getattr(gen, hf_name, None)
        options[name] = default if value is None else value
    max_length = getattr(gen, "max_length", None)
    options["max_length"] = min(int(max_length), context) if max_length else context
    return options


def genai_config(model: nn.Module, spec: Any, filename: str) -> dict[str, Any]:
    """The ``genai_config.json`` content for a ``to_onnx_decoder`` graph named ``filename``."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = int(getattr(text, "max_position_embeddings", None) or 2048)
    heads = int(text.num_attention_heads)  # (HF configs map n_head, n_embd, ... to these names)
    eos = spec.eos_token_id or [_first(getattr(config, "eos_token_id", None)) or 0]
    pad = spec.pad_token_id if spec.pad_token_id is not None else eos[0]
    bos = _first(getattr(getattr(model, "generation_config", None), "bos_token_id", None))
    model_type = getattr(config, "model_type", "")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": spec.head_dim,
        "hidden_size": int(text.hidden_size),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
    }
    return {"model": {"bos_token_id": bos if bos is not None else eos[0], "context_length": context,
                      "decoder": decoder, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad,
                      "type": model_type if model_type in GENAI_TYPES else "decoder", "vocab_size": spec.vocab},
            "search": _search(model, context)}


def write_serving_files(model: nn.Module, spec: Any, graph: Path, tokenizer: Any = None) -> tuple[Path, ...]:
    """Write the folder files beside ``graph`` (see the module docstring); returns the paths written."""
    folder = graph.parent
    texts = {"genai_config.json": json.dumps(genai_config(model, spec, graph.name), indent=2),
             "config.json": model.config.to_json_string()}
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        texts["generation_config.json"] = gen.to_json_string()
    written = []
    for name, text in texts.items():
        atomic_write_bytes(folder / name, text.encode())
        written.append(folder / name)
    if tokenizer is not None:
        written += _save_tokenizer(tokenizer, folder)
    return tuple(written)


def _save_tokenizer(tokenizer: Any, folder: Path) -> list[Path]:
    """``tokenizer.save_pretrained`` into a scratch folder, then each file moved in atomically."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer.") as scratch:
        tokenizer.save_pretrained(scratch)
        names = sorted(p.name for p in Path(scratch).iterdir() if p.is_file())
        for name in names:
            atomic_write_bytes(folder / name, (Path(scratch) / name).read_bytes())
    return [folder / name for name in names]
