"""`minillm export`: a checkpoint in the formats people deploy with: ONNX, a Hugging Face folder, GGUF,
and a LoRA run's adapter as a PEFT folder.

    minillm export out/shakespeare-char --onnx shakespeare-char.onnx
    minillm export out --format=hf --out=out-hf                  AutoModelForCausalLM / AutoTokenizer load it
    minillm export smollm2-135m-instruct --format=hf --out=smollm2-hf     (from GGUF: dequantized to fp32)
    minillm export out --format=gguf --type=q8_0 --out=model.gguf          llama.cpp / ollama load it
    minillm export out-finetune --format=peft --out=adapter-peft           PeftModel.from_pretrained loads it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm.weights.checkpoint import TOKENIZER_FILE, check_finite_forward, find_checkpoint, load_model
from minillm.model.config import ModelConfig, split_overrides
from minillm.serve.export import EXPORTERS, compare_with_onnxruntime, export_onnx

FORMATS = ("onnx", "hf", "gguf", "peft")


def cmd_export(args, overrides: list[str]) -> int:
    """Export a checkpoint: its forward pass to ONNX, the model and tokenizer as a Hugging Face folder or a
    GGUF file, or a LoRA fine-tune's adapter as a PEFT folder."""
    fmt = "onnx" if args.onnx else args.format
    args.type = getattr(args, "type", None)  # only there when given
    if fmt == "onnx" and not args.onnx:
        args.onnx = args.out
    if not (args.onnx if fmt == "onnx" else args.out):
        raise ValueError(f"--format={fmt} needs --out=" + ("FILE.gguf" if fmt == "gguf" else "OUT.onnx"
                                                             if fmt == "onnx" else "DIR"))
    if args.type is not None and fmt != "gguf":
        raise ValueError(f"--type applies to --format=gguf only (this is --format={fmt})")
    if fmt == "peft":
        return export_peft(args, overrides)
    if fmt == "gguf":  # the file type is checked before a model is loaded
        from minillm.weights.gguf_write import FILE_TYPES

        if (args.type or "f32") not in FILE_TYPES:
            raise ValueError(f"--type={args.type}: GGUF types minillm writes are {', '.join(FILE_TYPES)}")
    (changes,) = split_overrides(overrides, ModelConfig)
    if fmt == "onnx":
        # the readable attention exports to plain MatMul/Softmax; a Triton kernel cannot be exported
        changes.setdefault("attention", "naive")
        if changes["attention"] == "triton":
            raise ValueError("--attention=triton cannot be exported to ONNX; use naive or sdpa")
    folder = find_checkpoint(args.checkpoint)  # a checkpoint folder, or a run's newest complete one
    model, tokenizer, meta = load_model(folder, device="cpu", **changes)
    if fmt == "hf":
        return export_hf_folder(args, model, tokenizer, folder)
    if fmt == "gguf":
        return export_gguf_file(args, model, tokenizer, folder)
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


def export_hf_folder(args, model, tokenizer, folder) -> int:
    from minillm.weights.huggingface_write import export_hf, hf_model_type

    hf_model_type(getattr(model, "cfg", None))  # a model HF cannot hold: one line before the forward check
    check_finite_forward(model, folder)
    info = export_hf(model, tokenizer, args.out)
    print(f"wrote {info['path']}/ ({info['model_type']}, {info['parameters']:,} parameters, fp32): "
          f"{', '.join(info['files'])}, {info['bytes'] / 1e6:.2f} MB")
    if tokenizer is None:
        print(f"warning: {folder} has no tokenizer; the folder holds the model only")
    print(f"load it: AutoModelForCausalLM.from_pretrained({info['path']!r}), AutoTokenizer.from_pretrained(...)")
    return 0


def export_gguf_file(args, model, tokenizer, folder) -> int:
    from minillm.weights.gguf_write import write_gguf

    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer: a GGUF file carries its tokenizer, so export needs one")
    check_finite_forward(model, folder)
    path = write_gguf(model, tokenizer, args.out, file_type=args.type or "f32")
    print(f"wrote {path}: {Path(path).stat().st_size / 1e6:.2f} MB ({args.type or 'f32'})")
    return 0


def export_peft(args, overrides: list[str]) -> int:
    from minillm.cli.options import reject_unknown
    from minillm.finetune.peft_format import peft_from_run

    reject_unknown(args, overrides, "export --format=peft")
    info = peft_from_run(args.checkpoint, args.out)
    print(f"wrote {info['path']}/: adapter_config.json + adapter_model.safetensors (LoRA rank {info['rank']} "
          f"on {', '.join(info['targets'])}; {info['tensors']} tensors). Load it on the Hugging Face export of "
          f"the base ({info['base']}): PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_DIR), "
          f"{info['path']!r})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint: ONNX, a Hugging Face folder, GGUF, or a LoRA run's PEFT adapter",
        description=cmd_export.__doc__ + " onnx: idx (batch, seq) int64 -> logits (batch, seq, vocab), seq up "
        "to block_size, no KV cache; run in onnxruntime and compared with PyTorch after writing. Model options "
        "such as --attention=sdpa are --key=value (ONNX default: the readable 'naive' attention). hf: "
        "config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template), "
        "generation_config.json, as GPT-2 (LayerNorm/GELU models) or Llama/Qwen2/Mistral (RoPE/RMSNorm/SwiGLU); "
        "a model from GGUF is dequantized to fp32. gguf: the weight matrices stored as --type. peft: "
        "CHECKPOINT is a `minillm finetune --lora_rank=...` run (its adapter/); load it on the hf export of "
        "the base. A model or tokenizer a format cannot hold is refused in one line (exit 2).",
        epilog="examples: minillm export out --onnx out.onnx | minillm export out --format=hf --out=out-hf | "
        "minillm export smollm2-135m-instruct --format=hf --out=smollm2-hf | minillm export "
        "smollm2-135m-instruct --format=gguf --type=q8_0 --out=smollm2.q8_0.gguf | minillm export "
        "out-finetune --format=peft --out=out-peft",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint or run folder, Hugging Face folder, .gguf file or pulled model "
                   "name; for --format=peft, a LoRA fine-tune's run folder")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="what to write")
    p.add_argument("--out", default=None, metavar="PATH", help="where: a folder (hf, peft) or a file (gguf, onnx)")
    p.add_argument("--type", default=argparse.SUPPRESS, metavar="TYPE",  # (absent unless given: gguf only)
                   help="gguf only: how weight matrices are stored, f32 | f16 | q8_0 | q4_0 | q4_1 (default f32)")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx", help="where to write the ONNX file "
                   "(the same as --format=onnx --out=OUT.onnx)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="onnx: dynamo: torch.export + onnxscript (supported, ~10 s); "
                        "torchscript: the older tracer (fast, deprecated upstream)")
    p.add_argument("--opset", type=int, default=None, help="onnx: opset (default: the exporter's)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="onnx: run the file in onnxruntime and compare logits with PyTorch")
    p.set_defaults(func=cmd_export)
