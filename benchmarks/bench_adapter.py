"""Speed and memory of the fused AuroRA op against its peers, all ratios from one run (CPU).

    python benchmarks/bench_adapter.py [--repeats 15] [--quick]

1. Microbenchmark: ``base + Δ(x)`` forward+backward at N=4096 tokens, d=768, r̃=2: the fused op
   against the unfused adapter subgraph (the same oracle math in plain torch ops).
   And one frozen ``nn.Linear(768, 768)`` at N=4096 tokens (its input requiring grad, as inside a
   model): the bare linear against it with fused AuroRA r̃=2, our fused LoRA r=8 and HF PEFT LoRA r=8
   (forward+backward, and the no-grad forward), ratios to the bare linear. aurora-peft's AuroRA is not
   in the table: installing it rewrites a file of the installed PEFT package.
2. Training step on MiniLM-L6 (real weights), seq 128, batch 16, adapters on query/value, AdamW:
   AuroRA fused (adapter dropout 0, and at 0.05: the default until issue 34's 3-seed study), AuroRA unfused,
   our LoRA r=8, HF PEFT LoRA r=8 (every other dropout off: the model's own and the other adapters'), and
   the floor: the frozen model with a trainable head whose backward still runs through every layer
   (embedding output requires grad; activation gradients only). Step time (median), activation memory saved for backward
   (exact, from saved-tensor hooks), and peak RSS (each variant in its own process).
3. Inference: eager forward latency (eval, no_grad) with and without adapters.

Variants run interleaved (A B C, then shuffled orders). Every ratio is the median over rounds of the
ratio within a round (paired), so a slow spell of the shared machine cancels out. Prints tables;
writes benchmarks/results/adapter.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, paired_ratio, status_kib, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402
from aurora_fx import functional as AF  # noqa: E402
from aurora_fx.ops.aurora_delta import aurora_delta_add  # noqa: E402
from aurora_fx.ops.dropout import InputDropout  # noqa: E402

VARIANTS = ("aurora_fused", "aurora_fused_default_dropout", "aurora_unfused", "lora_r8", "peft_lora_r8", "floor")


# -- 1. microbenchmark --------------------------------------------------------------------------
def micro(repeats: int, n: int = 4096, d: int = 768, r: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_()
    base = torch.randn(n, d, generator=g).requires_grad_()
    A = (torch.randn(r, d, generator=g) / d**0.5).requires_grad_()
    B = (torch.randn(d, r, generator=g) * 0.1).requires_grad_()
    H = torch.randn(r, r, generator=g).requires_grad_()
    Ws = (torch.rand(r, 8, generator=g) * 0.2 - 0.1).requires_grad_()
    knots = AF.spline_knots(dtype=torch.float64)
    grad = torch.randn(n, d, generator=g)
    params = (x, base, A, B, H, Ws)

    # torch.autograd.grad: inside a model x and base are intermediates, so no .grad accumulation
    def fused():
        torch.autograd.grad(aurora_delta_add(base, x, A, B, H, Ws, 2.0, -1.0, 0.4)[0], params, grad)

    def unfused():
        torch.autograd.grad(base + AF.aurora_delta(x, A, B, H, Ws, knots, 2.0), params, grad)

    def fused_fwd():
        with torch.no_grad():
            aurora_delta_add(base, x, A, B, H, Ws, 2.0, -1.0, 0.4)

    def unfused_fwd():
        with torch.no_grad():
            base + AF.aurora_delta(x, A, B, H, Ws, knots, 2.0)

    times = interleaved({"fused": fused, "unfused": unfused, "fused_fwd": fused_fwd, "unfused_fwd": unfused_fwd},
                        repeats=repeats, warmup=3)
    med = {k: median(v) for k, v in times.items()}
    return {"n": n, "d": d, "rank": r, "median_ms": {k: 1000 * v for k, v in med.items()},
            "fwd_bwd_speedup": paired_ratio(times, "unfused", "fused"),
            "fwd_speedup": paired_ratio(times, "unfused_fwd", "fused_fwd")}


def _linears(d: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bare = torch.nn.Sequential(torch.nn.Linear(d, d)).requires_grad_(False)
    out = {"bare linear": bare,
           "AuroRA r̃=2 (fused)": aurora_fx.apply(copy.deepcopy(bare), "^0$", dropout=0.0),  # like the LoRA rows
           "AuroRA r̃=2, dropout 0.05": aurora_fx.apply(copy.deepcopy(bare), "^0$", dropout=0.05),
           "our LoRA r=8 (fused)": aurora_fx.apply(copy.deepcopy(bare), "^0$", method="lora", rank=8),
           "PEFT LoRA r=8": get_peft_model(copy.deepcopy(bare), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))}
    with torch.no_grad():
        for model in out.values():
            for n, p in model.named_parameters():
                if "adapter" in n or "lora_" in n:
                    p.normal_(0, 0.02)
    return out


def single_linear(repeats: int, n: int = 4096, d: int = 768) -> dict:
    """Ratios to one bare frozen Linear: fwd+bwd and no-grad forward, paired per round."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).requires_grad_()
    grad = torch.randn(n, d, generator=g)
    calls = {}
    for name, model in _linears(d).items():
        params = [x, *(p for p in model.parameters() if p.requires_grad)]
        calls[f"{name}|fwd+bwd"] = lambda m=model, ps=params: torch.autograd.grad(m(x), ps, grad)
        calls[f"{name}|fwd"] = lambda m=model: _no_grad(m, x)
    times = interleaved(calls, repeats=repeats, warmup=3)
    names = [k.split("|")[0] for k in calls if k.endswith("|fwd")]
    return {"n": n, "d": d, "names": names,
            "median_ms": {k: 1000 * median(v) for k, v in times.items()},
            "ratio": {k: paired_ratio(times, k, f"bare linear|{k.split('|')[1]}") for k in times}}


