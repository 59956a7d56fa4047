"""Tests of the container image recipe: the Dockerfile, .dockerignore and pinned requirements.

No container engine runs here, so the Dockerfile is checked by hadolint and by reading its
instructions. The pins are checked against the environment the test suite runs in, so the
image installs the versions that were tested.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
RUNTIME_REQUIREMENTS = ROOT / "requirements" / "runtime.txt"
HADOLINT = Path("/work/venv/bin/hadolint")
BASE_IMAGE = "python:3.11-slim-bookworm"
RUN_AS_USER = "65532"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def read_stages() -> list[list[Instruction]]:
    """Parse the Dockerfile into stages, each a list of instructions with continuations joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[Instruction]] = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, arguments = stripped.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(arguments.split()))
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def run_commands(stage: list[Instruction]) -> list[list[str]]:
    """Split every RUN of a stage into its shell commands, each as a word list."""
    commands: list[list[str]] = []
    for instruction in stage:
        if instruction.keyword != "RUN":
            continue
        for command in instruction.arguments.split("&&"):
            commands.append(shlex.split(command))
    return commands


def load_freeze_script() -> ModuleType:
    path = ROOT / "deploy" / "freeze_requirements.py"
    spec = importlib.util.spec_from_file_location("freeze_requirements", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in RUNTIME_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator == "==", f"{line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version
    return pins


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    """hadolint finds no error, warning, info or style issue, and no rule is switched off."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")
    completed = subprocess.run(
        [
            str(HADOLINT),
            "--config", str(config),
            "--disable-ignore-pragma",
            "--failure-threshold", "style",
            "--format", "json",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert json.loads(completed.stdout) == []
    assert completed.returncode == 0


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The hadolint call above can fail: an untagged base and unpinned apt install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\n", encoding="utf-8")
    completed = subprocess.run(
        [str(HADOLINT), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    codes = {finding["code"] for finding in json.loads(completed.stdout)}
    assert {"DL3006", "DL3008"} <= codes


def test_stages_use_pinned_slim_base() -> None:
    stages = read_stages()

    assert len(stages) == 2
    for stage in stages:
        assert stage[0].arguments.split()[0] == BASE_IMAGE


def test_builder_installs_pins_then_project_without_deps() -> None:
    """The builder installs exactly requirements/runtime.txt, then dbsync with --no-deps."""
    builder = read_stages()[0]
    installs = [command for command in run_commands(builder) if command[:2] == ["pip", "install"]]

    requirement_installs = [command for command in installs if "-r" in command]
    assert len(requirement_installs) == 1
    requirement_file = requirement_installs[0][requirement_installs[0].index("-r") + 1]
    assert requirement_file == "requirements/runtime.txt"

    project_installs = [command for command in installs if command[-1] == "."]
    assert len(project_installs) == 1
    assert "--no-deps" in project_installs[0]


def test_builder_pins_every_package_it_installs() -> None:
    """Apart from the requirement file and the project, pip installs only name==version pins."""
    builder = read_stages()[0]
    for command in run_commands(builder):
        if command[:2] != ["pip", "install"] or "-r" in command or command[-1] == ".":
            continue
        packages = [word for word in command[2:] if not word.startswith("-")]
        assert packages, f"pip install without packages: {command}"
        for package in packages:
            assert "==" in package, f"{package!r} in {command} is not pinned"


def test_final_stage_has_no_build_steps() -> None:
    """The final stage runs nothing, so no compiler or package manager is added to it."""
    final = read_stages()[-1]
    keywords = {instruction.keyword for instruction in final}

    assert "RUN" not in keywords
    copies = [instruction.arguments for instruction in final if instruction.keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_final_stage_runs_operator_as_numeric_user() -> None:
    final = read_stages()[-1]
    users = [instruction.arguments for instruction in final if instruction.keyword == "USER"]
    entrypoints = [
        json.loads(instruction.arguments)
        for instruction in final
        if instruction.keyword == "ENTRYPOINT"
    ]

    assert users == [f"{RUN_AS_USER}:{RUN_AS_USER}"]
    assert entrypoints == [["dbsync", "operator"]]


def test_final_stage_writes_only_under_tmp() -> None:
    """With a read-only root filesystem, temporary files and bytecode must not go elsewhere."""
    final = read_stages()[-1]
    environment = " ".join(
        instruction.arguments for instruction in final if instruction.keyword == "ENV"
    )

    assert "TMPDIR=/tmp" in environment
    assert "HOME=/tmp" in environment
    assert "PYTHONDONTWRITEBYTECODE=1" in environment


def test_dbsync_console_script_exists() -> None:
    """The ENTRYPOINT's `dbsync` is a console script of the installed distribution."""
    scripts = metadata.distribution("dbsync-operator").entry_points.select(
        group="console_scripts", name="dbsync"
    )

    assert [script.value for script in scripts] == ["dbsync.cli.main:main"]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Apply .dockerignore rules to a relative path: the last matching pattern wins.

    A pattern also matches everything below a matched directory, as in Docker.
    """
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        if body.startswith("**/"):
            matches = any(fnmatch.fnmatch(part, body[3:]) for part in parts)
        else:
            matches = any(fnmatch.fnmatch(prefix, body) for prefix in prefixes)
        if matches:
            excluded = not negated
    return excluded


def read_dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copy_sources() -> list[str]:
    sources: list[str] = []
    for stage in read_stages():
        for instruction in stage:
            words = instruction.arguments.split()
            if instruction.keyword != "COPY" or words[0].startswith("--from"):
                continue
            sources.extend(word.rstrip("/") for word in words[:-1])
    return sources


def test_copy_sources_exist() -> None:
    """Every file the builder copies is in the repository, or the image build would fail."""
    missing = [source for source in copy_sources() if not (ROOT / source).exists()]

    assert missing == []


def test_dockerignore_sends_copy_sources() -> None:
    patterns = read_dockerignore()
    excluded = [source for source in copy_sources() if dockerignore_excludes(source, patterns)]

    assert excluded == []


@pytest.mark.parametrize(
    "path",
    [".git/config", "tests/conftest.py", "operator/dbsync/__pycache__/x.pyc",
     "operator/dbsync_operator.egg-info/PKG-INFO", ".pytest_cache/README.md"],
)
def test_dockerignore_excludes_local_state(path: str) -> None:
    assert dockerignore_excludes(path, read_dockerignore())


def test_pins_match_installed_versions() -> None:
    """Each pin is the version installed here, so the image runs what the tests ran."""
    mismatched = {
        name: (pinned, metadata.version(name))
        for name, pinned in read_pins().items()
        if metadata.version(name) != pinned
    }

    assert mismatched == {}


def test_pins_cover_runtime_closure() -> None:
    """The pins list every runtime dependency, followed transitively, and nothing else."""
    closure = load_freeze_script().runtime_closure()

    assert set(read_pins()) == set(closure)


def test_pins_include_declared_dependencies() -> None:
    """Each dependency pyproject.toml declares is pinned, and no development-only tool is."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {canonicalize_name(Requirement(line).name) for line in project["dependencies"]}
    development = {
        canonicalize_name(Requirement(line).name)
        for line in project["optional-dependencies"]["dev"]
    }
    pins = set(read_pins())

    assert declared - pins == set()
    assert (development - declared) & pins == set()
