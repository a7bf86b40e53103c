"""The container image's Dockerfile and build context: pinned, non-root, free of secrets, and
installing the package with every runtime dependency pinned within pyproject's ranges."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "images" / "ladder-siam" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# Secret-looking names and values: AWS keys, tokens, passwords.
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def arguments(dockerfile: str, instruction: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == instruction]


def is_pinned_image(reference: str) -> bool:
    """``name:tag`` with a version-like tag (a digit in it), optionally ``@sha256:`` too."""
    name, _, digest = reference.partition("@")
    repository, _, tag = name.rpartition("/")[2].partition(":")
    if digest:
        return bool(re.fullmatch(r"sha256:[0-9a-f]{64}", digest)) and bool(repository)
    return bool(repository and tag and tag != "latest" and re.search(r"\d", tag))


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_pin_check_refuses_floating_references() -> None:
    assert is_pinned_image("pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime")
    assert is_pinned_image(f"pytorch/pytorch@sha256:{'0' * 64}")
    for floating in ("pytorch/pytorch", "pytorch/pytorch:latest", "pytorch/pytorch:runtime"):
        assert not is_pinned_image(floating), floating


def test_the_base_image_is_pinned_by_an_exact_tag(dockerfile: str) -> None:
    bases = arguments(dockerfile, "FROM")
    assert bases, "no FROM"
    for base in bases:
        reference = base.split()[0]
        assert "$" not in reference, f"{reference}: a build argument could float the base"
        assert is_pinned_image(reference), reference


def test_the_image_runs_as_a_non_root_user(dockerfile: str) -> None:
    users = arguments(dockerfile, "USER")
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"} and group not in {"root", "0"}, users[-1]
    # Numeric, so Kubernetes can check runAsNonRoot without resolving /etc/passwd.
    assert user.isdigit() and int(user) == 1000


def test_the_image_holds_no_credentials(dockerfile: str) -> None:
    for name, args in instructions(dockerfile):
        if name in {"ENV", "ARG"}:
            for assignment in shlex.split(args):
                key = assignment.split("=", 1)[0]
                assert not SECRET_NAME.search(key), f"{name} {assignment}"
    assert not AWS_KEY_ID.search(dockerfile)
    assert not re.search(r"aws_secret_access_key\s*=", dockerfile, re.IGNORECASE)
    # Writable caches for a read-only root filesystem point into /tmp (an emptyDir in pods).
    env = " ".join(arguments(dockerfile, "ENV"))
    for variable in ("HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert re.search(rf"\b{variable}=/tmp\b", env), variable


def test_the_image_installs_the_package_with_pinned_runtime_dependencies(dockerfile: str) -> None:
    assert arguments(dockerfile, "WORKDIR")[-1] == "/opt/ladder-siam"
    copies = " ".join(arguments(dockerfile, "COPY"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # Every folder a package installs from (src/, components/, pipelines/) is in the image; the
    # pretraining presets are package data under src/.
    package_dirs = [
        folder.split("/")[0] + "/"
        for folder in pyproject["tool"]["setuptools"]["package-dir"].values()
    ]
    for needed in ("pyproject.toml", "README.md", *package_dirs):
        assert needed in copies, needed
    [install] = [run for run in arguments(dockerfile, "RUN") if "pip install" in run]
    words = shlex.split(install.split("&&")[0])
    assert "--no-cache-dir" in words and "." in words
    pins = {
        canonicalize_name(requirement.name): requirement
        for requirement in (Requirement(word) for word in words if "==" in word)
    }
    project = pyproject["project"]
    for dependency in map(Requirement, project["dependencies"]):
        pin = pins.get(canonicalize_name(dependency.name))
        assert pin is not None, f"{dependency.name} is not pinned in the Dockerfile"
        [exact] = pin.specifier
        assert exact.operator == "==", pin
        assert dependency.specifier.contains(exact.version), f"{pin} outside {dependency}"


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a top-level path of the build context matches a .dockerignore pattern."""
    return any(
        fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
        for pattern in patterns
    )


def test_the_build_context_leaves_out_local_state_and_keeps_the_sources() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(pattern.startswith("!") for pattern in patterns)
    for local in (".venv", ".git", "demo_output", ".pytest_cache", "k8s/base/s3-credentials.env"):
        assert ignored(local, patterns) or ignored(local.split("/")[0], patterns), local
    for source in ("pyproject.toml", "README.md", "src"):
        assert not ignored(source, patterns), source
