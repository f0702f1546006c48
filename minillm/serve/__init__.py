"""Serving and export: putting a checkpoint where others can use it.

    protocol.py what clients send: request bodies read safely, validated strictly, OpenAI's error shape
    metrics.py  Prometheus metrics (totals, and per model and version) and structured JSON access logs
    registry.py models and their versions: load, warm up, switch without downtime, roll back
    chat.py     chat messages → one prompt in the model's template (instruction-tuned or plain)
    auth.py     API keys: `Authorization: Bearer KEY`, compared in constant time
    limits.py   what keeps one client from slowing the others: header and body timeouts, a
                connection cap, a parse budget for large bodies, rate-limited logs
    handlers.py the OpenAI endpoints, one named function per endpoint and per phase of a request
    admin.py    the model update service's endpoints (/admin/*): switch a model's version, roll back
    api.py      build_app: an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching
                engine, wiring the handlers above to their paths (needs the `serve` extra)
    export.py   the forward pass as an ONNX graph, checked against onnxruntime (the `export` extra)

Nothing is imported here: each module needs its own optional extra.
"""
