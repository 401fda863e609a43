"""``make clients``: aurora_fx's serving folders loaded by the real third-party clients, tokens compared.

One random Llama config (hidden 128, 2 layers), a fixed prompt, 16 greedy tokens. Folders:

* ``lora_exact``: LoRA r=4 on q_proj (α=8) and r=2 on v_proj (α=16), ``to_peft`` exact (one ``lora_alpha``,
  the other scale folded into ``lora_B``);
* ``aurora_fit``: AuroRA r̃=2 on q/v, ``to_peft(mode="fit")`` on random calibration batches;
* ``aroma_exact``: AROMA grown by two merges (one site cut back to one stored piece, so ranks differ per
  site: ``rank_pattern``), ``to_peft`` exact;
* ``onnx``: ``to_onnx_decoder`` of the AuroRA model (optimum's ``ORTModelForCausalLM``).

The reference is HF transformers + real PEFT on the same folder (for ``onnx``: aurora_fx's model itself).
Each client runs in its own virtualenv (``benchmarks/client_envs.py``; built once under the cache folder,
about 25 minutes the first time, mostly llama.cpp's build). The table (client, version, folder, loaded,
tokens equal, max |log-prob difference|) is printed and written to ``benchmarks/results/clients.json``; a
client that cannot install or load is a row that says why.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from client_envs import CLIENTS, converter_scripts, default_cache, ensure  # noqa: E402
from common import write_json  # noqa: E402

import aurora_fx  # noqa: E402

NEW = 16
PROMPT = [5, 17, 42, 99, 7, 63, 28, 11]
HERE = Path(__file__).parent


def _base():
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=256, vocab_size=512,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0, initializer_range=0.15)).eval()  # peaked logits
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


def _randomize(model, std: float) -> None:
    with torch.no_grad():
        for p in aurora_fx.trainable_parameters(model):
            p.normal_(0, std)


def _models(base):
    lora = aurora_fx.apply(copy.deepcopy(base), "q_proj", method="lora", rank=4, alpha=8.0)
    aurora_fx.apply(lora, "v_proj", method="lora", rank=2, alpha=16.0)
    _randomize(lora, 0.05)
    aurora = aurora_fx.apply(copy.deepcopy(base), "q_proj|v_proj")
    _randomize(aurora, 0.2)
    aroma = aurora_fx.apply(copy.deepcopy(base), "q_proj|v_proj", method="aroma")
    controller = aurora_fx.AromaController(aroma, torch.optim.SGD(aurora_fx.trainable_parameters(aroma), lr=0.0),
                                           max_inner_steps=1)
    for step in range(2):
        torch.manual_seed(10 + step)
        _randomize(aroma, 0.05)
        controller._outer_step()  # merge the piece: per-site stored factors
    _randomize(aroma, 0.05)
    site = aroma.model.layers[0].self_attn.q_proj.adapter  # one site compacted to rank 1: per-site ranks
    site.U, site.V = site.U[:, :1].clone(), site.V[:1].clone()  # (out, k), (k, in)
    return lora, aurora, aroma


def _artifacts(work: Path) -> dict:
    base = _base()
    base.save_pretrained(work / "base")
    lora, aurora, aroma = _models(base)
    calibration = [{"input_ids": torch.randint(3, 512, (4, 16))} for _ in range(8)]
    aurora_fx.export.to_peft(lora, work / "lora_exact")
    aurora_fx.export.to_peft(aurora, work / "aurora_fit", mode="fit", calibration=calibration)
    aurora_fx.export.to_peft(aroma, work / "aroma_exact")
    aurora_fx.export.to_onnx_decoder(aurora, work / "onnx")
    peft_folders = {n: str(work / n) for n in ("lora_exact", "aurora_fit", "aroma_exact")}
    reference = {n: _peft_reference(base, f) for n, f in peft_folders.items()}
    reference["onnx"] = _generate(aurora)
    return {"base": str(work / "base"), "peft": peft_folders, "onnx": str(work / "onnx"), "prompt": PROMPT,
            "new": NEW, "reference": reference}


def _peft_reference(base, folder: str) -> dict:
    from peft import PeftModel

    return _generate(PeftModel.from_pretrained(copy.deepcopy(base), folder).eval())


def _generate(model) -> dict:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    logprobs = [float(torch.log_softmax(s[0].double(), -1)[t]) for s, t in zip(out.logits, tokens, strict=True)]
    return {"tokens": tokens, "logprobs": logprobs}


def _run_client(name: str, spec: dict, cache: Path, work: Path) -> dict:
    client = CLIENTS[name]
    why = ensure(client, cache)
    if why is not None:
        return {"__error__": f"could not install: {why}"}
    if name == "llamacpp":
        spec = dict(spec, convert=str(converter_scripts(cache)), work=str(work / "llamacpp"))
        (work / "llamacpp").mkdir(exist_ok=True)
    spec_file, out_file = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run([str(client.python(cache)), str(HERE / "client_runners.py"), name, str(spec_file),
                           str(out_file)], capture_output=True, text=True, timeout=1800)
    if not out_file.exists():
        return {"__error__": f"runner died (exit {done.returncode}): {done.stderr.strip()[-400:]}"}
    return json.loads(out_file.read_text())


def _rows(name: str, got: dict, reference: dict) -> list[dict]:
    folders = ["onnx"] if name == "optimum" else ["lora_exact", "aurora_fit", "aroma_exact"]
    rows = []
    for folder in folders:
        row = {"client": name, "version": CLIENTS[name].version, "folder": folder}
        result = got.get(folder) or {"error": got.get("__error__", "no result")}
        if "error" in result:
            rows.append({**row, "loaded": False, "tokens_equal": False, "max_logprob_diff": None,
                         "note": result["error"]})
            continue
        ref = reference[folder]
        diffs = [abs(a - b) for a, b in zip(result["logprobs"], ref["logprobs"], strict=False)]
        rows.append({**row, "loaded": True, "tokens_equal": result["tokens"] == ref["tokens"],
                     "max_logprob_diff": max(diffs) if diffs else None, "tokens": result["tokens"],
                     "reference_tokens": ref["tokens"]})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| client | version | folder | loaded | tokens equal | max log-prob diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['max_logprob_diff']:.1e}" if r.get("max_logprob_diff") is not None else "-"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['client']} | {r['version']} | {r['folder']} | {'yes' if r['loaded'] else 'no'}{note} | "
                     f"{'yes' if r['tokens_equal'] else 'no'} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    cache = default_cache()
    names = sys.argv[1:] or list(CLIENTS)
    with tempfile.TemporaryDirectory(prefix="aurora_fx_clients.") as tmp:
        work = Path(tmp)
        spec = _artifacts(work)
        rows = [row for name in names for row in _rows(name, _run_client(name, spec, cache, work), spec["reference"])]
    print(_table(rows))
    write_json("clients.json", {"prompt": PROMPT, "new_tokens": NEW,
                                                   "rows": rows})


if __name__ == "__main__":
    main()
