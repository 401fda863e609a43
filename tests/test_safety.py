"""A save killed midway never harms the old file; atomic writes leave no partial files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import aurora_fx
from aurora_fx.atomic import atomic_write_bytes
from aurora_fx.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import functools, sys, time
    import torch
    from torch import nn
    import aurora_fx
    import aurora_fx.checkpoint as ck
    from aurora_fx.atomic import atomic_write_bytes

    def slow(done):
        print("progress", done, flush=True)
        time.sleep(0.2)

    ck.atomic_write_bytes = functools.partial(atomic_write_bytes, chunk=1 << 14, progress=slow)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    aurora_fx.apply(model, ".", method="lora", rank=32)
    with torch.no_grad():
        for p in aurora_fx.trainable_parameters(model):
            p.fill_(7.0)
    aurora_fx.save_adapters(model, sys.argv[1])
    print("finished", flush=True)
""")


def test_killing_a_save_midway_leaves_the_old_checkpoint_intact(tmp_path):
    path = tmp_path / "ck.safetensors"
    old_model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    aurora_fx.apply(old_model, ".", method="lora", rank=32)
    aurora_fx.save_adapters(old_model, path)
    old_bytes = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in child.stdout:  # wait until the new file is being written
        lines.append(line)
        if line.startswith("progress") and len(lines) >= 3:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not any(line.startswith("finished") for line in lines)
    assert path.read_bytes() == old_bytes  # the old file, whole
    ckpt = read_checkpoint(path)
    assert all(not torch.all(t == 7.0) for k, t in ckpt.tensors.items() if k.endswith("/A"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ck.safetensors"]
    assert all(name.startswith(".ck.safetensors.") and name.endswith(".tmp") for name in leftovers)


def test_a_write_that_raises_leaves_no_file_and_no_temp(tmp_path):
    target = tmp_path / "x.bin"

    def boom(done):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"x" * 100, chunk=10, progress=boom)
    assert list(tmp_path.iterdir()) == []
