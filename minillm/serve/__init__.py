"""Serving and export: putting a checkpoint where others can use it.

    protocol.py what clients send: request bodies read safely, validated strictly, OpenAI's error shape
    metrics.py  Prometheus metrics in the text format, and the middleware that counts every response
    api.py      an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine, with
                API keys (needs the `serve` extra)
    export.py   the forward pass as an ONNX graph, checked against onnxruntime (the `export` extra)

Nothing is imported here: each module needs its own optional extra.
"""
