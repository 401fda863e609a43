"""onnxruntime CPU latency of exports: MiniLM-L6 encoders, and a decoder LLM generating with its KV cache.

    python benchmarks/bench_onnx.py [--repeats 60] [--only encoder|decoder]

**Encoder part.**
Real MiniLM-L6 weights (sequence classifier, 5 labels), adapters on query/value with random non-zero
weights (latency does not depend on their values). Each model is exported once with
aurora_fx.export.to_onnx (verified in onnxruntime), then timed at batch 1 and 8, seq 128, with the
CPU provider and 2 intra-op threads; the four sessions run interleaved, one call each per round in
a shuffled order. Prints a table (median latency; ratio to the base = median over rounds of the
same round's ratio) and writes benchmarks/results/onnx.json.

**Decoder part.** A Llama config (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 2000; random
weights), the base and AuroRA r̃=2 on q/v (random non-zero weights), generating 32 new tokens greedily
from a 16-token prompt at batch 1: onnxruntime over ``to_onnx_decoder``'s graph with the KV cache
(``OnnxGenerator``), onnxruntime over ``to_onnx``'s graph without a cache (the whole sequence again at
every token), and PyTorch ``generate``. Tokens per second (median of interleaved repeats) and the
adapted / base ratio per path go to benchmarks/results/onnx_decoder.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, paired_ratio, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402
from aurora_fx.export import to_onnx  # noqa: E402
from aurora_fx.zoo import load_model  # noqa: E402

SEQ = 128


def models() -> dict[str, tuple[torch.nn.Module, bool]]:
    def fresh():
        torch.manual_seed(0)
        return load_model("minilm", num_labels=5).model

    aurora, lora = fresh(), fresh()
    aurora_fx.apply(aurora, "query|value")
    aurora_fx.apply(lora, "query|value", method="lora", rank=8)
    with torch.no_grad():
        for m in (aurora, lora):
            for name, p in m.named_parameters():
                if ".adapter." in name:
                    p.normal_(0, 0.02)
    return {"base": (fresh(), False), "aurora_unmerged": (aurora, False), "lora_r8_unmerged": (lora, False),
            "lora_r8_merged": (lora, True)}


def feeds(batch: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(batch)
    return {"input_ids": torch.randint(1000, 20000, (batch, SEQ), generator=g).numpy(),
            "attention_mask": np.ones((batch, SEQ), dtype=np.int64)}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle sessions' thread pools must not spin: with four sessions alive on 2 cores, spinning
    # workers steal the CPU from the session being timed (bimodal 23 ms / 50 ms runs otherwise).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--only", choices=["encoder", "decoder"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.only != "decoder":
        encoder_main(args.repeats)
    if args.only != "encoder":
        decoder_main(max(3, args.repeats // 10))


def encoder_main(repeats: int) -> None:
    """MiniLM-L6 base / AuroRA / LoRA / merged LoRA latencies at batch 1 and 8."""
    example = {k: torch.from_numpy(v) for k, v in feeds(2).items()}
    exports, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, merge) in models().items():
            result = to_onnx(model, Path(tmp) / f"{name}.onnx", example_kwargs=example, merge=merge)
            exports[name] = {"export_seconds": result.seconds, "megabytes": result.bytes / 2**20,
                             "max_abs_diff": max(result.max_abs_diff.values()), "nodes": sum(result.op_counts.values())}
            sessions[name] = session(result.path)
        latency, ratio = {}, {}
        for batch in (1, 8):
            data = feeds(batch)
            runs = interleaved({n: (lambda s=s, data=data: s.run(None, data)) for n, s in sessions.items()},
                               repeats=repeats, warmup=3)
            latency[batch] = {n: median(t) for n, t in runs.items()}
            ratio[batch] = {n: paired_ratio(runs, n, "base") for n in runs}
    rows = []
    for name in sessions:
        rows.append((name, *(f"{1000 * latency[b][name]:.2f}" for b in (1, 8)),
                     *(f"{ratio[b][name]:.3f}" for b in (1, 8)),
                     f"{exports[name]['export_seconds']:.1f}", f"{exports[name]['megabytes']:.1f}",
                     exports[name]["nodes"], f"{exports[name]['max_abs_diff']:.1e}"))
    print(table(("model", "b1 ms", "b8 ms", "b1 vs base", "b8 vs base", "export s", "MiB", "nodes", "ORT diff"),
                rows))
    path = write_json("onnx.json", {"repeats": repeats, "seq": SEQ, "exports": exports,
                                    "median_latency_s": {str(b): v for b, v in latency.items()},
                                    "paired_ratio_to_base": {str(b): v for b, v in ratio.items()}})
    print(f"wrote {path}")


NEW_TOKENS, PROMPT = 32, 16


def _decoders() -> dict[str, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=688, vocab_size=2000, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    adapted = aurora_fx.apply(__import__("copy").deepcopy(base), r"self_attn\.(q|v)_proj")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.02)
    return {"base": base, "aurora": adapted}


def _no_cache_loop(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    """Greedy decoding over a graph without a cache: the whole sequence again at every token."""
    for _ in range(NEW_TOKENS):
        logits = sess.run(None, {"input_ids": ids})[0]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


def decoder_main(repeats: int) -> None:
    """Tokens per second generating 32 tokens: ORT with the KV cache, ORT without, PyTorch generate."""
    from aurora_fx.export import OnnxGenerator, to_onnx_decoder

    prompt = torch.randint(0, 2000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    variants, agree = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _decoders().items():
            to_onnx_decoder(model, Path(tmp) / f"{name}_kv.onnx")
            plain = to_onnx(model, Path(tmp) / f"{name}_plain.onnx", example_kwargs={"input_ids": prompt})
            gen, sess = OnnxGenerator(Path(tmp) / f"{name}_kv.onnx"), session(plain.path)
            hf = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
            agree[name] = bool(torch.equal(gen.generate(prompt, max_new_tokens=NEW_TOKENS), hf))
            variants[f"{name}/ort_kv_cache"] = lambda g=gen: g.generate(prompt, max_new_tokens=NEW_TOKENS)
            variants[f"{name}/ort_no_cache"] = lambda s=sess: _no_cache_loop(s, prompt.numpy())
            variants[f"{name}/torch_generate"] = lambda m=model: m.generate(input_ids=prompt, do_sample=False,
                                                                           max_new_tokens=NEW_TOKENS)
        runs = interleaved(variants, repeats=repeats, warmup=1)
    rate = {n: NEW_TOKENS / median(t) for n, t in runs.items()}
    paths = ("ort_kv_cache", "ort_no_cache", "torch_generate")
    rows = [(p, f"{rate['base/' + p]:.0f}", f"{rate['aurora/' + p]:.0f}",
             f"{paired_ratio(runs, 'aurora/' + p, 'base/' + p):.3f}") for p in paths]
    print(f"\ndecoder: {NEW_TOKENS} new tokens from a {PROMPT}-token prompt, batch 1 (tokens/s, median of "
          f"{repeats}); ORT greedy = PyTorch generate: {agree}")
    print(table(("path", "base tok/s", "AuroRA tok/s", "AuroRA time / base time"), rows))
    path = write_json("onnx_decoder.json", {"repeats": repeats, "new_tokens": NEW_TOKENS, "prompt": PROMPT,
                                            "tokens_per_second": rate, "tokens_equal_to_generate": agree,
                                            "adapted_over_base_time": {p: paired_ratio(runs, "aurora/" + p,
                                                                                       "base/" + p)
                                                                       for p in paths}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
