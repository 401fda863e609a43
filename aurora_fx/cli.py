"""The ``aurora-fx`` command: ``demo``, ``sites``, ``train``, ``inspect`` and ``export``.

MODEL is ``minilm`` (the embedded all-MiniLM-L6-v2), a local Hugging Face folder, or
``timm:<name>``. DATA is ``bbc``, ``tweets``, a folder of ``<label>/*.txt`` files or a CSV with
``text`` and ``label`` columns.

Examples:
    aurora-fx sites minilm --pattern 'query|value'
    aurora-fx train minilm bbc --method aurora --pattern 'query|value' --steps 60 --out runs/bbc
    aurora-fx inspect runs/bbc/adapters.safetensors --render runs/bbc/map.svg
    aurora-fx export runs/bbc/adapters.safetensors --out runs/bbc/model.onnx
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from aurora_fx.demo import run_demo

    run_demo(steps=args.steps, test_size=args.test_size, out_dir=args.out, progress=not args.quiet)
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    import aurora_fx
    from aurora_fx.zoo import load_model

    # The same class as `train` builds (a classifier), so a pattern that matches here matches there.
    num_labels = 2 if args.task == "classification" and not args.model.startswith("timm:") else None
    table = aurora_fx.sites(load_model(args.model, num_labels=num_labels).model, args.pattern,
                            include_all=args.all)
    print(table)
    print(f"{len(table)} sites, {len(table.matched)} matched" + (f" by {args.pattern!r}" if args.pattern else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    import aurora_fx
    from aurora_fx.data import load_text_data, split
    from aurora_fx.train import TrainConfig, encode, evaluate, train_classifier
    from aurora_fx.zoo import load_model

    torch.manual_seed(args.seed)
    data = load_text_data(args.data)
    if len(data.label_names) < 2:
        raise ValueError(f"data {args.data!r} has only one label ({', '.join(data.label_names) or 'none'}); a "
                         f"classifier needs examples of at least two labels")
    test_size = int(args.test_size) if args.test_size >= 1 else float(args.test_size)
    train, test = split(data, test_size, seed=args.seed)
    loaded = load_model(args.model, num_labels=len(data.label_names))
    if loaded.kind != "text":
        raise SystemExit("aurora-fx train fine-tunes text classifiers; MODEL must be 'minilm' or a HF folder")
    model = loaded.model
    train_enc, test_enc = encode(loaded.tokenizer, train, args.max_length), encode(loaded.tokenizer, test,
                                                                                  args.max_length)
    before = evaluate(model, test_enc, progress=not args.quiet)
    aurora_fx.apply(model, args.pattern, method=args.method, rank=args.rank, alpha=args.alpha,
                    trainable_modules=args.head)
    print(aurora_fx.inspect(model).table())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      seed=args.seed)
    optimizer = scheduler = on_step = controller = None
    if args.method == "aroma":
        from aurora_fx.aroma import AromaController, AromaLR

        optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=args.lr)
        scheduler = AromaLR(optimizer, max_steps=args.steps, first_warmup=max(1, args.steps // 20))
        controller = AromaController(model, optimizer, scheduler, max_inner_steps=max(10, args.steps // 4))
        on_step = lambda step, loss: controller.step()  # noqa: E731
    result = train_classifier(model, train_enc, cfg, progress=not args.quiet, on_step=on_step,
                              optimizer=optimizer, scheduler=scheduler)
    if controller is not None:
        controller.finalize()
        print(f"AROMA ranks: {controller.ranks()}")
    after = evaluate(model, test_enc, progress=not args.quiet)
    path = aurora_fx.save_adapters(model, Path(args.out) / "adapters.safetensors", extra={
        "base_model": _absolute(args.model), "held_out": len(test), "num_labels": len(data.label_names),
        "labels": list(data.label_names),
        "accuracy_before": before, "accuracy_after": after, "steps": args.steps})
    summary = {"accuracy_before": round(before, 4), "accuracy_after": round(after, 4),
               "train_seconds": round(result.seconds, 1), "checkpoint": str(path)}
    print(json.dumps(summary))
    return 0


def _absolute(spec: str) -> str:
    """A model spec with a local folder made absolute (checkpoints are used from other folders)."""
    return spec if spec == "minilm" or spec.startswith("timm:") else str(Path(spec).absolute())


def _rebuild(checkpoint: str, model_spec: str | None):
    import aurora_fx
    from aurora_fx.checkpoint import read_checkpoint
    from aurora_fx.zoo import load_model

    ckpt = read_checkpoint(checkpoint)
    spec = model_spec or ckpt.extra.get("base_model")
    if not spec:
        raise ValueError(f"{checkpoint} does not record its base model; pass --model MODEL")
    if model_spec is None and spec != "minilm" and not spec.startswith("timm:") and not Path(spec).is_dir():
        raise ValueError(f"the base model {spec!r} recorded in {checkpoint} is not a folder here; pass --model MODEL "
                         f"(minilm, a local Hugging Face folder or timm:<name>) to say where it is")
    causal = ckpt.model_class.endswith("ForCausalLM")
    loaded = load_model(spec, num_labels=None if causal else ckpt.extra.get("num_labels"), causal_lm=causal)
    aurora_fx.load_adapters(loaded.model, ckpt.path)
    return loaded


def _cmd_inspect(args: argparse.Namespace) -> int:
    import aurora_fx

    loaded = _rebuild(args.checkpoint, args.model)
    report = aurora_fx.inspect(loaded.model)
    print(report.table())
    if args.site:
        print(report.code(args.site))
    if args.render:
        from aurora_fx.render import render

        written = render(report, args.render, site=args.site)
        print(f"wrote {written}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from aurora_fx.export import to_onnx
    from aurora_fx.zoo import example_inputs

    loaded = _rebuild(args.checkpoint, args.model)
    if args.format == "peft":
        return _export_peft(args, loaded)
    if loaded.kind == "causal_lm":
        return _export_decoder(args, loaded)
    result = to_onnx(loaded.model, args.out, example_kwargs=example_inputs(loaded), merge=args.merge,
                     lossy=args.lossy)
    diffs = ", ".join(f"{shape}: {d:.2e}" for shape, d in result.max_abs_diff.items())
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s; inputs "
          f"{list(result.input_names)}, outputs {list(result.output_names)}; "
          f"onnxruntime vs PyTorch max abs diff {diffs}")
    return 0


def _export_decoder(args: argparse.Namespace, loaded) -> int:
    from aurora_fx.export import to_onnx_decoder

    if args.merge:
        raise ValueError("--merge is not supported for causal LMs; the decoder graph keeps the adapters unmerged")
    result = to_onnx_decoder(loaded.model, args.out)
    diffs = ", ".join(f"batch {b} seq {s} past {p}: {d:.2e}" for (b, s, p), d in result.max_abs_diff.items())
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s: a causal LM, so the KV "
          f"cache is an input and an output ({len(result.input_names) - 3} past tensors); onnxruntime vs PyTorch "
          f"max abs diff {diffs}; generate with aurora_fx.export.OnnxGenerator({str(result.path)!r})")
    return 0


def _export_peft(args: argparse.Namespace, loaded) -> int:
    from aurora_fx.export import to_peft

    calibration = _calibration(args.calibrate, loaded) if args.calibrate else None
    if args.mode == "fit" and calibration is None:
        raise ValueError("--mode fit needs --calibrate DATA (bbc, tweets, a folder or a CSV) to fit on")
    result = to_peft(loaded.model, args.out, mode=args.mode, calibration=calibration, rank=args.rank)
    print(result)
    print(f"wrote {args.out}/adapter_config.json and adapter_model.safetensors (load with "
          f"peft.PeftModel.from_pretrained(base, {args.out!r}) or aurora_fx.load_peft_lora)")
    return 0


def _calibration(data_spec: str, loaded, count: int = 64, batch_size: int = 8, max_length: int = 128) -> list:
    """``count`` texts of DATA as tokenized batches (model keyword inputs)."""
    from aurora_fx.data import load_text_data

    if loaded.tokenizer is None:
        raise ValueError("--calibrate needs a text model (minilm or a HF folder)")
    texts = list(load_text_data(data_spec).texts[:count])
    return [dict(loaded.tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                                  return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``aurora-fx``: one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="aurora-fx", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_sites, _add_train, _add_inspect, _add_export):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune MiniLM on BBC News with AuroRA, export ONNX, check it")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _add_sites(sub) -> None:
    p = sub.add_parser("sites", help="dry run: every linear-like site, and whether PATTERN matches it")
    p.add_argument("model", help="minilm | HF folder | timm:<name>")
    p.add_argument("--pattern", default=None, help="regex searched in site paths")
    p.add_argument("--task", choices=["classification", "encoder"], default="classification",
                   help="text models: the classifier `train` builds (default, same paths) or the bare encoder")
    p.add_argument("--all", action="store_true", help="also list untraceable modules without a linear-like weight")
    p.set_defaults(func=_cmd_sites)


def _add_train(sub) -> None:
    import aurora_fx.methods  # noqa: F401  (registers the built-in methods)
    from aurora_fx.registry import method_names

    p = sub.add_parser("train", help="fine-tune a sequence classifier and save the adapter checkpoint")
    p.add_argument("model", help="minilm | HF folder")
    p.add_argument("data", help="bbc | tweets | folder of <label>/*.txt | CSV with text,label columns")
    p.add_argument("--method", choices=method_names(), default="aurora")
    p.add_argument("--pattern", default="query|value")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--head", default="classifier", help="modules that also train (regex); default the new head")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--test-size", type=float, default=0.2, help="held-out count (>= 1) or fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print the adapter report of a checkpoint; --render draws it")
    p.add_argument("checkpoint")
    p.add_argument("--model", default=None, help="base model, if the checkpoint does not record it")
    p.add_argument("--site", default=None, help="also print (and render) this site's rewritten graph")
    p.add_argument("--render", default=None, help="FILE.svg or FILE.png")
    p.set_defaults(func=_cmd_inspect)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint on its base model to ONNX (verified in onnxruntime) "
                                      "or to a PEFT LoRA folder")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="FILE.onnx, or a folder with --format peft")
    p.add_argument("--format", choices=["onnx", "peft"], default="onnx")
    p.add_argument("--mode", choices=["exact", "static", "fit"], default=None,
                   help="--format peft: exact (LoRA, AROMA), static or fit (AuroRA)")
    p.add_argument("--calibrate", default=None, help="--mode fit: DATA whose first 64 texts calibrate the fit")
    p.add_argument("--rank", type=int, default=None, help="--mode fit: LoRA rank of the fitted map")
    p.add_argument("--model", default=None)
    p.add_argument("--merge", action="store_true", help="merge LoRA/AROMA into the base weights first")
    p.add_argument("--lossy", action="store_true", help="with --merge: allow AuroRA's lossy static merge")
    p.set_defaults(func=_cmd_export)


# The library's errors name Python arguments; on the command line the options are named instead.
_OPTIONS = ((re.compile(r"\blossy=True\b"), "--lossy"), (re.compile(r"\bmerge=True\b"), "--merge"),
            (re.compile(r"\bmode='(\w+)'"), r"--mode \1"), (re.compile(r"\bmode=\.\.\."), "--mode"),
            (re.compile(r"\brank=(\d+)"), r"--rank \1"), (re.compile(r"\bcalibration=\[[^\]]*\]"), "--calibrate DATA"))


def cli_words(message: str) -> str:
    """``message`` with the Python arguments it names written as this command's options."""
    for pattern, option in _OPTIONS:
        message = pattern.sub(option, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aurora-fx`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:  # user errors: one line, exit 2
        message = " ".join(str(exc).split()) if "\n" not in str(exc).strip() else str(exc).strip()
        print(f"aurora-fx: error: {cli_words(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
        print("aurora-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
