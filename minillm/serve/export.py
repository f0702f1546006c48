"""Export a checkpoint's forward pass (token ids -> logits) to ONNX, with dynamic batch and sequence.

ONNX is a portable graph format: onnxruntime, TensorRT, OpenVINO, browsers (onnxruntime-web) and
phones run it without Python or PyTorch. Exporting means tracing the model once and writing every
operation it performed as a node of a graph; "dynamic axes" mark which input sizes may change, so one
file serves any batch size B and any sequence length 1 <= T <= block_size.

Two exporters ship with PyTorch, and both are offered by an explicit switch (`--exporter`):

    dynamo       torch.export captures the graph (symbolic shapes B and T are checked while tracing:
                 a Python `if` on T that would bake in one length is an error, not a silent bug),
                 then onnxscript translates it. The supported path since PyTorch 2.5; the default.
                 It costs ~10 s of fixed overhead even for a tiny model.
    torchscript  the older tracer (torch.jit.trace) with `dynamic_axes`. Sub-second, but it only
                 records the shapes it saw and warns where it had to guess; deprecated upstream.

Both produce the same logits here (tests/test_export.py runs each in onnxruntime at two (B, T)).
Only the forward is exported: no KV cache, so generating with the ONNX file re-runs the prefix.

    minillm export out/shakespeare --onnx shakespeare.onnx
    python -c "import onnxruntime as ort; s = ort.InferenceSession('shakespeare.onnx'); ..."
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

EXPORTERS = ("dynamo", "torchscript")


class LogitsOnly(nn.Module):
    """Wrap a minillm model so its graph is idx (B, T) int64 -> logits (B, T, V): no loss, no tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(idx)
        return logits  # (B, T, V)


def _require(module: str, extra: str = "export"):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module}: pip install 'minillm[{extra}]' "
                          f"(onnx, onnxruntime, onnxscript). Import failed with: {e}") from e


def export_onnx(model: nn.Module, out_path: str | Path, exporter: str = "dynamo",
                opset: int | None = None, metadata: dict | None = None) -> dict:
    """Write `model`'s forward as ONNX to `out_path`; returns {"seconds", "bytes", "exporter", ...}.

    The example input is (2, min(8, block_size)): neither dimension is 1, because torch.export
    specialises sizes 0 and 1 (a size-1 dim could be broadcast, so it cannot stand for "any").
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if model.cfg.block_size < 2:
        raise ValueError("ONNX export traces with T=2 or more; block_size must be at least 2")
    _require("onnx")
    cfg = model.cfg
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).eval()  # eval: dropout off, so the graph is the inference function
    example = torch.randint(0, cfg.vocab_size, (2, min(8, cfg.block_size)),
                            device=next(model.parameters()).device)  # (B, T)
    t0 = time.perf_counter()
    if exporter == "dynamo":
        _require("onnxscript")
        batch = torch.export.Dim("batch", min=1)
        seq = torch.export.Dim("seq", min=1, max=cfg.block_size)  # positions exist only up to block_size
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset,
                                    verbose=False, input_names=["idx"], output_names=["logits"],
                                    dynamic_shapes={"idx": {0: batch, 1: seq}})
        if metadata:  # key/value strings any ONNX consumer can read (e.g. Netron shows them)
            program.model.metadata_props.update({k: str(v) for k, v in metadata.items()})
        # external_data=None: weights inline (one file) unless the model passes protobuf's 2 GB limit
        program.save(str(out_path), external_data=None)
    else:
        torch.onnx.export(wrapper, (example,), str(out_path), dynamo=False, opset_version=opset or 17,
                          input_names=["idx"], output_names=["logits"],
                          dynamic_axes={"idx": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
        if metadata:
            import onnx
            proto = onnx.load(str(out_path))
            for k, v in metadata.items():
                proto.metadata_props.add(key=k, value=str(v))
            onnx.save(proto, str(out_path))
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out_path.parent.glob(out_path.name + "*"))  # + any .data file
    return {"path": str(out_path), "exporter": exporter, "seconds": seconds, "bytes": size}


@torch.no_grad()
def compare_with_onnxruntime(onnx_path: str | Path, model: nn.Module,
                             shapes: list[tuple[int, int]], seed: int = 0) -> float:
    """Run the ONNX file in onnxruntime and the model in PyTorch on random ids of each (B, T) shape;
    return the largest absolute difference of the logits seen."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for B, T in shapes:
        idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)  # (B, T)
        (ort_logits,) = session.run(["logits"], {"idx": idx.numpy()})  # (B, T, V)
        ref, _ = model(idx.to(next(model.parameters()).device))  # (B, T, V)
        ref = ref.float().cpu()
        worst = max(worst, float((torch.from_numpy(ort_logits) - ref).abs().max()))
    return worst
