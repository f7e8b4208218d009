"""The deployment artefacts under deploy/, checked as far as this machine can without Docker or a cluster.

Kubernetes manifests validate against the API schemas (kubernetes-validate, offline); every `specbridge` command
that an image, the compose file, a manifest or the systemd unit runs uses flags that `specbridge ... --help` lists
and model paths where `specbridge models prepare` puts the default pair; the images install torch from the index
their variant needs; the names that tie nginx, compose, the HPA and the metrics together agree; and the real nginx
binary accepts the shipped config.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cloud_verifier.metrics import VerifierMetrics
from shared.wire import ROUTING_KEY
from specbridge import cli
from specbridge.model_zoo import DEFAULT_PAIR, REAL_PAIRS
from tests.deploy.nginx_balancer import SITE_CONF, nginx_command, write_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
SYSTEMD_UNIT = DEPLOY / "specbridge-verifier.service"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
MODELS_DIR = "/models"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _manifest(kind: str) -> dict:
    (found,) = [document for path in MANIFESTS for document in _documents(path) if document["kind"] == kind]
    return found


def _verifier_container() -> dict:
    (container,) = _manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its text) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (after the FROM)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, text in _dockerfile_instructions():
        if instruction == "FROM":
            current = stages.setdefault(text.split(" AS ")[-1].strip(), [("FROM", text)])
        else:
            current.append((instruction, text))
    return stages


def _command_words(instruction_text: str) -> list[str]:
    """A CMD or RUN's words, in exec (JSON) or shell form."""
    if instruction_text.startswith("["):
        return yaml.safe_load(instruction_text)
    return shlex.split(instruction_text)


