"""Static checks of the Dockerfile (no Docker engine here): what can fail without building it.

Each COPY source exists and is not excluded by .dockerignore, the base is a CUDA PyTorch image
whose torch satisfies pyproject's bound, the package is pip-installed, the image ends as a
non-root user, and the entrypoint is the `largebatch` console script.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def build_args() -> dict[str, str]:
    """ARG defaults (ARG NAME=value)."""
    return dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parents."""
    parts = path.removeprefix("./").strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.lstrip("/")) for pat in patterns for p in prefixes)


def test_base_is_a_cuda_pytorch_image_with_a_recent_enough_torch():
    froms = [a for k, a in instructions() if k == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], froms[0].split()[0])
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda\d+\.\d+-cudnn\d+-(runtime|devel)",
                         image)
    assert match, image
    # pyproject's torch bound holds for the image's torch.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = next(d for d in deps if d.startswith("torch>=")).removeprefix("torch>=")
    assert (int(match[1]), int(match[2])) >= tuple(int(x) for x in lower.split(".")[:2])


def test_every_copy_source_exists_and_is_in_the_build_context():
    patterns = dockerignore()
    copies = [a for k, a in instructions() if k in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(args))
        for src in words[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert not ignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"


def test_package_installed_and_readme_copied_for_its_metadata():
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), runs
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    copied = " ".join(a for k, a in instructions() if k == "COPY")
    assert readme in copied.split()


def test_ends_as_a_non_root_user_that_is_created():
    users = [a for k, a in instructions() if k == "USER"]
    assert users, "no USER instruction: the image would run as root"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0")
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    assert re.search(rf"useradd\b[^&]*\b{re.escape(final)}\b", runs), runs
    keys = [k for k, _ in instructions()]
    assert keys.index("USER") > max(i for i, k in enumerate(keys) if k == "RUN")


def test_entrypoint_is_the_largebatch_console_script():
    entry = [a for k, a in instructions() if k == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["largebatch"]  # exec form: signals reach it
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["largebatch"] == "largebatch.cli:main"


@pytest.mark.parametrize("path, excluded", [
    ("src", False), ("configs", False), ("runs", True), ("src/largebatch/__pycache__", True),
    (".git", True), ("tests", True)])
def test_dockerignore_keeps_sources_and_drops_outputs(path, excluded):
    assert ignored(path, dockerignore()) is excluded
