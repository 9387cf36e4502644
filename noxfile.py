"""Test, lint and build sessions. `nox -s tests` runs all of it (what CI runs).

Every session installs only what it needs into a fresh virtualenv: `tests-<package>` installs that package, the lm
siblings it declares and the test tools, so a dependency missing from a pyproject.toml fails there first.
torch is always installed first and pinned to the CPU build this project's machines carry on disk; any other torch
spec may pull a multi-GB CUDA build.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import nox

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
TORCH = os.environ.get("LM_DEPLOY_TORCH_SPEC", "torch==2.13.0")
RUFF = "ruff==0.17.6"
TEST_TOOLS = ["pytest>=8", "hypothesis>=6", "packaging"]
# Independent references the tests compare against (transformers, and accelerate for transformers' GGUF loader).
REFERENCES = ["transformers>=4.46", "accelerate>=1.0"]
PACKAGES = {
    "lm-core": "lm_core",
    "lm-torch": "lm_torch",
    "lm-turbomind": "lm_turbomind",
    "lm-lite": "lm_lite",
    "lm-vl": "lm_vl",
    "lm-serve": "lm_serve",
}
# Test-only tools of one package's session: lm-serve's tests drive a real server with the official openai client
# and fuzz it with schemathesis (jsonschema-rs validates structured outputs).
PACKAGE_TEST_TOOLS = {"lm-serve": ["openai>=1.40", "httpx>=0.27", "schemathesis>=4", "jsonschema-rs>=0.20"]}
# Console scripts each wheel installs, checked with --help by the build session.
SCRIPTS = {"lm-deploy": ["lm"], "lm-serve": ["lm-serve"], "lm-lite": ["lm-lite"]}


def _pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def _sibling_closure(dist: str) -> list[str]:
    """`dist` and every lm package it requires, transitively (these are not on PyPI: they install from here)."""
    seen: list[str] = []
    todo = [dist]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        for requirement in _pyproject(_package_dir(name))["project"]["dependencies"]:
            sibling = re.match(r"(lm-[a-z]+)", requirement)
            if sibling and sibling.group(1) in PACKAGES:
                todo.append(sibling.group(1))
    return seen


def _package_dir(dist: str) -> Path:
    return ROOT if dist == "lm-deploy" else ROOT / "packages" / dist


def _install_with_torch(session: nox.Session, *args: str) -> None:
    session.install(TORCH)
    session.install(*args)


def _make_package_session(dist: str, import_name: str) -> None:
    @nox.session(name=f"tests-{dist}")
    def tests_package(session: nox.Session) -> None:
        local = [str(_package_dir(name)) for name in _sibling_closure(dist)]
        _install_with_torch(session, *local, *TEST_TOOLS, *REFERENCES, *PACKAGE_TEST_TOOLS.get(dist, []))
        session.run("pytest", f"tests/{import_name}", *session.posargs)

    tests_package.__doc__ = f"Run tests/{import_name} against {dist} installed alone with the test tools."


for _dist, _import_name in PACKAGES.items():
    _make_package_session(_dist, _import_name)


@nox.session
def integration(session: nox.Session) -> None:
    """The whole toolkit installed through the meta-package, lm-turbomind included."""
    local = [str(_package_dir(name)) for name in PACKAGES]
    _install_with_torch(session, *local, ".", *TEST_TOOLS, *REFERENCES)
    session.run("pytest", "tests/integration", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel and sdist, then install each wheel alone into a fresh venv, import it and run its CLI."""
    session.install("build>=1.2")
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    for name in [*PACKAGES, "lm-deploy"]:
        session.run("python", "-m", "build", "--outdir", str(dist_dir), str(_package_dir(name)))
    wheels = {name: next(dist_dir.glob(f"{name.replace('-', '_')}-*.whl")) for name in [*PACKAGES, "lm-deploy"]}
    sdists = {name: next(dist_dir.glob(f"{name.replace('-', '_')}-*.tar.gz")) for name in [*PACKAGES, "lm-deploy"]}
    session.log(f"built {len(wheels)} wheels and {len(sdists)} sdists in {dist_dir}")

    for name, wheel in wheels.items():
        venv = Path(session.create_tmp()) / f"alone-{name}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run(sys.executable, "-m", "venv", str(venv), external=True)
        bindir = venv / ("Scripts" if os.name == "nt" else "bin")
        python = str(bindir / "python")
        pip = [python, "-m", "pip", "install", "--quiet", "--find-links", str(dist_dir)]
        needs_torch = "torch" in " ".join(_all_requirements(name))
        if needs_torch:
            session.run(*pip, TORCH, external=True)
        session.run(*pip, str(wheel), external=True)
        import_name = PACKAGES.get(name, "lm_deploy")
        session.run(
            python,
            "-c",
            f"import {import_name}; print({import_name}.__name__, {import_name}.__version__)",
            external=True,
        )
        session.run(python, "-m", "lm_core", "--help", external=True, silent=True)
        for script in SCRIPTS.get(name, []):
            session.run(str(bindir / script), "--help", external=True, silent=True)


def _all_requirements(dist: str) -> list[str]:
    requirements: list[str] = []
    for name in _sibling_closure(dist):
        requirements += _pyproject(_package_dir(name))["project"]["dependencies"]
    return requirements


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Everything CI runs: lint, each package alone, the integration tests and the build checks."""
    for name in ["lint", *(f"tests-{dist}" for dist in PACKAGES), "integration", "build"]:
        session.notify(name)