def _specbridge_commands() -> dict[str, list[str]]:
    """Every `specbridge ...` command line the artefacts run, by where it is, without the program name."""
    commands: dict[str, list[str]] = {}
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if "command" in service:
            commands[f"compose {name}"] = service["command"]
    pod = _manifest("Deployment")["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        commands[f"k8s {container['name']}"] = container["command"]
    for stage, instructions in _dockerfile_stages().items():
        for instruction, text in instructions:
            if instruction in ("CMD", "RUN") and "specbridge " in text and "pip install" not in text:
                commands[f"Dockerfile {stage}"] = _command_words(text)
    exec_start = re.search(r"^ExecStart=(.*?)$", re.sub(r"\\\n", " ", SYSTEMD_UNIT.read_text()), re.MULTILINE)
    commands["systemd"] = shlex.split(exec_start[1])
    found = {}
    for where, words in commands.items():
        if "exec" in words:
            words = words[words.index("exec") + 1 :]
        assert Path(words[0]).name == "specbridge", f"{where} runs {words[0]!r}, not specbridge"
        found[where] = words[1:]
    return found


@functools.cache
def _help_flags(*subcommand: str) -> frozenset[str]:
    """The flags `specbridge SUBCOMMAND --help` lists (its own parser, run in this process: the imports are paid)."""
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as exited:
        cli.main([*subcommand, "--help"])
    assert exited.value.code == 0, f"specbridge {' '.join(subcommand)} --help exited with {exited.value.code}"
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", shown.getvalue()))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_kubernetes_manifests_match_the_api_schemas(path: Path) -> None:
    for document in _documents(path):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("where", sorted(_specbridge_commands()))
def test_every_specbridge_command_uses_flags_the_cli_has(where: str) -> None:
    words = _specbridge_commands()[where]
    subcommand = tuple(word for word in words[: next((i for i, w in enumerate(words) if w.startswith("-")), len(words))])
    flags = {word.split("=")[0] for word in words if word.startswith("--")}
    unknown = flags - _help_flags(*subcommand)
    assert not unknown, f"{where}: `specbridge {' '.join(subcommand)}` has no {sorted(unknown)}"


def test_model_paths_are_where_models_prepare_puts_the_default_pair() -> None:
    draft, target = REAL_PAIRS[DEFAULT_PAIR]
    expected = {"--target": f"{MODELS_DIR}/{target.key}/hf", "--draft": f"{MODELS_DIR}/{draft.key}/onnx",
                "--out": MODELS_DIR}
    checked = 0
    for where, words in _specbridge_commands().items():
        for flag, value in itertools.pairwise(words):
            if flag in expected and where != "systemd":  # the unit names a host path of the operator's choosing
                assert value == expected[flag], f"{where}: {flag} {value}"
                checked += 1
    assert checked >= 6


def test_images_install_torch_from_their_variants_index_at_the_makefiles_pin() -> None:
    stages = _dockerfile_stages()
    assert stages["verifier-base-cuda"][0][1].startswith("nvidia/cuda:")
    environment = {stage: " ".join(text for instruction, text in stages[stage] if instruction == "ENV")
                   for stage in ("verifier-base-cuda", "verifier-base-cpu")}
    assert f"TORCH_INDEX_URL={CPU_TORCH_INDEX} " in environment["verifier-base-cpu"] + " "
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in environment["verifier-base-cuda"]
    pinned = re.search(r"torch==([\d.]+)", (REPO_ROOT / "Makefile").read_text())[1]
    verifier = " ".join(text for _, text in stages["verifier"])
    assert f"TORCH_VERSION={pinned}" in verifier
    assert re.search(r'pip install [^&]*"torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', verifier)
    assert "torch" not in " ".join(text for _, text in stages["edge"]), "the edge image must not pull torch"


def test_images_install_extras_the_project_declares() -> None:
    declared = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installed = {extra for _, text in _dockerfile_instructions() for group in re.findall(r'/src\[([\w,]+)\]', text)
                 for extra in group.split(",")}
    assert {"edge", "verifier", "models"} <= installed <= declared


def test_compose_builds_real_stages_and_wires_nginx_to_its_verifiers() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    stages = _dockerfile_stages()
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert build["target"] in stages, name
            if "VARIANT" in build.get("args", {}):
                assert f"verifier-base-{build['args']['VARIANT']}" in stages, name
    # nginx's upstream names the compose services that run `serve`, at the port they listen on.
    served = {f"{name}:{words[words.index('--port') + 1]}" for name, service in services.items()
              if (words := service.get("command", []))[1:2] == ["serve"]}
    upstream = set(re.findall(r"^\s*server (\S+:\d+)", SITE_CONF.read_text(), re.MULTILINE))
    assert len(served) == 2 and upstream == served
    (mount,) = services["nginx"]["volumes"]
    assert (COMPOSE.parent / mount.split(":")[0]).resolve() == SITE_CONF
    edge_words = services["edge"]["command"]
    assert edge_words[edge_words.index("--server") + 1] == f"nginx:{services['nginx']['ports'][0].split(':')[-1]}"


def test_deployment_requests_a_gpu_probes_grpc_health_and_is_scraped_where_metrics_are_served() -> None:
    container = _verifier_container()
    command = container["command"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == int(command[command.index("--port") + 1])
    assert ports["metrics"] == int(command[command.index("--metrics-port") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    annotations = _manifest("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert _manifest("Service")["spec"]["selector"] == _manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]


def test_hpa_scales_on_what_the_adapter_serves_from_a_metric_the_verifier_exports() -> None:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    (metric,) = _manifest("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"[\w:]+", rule["seriesQuery"])[0]
    assert re.fullmatch(rule["name"]["matches"], series)
    exported = {sample.name for family in VerifierMetrics().registry.collect() for sample in family.samples}
    assert series in exported, f"the verifier exports no {series}"


def test_nginx_hashes_the_routing_key_the_edge_sends() -> None:
    assert f"hash $http_{ROUTING_KEY.replace('-', '_')} consistent;" in SITE_CONF.read_text()


def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["127.0.0.1:50061", "127.0.0.1:50062"], 50060)
    completed = subprocess.run(nginx_command(tmp_path, config, "-t"), check=False, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stderr
    assert "test is successful" in completed.stderr
