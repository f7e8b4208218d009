"""The edge imports and runs the draft without torch or transformers installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.edge_client.conftest import TinyDraft

# A None entry in sys.modules makes any `import torch` raise ImportError, as on an edge install.
EDGE_SCRIPT = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
from edge_client.draft_runtime import DraftRuntime
from edge_client.sampling import sample_categorical, softmax, top_k

runtime = DraftRuntime.load(sys.argv[1], variant="int8")
probs = softmax(runtime.feed([3, 4, 5])[-1], 0.8)
ids, top_probs = top_k(probs, 4)
runtime.feed([int(ids[sample_categorical(top_probs, np.random.default_rng(0))])])
print(runtime.num_cached)
"""


def test_edge_modules_run_without_torch(gpt2_draft: TinyDraft) -> None:
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", EDGE_SCRIPT, str(gpt2_draft.onnx_dir)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


def test_the_edge_api_cli_and_http_server_import_without_torch() -> None:
    script = ("import sys\nsys.modules['torch'] = None\n"
              "import specbridge, edge_client.api, edge_client.cli, edge_client.openai_server, edge_client.launcher\n"
              "assert callable(specbridge.connect)\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
