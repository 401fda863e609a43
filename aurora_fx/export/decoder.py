"""Decoder LLMs to ONNX the way they are served: the KV cache as graph inputs and outputs.

``to_onnx_decoder(model, folder)`` exports one graph for any HF causal LM (GPT-2, Llama, Qwen2, ...), in
a folder that onnxruntime-genai (``og.Model(folder)``) and optimum (``ORTModelForCausalLM.from_pretrained``)
load as it is (``aurora_fx.export.serving_folder``: ``genai_config.json``, ``config.json``,
``generation_config.json``, the tokenizer's files when one is passed). The graph:

* inputs ``input_ids`` (batch, seq), ``attention_mask`` (batch, past + seq), ``position_ids``
  (batch, seq) and ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past, head_dim) for
  every layer;
* outputs ``logits`` (batch, seq, vocab) and ``present.{i}.key`` / ``.value`` (the cache after the step);
* batch, sequence and past length dynamic; the first step runs with an empty past (past length 0).

That is the layout onnxruntime-genai, Olive's outputs and optimum's ``decoder_with_past`` take. The
adapters stay unmerged and exact inside (the fused AuroRA op through its ONNX translation). The graph
is verified in onnxruntime against PyTorch on a prefill (past 0) and a one-token decode step.
``OnnxGenerator(path).generate(ids, max_new_tokens=...)`` is a small greedy (or sampling) loop over it,
equal to HF ``generate(do_sample=False)`` token for token, left padding included. With
``swappable=True`` the adapter weights become overridable inputs (``export.save_adapter_weights``
writes one file per fine-tune), so one decoder graph serves several fine-tunes.

Checked in the suite: ``og.Model`` loads the folder of a Llama and a Qwen2 config and gives HF
``generate``'s greedy tokens (batch 1, and a left-padded batch of 2); with ``swappable=True``, each
fine-tune's ``.onnx_adapter`` file through ``og.Adapters`` gives that fine-tune's tokens.

Example:
    >>> aurora_fx.export.to_onnx_decoder(model, "llm", tokenizer=tokenizer)   # llm/model.onnx + folder files
    >>> gen = aurora_fx.export.OnnxGenerator("llm/model.onnx")
    >>> gen.generate(tokenizer("Hello", return_tensors="pt")["input_ids"], max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from aurora_fx.export.onnx import (
    ADAPTER_NODE_MARKS,
    TRANSLATIONS,
    ExportResult,
    ExportVerificationError,
    _write,
    default_atol,
    explain_conversion_error,
    exportable_experts,
    float_bases,
    is_decoder,
    strip_prefix,
)
from aurora_fx.export.rows import INDEX_INPUT, routes_rows
from aurora_fx.export.serving_folder import write_serving_files
from aurora_fx.named import adapter_names, adapter_rows

__all__ = ["to_onnx_decoder", "OnnxGenerator", "DecoderSpec", "is_decoder", "position_ids"]

_META = "aurora_fx.decoder"


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder graph needs to be driven: its cache layout and special tokens."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str
    eos_token_id: list[int] | None
    pad_token_id: int | None
    adapter_names: list[str] | None = None  # several named adapters: the graph takes an adapter_index input

    def input_names(self) -> list[str]:
        """The graph's inputs, in order."""
        index = [INDEX_INPUT] if self.adapter_names else []
        return ["input_ids", "attention_mask", "position_ids"] + self.cache_names("past_key_values") + index

    def output_names(self) -> list[str]:
        """The graph's outputs, in order."""
        return ["logits"] + self.cache_names("present")

    def cache_names(self, stem: str) -> list[str]:
        """``<stem>.<layer>.key`` and ``.value`` for every layer."""
        return [f"{stem}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF generate's positions: the running count of real tokens, 1 at left padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _cache_kwarg(model: nn.Module) -> str:
    """Transformers 5 names the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(kv) for kv in cache.to_legacy_cache()]


class _Flat(nn.Module):
    """The decoder with the cache as flat tensors in and out (what torch.export can trace)."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers, self.kwarg = model, layers, _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor], adapter_index=None):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        routing = adapter_rows(self.model, adapter_index) if adapter_index is not None else contextlib.nullcontext()
        with routing:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self.kwarg: cache})
        return (out.logits, *[t for kv in _layers(_returned_cache(out)) for t in kv])


