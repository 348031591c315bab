"""The Dockerfiles in docker/ agree with the repository, since no image is built here.

Each ``docker/*.Dockerfile`` is parsed (build context: the repository root) and checked:

* every COPY/ADD source exists in the repository and is not excluded by ``.dockerignore``;
* a stage that pip-installs the project from a local path has copied ``pyproject.toml``, its
  readme and every package directory into that path;
* every ``socialrec SUBCOMMAND`` run by RUN, ENTRYPOINT or CMD names a real subcommand of
  ``socialrec.cli.build_parser()``, and the image's default command parses;
* every pip install names only extras that pyproject.toml defines, and pins that agree with it.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from socialrec.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
PROJECT_NAME = canonicalize_name(PYPROJECT["project"]["name"])

# pip install options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--platform",
    "--python-version", "--implementation", "--abi", "--src", "--upgrade-strategy",
    "--progress-bar", "--root-user-action", "--report", "--config-settings", "-C",
    "--global-option", "--no-binary", "--only-binary", "--trusted-host", "--cache-dir",
    "--timeout", "--retries", "--proxy", "--cert", "--client-cert", "--log", "--exists-action",
}  # fmt: skip
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "\n"}


# --------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def where(self, path: Path) -> str:
        return f"{path.relative_to(REPO_ROOT)}:{self.line}: {self.keyword} {self.args}"


@dataclass
class Stage:
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions grouped by stage; comments dropped, backslash continuations joined."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) vanish, even inside a continuation
        if not pending:
            start = lineno
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).strip().partition(" ")
        pending = []
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage())
        assert stages, f"{path}:{start}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(start, keyword, " ".join(args.split())))
    assert not pending, f"{path}: file ends inside a line continuation"
    return stages


def exec_form(args: str) -> list[str] | None:
    """The argv of a JSON (exec) form, or None for shell form."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
        return value
    return None


def simple_commands(args: str) -> list[list[str]]:
    """The simple commands of an instruction: argv lists, leading VAR=value words dropped."""
    argv = exec_form(args)
    if argv is not None:
        if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["bash", "-c"]) and len(argv) == 3:
            return simple_commands(argv[2])
        return [argv]
    lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            commands.append(current)
            current = []
        elif current or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """COPY/ADD ``--flag=value`` options and the remaining words (sources..., dest)."""
    words = exec_form(args) or shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


# --------------------------------------------------------------------------- .dockerignore


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern syntax (Go filepath.Match plus ``**``) as a regex."""
    pattern = posixpath.normpath(pattern.strip().lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    path = REPO_ROOT / ".dockerignore"
    if not path.exists():
        return []
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _ignore_regex(line[1:] if negated else line)))
    return rules


IGNORE_RULES = _ignore_rules()


def dockerignored(rel: str) -> bool:
    """Whether a context path is excluded: the last rule matching it or a parent decides."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in IGNORE_RULES:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


# --------------------------------------------------------------------------- helpers


def socialrec_subcommands() -> set[str]:
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1, "socialrec.cli.build_parser() should have one subparsers group"
    return set(subparsers[0].choices)


def socialrec_invocations(argv: list[str]) -> list[str] | None:
    """The arguments after ``socialrec`` when argv runs the socialrec CLI, else None."""
    if argv and posixpath.basename(argv[0]) == "socialrec":
        return argv[1:]
    if len(argv) >= 3 and argv[0].startswith("python") and argv[1:3] == ["-m", "socialrec.cli"]:
        return argv[3:]
    return None


def pip_install_targets(argv: list[str]) -> list[str] | None:
    """The requirement words of a ``pip install`` command (with -e values), else None."""
    if argv and re.fullmatch(r"pip3?(\.\d+)?", posixpath.basename(argv[0])):
        rest = argv[1:]
    elif len(argv) >= 3 and argv[0].startswith("python") and argv[1:3] == ["-m", "pip"]:
        rest = argv[3:]
    else:
        return None
    if not rest or rest[0] != "install":
        return None
    targets, words = [], iter(rest[1:])
    for word in words:
        if word in ("-e", "--editable"):
            targets.append(next(words))
        elif word.startswith("--editable="):
            targets.append(word.partition("=")[2])
        elif word in PIP_VALUE_OPTIONS:
            next(words)
        elif not word.startswith("-"):
            targets.append(word)
    return targets


