"""The process runtime's sandbox, tried as a hostile experiment would (issue 22): a user
task in an archive that looks for the envoy's secrets, key and neighbours, forks a daemon
and asks for requirements, run by real envoys through a real director.

The hostile task reports what it saw as its failure (the text the experiment's status
carries), or, when it must keep running, in a file beside its module. Where the envoy
runs as root its collaborators run as a uid of its own: the checks of what the task can
read and write need that, and are skipped elsewhere."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedkube.api.config import EnvoyConfig, SandboxSettings
from fedkube.api.errors import ConfigError
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.collaborator.environment import (
    RequirementsError,
    check_requirements,
    install_requirements,
    pip_arguments,
)
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from fedkube.envoy_agent import sandbox
from fedkube.envoy_agent.process_runtime import collaborator_environment
from fedkube.transport import certs
from fedkube.transport.tls import TLSFiles
from tests.helpers import write_policy

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the sandbox runs collaborators as "
                                "another user only when the envoy runs as root")
SECRET_ENV = "FEDKUBE_TEST_PLANTED_SECRET"
REPORT = "HOSTILE-REPORT "

# Everything it tries, it tries at the start of its first round (the client runs
# init_model here, at submission).
HOSTILE_TASK = b'''
import json, os, time
from pathlib import Path
from fedkube.tasks.models import logreg_init as init_model, logreg_validate as validate


def _succeeds(attempt):
    try:
        attempt()
        return True
    except OSError:
        return False


def _daemon():
    """A daemon as one is made: fork, setsid, fork again; its pid comes through a pipe."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(3600)
        os._exit(0)
    os.close(w)
    os.waitpid(first, 0)
    pid = int(os.read(r, 32))
    os.close(r)
    return pid


def _envoy_environ(pid, secret):
    try:
        return secret.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def train(model, data, params):
    import sklearn.datasets

    probe = params["probe"]
    secret = probe["secret"]
    other = Path(probe["other_envoy"])
    shard_data = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    report = {
        "uid": os.getuid(), "pid": os.getpid(),
        # As the collaborator was started (what its imports set since is not the envoy's).
        "environ": sorted({entry.split(b"=", 1)[0].decode() for entry in
                           Path("/proc/self/environ").read_bytes().split(b"\\0") if entry})[:40],
        "secret_in_environ": any(secret in value for value in os.environ.values()),
        "secret_in_envoy_environ": _envoy_environ(probe["envoy_pid"], secret),
        "key_readable": _succeeds(lambda: Path(probe["key"]).read_bytes()),
        "other_envoy_listed": _succeeds(lambda: os.listdir(other)),
        "other_envoy_written": _succeeds(lambda: (other / "from-the-task").write_text("x")),
        "shard_data_writable": os.access(shard_data, os.W_OK),
        "daemon": _daemon(),
    }
    Path(__file__).with_name("hostile-report.json").write_text(json.dumps(report))
    if probe.get("linger"):
        time.sleep(600)
    raise RuntimeError("HOSTILE-REPORT " + json.dumps(report))
