"""specbridge: edge-cloud speculative decoding across different tokenizers.

The top-level package holds the CLI, the model zoo, the in-process speculative loop and the
benchmarks; `edge_client`, `cloud_verifier` and `shared` hold the two sides and what they share.

It also names the Python API (edge_client.api; its docstring has an example): `connect`, then
`Edge.generate`, `Edge.stream` and `Edge.stats`. The names load on first use, so `import
specbridge` stays light (no grpc, onnxruntime or torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "connect": "edge_client.api",
    "Edge": "edge_client.api",
    "Generation": "edge_client.api",
    "GenerationStream": "edge_client.api",
    "ClientResult": "edge_client.client",
    "EdgeClientError": "edge_client.client",
    "TextPiece": "edge_client.committed_text",
    "Origin": "edge_client.committed_text",
    "ChatMessage": "shared.wire",
    "FinishReason": "shared.wire",
    "DecodingConfig": "shared.decoding",
    "DecodeMode": "shared.decoding",
    "AcceptanceRule": "shared.decoding",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'specbridge' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
