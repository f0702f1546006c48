"""`minillm export`: a checkpoint's forward pass as an ONNX file, checked against onnxruntime.

    minillm export out/shakespeare-char --onnx shakespeare-char.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm.weights.checkpoint import TOKENIZER_FILE, check_finite_forward, find_checkpoint, load_model
from minillm.model.config import ModelConfig, split_overrides
from minillm.serve.export import EXPORTERS, compare_with_onnxruntime, export_onnx


def cmd_export(args, overrides: list[str]) -> int:
    """Export a checkpoint's forward pass (idx -> logits) to ONNX with dynamic batch and sequence."""
    (changes,) = split_overrides(overrides, ModelConfig)
    # the readable attention exports to plain MatMul/Softmax; a Triton kernel cannot be exported
    changes.setdefault("attention", "naive")
    if changes["attention"] == "triton":
        raise ValueError("--attention=triton cannot be exported to ONNX; use naive or sdpa")
    folder = find_checkpoint(args.checkpoint)  # a checkpoint folder, or a run's newest complete one
    model, tokenizer, meta = load_model(folder, device="cpu", **changes)
    check_finite_forward(model, folder)
    info = export_onnx(model, args.onnx, exporter=args.exporter, opset=args.opset,
                       metadata={"minillm.config": json.dumps(model.cfg.to_dict()),
                                 "minillm.weights.checkpoint": str(Path(args.checkpoint).resolve())})
    print(f"wrote {info['path']}: {info['bytes'] / 1e6:.2f} MB in {info['seconds']:.1f} s "
          f"({info['exporter']} exporter); input idx (batch, seq<= {model.cfg.block_size}) int64 "
          f"-> logits (batch, seq, {model.cfg.vocab_size})")
    if args.verify:
        T = model.cfg.block_size
        diff = compare_with_onnxruntime(args.onnx, model, [(1, 1), (3, max(1, T // 2)), (2, T)])
        print(f"onnxruntime vs PyTorch at (B, T) = (1, 1), (3, {max(1, T // 2)}), (2, {T}): "
              f"max |logits difference| = {diff:.2e}")
        if diff > 1e-3:
            print("warning: the ONNX logits differ from PyTorch by more than 1e-3")
            return 1
    if tokenizer is not None:
        print(f"the tokenizer stays in {folder / TOKENIZER_FILE} "
              "(ONNX holds the model only)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX (dynamic batch and sequence axes)",
        description=cmd_export.__doc__ + " The ONNX graph takes idx (batch, seq) int64 token ids, "
        "seq up to block_size, and returns logits (batch, seq, vocab); there is no KV cache in it. "
        "Model options such as --attention=sdpa are --key=value (default: the readable 'naive' "
        "attention). After writing, the file is run in onnxruntime and compared with PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + config.json)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="dynamo: torch.export + onnxscript (supported, ~10 s); "
                        "torchscript: the older tracer (fast, deprecated upstream)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the file in onnxruntime and compare logits with PyTorch")
    p.set_defaults(func=cmd_export)