def pyproject_pins() -> dict[str, set[str]]:
    """Exact pins (``name==version``) anywhere in pyproject's dependencies and extras."""
    deps = list(PYPROJECT["project"].get("dependencies", []))
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        deps.extend(extra)
    pins: dict[str, set[str]] = {}
    for dep in deps:
        req = Requirement(dep)
        for spec in req.specifier:
            if spec.operator == "==":
                pins.setdefault(canonicalize_name(req.name), set()).add(spec.version)
    return pins


def package_dirs() -> list[str]:
    """Top-level package directories that ``[tool.setuptools.packages.find]`` includes."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        d.name
        for d in REPO_ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in include)
    )


# --------------------------------------------------------------------------- tests


def test_there_are_dockerfiles() -> None:
    assert DOCKERFILES, "no docker/*.Dockerfile found"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_dockerignored(path: Path) -> None:
    checked = 0
    for stage in parse_dockerfile(path):
        for ins in stage.instructions:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            flags, words = split_flags(ins.args)
            assert len(words) >= 2, ins.where(path)
            if "from" in flags:
                continue  # copied from another stage or image, not from the context
            for src in words[:-1]:
                if ins.keyword == "ADD" and re.match(r"[a-z]+://", src):
                    continue
                rel = posixpath.normpath(src.lstrip("/"))
                assert not rel.startswith(".."), f"{ins.where(path)}: {src} leaves the context"
                matches = list(REPO_ROOT.glob(rel)) if any(c in rel for c in "*?[") else []
                assert matches or (REPO_ROOT / rel).exists(), f"{ins.where(path)}: no {src}"
                assert rel == "." or not dockerignored(rel), (
                    f"{ins.where(path)}: {src} is excluded by .dockerignore"
                )
                is_package_dir = rel != "." and (REPO_ROOT / rel).is_dir()
                for py in (REPO_ROOT / rel).rglob("*.py") if is_package_dir else []:
                    py_rel = py.relative_to(REPO_ROOT).as_posix()
                    assert "__pycache__" in py_rel or not dockerignored(py_rel), (
                        f"{ins.where(path)}: {py_rel} is excluded by .dockerignore"
                    )
                checked += 1
    assert checked, f"{path.name}: no COPY from the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_local_installs_have_the_whole_project(path: Path) -> None:
    """``pip install .[extra]`` needs pyproject.toml, the readme and every package copied in."""
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], *package_dirs()]
    for stage in parse_dockerfile(path):
        workdir, copied = "/", set()
        for ins in stage.instructions:
            if ins.keyword == "WORKDIR":
                workdir = posixpath.join(workdir, ins.args)
            elif ins.keyword in ("COPY", "ADD"):
                flags, words = split_flags(ins.args)
                if "from" in flags:
                    continue
                *sources, dest = words
                dest = posixpath.join(workdir, dest)
                for src in sources:
                    rel = posixpath.normpath(src)
                    if rel == "." or (REPO_ROOT / rel).is_dir():
                        # A directory's contents land in dest.
                        copied.update(
                            posixpath.normpath(posixpath.join(dest, p.name))
                            for p in (REPO_ROOT / rel).iterdir()
                        )
                        copied.add(posixpath.normpath(dest))
                    elif dest.endswith("/") or len(sources) > 1 or words[-1] in (".", "./"):
                        copied.add(
                            posixpath.normpath(posixpath.join(dest, posixpath.basename(rel)))
                        )
                    else:
                        copied.add(posixpath.normpath(dest))
            elif ins.keyword == "RUN":
                for argv in simple_commands(ins.args):
                    for target in pip_install_targets(argv) or []:
                        local = re.sub(r"\[.*\]$", "", target)
                        if not (local.startswith(".") or local.startswith("/")):
                            continue
                        root = posixpath.normpath(posixpath.join(workdir, local))
                        missing = [n for n in needed if posixpath.join(root, n) not in copied]
                        assert not missing, f"{ins.where(path)}: not copied into {root}: {missing}"


def _socialrec_runs(path: Path) -> list[tuple[Instruction, list[str]]]:
    """(instruction, arguments after socialrec) for each RUN and each stage's default command."""
    runs = []
    for stage in parse_dockerfile(path):
        entrypoint: Instruction | None = None
        cmd: Instruction | None = None
        for ins in stage.instructions:
            if ins.keyword == "RUN":
                for argv in simple_commands(ins.args):
                    args = socialrec_invocations(argv)
                    if args is not None:
                        runs.append((ins, args))
            elif ins.keyword == "ENTRYPOINT":
                entrypoint, cmd = ins, None  # a new ENTRYPOINT drops an inherited CMD
            elif ins.keyword == "CMD":
                cmd = ins
        # The container runs ENTRYPOINT + CMD when ENTRYPOINT is exec form, else one of them.
        if entrypoint is not None:
            argv = exec_form(entrypoint.args)
            if argv is None:
                commands = simple_commands(entrypoint.args)
            else:
                cmd_argv = (exec_form(cmd.args) or shlex.split(cmd.args)) if cmd else []
                commands = [argv + cmd_argv]
        else:
            commands = simple_commands(cmd.args) if cmd else []
        for argv in commands:
            args = socialrec_invocations(argv)
            if args is not None:
                runs.append((cmd or entrypoint, args))
    return runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_socialrec_commands_are_real_subcommands(path: Path) -> None:
    subcommands = socialrec_subcommands()
    for ins, args in _socialrec_runs(path):
        assert args, f"{ins.where(path)}: socialrec without a subcommand"
        assert args[0] in subcommands, (
            f"{ins.where(path)}: `socialrec {args[0]}` is not one of {sorted(subcommands)}"
        )
        if any("$" in a for a in args):
            continue  # shell variables: only the subcommand can be checked
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
            build_parser().parse_args(args)
        assert not stderr.getvalue(), f"{ins.where(path)}: {stderr.getvalue()}"


