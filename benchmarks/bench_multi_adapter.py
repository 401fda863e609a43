"""Many adapters on one base: mixed-adapter batches against one adapter and against HF PEFT (CPU).

    python benchmarks/bench_multi_adapter.py [--repeats 15] [--quick]

1. **MiniLM-L6 forward** (real weights, BBC texts, seq 128, batch 32, eval, no grad), q/v adapted:
   * ``ours_one``: 8 named AuroRA r̃=2 adapters, every row on the first (``adapter_rows``);
   * ``ours_mixed8``: the same model, rows spread over all 8 (4 rows each);
   * ``ours_plain``: a model holding one AuroRA adapter (no names: the fused op), for reference;
   * ``peft_one`` / ``peft_mixed8``: HF PEFT with 8 LoRA r=8 adapters, ``adapter_names=`` all on one / spread
     (``_mixed_batch_forward``: a Python loop over adapters, gather, two GEMMs, scatter-add);
   * ``base``: the frozen model.
2. **Llama-config decode step** (hidden 512, 4 layers, 8 heads / 4 kv heads, past 64 tokens, batch 8, one new
   token per row), 8 named AuroRA r̃=2 adapters on q/v: all rows on one adapter vs 8-way mixed, in PyTorch and in
   onnxruntime (the ``to_onnx_decoder`` graph with its ``adapter_index`` input).

Time: interleaved rounds (every variant once per round, shuffled), medians and the spread (quartiles and min-max of
the paired ratios in the same round). Targets (issue 33): 8-way mixed ≤ 1.2× the one-adapter time in PyTorch and in
onnxruntime, and ≤ PEFT's mixed-batch time. Writes ``benchmarks/results/multi_adapter.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, paired_ratio, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402

NAMES = tuple(f"a{i}" for i in range(8))
ENCODER = {"seq": 128, "batch": 32}
DECODER = {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4, "past": 64, "batch": 8, "vocab": 4096}


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter" in name or "lora_" in name:
                p.normal_(0.0, 0.05)


# -- 1. MiniLM forward ----------------------------------------------------------------------------
def minilm_batch(batch: int, seq: int) -> dict:
    from aurora_fx.data import load_bbc
    from aurora_fx.zoo import load_model

    tok = load_model("minilm").tokenizer
    texts = list(load_bbc().texts[:batch])
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _minilm():
    from aurora_fx.zoo import load_model

    return load_model("minilm").model.eval()


def ours_named() -> torch.nn.Module:
    model = _minilm()
    for name in NAMES:
        aurora_fx.apply(model, "query|value", name=name)
    _randomize(model)
    return model.eval()


def ours_plain() -> torch.nn.Module:
    model = _minilm()
    aurora_fx.apply(model, "query|value")
    _randomize(model)
    return model.eval()


def peft_named() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    model = get_peft_model(_minilm(), config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, config)
    _randomize(model)
    return model.eval()


def encoder_variants(batch: dict) -> dict:
    size = batch["input_ids"].shape[0]
    one, mixed = [NAMES[0]] * size, [NAMES[i % len(NAMES)] for i in range(size)]
    ours, plain, peft, base = ours_named(), ours_plain(), peft_named(), _minilm()

    def routed(rows):
        def run():
            with torch.no_grad(), aurora_fx.adapter_rows(ours, rows):
                ours(**batch)
        return run

    def peft_rows(rows):
        def run():
            with torch.no_grad():
                peft(**batch, adapter_names=rows)
        return run

    def plain_run(model):
        def run():
            with torch.no_grad():
                model(**batch)
        return run

    return {"base": plain_run(base), "ours_plain": plain_run(plain), "ours_one": routed(one),
            "ours_mixed8": routed(mixed), "peft_one": peft_rows(one), "peft_mixed8": peft_rows(mixed)}


# -- 2. Llama decode step -------------------------------------------------------------------------
def llama_named(quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = DECODER
    scale = 4 if quick else 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=d["hidden"] // scale, num_hidden_layers=d["layers"],
                                         num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                                         intermediate_size=2 * d["hidden"] // scale, vocab_size=d["vocab"],
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    for name in NAMES:
        aurora_fx.apply(model, "q_proj|v_proj", name=name)
    _randomize(model)
    return model.eval()


def _quiet_session(path: Path):
    """An onnxruntime session on the 2 cores whose threads do not spin after a run (spinning threads would steal
    the CPU from the PyTorch variant timed next)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decoder_variants(model: torch.nn.Module, folder: Path) -> tuple[dict, dict]:
    from aurora_fx.export.decoder import _example, _feeds, _Flat, _spec

    result = aurora_fx.export.to_onnx_decoder(model, folder, verify=True)
    spec = _spec(model)
    d = DECODER
    example = _example(spec, d["batch"], 1, d["past"], torch.float32, spec.vocab, seed=3)[:4]
    flat = _Flat(model, spec.layers).eval()
    one = torch.zeros(d["batch"], dtype=torch.int64)
    mixed = torch.arange(d["batch"], dtype=torch.int64) % len(NAMES)

    def torch_step(index):
        def run():
            with torch.no_grad():
                flat(*example, index)
        return run

    session = _quiet_session(result.path)

    def ort_step(index):
        feeds = {**_feeds(spec, example), "adapter_index": index.numpy()}
        names = [i.name for i in session.get_inputs()]
        feeds = {k: v for k, v in feeds.items() if k in names}
        return lambda: session.run(None, feeds)

    variants = {"torch_one": torch_step(one), "torch_mixed8": torch_step(mixed), "ort_one": ort_step(one),
                "ort_mixed8": ort_step(mixed)}
    return variants, {"export_max_abs_diff": {str(k): v for k, v in result.max_abs_diff.items()}}


