"""Runs inside one client's own virtualenv (``benchmarks/client_envs.py``): greedy tokens from each folder.

Usage: ``<client venv>/bin/python client_runners.py CLIENT SPEC.json OUT.json``. The spec names the base
model folder, the folders to load, the prompt (token ids) and the number of new tokens; the output maps
each folder to ``{"tokens": [...], "logprobs": [...]}`` or ``{"error": "..."}``. Only the client's own
API is used here: nothing of aurora_fx is imported (it is not installed in these environments).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import traceback
from pathlib import Path


def _vllm(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["base"], enable_lora=True, max_lora_rank=16, max_loras=1, dtype="float32",
              skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
              gpu_memory_utilization=0.15)  # on the CPU: the share of RAM it reserves (default 0.92)
    params = SamplingParams(temperature=0.0, max_tokens=spec["new"], logprobs=0, detokenize=False)
    results = {}
    for i, (name, folder) in enumerate(spec["peft"].items()):
        out = llm.generate({"prompt_token_ids": spec["prompt"]}, params,
                           lora_request=LoRARequest(name, i + 1, folder))[0].outputs[0]
        tokens = list(out.token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.logprobs, tokens, strict=False)]
        results[name] = {"tokens": tokens, "logprobs": logprobs}
    return results


def _optimum(spec: dict) -> dict:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(spec["onnx"], provider="CPUExecutionProvider")
    out = model.generate(torch.tensor([spec["prompt"]]), max_new_tokens=spec["new"], do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(spec["prompt"]):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens, strict=False)]
    return {"onnx": {"tokens": tokens, "logprobs": logprobs}}


def _sentencepiece_tokenizer(folder: Path) -> None:
    """A small SentencePiece model for the random base (llama.cpp's converter needs a tokenizer; the
    runs feed token ids, so its pieces never matter). Its converter pads the vocabulary to vocab_size."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 97}" for j in range(12)) for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=120,
                                   hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)


def _llamacpp(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    convert, work = Path(spec["convert"]), Path(spec["work"])
    base = work / "base"
    if not (base / "tokenizer.model").exists():
        subprocess.run(["cp", "-r", spec["base"], str(base)], check=True)
        _sentencepiece_tokenizer(base)
    gguf = work / "base.gguf"
    subprocess.run([sys.executable, str(convert / "convert_hf_to_gguf.py"), str(base), "--outfile", str(gguf),
                    "--outtype", "f32"], check=True, capture_output=True)
    results = {}
    for name, folder in spec["peft"].items():
        lora = work / f"{name}.gguf"
        done = subprocess.run([sys.executable, str(convert / "convert_lora_to_gguf.py"), folder, "--base",
                               str(base), "--outfile", str(lora), "--outtype", "f32"], capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": "convert_lora_to_gguf.py: " + done.stderr.strip().splitlines()[-1][-300:]}
            continue
        llm = Llama(model_path=str(gguf), lora_path=str(lora), n_ctx=128, logits_all=True, verbose=False,
                    n_threads=2, seed=0, type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32; default f16)
        llm.eval(spec["prompt"])
        tokens, logprobs = [], []
        for _ in range(spec["new"]):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(logits.argmax())
            logprobs.append(float(logits[token] - logits.max() - math.log(np.exp(logits - logits.max()).sum())))
            tokens.append(token)
            llm.eval([token])
        results[name] = {"tokens": tokens, "logprobs": logprobs}
    return results


RUNNERS = {"vllm": _vllm, "optimum": _optimum, "llamacpp": _llamacpp}

if __name__ == "__main__":
    client, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[client](spec)
    except Exception as error:  # reported in the table, with the client's own words
        result = {"__error__": f"{type(error).__name__}: {error}"[-500:], "__trace__": traceback.format_exc()[-2000:]}
    Path(out_path).write_text(json.dumps(result))