def test_the_pipeline_image_runs_socialrec_train() -> None:
    runs = _socialrec_runs(REPO_ROOT / "docker" / "pipeline.Dockerfile")
    assert [args[0] for _, args in runs] == ["train"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_name_defined_extras_and_agreeing_pins(path: Path) -> None:
    pins = pyproject_pins()
    installs = 0
    for stage in parse_dockerfile(path):
        for ins in stage.instructions:
            if ins.keyword != "RUN":
                continue
            for argv in simple_commands(ins.args):
                for target in pip_install_targets(argv) or []:
                    installs += 1
                    where = f"{ins.where(path)}: {target}"
                    local = re.fullmatch(r"(?P<path>[./][^\[]*)(?:\[(?P<extras>[^\]]*)\])?", target)
                    if local:
                        extras = {
                            e.strip() for e in (local["extras"] or "").split(",") if e.strip()
                        }
                        assert extras <= EXTRAS, f"{where}: unknown extras {extras - EXTRAS}"
                        continue
                    try:
                        req = Requirement(target)
                    except InvalidRequirement as e:
                        pytest.fail(f"{where}: {e}")
                    name = canonicalize_name(req.name)
                    if name == PROJECT_NAME:
                        assert req.extras <= EXTRAS, (
                            f"{where}: unknown extras {req.extras - EXTRAS}"
                        )
                    for spec in req.specifier:
                        if spec.operator == "==" and name in pins:
                            assert spec.version in pins[name], (
                                f"{where}: pyproject.toml pins {name}=={sorted(pins[name])}"
                            )
    assert installs, f"{path.name}: no pip install found"


# --------------------------------------------------------------------------- the parser itself


def test_parser_handles_continuations_comments_and_shell_operators(tmp_path: Path) -> None:
    f = tmp_path / "x.Dockerfile"
    f.write_text(
        "# syntax=docker/dockerfile:1\nFROM python:3.11-slim AS base\n"
        "RUN A=1 pip install 'torch==2.13.0' \\\n    # a comment inside\n"
        '    && python -m pip install -e ".[dev,train]" --index-url https://x/simple\n'
        'FROM base\nENTRYPOINT ["socialrec"]\nCMD ["split", "--export", "/out"]\n'
    )
    stages = parse_dockerfile(f)
    assert [len(s.instructions) for s in stages] == [2, 3]
    run = stages[0].instructions[1]
    assert run.line == 3
    cmds = simple_commands(run.args)
    assert [pip_install_targets(c) for c in cmds] == [["torch==2.13.0"], [".[dev,train]"]]
    assert socialrec_invocations(["/usr/local/bin/socialrec", "train"]) == ["train"]
    assert socialrec_invocations(["pip", "show", "socialrec"]) is None
    assert dockerignored("runs/lastfm/report.json") and dockerignored("training/__pycache__")
    assert not dockerignored("training/train.py")


# --------------------------------------------------------------------------- compose + envoy

COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
SHELLS = {"sh", "bash"}


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")  # in the dev extra
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _image_entrypoints() -> dict[str, list[str]]:
    """Compose image name -> the ENTRYPOINT (exec form) of the Dockerfile that builds it."""
    out = {}
    for name, svc in _compose()["services"].items():
        build = svc.get("build")
        if not build or "image" not in svc:
            continue
        stages = parse_dockerfile(COMPOSE.parent / build["context"] / build["dockerfile"])
        entry = [i for i in stages[-1].instructions if i.keyword == "ENTRYPOINT"]
        out[svc["image"]] = exec_form(entry[-1].args) if entry else []
        assert out[svc["image"]] is not None, f"{name}: use an exec-form ENTRYPOINT"
    return out


def _service_argvs(svc: dict, entrypoints: dict[str, list[str]]) -> list[list[str]]:
    """The simple commands a service runs: its entrypoint + command, shell scripts split."""
    entry = svc.get("entrypoint", entrypoints.get(svc.get("image", ""), []))
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = svc.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else list(command)
    argv = entry + command
    if argv and posixpath.basename(argv[0]) in SHELLS:
        script = argv[-1].replace("$$", "$")  # compose escapes $ as $$
        return [c[1:] if c[0] == "exec" else c for c in simple_commands(script)]
    return [argv] if argv else []


def test_compose_services_and_wiring() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"redis", "pipeline", "serve-a", "serve-b", "envoy", "retrain", "locust"} <= set(
        services
    )
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: no {source}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO_ROOT, f"{name}: build context should be the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        if "image" in svc and not build and svc["image"].startswith("socialrec-"):
            built = {s["image"] for s in services.values() if s.get("build")}
            assert svc["image"] in built, f"{name}: image {svc['image']} is built by no service"
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert set(services["retrain"]["profiles"]) == {"retrain"}
    # the serve image is the torch-free one, and both replicas watch the shared bundle root
    for name in ("serve-a", "serve-b"):
        assert services[name]["build"]["dockerfile"] == "docker/serve.Dockerfile"
        assert "bundles:/bundles:ro" in services[name]["volumes"]


