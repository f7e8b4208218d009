"""The edge install on a laptop: a wheel built from this tree, installed with only its `[edge]` extra into a fresh
venv (pip fetches the dependencies), gives a working `specbridge edge` and `edge serve` without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 900
# What an edge program imports: the API, the client, the HTTP server; none of it may pull torch.
IMPORT_CHECK = """
import importlib.util, sys
import specbridge
from edge_client.api import connect
from edge_client.openai_server import EdgeServeConfig, OpenAIEndpoint
assert callable(specbridge.connect)
assert "torch" not in sys.modules, "an edge module imported torch"
assert importlib.util.find_spec("torch") is None, "the edge install pulled torch"
print("edge ok")
"""


def _run(command: list[str], cwd: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _source_copy(destination: Path) -> Path:
    """The files git would commit (tracked or new, not ignored): building never writes into the shared tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_the_edge_extra_alone_is_a_working_edge_without_torch(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(source)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("specbridge-*.whl")
    _run([sys.executable, "-m", "venv", str(tmp_path / "venv")], tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[edge]"], tmp_path)

    # Outside the source tree, so that only the installed package can be imported.
    assert _run([str(python), "-c", IMPORT_CHECK], tmp_path).stdout.strip() == "edge ok"
    specbridge = tmp_path / "venv" / "bin" / "specbridge"
    assert "--draft" in _run([str(specbridge), "edge", "--help"], tmp_path).stdout
    assert "--api-key-file" in _run([str(specbridge), "edge", "serve", "--help"], tmp_path).stdout
    unavailable = subprocess.run([str(specbridge), "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert unavailable.returncode == 2 and "'serve' is not available in this install" in unavailable.stderr
    export = subprocess.run([str(specbridge), "export-draft", "--model", "m", "--out", "o"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 2 and "needs the 'torch' package" in export.stderr and "Traceback" not in export.stderr