'''


def alive(pid: int) -> bool:
    """Whether pid is a process that has not ended (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def host() -> Iterator[Path]:
    """A directory laid out as a data owner's machine might be, that any user may enter:
    the certificates (keys mode 0600) and each envoy's work directory."""
    path = Path(tempfile.mkdtemp(prefix="fedkube-sandbox-"))
    path.chmod(0o755)
    ca = certs.load_or_create_ca(path / "certs")
    certs.write_pair(path / "certs", "director", certs.issue(ca, "localhost",
                                                             hosts=["127.0.0.1"],
                                                             role="director"))
    for name in ("env1", "env2"):
        certs.write_pair(path / "certs", name, certs.issue(ca, name, role="envoy"))
    certs.write_pair(path / "certs", "alice", certs.issue(ca, "alice", role="owner"))
    (path / "certs").chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _show_logs(started: list[Process]) -> None:
    for process in started:
        print(f"----- {process.name} -----\n{process.output()[-4000:]}")


class Federation:
    """A director and envoys env1, env2 as processes, under mTLS, whose shard policies let
    experiments run their own code (and what `policies` adds); their environment holds a
    planted secret."""

    def __init__(self, work: Path, cert_dir: Path, *,
                 policies: dict[str, dict[str, Any]] | None = None) -> None:
        self.secret = secrets.token_hex(16)
        self.port = free_port()
        self.started: list[Process] = []
        self.started.append(director_process(work, self.port, period=1.0,
                                             cert_dir=cert_dir).start())
        self.envoys = {}
        for index, name in enumerate(("env1", "env2")):
            policy = write_policy(work, {"userCode": True, **(policies or {}).get(name, {})},
                                  name=f"{name}-policy")
            envoy = envoy_process(work, name, self.port, index=index, count=2,
                                  cert_dir=cert_dir, policy=policy)
            envoy.env[SECRET_ENV] = self.secret
            self.started.append(envoy.start())
            self.envoys[name] = envoy
        self.client = DirectorClient(f"localhost:{self.port}",
                                     tls=TLSFiles.from_dir(cert_dir, "alice"),
                                     client_id="alice", timeout=10)
        try:
            self.client.wait_online(2, timeout=60)
        except BaseException:
            _show_logs(self.started)
            self.stop()
            raise

    def submit(self, name: str, plan: Plan, files: dict[str, bytes],
               collaborators: list[str]) -> None:
        archive, initial = experiment_archive(plan, files)
        self.client.submit(name, archive, collaborators=collaborators, initial_model=initial)

    def stop(self) -> None:
        self.client.close()
        for process in self.started:
            process.stop()


def hostile_plan(federation: Federation, work: Path, cert_dir: Path, *,
                 linger: bool = False) -> Plan:
    envoy = federation.envoys["env1"]
    assert envoy.popen is not None
    probe = {"secret": federation.secret, "envoy_pid": envoy.popen.pid,
             "key": str(cert_dir / "env1.key"), "other_envoy": str(work / "env2"),
             "linger": linger}
    return Plan(task="archive:hostile", rounds=1, params={"probe": probe},
                round_timeout_s=120)


@pytest.fixture(scope="module")
def hostile_report(host: Path) -> Iterator[dict[str, Any]]:
    """What the hostile task saw, run by env1 to its end (it fails on purpose)."""
    work = host / "run"
    work.mkdir(mode=0o755)
    federation = Federation(work, host / "certs")
    try:
        federation.submit("hostile", hostile_plan(federation, work, host / "certs"),
                          {"hostile.py": HOSTILE_TASK}, ["env1"])
        status = federation.client.wait("hostile", timeout=180)
        assert status.status == "failed" and REPORT in status.error, status.error
        report: dict[str, Any] = json.loads(status.error.split(REPORT, 1)[1])
        print("the hostile task saw:", report)
        yield report
    except BaseException:
        _show_logs(federation.started)
        raise
    finally:
        federation.stop()


# -- what the task sees ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_secret_planted_in_the_envoys_environment_is_not_visible_to_the_task(
        hostile_report: dict[str, Any]) -> None:
    assert not hostile_report["secret_in_environ"]
    assert SECRET_ENV not in hostile_report["environ"]
    # The minimal environment: nothing of the envoy's (this process's, and so its
    # envoys') but what every collaborator gets.
    inherited = set(hostile_report["environ"]) & set(os.environ)
    assert inherited <= {*sandbox.BASE_ENV, "HOME", "TMPDIR", "PYTHONUNBUFFERED",
                         "PYTHONPATH", "GLIBC_TUNABLES"}, inherited
    if AS_ROOT:  # another user: the envoy's /proc/PID/environ is not its to read
        assert not hostile_report["secret_in_envoy_environ"]


@needs_root
@pytest.mark.slow
def test_the_envoys_key_file_is_not_readable_by_the_task(
        hostile_report: dict[str, Any], host: Path) -> None:
    assert hostile_report["uid"] != 0, "the collaborator ran as root (see the envoy's log)"
    assert (host / "certs" / "env1.key").stat().st_mode & 0o777 == 0o600
    assert not hostile_report["key_readable"]


@needs_root
@pytest.mark.slow
def test_the_task_cannot_write_into_another_envoys_directory_nor_its_shard_data(
        hostile_report: dict[str, Any], host: Path) -> None:
    assert hostile_report["uid"] != 0
    assert not hostile_report["other_envoy_listed"]
    assert not hostile_report["other_envoy_written"]
    assert not (host / "run" / "env2" / "from-the-task").exists()
    assert not hostile_report["shard_data_writable"]


@pytest.mark.slow
def test_a_daemon_the_task_forks_is_gone_when_the_collaborator_ends(
        hostile_report: dict[str, Any]) -> None:
    daemon = hostile_report["daemon"]
    # The experiment has failed, so the collaborator has ended: the daemon, which left
    # its process group and session, must have gone with it.
    wait_for(lambda: not alive(daemon), timeout=30, message=f"daemon {daemon} gone")
    assert not alive(hostile_report["pid"])


@pytest.mark.slow
def test_nothing_of_the_collaborator_survives_its_envoy_sigkilled(host: Path) -> None:
    work = host / "killed"
    work.mkdir(mode=0o755)
    federation = Federation(work, host / "certs")
    try:
        federation.submit("lingering", hostile_plan(federation, work, host / "certs",
                                                    linger=True),
                          {"hostile.py": HOSTILE_TASK}, ["env1"])

        def report() -> dict[str, Any] | None:
            for path in (work / "env1").rglob("hostile-report.json"):
                try:
                    return dict(json.loads(path.read_text()))
                except ValueError:  # caught half-written
                    return None
            return None

        wait_for(lambda: report() is not None, timeout=120, message="the task running")
        seen = report()
        assert seen is not None
        assert alive(seen["daemon"]) and alive(seen["pid"])
        federation.envoys["env1"].kill(signal.SIGKILL)
        wait_for(lambda: not alive(seen["pid"]), timeout=30,
                 message="the collaborator gone with its envoy")
        wait_for(lambda: not alive(seen["daemon"]), timeout=30,
                 message="the daemon it forked gone with its envoy")
    except BaseException:
        _show_logs(federation.started)
        raise
    finally:
        federation.stop()


# -- requirements -----------------------------------------------------------------------

def _wheel(name: str, version: str, source: str) -> bytes:
    """A minimal pure-Python wheel, built by hand so the test needs no network."""
    files = {f"{name}/__init__.py": source.encode(),
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: fedkube-tests\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256="
        f"{base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip('=')},"
        f"{len(data)}\n" for path, data in files.items())
    record += f"{name}-{version}.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for path, data in {**files, f"{name}-{version}.dist-info/RECORD":
                           record.encode()}.items():
            wheel.writestr(path, data)
    return buffer.getvalue()


TASK_NEEDING_A_PACKAGE = b'''
from fedkube.tasks.models import logreg_init as init_model, logreg_validate as validate
from fedkube.tasks.models import logreg_train

