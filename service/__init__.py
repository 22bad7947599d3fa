"""The inference service: FastAPI app, batching engine, metrics. Run it with `python -m service`.

`service/` imports `models/`, never `training/`.
"""

__version__ = "0.1.0"
