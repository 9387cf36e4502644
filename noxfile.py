"""Test, lint, type-check and build sessions. `nox -s tests` runs all of it (what CI runs).

Every session installs only what it needs into a fresh virtualenv: `tests-<package>` installs that package, the lm
siblings it declares and the test tools, so a dependency missing from a pyproject.toml fails there first.
Where a session installs torch, it goes first, pinned to the CPU build this project's machines carry on disk; any
other torch spec may pull a multi-GB CUDA build. The sessions of `WITHOUT_TORCH` install none.

Speed (CI is a 2-core machine): pip installs with --no-compile (it would byte-compile every module of torch,
transformers, ...; Python writes the .pyc of the modules actually imported, on first import), the long test folders
run in pytest-xdist workers (`PYTEST_WORKERS`; pass `-- -n 0` to run one in a single process), and the build session
builds and checks its packages two at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
PYRIGHT = "pyright==1.1.414"
TEST_TOOLS = ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "packaging"]
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
PACKAGE_TEST_TOOLS = {
    "lm-serve": ["openai>=1.40", "httpx>=0.27", "schemathesis>=4", "jsonschema-rs>=0.20"],
    # lm-torch's optional Ray executor, run over a two-node Ray cluster on the test machine.
    "lm-torch": ["ray>=2.10"],
    # lm-vl's Qwen resize is checked against qwen-vl-utils' smart_resize too.
    "lm-vl": ["qwen-vl-utils>=0.0.14"],
}
# Third-party clients the opt-in `clients` session drives a real server with (pinned: their releases change what
# they send).
CLIENT_LIBRARIES = [
    "openai==3.3.0",
    "langchain-openai==1.8.1",
    "instructor==1.17.0",
    "litellm==1.110.2",
    "lm-eval[api]==0.4.13",
]
# Packages whose tests need neither torch nor the references: their sessions install no torch, so one that starts to
# import torch without declaring it fails there. (lm-core's tests compare its GGUF conversion and model resolution
# against transformers' torch models, so tests-lm-core installs torch as a test reference; lm-vl preprocesses in
# torch.) Empty today: every package's tests need torch.
WITHOUT_TORCH: set[str] = set()
# Test folders of a package that its tests-<package> session leaves to a session of their own (the openai client,
# which tests-lm-serve installs, would otherwise run the clients session's openai tests there too).
SEPARATE_TESTS = {"lm-serve": ("tests/lm_serve/clients",)}
# Console scripts each wheel installs, checked with --help by the build session.
SCRIPTS = {"lm-deploy": ["lm"], "lm-serve": ["lm-serve"], "lm-lite": ["lm-lite"]}
# pytest-xdist workers for the test folders that take minutes (CI has 2 cores); the others run in one process.
PYTEST_WORKERS = {"lm-core": 2, "lm-torch": 2, "lm-serve": 2, "integration": 2}
# Lets Python cache the .pyc of what the tests import (a shell may set PYTHONDONTWRITEBYTECODE; with --no-compile
# every process, every server and test subprocess included, would then compile torch and transformers again).
RUN_ENV = {"PYTHONDONTWRITEBYTECODE": None}
# The build session's builds and per-wheel checks run this many at a time.
BUILD_JOBS = 2
# JUnit reports of the test sessions (`report` prints their failures last, where a log's tail shows them).
REPORTS = ROOT / ".nox" / "reports"
# Lines of one failure's message that `report` prints, and failures it prints in full.
REPORT_LINES = 12
REPORT_FAILURES = 6


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
    session.install("--no-compile", TORCH)
    session.install("--no-compile", *args)


def _pytest(session: nox.Session, folder: str, workers: int, ignore: tuple[str, ...] = ()) -> None:
    """pytest over `folder` but not `ignore`, in `workers` pytest-xdist processes (0: in this one); posargs come last
    and win. Each run writes a JUnit report to `REPORTS`, which the `report` session summarises."""
    parallel = ["-n", str(workers)] if workers else []
    ignored = [f"--ignore={path}" for path in ignore]
    REPORTS.mkdir(parents=True, exist_ok=True)
    junit = f"--junitxml={REPORTS / (session.name + '.xml')}"
    session.run("pytest", folder, *parallel, *ignored, junit, *session.posargs, env=RUN_ENV)


def _make_package_session(dist: str, import_name: str) -> None:
    @nox.session(name=f"tests-{dist}")
    def tests_package(session: nox.Session) -> None:
        local = [str(_package_dir(name)) for name in _sibling_closure(dist)]
        if dist in WITHOUT_TORCH:
            if any(re.match(r"torch\b", req) for req in _all_requirements(dist)):
                session.error(f"{dist} requires torch now: take it out of WITHOUT_TORCH")
            session.install("--no-compile", *local, *TEST_TOOLS, *PACKAGE_TEST_TOOLS.get(dist, []))
        else:
            _install_with_torch(session, *local, *TEST_TOOLS, *REFERENCES, *PACKAGE_TEST_TOOLS.get(dist, []))
        _pytest(session, f"tests/{import_name}", PYTEST_WORKERS.get(dist, 0), SEPARATE_TESTS.get(dist, ()))

    tests_package.__doc__ = f"Run tests/{import_name} against {dist} installed alone with the test tools."


for _dist, _import_name in PACKAGES.items():
    _make_package_session(_dist, _import_name)


@nox.session
def integration(session: nox.Session) -> None:
    """The whole toolkit installed through the meta-package, lm-turbomind included."""
    local = [str(_package_dir(name)) for name in PACKAGES]
    _install_with_torch(session, *local, ".", *TEST_TOOLS, *REFERENCES)
    _pytest(session, "tests/integration", PYTEST_WORKERS["integration"])


@nox.session
def clients(session: nox.Session) -> None:
    """Opt-in (not part of `tests`): tests/lm_serve/clients, real third-party clients against a real server."""
    local = [str(_package_dir(name)) for name in _sibling_closure("lm-serve")]
    _install_with_torch(session, *local, *TEST_TOOLS, *REFERENCES, *PACKAGE_TEST_TOOLS["lm-serve"], *CLIENT_LIBRARIES)
    _pytest(session, "tests/lm_serve/clients", PYTEST_WORKERS["lm-serve"])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install("--no-compile", RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright over every package's source: basic, strict under lm-core (config: pyproject.toml's [tool.pyright]).

    The packages resolve from their src folders (pyright's extraPaths); only their third-party dependencies are
    installed, so the session needs no lm-turbomind compile.
    """
    dists = [*PACKAGES, "lm-deploy"]
    third_party = sorted({req for dist in dists for req in _pyproject(_package_dir(dist))["project"]["dependencies"]})
    third_party = [req for req in third_party if not re.match(r"lm-[a-z]+", req)]
    _install_with_torch(session, *third_party, PYRIGHT)
    # `-p ROOT`: this repository's pyproject.toml, never a pyright config found in a directory above it.
    session.run("pyright", "-p", str(ROOT), "--pythonpath", str(Path(session.bin) / "python"), env=RUN_ENV)


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel and sdist, then install each wheel alone into a fresh venv, import it and run its CLI."""
    session.install("--no-compile", "build>=1.2")
    names = [*PACKAGES, "lm-deploy"]
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    python = str(Path(session.bin) / "python")
    _run_jobs(
        session,
        {name: [Cmd([python, "-m", "build", "--outdir", str(dist_dir), str(_package_dir(name))])] for name in names},
    )
    wheels = {name: next(dist_dir.glob(f"{name.replace('-', '_')}-*.whl")) for name in names}
    sdists = {name: next(dist_dir.glob(f"{name.replace('-', '_')}-*.tar.gz")) for name in names}
    session.log(f"built {len(wheels)} wheels and {len(sdists)} sdists in {dist_dir}")

    checks = {}
    for name, wheel in wheels.items():
        venv = Path(session.create_tmp()) / f"alone-{name}"
        shutil.rmtree(venv, ignore_errors=True)
        bindir = venv / ("Scripts" if os.name == "nt" else "bin")
        python = str(bindir / "python")
        # -qq: errors only (a machine's pip configuration may warn once per package about its index).
        pip = [python, "-m", "pip", "install", "--no-compile", "-qq", "--find-links", str(dist_dir)]
        commands = [Cmd([sys.executable, "-m", "venv", str(venv)])]
        if "torch" in " ".join(_all_requirements(name)):
            commands.append(Cmd([*pip, TORCH]))
        commands.append(Cmd([*pip, str(wheel)]))
        import_name = PACKAGES.get(name, "lm_deploy")
        version = f"import {import_name}; print({import_name}.__name__, {import_name}.__version__)"
        commands.append(Cmd([python, "-c", version]))
        commands.append(Cmd([python, "-m", "lm_core", "--help"], silent=True))
        commands += [Cmd([str(bindir / script), "--help"], silent=True) for script in SCRIPTS.get(name, [])]
        checks[name] = commands
    _run_jobs(session, checks)


@dataclass
class Cmd:
    """One command of a build-session job; a silent one's output is shown only if it fails."""

    argv: list[str]
    silent: bool = False


