"""Serving and export: putting a checkpoint where others can use it.

    api.py      an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine, with
                API keys and Prometheus metrics (needs the `serve` extra)
    export.py   the forward pass as an ONNX graph, checked against onnxruntime (the `export` extra)

Nothing is imported here: each module needs its own optional extra.
"""
