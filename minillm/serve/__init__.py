"""Serving and export: putting a checkpoint where others can use it.

    protocol.py what clients send: request bodies read safely, validated strictly, OpenAI's error shape
    metrics.py  Prometheus metrics (totals, and per model and version) and structured JSON access logs
    registry.py models and their versions: load, warm up, switch without downtime, roll back
    chat.py     chat messages → one prompt in the model's template (instruction-tuned or plain)
    api.py      an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine, with
                API keys (needs the `serve` extra)
    export.py   the forward pass as an ONNX graph, checked against onnxruntime (the `export` extra)

Nothing is imported here: each module needs its own optional extra.
"""
