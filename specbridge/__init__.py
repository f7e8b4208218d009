"""specbridge: edge-cloud speculative decoding across different tokenizers.

The top-level package holds the CLI, the model zoo, the in-process speculative loop and the
benchmarks; `edge_client`, `cloud_verifier` and `shared` hold the two sides and what they share.
"""

__version__ = "0.1.0"