def spread(times: dict, name: str, ref: str) -> list[float]:
    """The paired ratios' min, quartiles and max (ms-scale steps have rare outlier rounds: quote the quartiles)."""
    pairs = sorted(a / b for a, b in zip(times[name], times[ref], strict=True))
    q = statistics.quantiles(pairs, n=4)
    return [pairs[0], q[0], q[2], pairs[-1]]


def summarize(times: dict, pairs: list[tuple[str, str]]) -> dict:
    return {"median_ms": {v: median(t) * 1e3 for v, t in times.items()},
            "ratios": {f"{a}/{b}": paired_ratio(times, a, b) for a, b in pairs},
            "spread": {f"{a}/{b}": spread(times, a, b) for a, b in pairs}, "runs_s": times}


def report(title: str, summary: dict) -> str:
    rows = [(v, f"{ms:.2f}") for v, ms in summary["median_ms"].items()]
    text = f"\n{title}\n" + table(("variant", "median ms"), rows) + "\n"
    rows = [(k, f"{r:.3f}", "{1:.2f}-{2:.2f}".format(*summary["spread"][k]), "{0:.2f}-{3:.2f}".format(
        *summary["spread"][k])) for k, r in summary["ratios"].items()]
    return text + table(("ratio", "median", "quartiles", "min-max"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 3 if args.quick else args.repeats
    size = {"batch": 8, "seq": 32} if args.quick else ENCODER
    enc_times = interleaved(encoder_variants(minilm_batch(size["batch"], size["seq"])), repeats=repeats)
    encoder = summarize(enc_times, [("ours_mixed8", "ours_one"), ("ours_mixed8", "peft_mixed8"),
                                    ("ours_one", "ours_plain"), ("peft_mixed8", "peft_one"),
                                    ("ours_plain", "base")])
    print(report(f"1. MiniLM-L6 forward, batch {size['batch']}, seq {size['seq']}, q/v", encoder))
    with tempfile.TemporaryDirectory() as tmp:
        variants, info = decoder_variants(llama_named(args.quick), Path(tmp))
        dec_times = interleaved(variants, repeats=repeats * 10)  # (ms-scale steps: many rounds)
    decoder = {**summarize(dec_times, [("torch_mixed8", "torch_one"), ("ort_mixed8", "ort_one"),
                                       ("ort_one", "torch_one")]), **info}
    print(report(f"2. Llama decode step, batch {DECODER['batch']}, past {DECODER['past']}, 8 AuroRA adapters",
                 decoder))
    targets = {"torch_mixed_le_1.2x_one": encoder["ratios"]["ours_mixed8/ours_one"] <= 1.2
               and decoder["ratios"]["torch_mixed8/torch_one"] <= 1.2,
               "ort_mixed_le_1.2x_one": decoder["ratios"]["ort_mixed8/ort_one"] <= 1.2,
               "mixed_le_peft_mixed": encoder["ratios"]["ours_mixed8/peft_mixed8"] <= 1.0}
    print(f"\ntargets: {targets}")
    if not args.quick:
        path = write_json("multi_adapter.json", {"encoder_shape": size, "decoder_shape": DECODER,
                                                 "adapters": {"ours": "8 × AuroRA r̃=2 (dropout 0.05, eval)",
                                                              "peft": "8 × LoRA r=8"},
                                                 "encoder": encoder, "decoder": decoder, "targets": targets})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
