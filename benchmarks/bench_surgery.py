"""Surgery time vs number of sites: Llama-2-7B-shaped models with 1, 8 and 32 layers on the meta device.

    python benchmarks/bench_surgery.py [--repeats 5]

Each layer has 7 sites (q, k, v, o, gate, up, down). Prints a table (median of repeats, time per site,
ratio to the 1-layer model) and writes benchmarks/results/surgery.json. Linear scaling means the time
per site stays flat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402

PATTERN = r"(q|k|v|o|gate|up|down)_proj"


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def time_apply(layers: int) -> float:
    model = build(layers)
    start = time.perf_counter()
    aurora_fx.apply(model, PATTERN)
    seconds = time.perf_counter() - start
    assert len(aurora_fx.adapters(model)) == 7 * layers
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = (1, 8, 32)
    time_apply(2)  # warm caches (imports, the stock-graph cache) before measuring
    runs = {n: [] for n in sizes}
    for _ in range(args.repeats):  # interleaved
        for n in sizes:
            runs[n].append(time_apply(n))
    med = {n: median(v) for n, v in runs.items()}
    rows = [(n, 7 * n, f"{med[n]:.3f}", f"{1000 * med[n] / (7 * n):.2f}", f"{med[n] / med[1]:.1f}x",
             f"{7 * n / 7:.0f}x") for n in sizes]
    print(table(("layers", "sites", "apply s (median)", "ms per site", "time vs 1 layer", "sites vs 1 layer"), rows))
    path = write_json("surgery.json", {"repeats": args.repeats, "median_seconds": {str(n): med[n] for n in sizes},
                                       "runs": {str(n): runs[n] for n in sizes}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
