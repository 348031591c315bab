"""docker/ agrees with the repository, since no image is built here.

hadolint lints the Dockerfiles; the rest are what a linter cannot know: the files they COPY
exist, the serve image installs only the torch-free ``serve`` extra, the pinned torch matches
pyproject.toml, every ``socialrec`` command line parses, and compose.yaml / haproxy.cfg point at
existing Dockerfiles and agree on the replicas and their ports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from socialrec.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def instructions(path: Path, keyword: str) -> list[str]:
    """Arguments of every ``keyword`` instruction (continuation lines joined, comments dropped)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [m.group(1) for m in re.finditer(rf"^{keyword}\s+(.*)$", text, re.MULTILINE)]


def pip_targets(path: Path) -> list[str]:
    """What the Dockerfile's RUN lines ``pip install`` (options dropped)."""
    targets = []
    for run in instructions(path, "RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                targets += [w for w in words[2:] if not w.startswith("-")]
    return targets


def parses(args: list[str]) -> None:
    """Fail unless ``socialrec ARGS`` is a valid command line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"socialrec {shlex.join(args)}: {err.getvalue()}")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (dev extra)")
def test_hadolint_finds_nothing() -> None:
    files = [str(p.relative_to(ROOT)) for p in DOCKERFILES]
    r = subprocess.run(
        ["hadolint", "--no-color", *files], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_complete_the_package(path: Path) -> None:
    ignored = [
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = set()
    for args in instructions(path, "COPY"):
        *sources, _dest = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in sources:
            src = src.rstrip("/")
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
            assert not any(fnmatch(src, p) for p in ignored), f"{path.name}: {src} is ignored"
            copied.add(src)
    # `pip install ./[...]` builds the package: it needs every folder package-dir maps.
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert needed <= copied, f"{path.name}: not copied: {sorted(needed - copied)}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_known_extras_and_the_pyproject_torch_pin(path: Path) -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    (torch_pin,) = [d for d in train if d.startswith("torch")]
    for target in pip_targets(path):
        if target.startswith("."):  # the project itself, "./[extra,...]"
            m = re.fullmatch(r"\./\[(.*)\]", target)
            assert m and set(m.group(1).split(",")) <= extras, f"{path.name}: {target}"
        else:
            assert target == torch_pin, f"{path.name}: {target}: only the project and {torch_pin}"


def test_the_serve_image_installs_only_the_serve_extra() -> None:
    assert pip_targets(DOCKER / "serve.Dockerfile") == ["./[serve]"]
    assert not any("torch" in d for d in PYPROJECT["project"]["optional-dependencies"]["serve"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_default_command_parses(path: Path) -> None:
    assert instructions(path, "ENTRYPOINT") == ['["socialrec"]']
    (cmd,) = instructions(path, "CMD")
    parses(json.loads(cmd))  # exec form


def test_docker_runs_only_socialrec_modules_and_existing_files() -> None:
    text = "\n".join(p.read_text() for p in [*DOCKERFILES, DOCKER / "compose.yaml"])
    for module in re.findall(r"python3?\s+-m\s+([\w.]+)", text):
        assert module.split(".")[0] in {"socialrec", "pip"}, f"python -m {module}"
        assert module == "pip" or importlib.util.find_spec(module), f"python -m {module}"
    for locustfile in re.findall(r"locust -f (\S+)", text):
        assert (ROOT / locustfile).is_file(), locustfile


def test_compose_builds_existing_dockerfiles_and_runs_real_commands() -> None:
    c = compose()
    services, volumes = c["services"], set(c["volumes"])
    used = set()
    for name, svc in services.items():
        if build := svc.get("build"):
            assert (DOCKER / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert (DOCKER / src).exists() if src.startswith(".") else src in volumes, vol
        if svc.get("image", "").startswith("socialrec-"):
            command = svc["command"]
            if svc.get("entrypoint", ["socialrec"]) == ["socialrec"]:
                lines = [command]
            else:  # a shell script: its `socialrec ...` commands
                lines = [shlex.split(c) for c in re.split(r"&&", command[0])]
                lines = [ln[1:] for ln in lines if ln[0] == "socialrec"]
            for args in lines:
                parses(args)
                used.add(args[0])
    assert {"train", "compress", "publish", "publish-bundle", "serve", "retrain"} <= used
    for name in ("serve-a", "serve-b"):
        assert services[name]["build"]["dockerfile"] == "docker/serve.Dockerfile"


def test_haproxy_routes_to_the_compose_replicas_on_their_ports() -> None:
    text = (DOCKER / "haproxy.cfg").read_text()
    services = compose()["services"]
    backends = set(re.findall(r"^  server (\S+) (\S+):(\d+) proto h2 check", text, re.M))
    replicas, ports = set(), set()
    for name, svc in services.items():
        cmd = svc.get("command", [])
        if cmd[:1] == ["serve"]:
            assert cmd[cmd.index("--host") + 1] == "0.0.0.0", name
            port = cmd[cmd.index("--port") + 1]
            replicas.add((name, name, port))  # the server's name is the service's host name
            ports |= {cmd[cmd.index(flag) + 1] for flag in ("--port", "--metrics-port")}
    assert replicas == backends and len(replicas) == 2
    (bind,) = re.findall(r"^  bind \S+:(\d+) proto h2$", text, re.M)
    assert f"{bind}:{bind}" in services["haproxy"]["ports"]
    mount = "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
    assert mount in services["haproxy"]["volumes"]
    exposed = set(instructions(DOCKER / "serve.Dockerfile", "EXPOSE")[0].split())
    assert ports <= exposed, f"serve.Dockerfile EXPOSE {exposed}, compose uses {ports}"