def _spec(model: nn.Module, routed: bool | None = None) -> DecoderSpec:
    """Probe one forward with the cache on: layer count, kv heads and head size from its tensors."""
    ids = torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    layers = _layers(_returned_cache(out))
    key = layers[0][0]
    gen = getattr(model, "generation_config", None) or model.config
    eos = getattr(gen, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    names = list(adapter_names(model)) if routes_rows(model, routed) else None
    return DecoderSpec(len(layers), key.shape[1], key.shape[3], out.logits.shape[-1], str(key.dtype).split(".")[-1],
                       [eos] if isinstance(eos, int) else (list(eos) if eos is not None else None),
                       pad if isinstance(pad, int) else None, names)


def _example(spec: DecoderSpec, batch: int, seq: int, past: int, dtype: torch.dtype, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if batch > 1 and past + seq > 3:
        mask[0, :2] = 0  # left padding in the first row (the exported graph must not assume a full mask)
    pos = position_ids(mask)[:, -seq:].contiguous()
    cache = [torch.randn(batch, spec.kv_heads, past, spec.head_dim, generator=gen).to(dtype)
             for _ in range(2 * spec.layers)]
    if spec.adapter_names:  # rows cycle through the names and the base (-1)
        return ids, mask, pos, cache, torch.arange(batch) % (len(spec.adapter_names) + 1) - 1
    return ids, mask, pos, cache


def _export(flat: _Flat, spec: DecoderSpec, example) -> Any:
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, [{0: dyn, 2: dyn}] * (2 * spec.layers))
    shapes += ({0: dyn},) if spec.adapter_names else ()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(flat, example, dynamic_shapes=shapes, strict=False)
        try:
            return torch.onnx.export(program, example, dynamo=True, external_data=False, optimize=False,
                                     custom_translation_table=TRANSLATIONS, input_names=spec.input_names(),
                                     output_names=spec.output_names())
        except Exception as exc:
            raise explain_conversion_error(exc) from exc


def _feeds(spec: DecoderSpec, example) -> dict[str, np.ndarray]:
    ids, mask, pos, cache = example[:4]
    index = {INDEX_INPUT: example[4].numpy()} if len(example) > 4 else {}
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
            **{n: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
               for n, t in zip(spec.cache_names("past_key_values"), cache, strict=True)}, **index}


def _verify(flat: _Flat, spec: DecoderSpec, path: Path, dtype: torch.dtype, atol: float, weights=None):
    """Prefill (past 0, left padding) and a one-token decode step, ORT against PyTorch."""
    from aurora_fx.export.swappable import SwappableSession

    session = SwappableSession(path)
    diffs = {}
    for batch, seq, past in ((2, 6, 0), (3, 1, 4)):
        example = _example(spec, batch, seq, past, dtype, spec.vocab, seed=batch)
        with torch.no_grad():
            expected = flat(*example)
        got = session.run(_feeds(spec, example), weights=weights)
        diff = max(_masked_diff(g, e.float().numpy(), example[1].numpy(), i > 0)
                   for i, (g, e) in enumerate(zip(got, expected, strict=True)))
        diffs[(batch, seq, past)] = diff
        if not diff <= atol:
            raise ExportVerificationError(f"onnxruntime differs from PyTorch by {diff:.3g} (> atol {atol:g}) on "
                                          f"batch {batch}, seq {seq}, past {past}; {str(path)!r} should not be "
                                          f"trusted")
    return diffs


