"""The planted bugs of ``make mutants`` (``tests/mutation/run.py``): each must make its tests fail.

``Mutant(name, file, old, new, tests, what)``: ``old`` occurs exactly once in ``file``. The first group are the
guards that earlier mutation runs found unguarded (issue "every guard catches its own removal"), then the two
live distributed AROMA bugs, then the guards added with the fresh-machine, serving, second-hour and resume work,
then core math that the oracle tests hold.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    """One planted bug."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


PEFT = ("tests/export/test_peft_lora.py",)
SECOND = ("tests/test_second_hour.py",)
SEQ2SEQ = ("tests/export/test_seq2seq.py",)
SYNC = ("tests/test_fsdp.py::test_aroma_decisions_stay_identical_when_only_the_controller_syncs",)
MIXED = ("tests/test_activation_checkpointing.py",)

MUTANTS: list[Mutant] = [
    # -- to_peft's fit (the serve-as-LoRA path)
    Mutant("fit-bias-sign", "aurora_fx/export/peft_lora.py",
           'out[f"{key}.lora_B.bias"] = (c.double() / peft_scale)', 'out[f"{key}.lora_B.bias"] = (-c.double() / peft_scale)',
           PEFT, "the fitted bias written with the wrong sign"),
    Mutant("fit-not-centred", "aurora_fx/export/peft_lora.py",
           "        xtx, xty = xtx - stats.n * torch.outer(mx, mx), xty - stats.n * torch.outer(mx, my)\n", "",
           PEFT, "the fit with a bias not centred (not the least-squares optimum)"),
    Mutant("fit-heavy-ridge", "aurora_fx/export/peft_lora.py",
           "ridge = 1e-8 * float(torch.diagonal(xtx).mean())", "ridge = 1e-1 * float(torch.diagonal(xtx).mean())",
           PEFT, "a heavy ridge in the fit"),
    Mutant("fit-no-held-out", "aurora_fx/export/peft_lora.py",
           'part = 1 if state["batch"] % 4 == 3 else 0', "part = 0", PEFT, "no batches held out of the fit"),
    Mutant("fit-train-mode", "aurora_fx/export/peft_lora.py",
           "        model.eval()\n        with torch.no_grad():\n            for batch in calibration:",
           "        model.train()\n        with torch.no_grad():\n            for batch in calibration:",
           PEFT, "calibration run in train mode (dropout on)"),
    # -- autocast, grids, inits
    Mutant("autocast-fused", "aurora_fx/ops/fused.py",
           "    if torch.is_autocast_enabled(device):\n        dtype = torch.get_autocast_dtype(device)",
           "    if False:\n        dtype = torch.get_autocast_dtype(device)",
           ("tests/test_mixed_precision.py",), "the fused linear ops ignore autocast"),
    Mutant("autocast-delta-op", "aurora_fx/ops/aurora_delta.py",
           'register_autocast(aurora_delta_add, "aurora_delta_add")', "pass",
           ("tests/test_mixed_precision.py",), "aurora_delta_add has no autocast rule"),
    Mutant("spline-centre", "aurora_fx/ops/aurora_delta.py",
           "    return grid_lo + (2 - ORDER) * grid_step", "    return -1.4",
           ("tests/ops/test_aurora_delta.py",), "a spline centre right on the default grid only"),
    Mutant("init-h-identity", "aurora_fx/methods/aurora.py", "nn.init.xavier_normal_(self.H)", "nn.init.eye_(self.H)",
           ("tests/test_init.py",), "H initialised to the identity"),
    Mutant("init-ws-wide", "aurora_fx/methods/aurora.py",
           "nn.init.uniform_(self.Ws, -config.spline_init, config.spline_init)", "nn.init.uniform_(self.Ws, -1.0, 1.0)",
           ("tests/test_init.py",), "Ws ~ U(±1)"),
    Mutant("init-a-wide", "aurora_fx/methods/base.py", "nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)",
           "nn.init.kaiming_uniform_(t, a=0.0, generator=generator)", ("tests/test_init.py",), "a 2.4x wider A"),
    # -- AROMA bookkeeping, ONNX verification, dropout draws
    Mutant("aroma-wnorm-stale", "aurora_fx/aroma.py",
           "        t.wnorm2 = _weff_norm2(a, t.weight)  # exact after the compaction (k matrix-vector products)\n", "",
           ("tests/test_aroma.py",), "||W_eff||^2 not refreshed after a merge"),
    Mutant("aroma-cross-sign", "aurora_fx/aroma.py", "    return w2 + 2 * cross + AF.lowrank_norm2(U, V).item()",
           "    return w2 - 2 * cross + AF.lowrank_norm2(U, V).item()", ("tests/test_aroma.py",),
           "the cross term of ||W0 + UV||^2 with the wrong sign"),
    Mutant("decoder-verify-silent", "aurora_fx/export/decoder.py", "        if not diff <= atol:\n            raise",
           "        if False:\n            raise", ("tests/export/test_decoder.py",), "the decoder verification never raises"),
    Mutant("dropout-shared-draws", "aurora_fx/ops/dropout.py", "return words.view(torch.int16)[:n].view(tuple(shape))",
           "return words.view(torch.int16)[0::2].repeat_interleave(2)[:n].view(tuple(shape))",
           ("tests/ops/test_dropout.py",), "adjacent mask elements share one draw"),
    # -- the two live distributed AROMA bugs
    Mutant("aroma-span-rule-per-rank", "aurora_fx/aroma.py",
           "grow = agree(torch.tensor([float(self._merge(t, gen)) for t in merging], dtype=torch.float64))",
           "grow = torch.tensor([float(self._merge(t, gen)) for t in merging], dtype=torch.float64)",
           SYNC, "whether a site grows on is decided per rank"),
    Mutant("aroma-masks-per-rank", "aurora_fx/aroma.py", "torch.rand(whole.shape, generator=gen)",
           "torch.rand(whole.shape)", SYNC, "the moment-reset masks drawn from each rank's global RNG"),
    # -- dropout masks under compile and checkpointing
    Mutant("mask-order-counter", "aurora_fx/ops/dropout.py", 'mutates_args=("order",),', "mutates_args=(),", MIXED,
           "the mask op no longer orders its draws (inductor reorders them)"),
    Mutant("mask-two-paths", "aurora_fx/ops/dropout.py",
           "        return torch.ops.aurora_fx.keep_mask(_order(device), list(shape), p)",
           "        return torch.rand(tuple(shape), device=device) >= p", MIXED,
           "a traced mask drawn another way than the eager one"),
    # -- files, serving folders
    Mutant("file-mode-0600", "aurora_fx/atomic.py", "    os.fchmod(fd, new_file_mode())\n", "",
           ("tests/test_atomic.py",), "written files keep mkstemp's 0600"),
    Mutant("peft-no-fold", "aurora_fx/export/peft_lora.py", "    fold = factors.scale / peft_scale", "    fold = 1.0",
           PEFT, "a site's own scale not folded into lora_B (one lora_alpha for all)"),
    Mutant("peft-no-rank-pattern", "aurora_fx/export/peft_lora.py",
           '"rank_pattern": {re.escape(s): int(v) for s, v in ranks.items() if v != r},', '"rank_pattern": {},',
           PEFT, "per-site ranks not written"),
    Mutant("genai-share-buffer", "aurora_fx/export/serving_folder.py", '"past_present_share_buffer": False',
           '"past_present_share_buffer": True', ("tests/export/test_serving_folder.py",),
           "genai told the cache is one shared buffer"),
    Mutant("genai-type", "aurora_fx/export/serving_folder.py",
           '"type": model_type if model_type in GENAI_TYPES else "decoder"', '"type": "decoder"',
           ("tests/export/test_serving_folder.py",), "genai's own model types not used"),
    Mutant("folder-no-config", "aurora_fx/export/serving_folder.py", '"config.json": model.config.to_json_string()}',
           '"config.json": "{}"}', ("tests/export/test_serving_folder.py",), "an empty config.json beside the graph"),
    # -- the second hour
    Mutant("nested-tensor", "aurora_fx/fastpaths.py", '                                             nn.TransformerEncoder: ("use_nested_tensor", False)}',
           "}", SECOND, "the encoder still makes NestedTensors under adapters"),
    Mutant("record-all-tensors", "aurora_fx/pretrained.py",
           'if site is not None and name in site.get("tensors", (name,)):', "if site is not None:", SECOND,
           "from_pretrained takes a frozen AROMA site's dead A, B"),
    Mutant("csv-extra-fields", "aurora_fx/data.py", "    extra = [line for line, r in rows if r.get(None)]",
           "    extra = []", SECOND, "rows with an unquoted comma accepted"),
    Mutant("csv-bom", "aurora_fx/data.py", 'encoding="utf-8-sig"', 'encoding="utf-8"', SECOND, "a BOM header refused"),
    Mutant("csv-empty-label", "aurora_fx/data.py",
           '    empty = [line for line, r in rows if not (r[text_column] or "").strip() or not (r[label_column] or "").strip()]',
           "    empty = []", SECOND, "rows without a label accepted"),
    Mutant("peft-layers", "aurora_fx/peft_config.py",
           "return found is not None and int(found.group(1)) in wanted", "return True", SECOND,
           "layers_to_transform ignored"),
    Mutant("peft-exclude", "aurora_fx/peft_config.py",
           'excluded = _names_rule(config.exclude_modules) if getattr(config, "exclude_modules", None) else (lambda p: False)',
           "excluded = lambda p: False  # noqa: E731", SECOND, "exclude_modules ignored"),
    Mutant("peft-all-linear", "aurora_fx/peft_config.py", "target = lambda path, module: path != output",
           "target = lambda path, module: True", SECOND, "'all-linear' adapts the output layer too"),
    Mutant("peft-modules-to-save", "aurora_fx/peft_config.py",
           """trainable = rf"(^|\\.)({'|'.join(re.escape(m) for m in saved)})$" if saved else None""",
           "trainable = None", SECOND, "modules_to_save do not train"),
    Mutant("peft-init-ignored", "aurora_fx/peft_config.py", "    if init is not True:\n", "    if False:\n", SECOND,
           "init_lora_weights='pissa' ignored"),
    Mutant("peft-wrapped", "aurora_fx/peft_config.py", 'if type(m).__module__.startswith("peft.")), None)',
           "if False), None)", SECOND, "a PEFT-wrapped model adapted"),
    Mutant("method-vs-config", "aurora_fx/registry.py",
           "            if method is not None and str(method).lower() != config.method:", "            if False:", SECOND,
           "method='lora' with an AuroraConfig silently uses AuroRA"),
    Mutant("fit-worse-silent", "aurora_fx/export/peft_lora.py",
           "bad = [s for s in sites if s.heldout_error is not None and s.heldout_error > 1.0]", "bad = []", SECOND,
           "a fit worse than no adapter written silently"),
    Mutant("cli-python-words", "aurora_fx/cli.py", 'print(f"aurora-fx: error: {cli_words(message)}"',
           'print(f"aurora-fx: error: {message}"', SECOND, "CLI errors name Python arguments"),
    Mutant("eager-transformers", "aurora_fx/__init__.py", '__version__ = "0.1.0"\n',
           '__version__ = "0.1.0"\nimport aurora_fx.aroma_callback  # noqa: E402, F401\n',
           SECOND, "import aurora_fx imports torch and transformers"),
    Mutant("moe-grouped-mm", "aurora_fx/export/onnx.py", '    switch("batched_mm")\n', "", SECOND,
           "an MoE decoder exported with grouped_mm"),
    Mutant("seq2seq-one-seq", "aurora_fx/export/dynamic_axes.py",
           'return "decoder_seq" if name.startswith("decoder_") else "seq"', 'return "seq"', SEQ2SEQ,
           "encoder and decoder lengths tied"),
    Mutant("seq2seq-mel-axis", "aurora_fx/export/dynamic_axes.py",
           '_FIXED_LAYOUT = ("input_features", "pixel_values", "pixel_mask")', '_FIXED_LAYOUT = ("pixel_values", "pixel_mask")',
           SEQ2SEQ, "Whisper's mel-bin axis made dynamic"),
    Mutant("seq2seq-cache-on", "aurora_fx/export/onnx.py",
           '    if "use_cache" in kwargs or not (is_decoder(model) or _is_encoder_decoder(model)):',
           '    if "use_cache" in kwargs or not is_decoder(model):', SEQ2SEQ, "an encoder-decoder exported with its cache"),
    # -- resuming AROMA
    Mutant("resume-no-snapshots", "aurora_fx/aroma.py",
           "t.snap = None if snap is None else tuple(x.to(t.adapter.A.device) for x in snap)", "t.snap = None",
           ("tests/test_aroma_resume.py",), "a resumed controller forgets its inner-check snapshots"),
    Mutant("resume-no-counters", "aurora_fx/aroma.py",
           '        for name, value in state["counters"].items():\n            setattr(self, name, value)\n', "",
           ("tests/test_aroma_resume.py",), "a resumed controller restarts its counters"),
    Mutant("aromalr-get-lr", "aurora_fx/aroma.py",
           "rates = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas, strict=True)]",
           "rates = self.get_lr()", ("tests/test_aroma.py",), "AromaLR.rewarm calls get_lr() outside step() (warns)"),
    Mutant("rewarm-without-merge", "aurora_fx/aroma.py",
           "        if merged:  # a re-warm follows a merge only (an outer step may just stop sites)\n",
           "        if True:\n", ("tests/test_aroma.py",), "a re-warm after an outer step that merged nothing"),
    Mutant("lora-grad-b-scale", "aurora_fx/ops/lora_delta.py",
           "grad_B = tn(t2, g).t() * ctx.scale if need[3] else None", "grad_B = tn(t2, g).t() if need[3] else None",
           ("tests/ops/test_custom_ops.py",), "lora_delta_add's dL/dB without the scale"),
    Mutant("triton-first-block-grads", "aurora_fx/ops/triton_ops.py", "    return g_z, g_h.sum(0), g_ws.sum(0)",
           "    return g_z, g_h[0], g_ws[0]", ("tests/ops/test_triton.py",),
           "only the first row block's dL/dH, dL/dWs summed (Triton)"),
    Mutant("triton-column-tile", "aurora_fx/ops/triton_kernels.py",
           "    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)", "    cols = tl.arange(0, BLOCK_D)",
           ("tests/ops/test_triton.py",), "the rank update ignores its column tile (Triton)"),
    # -- core math
    Mutant("lora-scale", "aurora_fx/functional.py", "    return F.linear(F.linear(x, A), B) * scale",
           "    return F.linear(F.linear(x, A), B) * (scale + 1.0)", ("tests/test_functional.py", "tests/test_models.py"),
           "the LoRA oracle's scale"),
    Mutant("lora-delta-weight", "aurora_fx/functional.py", "    return scale * (B @ A)", "    return 0.99 * scale * (B @ A)",
           ("tests/test_surgery.py",), "an inexact LoRA merge"),
    Mutant("static-merge-sign", "aurora_fx/functional.py",
           "    return scale * (B @ anl(A.t(), H, Ws, knots, order).t())", "    return -scale * (B @ anl(A.t(), H, Ws, knots, order).t())",
           PEFT, "AuroRA's static merge with the wrong sign"),
    Mutant("lora-factors-scale", "aurora_fx/methods/lora.py",
           "        return LoraFactors(self.A.detach(), self.B.detach(), self.scale)",
           "        return LoraFactors(self.A.detach(), self.B.detach(), 2 * self.scale)", PEFT,
           "LoRA exported at twice its scale"),
    Mutant("fingerprint-off", "aurora_fx/checkpoint.py", "    if check_base:\n", "    if False:\n",
           ("tests/test_checkpoint.py", "tests/test_first_hour.py"), "adapters load onto another base without a word"),
]
