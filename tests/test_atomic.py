"""Files aurora_fx writes are atomic and readable by their consumers (the mode ``open(..., "w")`` gives).

Every kind of file: an adapter checkpoint, a ``to_peft`` folder, an ``.onnx_adapter`` file, an ONNX
graph and a rendered picture, under two umasks. ``mkstemp`` alone gives 0600, which a server running as
another user cannot read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import aurora_fx
from aurora_fx.atomic import atomic_path, atomic_write_bytes, new_file_mode
from tests.models import CASES, randomize_adapters


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_mode_follows_the_umask(umask):
    assert new_file_mode() == 0o666 & ~umask


def test_atomic_writes_get_the_ordinary_mode_and_leave_no_temporary(tmp_path, umask):
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 10)
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    with open(tmp_path / "plain.bin", "w") as fh:  # what the user's own files get
        fh.write("z")
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.bin") == _mode(tmp_path / "plain.bin") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "plain.bin"]


@pytest.mark.slow
def test_every_kind_of_written_file_is_readable_by_others(tmp_path, umask):
    case = CASES["llama"]
    model = aurora_fx.apply(case.build(), case.pattern, method="lora", rank=4)
    randomize_adapters(model)
    written = [aurora_fx.save_adapters(model, tmp_path / "adapters.safetensors")]
    aurora_fx.export.to_peft(model, tmp_path / "peft")
    written += [tmp_path / "peft" / "adapter_config.json", tmp_path / "peft" / "adapter_model.safetensors"]
    written.append(aurora_fx.export.save_adapter_weights(model, tmp_path / "tune.onnx_adapter"))
    with torch.no_grad():
        written.append(aurora_fx.export.to_onnx(model, tmp_path / "model.onnx", example_kwargs=case.inputs(1, 4),
                                                verify=False).path)
    want = 0o666 & ~umask
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(want) for p in written}