def _masked_diff(got: np.ndarray, expected: np.ndarray, mask: np.ndarray, is_cache: bool) -> float:
    """Max abs difference at real (unpadded) positions: what left padding computes is never read."""
    valid = mask.astype(bool)  # (batch, past + seq)
    if is_cache:  # (batch, heads, past + seq, head_dim)
        keep = np.broadcast_to(valid[:, None, :, None], got.shape)
    else:  # logits (batch, seq, vocab)
        keep = np.broadcast_to(valid[:, -got.shape[1]:, None], got.shape)
    return float(np.abs(got - expected)[keep].max()) if keep.any() else 0.0


def to_onnx_decoder(model: nn.Module, path: str | os.PathLike, *, verify: bool = True, swappable: bool = False,
                    atol: float | None = None, tokenizer: Any = None, adapter_index: bool | None = None
                    ) -> ExportResult:
    """Export an HF causal LM with its KV cache as inputs and outputs, in a serving folder (module docstring).

    Args:
        model: An HF decoder (adapted or not); exported in eval mode, not modified.
        path: A folder (the graph is ``<folder>/model.onnx``), or the ``.onnx`` file itself (the folder
            files go beside it). Each file is written atomically; the decoder spec is in the graph's metadata.
        verify: Check prefill and decode steps in onnxruntime against PyTorch.
        swappable: Adapter weights as overridable inputs with zero defaults (``to_onnx_swappable``).
        atol: Verification tolerance (default 1e-4; 3e-2 for bf16/fp16 models).
        tokenizer: An HF tokenizer whose files are saved into the folder too.
        adapter_index: Add an ``adapter_index`` input (int64 ``(batch,)``, indices into the spec's
            ``adapter_names``, -1 for the base) so each row decodes with its own named adapter
            (``aurora_fx.export.rows``; ``OnnxGenerator.generate(adapter_index=...)``). Default: on for a model with
            several names.

    Returns:
        An ``ExportResult``; ``max_abs_diff`` is keyed by (batch, seq, past); ``files`` are the folder files.
    """
    if not is_decoder(model):
        raise ValueError(f"{type(model).__name__} is not an HF causal LM with a KV cache (it needs generate() and "
                         f"config.use_cache); export it with aurora_fx.export.to_onnx")
    exported = copy.deepcopy(model).eval()
    notes = exportable_experts(exported) + float_bases(exported)
    spec = _spec(exported, adapter_index)
    dtype = next(exported.parameters()).dtype
    flat = _Flat(exported, spec.layers).eval()
    start = time.perf_counter()
    program = _export(flat, spec, _example(spec, 2, 5, 3, dtype, spec.vocab))
    seconds = time.perf_counter() - start
    proto = program.model_proto
    strip_prefix(proto, "model.")  # parameter names as in the model itself (adapter files match them)
    onnx.helper.set_model_props(proto, {_META: json.dumps(asdict(spec))})
    weights = None
    if swappable:
        from aurora_fx.export.swappable import adapter_tensors, make_overridable

        weights = adapter_tensors(exported)
        make_overridable(proto, exported)
    target = Path(path) if Path(path).suffix == ".onnx" else Path(path) / "model.onnx"
    size = _write(_Saved(proto), target, None)
    files = write_serving_files(exported, spec, target, tokenizer)
    diffs = _verify(flat, spec, target, dtype, default_atol(model) if atol is None else atol, weights) if verify else {}
    return ExportResult(path=target, input_names=tuple(spec.input_names()), output_names=tuple(spec.output_names()),
                        dynamic_axes={"input_ids": ("batch", "seq"), "attention_mask": ("batch", "past+seq")},
                        max_abs_diff=diffs, seconds=seconds, bytes=size,
                        op_counts=_op_counts(proto),
                        adapter_nodes=sum(any(m in n.name for m in ADAPTER_NODE_MARKS) for n in proto.graph.node),
                        notes=notes, files=files)


@dataclass
class _Saved:
    """What ``onnx._write`` expects (an object with ``model_proto``)."""

    model_proto: onnx.ModelProto


