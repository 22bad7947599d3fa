"""A light client for the taming-server API (httpx, numpy and Pillow; no torch).

    from taming_client import TamingClient
    with TamingClient("http://localhost:8000") as client:
        gen = client.generate(label=7, seed=1)
        tokens = client.encode(gen.images)
        images = client.decode(tokens)
"""

from .client import DEFAULT_URL, AsyncTamingClient, TamingClient
from .protocol import GenerateParams
from .types import Generation, ModelInfo, ModelList, RowEvent, SamplingDefaults, TamingError

__version__ = "0.1.0"

__all__ = ["DEFAULT_URL", "AsyncTamingClient", "GenerateParams", "Generation", "ModelInfo", "ModelList",
           "RowEvent", "SamplingDefaults", "TamingClient", "TamingError"]