def _no_grad(model, x):
    """Inference: eval mode (adapter dropout off), no grad."""
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train()


# -- 2./3. MiniLM ---------------------------------------------------------------------------------
def batch(seq: int = 128, size: int = 16) -> dict:
    from aurora_fx.data import load_bbc
    from aurora_fx.zoo import load_model

    tok = load_model("minilm").tokenizer
    texts = list(load_bbc().texts[:size])
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.arange(size) % 5}


def build(variant: str):
    """The MiniLM classifier for a variant, with its optimizer."""
    from aurora_fx.zoo import load_model

    torch.manual_seed(0)
    model = load_model("minilm", num_labels=5).model
    # both built at dropout 0.05 (the default when the variants were named and measured); "aurora_fused"
    # switches it off below with every other dropout, so its timing is the dropout-0 path
    if variant in ("aurora_fused", "aurora_fused_default_dropout"):
        aurora_fx.apply(model, "query|value", trainable_modules="classifier", dropout=0.05)
    elif variant == "aurora_unfused":
        aurora_fx.apply(model, "query|value", trainable_modules="classifier", fuse=False)
    elif variant == "lora_r8":
        aurora_fx.apply(model, "query|value", method="lora", rank=8, alpha=16, trainable_modules="classifier")
    elif variant == "peft_lora_r8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 lora_dropout=0.0, modules_to_save=["classifier"]))
    elif variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        model.bert.embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
    model.train()
    # dropout off: identical work in every variant, no RNG noise in the timing; but the default-dropout variant
    # keeps the adapter's own input dropout 0.05 (the default until issue 34; ``dropout=0.05`` users' path)
    keep_adapter = variant == "aurora_fused_default_dropout"
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and not (keep_adapter and isinstance(m, InputDropout)):
            m.p = 0.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_step(model, optimizer, inputs: dict) -> None:
    loss = model(**inputs).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def saved_activation_bytes(model, inputs: dict) -> int:
    """Bytes the autograd graph keeps for backward (unique storages), for one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    return sum(b for ptr, b in storages.items() if ptr not in params)



def rss_child(variant: str) -> None:
    """Run in a fresh process: peak RSS during 5 training steps of one variant.

    Loading the weights peaks higher than training, so the peak (VmHWM) is reset after building the
    model (``/proc/self/clear_refs``); the result is the training peak and its rise over the RSS at start.
    """
    torch.set_num_threads(2)
    inputs = batch()
    model, optimizer = build(variant)
    train_step(model, optimizer, inputs)  # optimizer state allocated
    Path("/proc/self/clear_refs").write_text("5")
    start = status_kib("VmRSS")
    for _ in range(5):
        train_step(model, optimizer, inputs)
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "rss_at_start_mib": start / 1024,
                      "rise_mib": (peak - start) / 1024}))


def peak_rss(variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, __file__, "--rss-child", variant], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def training(repeats: int) -> dict:
    inputs = batch()
    built = {v: build(v) for v in VARIANTS}
    steps = {v: (lambda m=m, o=o: train_step(m, o, inputs)) for v, (m, o) in built.items()}
    times = interleaved(steps, repeats=repeats, warmup=2)
    med = {v: median(t) for v, t in times.items()}
    ratios = {ref: {v: paired_ratio(times, v, ref) for v in VARIANTS} for ref in ("floor", "peft_lora_r8")}
    saved = {v: saved_activation_bytes(m, inputs) / 2**20 for v, (m, _) in built.items()}
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, (m, _) in built.items()}
    rss = {v: peak_rss(v) for v in VARIANTS}
    eval_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return {"median_step_s": med, "paired_ratio": ratios, "runs_s": times, "saved_activations_mib": saved,
            "trainable_params": trainable, "peak_rss": rss, "inference": inference(built, eval_inputs, repeats)}


def inference(built: dict, inputs: dict, repeats: int) -> dict:
    plain = copy.deepcopy(built["floor"][0]).eval()
    models = {"base": plain, **{v: built[v][0] for v in ("aurora_fused", "aurora_unfused", "lora_r8",
                                                           "peft_lora_r8")}}
    for m in models.values():
        m.eval()

    def run(m):
        def fn():
            with torch.no_grad():
                m(**inputs)
        return fn

    times = interleaved({k: run(m) for k, m in models.items()}, repeats=repeats, warmup=2)
    return {"median_s": {k: median(v) for k, v in times.items()},
            "paired_ratio_to_base": {k: paired_ratio(times, k, "base") for k in times}}


def report(result: dict) -> None:
    mi = result["micro"]
    print(f"\n1. Microbenchmark: base + Δ(x), N={mi['n']}, d={mi['d']}, r̃={mi['rank']} (median of repeats)")
    ms = mi["median_ms"]
    print(table(("path", "fwd+bwd ms", "fwd ms"), [
        ("unfused adapter subgraph", f"{ms['unfused']:.2f}", f"{ms['unfused_fwd']:.2f}"),
        ("fused aurora_delta_add", f"{ms['fused']:.2f}", f"{ms['fused_fwd']:.2f}"),
        ("speed-up (paired, unfused / fused)", f"{mi['fwd_bwd_speedup']:.2f}x", f"{mi['fwd_speedup']:.2f}x")]))
    sl = result["single_linear"]
    print(f"\n1b. One frozen nn.Linear({sl['d']}, {sl['d']}), N={sl['n']} tokens, input requires grad (paired ratios "
          f"to the bare linear)")
    print(table(("variant", "fwd+bwd ms", "vs bare", "no-grad fwd ms", "vs bare"), [
        (name, f"{sl['median_ms'][name + '|fwd+bwd']:.2f}", f"{sl['ratio'][name + '|fwd+bwd']:.3f}",
         f"{sl['median_ms'][name + '|fwd']:.2f}", f"{sl['ratio'][name + '|fwd']:.3f}") for name in sl["names"]]))
    if "training" not in result:
        return
    tr = result["training"]
    print("\n2. Training step, MiniLM-L6 real weights, seq 128, batch 16, query/value, AdamW")
    rows = []
    for v in VARIANTS:
        step, rss, ratio = tr["median_step_s"][v], tr["peak_rss"][v], tr["paired_ratio"]
        rows.append((v, f"{tr['trainable_params'][v]:,}", f"{1000 * step:.0f}", f"{ratio['floor'][v]:.3f}",
                     f"{ratio['peft_lora_r8'][v]:.3f}", f"{tr['saved_activations_mib'][v]:.1f}",
                     f"{rss['peak_rss_mib']:.0f}", f"{rss['rise_mib']:.0f}"))
    print(table(("variant", "trainable", "step ms", "vs floor", "vs PEFT LoRA", "saved act. MiB",
                 "peak RSS MiB", "RSS rise MiB"), rows))
    inf = tr["inference"]
    print("\n3. Eager inference, batch 16, seq 128 (no_grad)")
    print(table(("model", "forward ms", "vs base"),
                [(k, f"{1000 * v:.1f}", f"{inf['paired_ratio_to_base'][k]:.3f}") for k, v in inf["median_s"].items()]))


# -- 4. convolution sites --------------------------------------------------------------------------
CONV_VARIANTS = ("bare", "ours_lora_r8", "ours_aurora_r2", "peft_lora_r8")


def _conv_variant(module: torch.nn.Module, variant: str, pattern: str) -> torch.nn.Module:
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.requires_grad_(False)
    if variant == "peft_lora_r8":
        import peft

        names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and re.search(pattern, n)]
        return peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=names), module)
    if variant != "bare":
        method, rank = {"ours_lora_r8": ("lora", 8), "ours_aurora_r2": ("aurora", 2)}[variant]
        aurora_fx.apply(module, pattern, method=method, rank=rank, dropout=0.0)
    return module


def conv(repeats: int, batch: int = 8) -> dict:
    """fwd+bwd of one Conv2d(256, 256, 3, padding=1) and of a ResNet-50 stage (layer1: 3 bottlenecks, 256 channels)
    at 56×56, batch ``batch``, input requiring grad; every 2-D convolution adapted; ratios to the bare module."""
    import timm

    torch.manual_seed(0)
    blocks = {"conv3x3": (torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1)), r"^0$", 256),
              "resnet50_layer1": (timm.create_model("resnet50", pretrained=False).layer1, r"conv|downsample\.0", 64)}
    out = {}
    for name, (module, pattern, channels) in blocks.items():
        x = torch.randn(batch, channels, 56, 56, requires_grad=True)
        built = {v: _conv_variant(module, v, pattern) for v in CONV_VARIANTS}
        grad = torch.randn_like(built["bare"](x))
        steps = {v: (lambda m=m, x=x, grad=grad: torch.autograd.grad(m(x), x, grad)) for v, m in built.items()}
        times = interleaved(steps, repeats=repeats, warmup=1)
        ratios = {v: paired_ratio(times, v, "bare") for v in CONV_VARIANTS}
        out[name] = {"median_s": {v: median(t) for v, t in times.items()}, "ratio_to_bare": ratios,
                     "runs_s": times, "ours_lora_le_peft": ratios["ours_lora_r8"] <= ratios["peft_lora_r8"],
                     "ours_aurora_le_peft": ratios["ours_aurora_r2"] <= ratios["peft_lora_r8"]}
    return {"batch": batch, "blocks": out}


def conv_report(result: dict) -> None:
    rows = [(name, v, f"{1000 * r['median_s'][v]:.0f}", f"{r['ratio_to_bare'][v]:.3f}")
            for name, r in result["blocks"].items() for v in CONV_VARIANTS]
    print(f"\n4. Convolution sites, fwd+bwd, batch {result['batch']}, 56×56 (input requires grad)")
    print(table(("block", "variant", "ms", "× bare"), rows))
    for name, r in result["blocks"].items():
        print(f"{name}: ours LoRA ≤ PEFT LoRA: {r['ours_lora_le_peft']}; ours AuroRA ≤ PEFT LoRA: "
              f"{r['ours_aurora_le_peft']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--micro-only", action="store_true", help="only the op microbenchmark")
    parser.add_argument("--conv-only", action="store_true", help="only the convolution part (adapter_conv.json)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    torch.set_num_threads(2)
    repeats = 3 if args.quick else args.repeats
    if args.conv_only:
        result = conv(repeats)
        conv_report(result)
        print(f"\nwrote {write_json('adapter_conv.json', result)}")
        return
    result = {"repeats": repeats, "micro": micro(max(repeats, 10) * 4),
              "single_linear": single_linear(max(repeats, 10) * 4)}
    if not args.micro_only:
        result["training"] = training(repeats)
    report(result)
    print(f"\nwrote {write_json('adapter.json', result)}")


if __name__ == "__main__":
    main()