def _op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class OnnxGenerator:
    """Greedy (or sampling) generation over an onnxruntime session of a ``to_onnx_decoder`` graph.

    Args:
        path: The decoder ``.onnx`` file.
        adapter: For a swappable graph: an ORT adapter file (``export.save_adapter_weights``) to run
            with; None runs the weights in the graph.
    """

    def __init__(self, path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> None:
        from aurora_fx.export.swappable import SwappableSession

        self.session = SwappableSession(path)
        self.adapter = adapter
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if _META not in meta:
            raise ValueError(f"{str(path)!r} is not a to_onnx_decoder graph (no {_META!r} metadata)")
        self.spec = DecoderSpec(**json.loads(meta[_META]))

    def step(self, input_ids, attention_mask, position_ids, cache, adapter_index=None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits and the new cache (numpy arrays)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 **dict(zip(self.spec.cache_names("past_key_values"), cache, strict=True))}
        if self.spec.adapter_names:
            feeds[INDEX_INPUT] = self._index(adapter_index, input_ids.shape[0])
        out = self.session.run(feeds, adapter=self.adapter)
        return out[0], out[1:]

    def _index(self, adapter_index, batch: int) -> np.ndarray:
        """The per-row adapter index: names (None for the base) or integers; required by a routed graph."""
        names = self.spec.adapter_names
        if adapter_index is None:
            raise ValueError(f"this graph serves the named adapters {names}: pass adapter_index=[...] (a name, or "
                             f"None for the base, per row)")
        index = [(-1 if i is None else names.index(i)) if not isinstance(i, (int, np.integer)) else int(i)
                 for i in (adapter_index.tolist() if hasattr(adapter_index, "tolist") else adapter_index)]
        if len(index) != batch or any(not -1 <= i < len(names) for i in index):
            raise ValueError(f"adapter_index {list(adapter_index)} must give each of the {batch} rows a name of "
                             f"{names}, None, or an index in [-1, {len(names) - 1}]")
        return np.asarray(index, dtype=np.int64)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                 return_logits: bool = False, adapter_index=None):
        """Generate like HF ``generate``.

        It stops at ``max_new_tokens`` or when every row has ended (EOS), padding ended rows with
        the pad token. A graph with an ``adapter_index`` input takes one entry per row: a name of
        ``spec.adapter_names``, None for the base, or its index (HF's counterpart:
        ``with aurora_fx.adapter_rows(model, names): model.generate(...)``).

        Returns:
            ``(batch, prompt + new)`` int64 tokens (a torch tensor), and the per-step last-position
            logits if ``return_logits``.
        """
        ids = np.asarray(input_ids.cpu() if torch.is_tensor(input_ids) else input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(
            attention_mask.cpu() if torch.is_tensor(attention_mask) else attention_mask, dtype=np.int64)
        batch = ids.shape[0]
        float_type = np.float16 if self.spec.dtype == "float16" else np.float32
        cache = [np.zeros((batch, self.spec.kv_heads, 0, self.spec.head_dim), float_type)
                 for _ in range(2 * self.spec.layers)]
        rng = np.random.default_rng(seed)
        eos = set(self.spec.eos_token_id or [])
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else (min(eos) if eos else 0)
        unfinished = np.ones(batch, dtype=bool)
        tokens, step_ids, logits_seen = ids, ids, []
        for _ in range(max_new_tokens):
            pos = position_ids(torch.from_numpy(mask)).numpy()[:, -step_ids.shape[1]:]
            logits, cache = self.step(step_ids, mask, pos, cache, adapter_index)
            last = logits[:, -1].astype(np.float32)
            logits_seen.append(last)
            new = _pick(last, do_sample, temperature, top_k, rng)
            new = np.where(unfinished, new, pad)
            tokens = np.concatenate([tokens, new[:, None]], axis=1)
            unfinished &= ~np.isin(new, list(eos)) if eos else unfinished
            if not unfinished.any():
                break
            step_ids, mask = new[:, None], np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        result = torch.from_numpy(tokens)
        return (result, logits_seen) if return_logits else result


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """The next token per row: argmax, or a sample from the (top-k, tempered) softmax."""
    if not do_sample:
        return logits.argmax(-1)
    scaled = logits / max(temperature, 1e-6)
    if top_k is not None:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