def test_compose_socialrec_commands_are_real_subcommands() -> None:
    subcommands = socialrec_subcommands()
    entrypoints = _image_entrypoints()
    used = set()
    for name, svc in _compose()["services"].items():
        for argv in _service_argvs(svc, entrypoints):
            args = socialrec_invocations(argv)
            if args is None:
                continue
            assert args and args[0] in subcommands, f"{name}: `socialrec {args[:1]}` unknown"
            used.add(args[0])
            if any("$" in a for a in args):
                continue
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
                build_parser().parse_args(args)
            assert not stderr.getvalue(), f"{name}: {stderr.getvalue()}"
    assert {"train", "publish-bundle", "serve", "retrain"} <= used


def test_compose_locust_service_uses_a_real_locustfile() -> None:
    svc = _compose()["services"]["locust"]
    argvs = _service_argvs(svc, _image_entrypoints())
    files = [a[a.index("-f") + 1] for a in argvs if a and a[0] == "locust" and "-f" in a]
    assert files, "locust service runs no locustfile"
    for f in files:
        assert (REPO_ROOT / f).is_file(), f"locust service: no {f}"
    # locust is installed in the image the service uses
    dockerfile = REPO_ROOT / "docker" / "pipeline.Dockerfile"
    assert svc["image"] == "socialrec-pipeline" and "loadtest" in dockerfile.read_text()


def test_envoy_balances_grpc_round_robin_over_the_replicas() -> None:
    yaml = pytest.importorskip("yaml")
    envoy = yaml.safe_load((REPO_ROOT / "docker" / "envoy.yaml").read_text(encoding="utf-8"))
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC is HTTP/2
    endpoints = {
        (e["endpoint"]["address"]["socket_address"]["address"],
         e["endpoint"]["address"]["socket_address"]["port_value"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }  # fmt: skip
    services = _compose()["services"]
    replicas = {n for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert replicas == {"serve-a", "serve-b"}
    for name in replicas:
        cmd = services[name]["command"]
        port = int(cmd[cmd.index("--port") + 1])
        assert (name, port) in endpoints, f"envoy does not route to {name}:{port}"
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    routes = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = routes["typed_config"]["route_config"]["virtual_hosts"][0]
    assert vhost["routes"][0]["route"]["cluster"] == cluster["name"]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == (
        "socialrec.v1.Recommender"
    )
