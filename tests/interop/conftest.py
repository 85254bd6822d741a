"""The Java, Go and Node programs of the interop tests, built once per version of their sources.

A build lands in ~/.cache/bridge/interop/<name>-<hash of its sources>, never in the repository,
so a rerun with unchanged sources starts at once. With CI set, a missing toolchain or a failed
build fails the tests; elsewhere they are skipped, like the brokers in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from bridge.dev._common import cache_root
from tests.conftest import REPO, SCHEMAS, in_ci

HERE = Path(__file__).resolve().parent
SCHEMA_DIRS = f"{REPO / 'bridge' / 'schemas'},{SCHEMAS}"  # how every program takes them
JAVA_MAINS = ("Fingerprint", "ReadDeadLetter", "KafkaEnqueue", "RegistryEnqueue")
SOURCE_SUFFIXES = (".java", ".xml", ".go", ".mod", ".sum", ".mjs", ".json")
BUILD_OUTPUT = ("target", "node_modules")  # (of builds run by hand in the source folders)
BUILD_TIMEOUT_S = 240


@dataclass(frozen=True)
class Program:
    """A built program, run to completion with arguments."""

    command: tuple[str, ...]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run with `args`, whatever its exit code."""
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)

    def __call__(self, *args: str, timeout: float = 60) -> str:
        """Run with `args` and return its output; fail the test, with its errors, if it fails."""
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{done.stderr}"
        return done.stdout


@pytest.fixture(scope="session")
def java() -> dict[str, Program]:
    """The Java programs (Apache Avro, kafka-clients), by main class."""
    out = built("java", ["java", "mvn"], build_java)
    classpath = f"{out / 'classes'}:{out / 'lib' / '*'}"  # java expands lib/* itself
    return {main: Program(("java", "-cp", classpath, f"bridge.interop.{main}")) for main in JAVA_MAINS}


@pytest.fixture(scope="session")
def go_enqueue() -> Program:
    """The Go program (hamba/avro, amqp091-go) that enqueues a job on RabbitMQ."""
    return Program((str(built("go", ["go"], build_go) / "enqueue"),))


@pytest.fixture(scope="session")
def node() -> Program:
    """The Node program (avsc, amqplib) that enqueues and reads jobs on RabbitMQ."""
    return Program(("node", str(built("node", ["node", "npm"], build_node) / "main.mjs")))


@dataclass(frozen=True)
class Enqueue:
    """A program of another language that enqueues one test.Echo job on RabbitMQ, with flags
    of the same names (Go's `-queue`, Node's `--queue`)."""

    language: str
    program: Program
    dash: str
    command: tuple[str, ...] = ()

    def run(self, **flags: str) -> subprocess.CompletedProcess[str]:
        args = [
            arg
            for name, value in {"schemas": SCHEMA_DIRS, **flags}.items()
            for arg in (self.dash + name, value)
        ]
        return self.program.run(*self.command, *args)

    def __call__(self, **flags: str) -> str:
        done = self.run(**flags)
        assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{done.stderr}"
        return done.stdout


@pytest.fixture(params=["go", "node"])
def rabbitmq_enqueue(request: pytest.FixtureRequest) -> Enqueue:
    """Go's producer and Node's, in turn."""
    if request.param == "go":
        return Enqueue("go", request.getfixturevalue("go_enqueue"), "-")
    return Enqueue("node", request.getfixturevalue("node"), "--", ("enqueue",))


def build_java(out: Path) -> None:
    # `process-classes` compiles and copies the dependencies to lib/ (see pom.xml), no jar.
    pom = HERE / "java" / "pom.xml"
    command = ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(pom), "process-classes"]
    _run([*command, f"-Dinterop.out={out}"], HERE / "java")


def build_go(out: Path) -> None:
    _run(["go", "build", "-o", str(out / "enqueue"), "."], HERE / "go")


def build_node(out: Path) -> None:
    out.mkdir(parents=True)
    for name in ("main.mjs", "package.json", "package-lock.json"):
        shutil.copy(HERE / "node" / name, out / name)
    _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], out)  # the lockfile's versions


def built(name: str, tools: list[str], build: Callable[[Path], None]) -> Path:
    """The cached build of `tests/interop/<name>`, made first if its sources changed."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        unavailable(f"the {name} interop programs need {', '.join(missing)} on PATH")
    out = cache_root() / "interop" / f"{name}-{source_hash(HERE / name)}"
    if out.is_dir():
        return out
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    try:
        build(partial)
        partial.rename(out)  # only a finished build is ever found under its final name
    except subprocess.CalledProcessError as exc:
        unavailable(f"building the {name} interop programs failed:\n{exc.stdout}{exc.stderr}")
    except subprocess.TimeoutExpired:
        unavailable(f"building the {name} interop programs took more than {BUILD_TIMEOUT_S} s")
    except OSError:  # from the rename: fine if another run finished the same build first
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def source_hash(folder: Path) -> str:
    """A digest of the sources under `folder`: their paths and contents, not build output."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix in SOURCE_SUFFIXES and not set(BUILD_OUTPUT) & set(path.relative_to(folder).parts):
            digest.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)


def unavailable(why: str) -> NoReturn:
    if in_ci():
        pytest.fail(why)
    pytest.skip(why)
