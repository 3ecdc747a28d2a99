"""The model owner's commands as a user meets them: every client subcommand, run as a real
`python -m fedkube.cli` process, with each kind of mistake (missing files, bad values,
unknown names, wrong certificates, no credentials, a director that is down) ends in the
documented exit code and one line on stderr, `fedkube: <what went wrong>; <what to do>`,
never a traceback (docs/quickstart.md, "Exit codes")."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedkube.cli.exits import ExitCode
from fedkube.dev.processes import director_process, free_port, port_open, wait_for
from tests.helpers import CertDir

USAGE, FAILED, REFUSED, UNAVAILABLE = (ExitCode.USAGE, ExitCode.FAILED, ExitCode.REFUSED,
                                       ExitCode.UNAVAILABLE)

# Each client subcommand with what it needs besides the director and credentials.
SUBCOMMANDS = {
    "shards": ["shards"],
    "submit": ["experiment", "submit", "--name", "x", "--collaborators", "env1"],
    "list": ["experiment", "list"],
    "status": ["experiment", "status", "x"],
    "wait": ["experiment", "wait", "x", "--timeout", "2"],
    "metrics": ["experiment", "metrics", "x"],
    "model": ["experiment", "model", "x", "--out", "{tmp}/best.npz"],
    "plot": ["experiment", "plot", "x", "--out", "{tmp}/metrics.png"],
    "remove": ["experiment", "remove", "x"],
}
ALICE = ["--ca", "{certs}/ca.crt", "--cert", "{certs}/alice.crt", "--key", "{certs}/alice.key"]

# What goes wrong, how it is passed, and what the user is told: for every subcommand.
EVERY_COMMAND = {
    "no TLS flags": (["--director", "{plain}"], USAGE,
                     "pass --ca/--cert/--key for mTLS, or --insecure"),
    "--ca alone": (["--director", "{plain}", "--ca", "{certs}/ca.crt"], USAGE,
                   "--ca without --cert/--key"),
    "missing --ca file": (["--director", "{mtls}", "--ca", "{tmp}/nope.crt",
                           *ALICE[2:]], USAGE, "--ca {tmp}/nope.crt: no such file"),
    "missing --key file": (["--director", "{mtls}", *ALICE[:4], "--key", "{tmp}/nope.key"],
                           USAGE, "--key {tmp}/nope.key: no such file"),
    "key of another certificate": (["--director", "{mtls}", *ALICE[:4], "--key",
                                    "{certs}/env1.key"], USAGE, "does not match --cert"),
    "director down": (["--director", "{down}", "--insecure"], UNAVAILABLE,
                      "cannot reach the director at {down} (connection refused)"),
    "plaintext to an mTLS director": (["--director", "{mtls}", "--insecure"], UNAVAILABLE,
                                      "requires mTLS; pass --ca/--cert/--key"),
    "envoy certificate": (["--director", "{mtls}", "--ca", "{certs}/ca.crt", "--cert",
                           "{certs}/env1.crt", "--key", "{certs}/env1.key"], REFUSED,
                          "an envoy certificate cannot "),
    "certificate of another CA": (["--director", "{mtls}", "--ca", "{certs}/ca.crt", "--cert",
                                   "{rogue}/alice.crt", "--key", "{rogue}/alice.key"],
                                  REFUSED, "does not accept your certificate"),
    "another CA's --ca": (["--director", "{mtls}", "--ca", "{rogue}/ca.crt", *ALICE[2:]],
                          UNAVAILABLE, "TLS handshake with the director at {mtls} failed"),
}
# Mistakes of one subcommand: (subcommand, extra arguments, code, what stderr says).
PLAIN = ["--director", "{plain}", "--insecure"]
ONE_COMMAND = {
    "--archive missing": ("submit", [*PLAIN, "--archive", "{tmp}/nope.py"], USAGE,
                          "--archive {tmp}/nope.py: no such file"),
    "--requirements missing": ("submit", [*PLAIN, "--requirements", "{tmp}/nope.txt"], USAGE,
                               "--requirements {tmp}/nope.txt: no such file"),
    "--rounds 0": ("submit", [*PLAIN, "--rounds", "0"], USAGE,
                   "--rounds 0: input should be greater than or equal to 1"),
    "--rounds abc": ("submit", [*PLAIN, "--rounds", "abc"], USAGE,
                     "argument --rounds: invalid int value: 'abc'"),
    "--round-timeout 0": ("submit", [*PLAIN, "--round-timeout", "0"], USAGE,
                          "--round-timeout 0.0: input should be greater than 0"),
    "--param bad value": ("submit", [*PLAIN, "--param", "learning_rate=abc"], USAGE,
                          "learning_rate='abc': input should be a valid number"),
    "--param out of range": ("submit", [*PLAIN, "--task", "digits-mlp", "--param",
                                        "hidden=0"], USAGE, "hidden takes an integer >= 1"),
    "--param unknown": ("submit", [*PLAIN, "--param", "bogus=1"], USAGE,
                        "no parameter 'bogus'; its parameters are: batch_size, epochs, l2, "
                        "learning_rate, seed"),
    "--param not NAME=VALUE": ("submit", [*PLAIN, "--param", "learning_rate"], USAGE,
                               "--param wants NAME=VALUE"),
    "--task unknown": ("submit", [*PLAIN, "--task", "nope"], USAGE,
                       "unknown task 'nope'; pass --task digits-logreg or digits-mlp, or "
                       "--archive MODULE.py"),
    "archive lacking train": ("submit", [*PLAIN, "--archive", "{tmp}/lacking.py"], USAGE,
                              "lacks ['train', 'validate']"),
    "archive syntax error": ("submit", [*PLAIN, "--archive", "{tmp}/broken.py"], USAGE,
                             "broken.py: syntax error at line 1"),
    "archive import error": ("submit", [*PLAIN, "--archive", "{tmp}/importer.py"], USAGE,
                             "No module named 'no_such_package'"),
    "archive PARAMS refuses": ("submit", [*PLAIN, "--archive", "{tmp}/declared.py", "--param",
                                          "momentum=0.9"], USAGE,
                               "task archive:declared has no parameter 'momentum'"),
    "unknown collaborator": ("submit", [*PLAIN, "--collaborators", "nosuch"], FAILED,
                             "unknown collaborators (no such shard)"),
    "unknown experiment": ("status", PLAIN, FAILED, "no experiment named 'x'"),
    "plot --out in a missing dir": ("plot", [*PLAIN, "--out", "{tmp}/none/x.png"], USAGE,
                                    "the directory {tmp}/none does not exist"),
    "model --out in a missing dir": ("model", [*PLAIN, "--out", "{tmp}/none/x.npz"], USAGE,
                                     "the directory {tmp}/none does not exist"),
    "no director": ("list", ["--insecure"], USAGE, "no director given; pass --director"),
    "director not HOST:PORT": ("list", ["--director", "localhost", "--insecure"], USAGE,
                               "is not HOST:PORT"),
    "--insecure with certificates": ("list", [*PLAIN, *ALICE], USAGE,
                                     "--insecure together with --ca/--cert/--key"),
    "wait for shards in vain": ("shards", [*PLAIN, "--wait-online", "1", "--timeout", "1"],
                                UNAVAILABLE, "0 of 1 shards online after 1s"),
}


@dataclass(frozen=True)
class Case:
    args: list[str]
    code: int
    says: str
    env: dict[str, str] | None = None


def _cases() -> dict[str, Case]:
    cases = {f"{command}: {mistake}": Case([*SUBCOMMANDS[command], *args], code, says)
             for mistake, (args, code, says) in EVERY_COMMAND.items()
             for command in SUBCOMMANDS}
    cases |= {f"{command}: {mistake}": Case([*SUBCOMMANDS[command], *args], code, says)
              for mistake, (command, args, code, says) in ONE_COMMAND.items()}
    # Partial credentials from the environment are refused the same way, by their names.
    cases["list: FEDKUBE_CA alone"] = Case(
        [*SUBCOMMANDS["list"], "--director", "{plain}"], USAGE,
        "FEDKUBE_CA without FEDKUBE_CERT/FEDKUBE_KEY", env={"FEDKUBE_CA": "{certs}/ca.crt"})
    cases["list: no such --context"] = Case(
        [*SUBCOMMANDS["list"], "--context", "nope"], USAGE, "no context 'nope'")
    return cases


CASES = _cases()


@dataclass(frozen=True)
class Places:
    plain: str  # an insecure director
    mtls: str  # an mTLS director
    down: str  # where nothing listens
    certs: Path
    rogue: Path  # another CA's certificates
    tmp: Path
    config_home: Path  # XDG_CONFIG_HOME of the commands: no config file unless a test writes one

    def fill(self, text: str) -> str:
        return text.format(plain=self.plain, mtls=self.mtls, down=self.down, certs=self.certs,
                           rogue=self.rogue, tmp=self.tmp)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FEDKUBE_", "GRPC_"))}
        env["XDG_CONFIG_HOME"] = str(self.config_home)
        return env | {k: self.fill(v) for k, v in (extra or {}).items()}


def fedkube(places: Places, args: list[str], env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedkube.cli",
                           *(places.fill(a) for a in args)],
                          capture_output=True, text=True, timeout=120, env=places.env(env),
                          cwd=cwd)


def _user_modules(tmp: Path) -> None:
    (tmp / "lacking.py").write_text("def init_model(params):\n    return {}\n")
    (tmp / "broken.py").write_text("def init_model(params)\n    return {}\n")
    (tmp / "importer.py").write_text("import no_such_package\n")
    (tmp / "declared.py").write_text(
        "import numpy as np\nPARAMS = {'learning_rate': 0.5, 'epochs': 1}\n"
        "def init_model(params):\n    return {'w': np.zeros(2, np.float32)}\n"
        "def train(model, data, params):\n    return model, {}\n"
        "def validate(model, data, params):\n    return {'accuracy': 0.0}\n")


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, cert_dir: CertDir,
           rogue_cert_dir: CertDir) -> Iterator[Places]:
    """An insecure director and an mTLS one, for the whole module."""
    work = tmp_path_factory.mktemp("cli-errors")
    plain, mtls = free_port(), free_port()
    directors = [director_process(work / "plain", plain).start(),
                 director_process(work / "mtls", mtls, cert_dir=cert_dir.path).start()]
    try:
        for port, process in zip((plain, mtls), directors, strict=True):
            wait_for(functools.partial(port_open, port), timeout=60,
                     message=f"director on {port}: {process.output()[-2000:]}")
        (work / "config").mkdir()
        _user_modules(work)
        yield Places(plain=f"localhost:{plain}", mtls=f"localhost:{mtls}",
                     down=f"localhost:{free_port()}", certs=cert_dir.path,
                     rogue=rogue_cert_dir.path, tmp=work, config_home=work / "config")
    finally:
        for process in directors:
            process.stop()


@pytest.fixture(scope="module")
def outcomes(places: Places) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case run once, a few at a time (each is a process that mostly waits)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(fedkube, places, case.args, case.env)
                   for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_each_mistake_is_one_line_and_its_exit_code(
        name: str, places: Places, outcomes: dict[str, subprocess.CompletedProcess[str]]
        ) -> None:
    case, result = CASES[name], outcomes[name]
    says = places.fill(case.says)
    shown = f"exit {result.returncode}\nstderr: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, shown
    assert result.returncode == case.code, shown
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fedkube: "), shown
    assert "; " in result.stderr, shown  # what went wrong; what to do
    assert says in result.stderr, shown


@pytest.mark.slow
def test_debug_shows_the_traceback(places: Places) -> None:
    result = fedkube(places, ["--debug", "shards", "--director", "{down}", "--insecure"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UNAVAILABLE" in result.stderr


@pytest.mark.slow
def test_environment_and_config_file_contexts(places: Places) -> None:
    # The environment alone.
    result = fedkube(places, ["shards", "--output", "json"],
                     env={"FEDKUBE_DIRECTOR": "{plain}", "FEDKUBE_INSECURE": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    # A config file with relative paths; its current context, then one by --context.
    home = places.tmp / "home"
    (home / "fedkube").mkdir(parents=True)
    for name in ("ca.crt", "alice.crt", "alice.key"):
        (home / "fedkube" / name).write_bytes((places.certs / name).read_bytes())
    (home / "fedkube" / "config.yaml").write_text(
        f"current-context: lab\ncontexts:\n"
        f"  lab: {{director: '{places.mtls}', ca: ca.crt, cert: alice.crt, key: alice.key}}\n"
        f"  local: {{director: '{places.plain}', insecure: true, client-id: bob}}\n")
    config = {"XDG_CONFIG_HOME": str(home)}
    for args in (["shards"], ["shards", "--context", "local"], ["experiment", "list"]):
        result = fedkube(places, [*args, "--output", "json"], env=config)
        assert result.returncode == 0, (args, result.stderr)
    # Flags win over the environment, which wins over the file.
    result = fedkube(places, ["shards", "--output", "json", "--director", "{plain}",
                              "--insecure"], env={**config, "FEDKUBE_CA": "nope"})
    assert result.returncode == 0, result.stderr
    result = fedkube(places, ["shards"], env={**config, "FEDKUBE_DIRECTOR": "{down}"})
    assert result.returncode == UNAVAILABLE and "connection refused" in result.stderr
    # A broken file is one line naming it.
    (home / "fedkube" / "config.yaml").write_text("contexts: {lab: {colour: blue}}\n")
    result = fedkube(places, ["shards"], env=config)
    assert result.returncode == USAGE and result.stderr.count("\n") == 1
    assert "config.yaml: contexts.lab.colour: Extra inputs are not permitted" in result.stderr


@pytest.mark.slow
def test_version_and_help() -> None:
    from fedkube import __version__

    result = subprocess.run([sys.executable, "-m", "fedkube.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"fedkube {__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{parser.prog} {name}".removeprefix("fedkube ")] = sub
                found |= _subparsers(sub)
    return found


def test_every_client_flag_has_help_and_shows_its_default() -> None:
    from fedkube.cli import build_parser

    commands = _subparsers(build_parser())
    clients = {name: sub for name, sub in commands.items()
               if sub.get_default("client_command")}
    assert set(clients) == {"shards", *(f"experiment {a}" for a in SUBCOMMANDS
                                        if a != "shards")}
    for name, sub in clients.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
    text = clients["experiment submit"].format_help()
    assert "(default: 10)" in text and "SECONDS" in text  # --rounds, --round-timeout
    assert "learning_rate: a number > 0" in text  # --param lists each task's parameters


def test_the_director_refuses_bad_params_of_builtin_tasks(tmp_path: Path) -> None:
    """The director checks a built-in task's params itself: a client of its own (not the
    CLI) cannot submit what the task would fail on in a collaborator."""
    from fedkube.aggregator.runner import AggregatorRunner
    from fedkube.api.errors import InvalidArgumentError
    from fedkube.api.plan import Plan
    from fedkube.tasks.archive import build_archive

    runner = AggregatorRunner(outcome=None)  # type: ignore[arg-type]
    archive = tmp_path / "archive.zip"
    for params, says in (({"bogus": 1}, "has no parameter 'bogus'"),
                         ({"learning_rate": "abc"}, "learning_rate='abc'"),
                         ({"epochs": 0}, "epochs takes an integer >= 1")):
        archive.write_bytes(build_archive(Plan(task="digits-logreg", params=params)))
        with pytest.raises(InvalidArgumentError, match=says):
            runner.inspect(archive, "x")
    archive.write_bytes(build_archive(Plan(task="digits-mlp", params={"hidden": 8})))
    assert runner.inspect(archive, "x") == 10
