"""The Dockerfile cannot be built here (no registry for base images), so this checks what can be
checked without building: it parses, every stage and instruction is known, what it copies exists
and is in the build context, the entry point is the `ddm` console script, it ends as a non-root
user, it is CPU by default, and nothing secret is baked in."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}  # fmt: skip
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    if pending:
        raise ValueError("the Dockerfile ends inside a continued line")
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return parse((REPO / "Dockerfile").read_text())


def context_includes(path: str) -> bool:
    """Is ``path`` in the build context under .dockerignore (``*`` then ``!`` re-includes)?"""
    included = True
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule[1:].rstrip("/") if negate else rule.rstrip("/")
        pattern = pattern.removeprefix("**/")
        parts = Path(path).parts
        if any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or fnmatch.fnmatch(parts[i], pattern)
            for i in range(len(parts))
        ):
            included = negate
    return included


def test_parses_into_known_instructions(dockerfile):
    assert dockerfile[0][0] in ("ARG", "FROM") and all(word in INSTRUCTIONS for word, _ in dockerfile)
    stages = [args for word, args in dockerfile if word == "FROM"]
    assert len(stages) >= 2, "a build stage and a slim final stage"


def test_cpu_by_default_and_cuda_by_argument(dockerfile):
    args = dict(a.split("=", 1) for w, a in dockerfile if w == "ARG" and "=" in a)
    assert args["BASE"].startswith("python:3.11-slim")
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    assert any(a.startswith("${BASE}") for w, a in dockerfile if w == "FROM")
    text = (REPO / "Dockerfile").read_text()
    assert "--build-arg BASE=nvidia/cuda:" in text and "--build-arg TORCH_INDEX=" in text


def test_entry_point_is_the_ddm_console_script(dockerfile):
    entry = [a for w, a in dockerfile if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["ddm"]  # exec form: signals reach ddm directly
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddm"] == "ddm.coordinator.cli:main"


def test_copied_paths_exist_and_are_in_the_build_context(dockerfile):
    copies = [a for w, a in dockerfile if w in ("COPY", "ADD") and "--from=" not in a]
    assert copies
    for args in copies:
        *sources, _dest = [p for p in args.split() if not p.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
            assert context_includes(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    # what setuptools needs to install the package is all copied
    copied = {p.rstrip("/") for a in copies for p in a.split()[:-1]}
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values()
    assert set(package_dirs) <= copied and {"pyproject.toml", "requirements"} <= copied


def test_runs_as_a_non_root_user(dockerfile):
    users = [a for w, a in dockerfile if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"  # the UID the k8s/ pods and job pods insist on
    from ddm.coordinator.kube import RUN_AS_USER

    assert RUN_AS_USER == 10001


def test_no_secrets_baked_in(dockerfile):
    for word, args in dockerfile:
        if word in ("ENV", "ARG", "LABEL"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split("=")[0]]:
                assert not SECRETISH.search(key), (
                    f"{word} {key}: secrets come from Kubernetes Secrets at run time"
                )
    for secret in (".aws", ".kube", ".env", "id_rsa", "key.pem", ".netrc", ".git", "runs", ".venv"):
        assert not context_includes(secret), f"{secret} would be in the build context"
    for secret in ("coordinator/tls.key", "proto/ca.pem", "expert/.env"):  # even inside copied folders
        assert not context_includes(secret), f"{secret} would be in the build context"
    assert context_includes("coordinator/cli.py")