def _run_jobs(session: nox.Session, jobs: dict[str, list[Cmd]]) -> None:
    """Run each job's commands in order, `BUILD_JOBS` jobs at a time (a job stops at its first failing command).

    Each job's commands and output are logged once it has ended; the session fails, after every job has ended,
    naming each job that failed.
    """
    env = {**os.environ}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # see RUN_ENV

    def run_job(commands: list[Cmd]) -> tuple[bool, list[str]]:
        lines = []
        for cmd in commands:
            lines.append("$ " + " ".join(cmd.argv))
            done = subprocess.run(cmd.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            if done.stdout.strip() and (done.returncode != 0 or not cmd.silent):
                lines.append(done.stdout.rstrip())
            if done.returncode != 0:
                lines.append(f"Command {cmd.argv[0]} failed with exit code {done.returncode}")
                return False, lines
        return True, lines

    with ThreadPoolExecutor(max_workers=BUILD_JOBS) as pool:
        results = dict(zip(jobs, pool.map(run_job, jobs.values()), strict=True))
    for name, (ok, lines) in results.items():
        session.log(f"{name}: {'ok' if ok else 'FAILED'}")
        print("\n".join(lines), flush=True)
    failed = [name for name, (ok, _) in results.items() if not ok]
    if failed:
        session.error(f"failed: {', '.join(failed)}")


def _all_requirements(dist: str) -> list[str]:
    requirements: list[str] = []
    for name in _sibling_closure(dist):
        requirements += _pyproject(_package_dir(name))["project"]["dependencies"]
    return requirements


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Everything CI runs: lint, the type check, each package alone, the integration tests and the build checks, then
    `report`."""
    shutil.rmtree(REPORTS, ignore_errors=True)
    for name in ["lint", "typecheck", *(f"tests-{dist}" for dist in PACKAGES), "integration", "build", "report"]:
        session.notify(name)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """The failed and errored tests of every test session's JUnit report (the last session of `tests`, so that the
    end of a long log names what failed); fails if any test did."""
    import xml.etree.ElementTree as ET

    failures: list[tuple[str, str, str]] = []
    for path in sorted(REPORTS.glob("*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            for bad in [*case.findall("failure"), *case.findall("error")]:
                test = f"{case.get('classname', '')}::{case.get('name', '')}"
                text = (bad.get("message") or "") + "\n" + (bad.text or "")
                failures.append((path.stem, test, text))
    if not failures:
        session.log(f"no failed tests in {len(list(REPORTS.glob('*.xml')))} reports")
        return
    for index, (name, test, text) in enumerate(failures):
        if index < REPORT_FAILURES:
            lines = [line for line in text.splitlines() if line.strip()]
            tail = lines[-REPORT_LINES:]
            print(f"--- {name}: {test}", *("    " + line[:300] for line in tail), sep="\n", flush=True)
        else:
            print(f"--- {name}: {test}", flush=True)
    session.error(f"{len(failures)} failed tests")