def train(model, data, params):
    import fedkube_sandbox_dep

    return logreg_train(model, data, params)
'''
WHEEL = "wheels/fedkube_sandbox_dep-1.0-py3-none-any.whl"


@pytest.mark.slow
def test_a_requirements_file_is_refused_unless_the_policy_allows_it(host: Path) -> None:
    """env1's policy does not allow requirements; env2's does, but no pip option."""
    work = host / "requirements"
    work.mkdir(mode=0o755)
    federation = Federation(work, host / "certs", policies={"env2": {"requirements": True}})
    files = {"needs_dep.py": TASK_NEEDING_A_PACKAGE,
             WHEEL: _wheel("fedkube_sandbox_dep", "1.0", ""),
             "requirements.txt": f"./{WHEEL}\n".encode()}
    plan = Plan(task="archive:needs_dep", rounds=1, params={"learning_rate": 1.0},
                round_timeout_s=60, install_requirements=True)
    try:
        federation.submit("refused", plan, files, ["env1"])
        options = {**files, "requirements.txt":
                   f"--index-url http://127.0.0.1:9/simple\n./{WHEEL}\n".encode()}
        federation.submit("options", plan, options, ["env2"])
        refused = federation.client.wait("refused", timeout=120)
        assert refused.status == "failed", refused
        # Refused before anything of it runs: by the policy's review, and were that
        # passed, by the sandbox (fedkube.envoy_agent.process_runtime), then by the
        # collaborator (fedkube.collaborator.environment).
        assert "requirements" in refused.error and "not allowed" in refused.error, refused
        with_options = federation.client.wait("options", timeout=120)
        assert with_options.status == "failed", with_options
        assert "pip options are not accepted" in with_options.error
        assert "--index-url" in with_options.error
    except BaseException:
        _show_logs(federation.started)
        raise
    finally:
        federation.stop()


def test_requirements_that_would_run_code_or_steer_pip_are_refused() -> None:
    for text in ("numpy>=1.24,<3", "numpy >= 1.24", "./wheels/pkg-1.0-py3-none-any.whl",
                 "pkg[extra]==1.0; python_version >= '3.11'", "# a comment\n\n",
                 "pkg==1.0 \\\n    --hash=sha256:0123 \\\n    --hash sha256:4567",
                 "pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl"):
        check_requirements(text)
    refused = {
        "-e .": "pip options", "--index-url http://x/simple": "pip options",
        "-r more.txt": "pip options", "--extra-index-url http://x": "pip options",
        "-f ./wheels": "pip options", "--no-binary :all:": "pip options",
        "pkg --config-settings=x=y": "only --hash", "./src/": "only wheels",
        "pkg-1.0.tar.gz": "only wheels", "./pkg-1.0.zip": "only wheels",
        "pkg @ https://example.invalid/pkg-1.0.tar.gz": "only wheels",
        "git+https://example.invalid/pkg": "VCS", "pkg @ git+https://example.invalid/p": "VCS",
    }
    for text, reason in refused.items():
        with pytest.raises(RequirementsError, match=reason):
            check_requirements(f"numpy\n{text}\n")


def test_pip_installs_binary_wheels_only_and_hashes_where_asked(tmp_path: Path) -> None:
    assert pip_arguments("binary")[-4:] == ["--only-binary", ":all:", "-r", "requirements.txt"]
    assert "--require-hashes" not in pip_arguments("binary")
    assert "--require-hashes" in pip_arguments("hashes")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    with pytest.raises(RequirementsError, match="does not let experiments install"):
        install_requirements(tmp_path, tmp_path / "venv", policy="refuse")
    assert not (tmp_path / "venv").exists()


# -- settings -------------------------------------------------------------------------------

def test_the_collaborator_environment_is_the_minimal_one_and_what_the_policy_passes() -> None:
    parent = {"PATH": "/bin", "LANG": "C.UTF-8", "AWS_SECRET_ACCESS_KEY": "s3cret",
              "FEDKUBE_TOKEN": "t", "MY_DATA_ROOT": "/data"}
    assert collaborator_environment(parent, ()) == {"PATH": "/bin", "LANG": "C.UTF-8"}
    passed = collaborator_environment(parent, (1,), pass_env=["MY_DATA_ROOT"])
    assert passed == {"PATH": "/bin", "LANG": "C.UTF-8", "MY_DATA_ROOT": "/data",
                      "CUDA_VISIBLE_DEVICES": "1"}
    assert collaborator_environment({}, ())["PATH"] == sandbox.DEFAULT_PATH


def test_the_sandbox_user_is_an_envoys_own_uid_when_it_runs_as_root() -> None:
    settings = SandboxSettings()
    one = sandbox.sandbox_identity(settings, "env1\0/srv/env1", euid=0)
    assert one is not None and one.dedicated
    assert sandbox.DEDICATED_UID_BASE <= one.uid < sandbox.DEDICATED_UID_BASE + 2 * (1 << 24)
    assert one == sandbox.sandbox_identity(settings, "env1\0/srv/env1", euid=0)  # stable
    other = sandbox.sandbox_identity(settings, "env1\0/srv/other", euid=0)
    assert other is not None and other.uid != one.uid
    assert sandbox.sandbox_identity(SandboxSettings(user="root"), "env1", euid=0) is None
    nobody = sandbox.sandbox_identity(SandboxSettings(user="nobody"), "env1", euid=0)
    assert nobody is not None and not nobody.dedicated
    assert nobody.uid == pwd.getpwnam("nobody").pw_uid
    # An envoy that is not root runs them as itself, and cannot be told otherwise.
    assert sandbox.sandbox_identity(settings, "env1", euid=1000) is None
    with pytest.raises(ConfigError, match="only an envoy running as root"):
        sandbox.sandbox_identity(SandboxSettings(user="nobody"), "env1", euid=1000)
    with pytest.raises(ConfigError, match="no such user"):
        sandbox.sandbox_identity(SandboxSettings(user="no-such-user-here"), "env1", euid=0)


def test_sandbox_flags_reach_the_envoy_config(tmp_path: Path) -> None:
    from fedkube.cli.main import build_parser

    config_file = tmp_path / "envoy.yaml"
    config_file.write_text("name: env1\ndirector: localhost:1\ntls: {insecure: true}\n"
                           "sandbox: {pass_env: [MY_DATA_ROOT], user: nobody}\n")
    args = build_parser().parse_args(["envoy", "start", "--config", str(config_file),
                                      "--allow-requirements", "--require-hashes",
                                      "--pass-env", "HF_HOME"])
    from fedkube.cli.envoy import envoy_config

    config = envoy_config(args)
    assert isinstance(config, EnvoyConfig)
    assert config.sandbox == SandboxSettings(pass_env=["HF_HOME"], allow_requirements=True,
                                             require_hashes=True, user="nobody")
    defaults = EnvoyConfig.model_validate({"name": "e", "director": "h:1",
                                           "tls": {"insecure": True}})
    assert defaults.sandbox == SandboxSettings()
    # The work directory is absolute and the shard's own, not the current folder.
    assert defaults.work_dir.is_absolute() and defaults.work_dir.name == "envoy-e"
    with pytest.raises(ValueError, match="require_hashes goes with allow_requirements"):
        SandboxSettings(require_hashes=True)
