"""A shard's policy and plan review (fedkube.api.policy, fedkube.review): each rule refuses what
it should with a reason that names it, and lets through what it should; the review hooks;
the policy file's errors, one line each."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.api.compute import ComputeResources
from fedkube.api.errors import ConfigError
from fedkube.api.plan import Plan
from fedkube.api.policy import ShardPolicy, load_policy, parse_quantity
from fedkube.openfl.workspace import PLAN_PATH
from fedkube.review.plan_review import Submission, Verdict, describe, review
from tests.helpers import ROOT

USER_MODULE = b"def init_model(params): ...\ndef train(m, d, p): ...\ndef validate(m, d, p): ...\n"


def fedkube_archive(tmp_path: Path, plan: Plan, files: dict[str, bytes] | None = None,
                    name: str = "archive.zip") -> Path:
    from fedkube.tasks.archive import build_archive

    path = tmp_path / name
    path.write_bytes(build_archive(plan, files))
    return path


def openfl_archive(tmp_path: Path, *, rounds: int = 3, cuda: bool = False,
                   requirements: str | None = None) -> Path:
    """An OpenFL workspace as FLExperiment.start zips it: plan/plan.yaml, the pickles the
    plan names, the owner's code."""
    plan = {"aggregator": {"settings": {"rounds_to_train": rounds},
                           "template": "openfl.component.Aggregator"},
            "collaborator": {"settings": {"device_assignment_policy":
                                          "CUDA_PREFERRED" if cuda else "CPU_ONLY"}},
            "api_layer": {"settings": {"task_assigner_file": "task_assigner_obj.pkl"}}}
    path = tmp_path / "openfl.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(PLAN_PATH, yaml.dump(plan))
        z.writestr("task_assigner_obj.pkl", b"")
        z.writestr("experiment.py", "print('the owner's script')\n")
        if requirements is not None:
            z.writestr("requirements.txt", requirements)
    return path


def submission(tmp_path: Path, plan: Plan | None = None, *, owner: str = "owner:alice",
               files: dict[str, bytes] | None = None) -> Submission:
    archive = fedkube_archive(tmp_path, plan or Plan(task="digits-logreg", rounds=5), files)
    return describe(archive, "exp-1", owner)


def user_task(tmp_path: Path, **plan: Any) -> Submission:
    return submission(tmp_path, Plan(task="archive:mytask", **plan),
                      files={"mytask.py": USER_MODULE})


def refused(verdict: Verdict, *fragments: str) -> None:
    assert verdict.decision == "refused", verdict
    for fragment in fragments:
        assert fragment in verdict.reason, (fragment, verdict.reason)


ACCEPTED = Verdict("accepted", "the shard policy allows it")


# -- describe -----------------------------------------------------------------------------

def test_describe_reads_a_fedkube_archive(tmp_path: Path) -> None:
    resources = ComputeResources(requests={"cpu": "2"}, limits={"memory": "4Gi"})
    s = submission(tmp_path, Plan(task="archive:mytask", rounds=7, gpus_per_collaborator=2,
                                  collaborator_resources=resources, install_requirements=True),
                   files={"mytask.py": USER_MODULE, "requirements.txt": b"numpy\n"})
    assert (s.experiment, s.owner, s.openfl, s.task, s.rounds, s.gpus) == (
        "exp-1", "owner:alice", False, "archive:mytask", 7, 2)
    assert (s.user_code, s.requirements, s.resources) == (True, True, resources)
    assert s.digest == hashlib.sha256(s.archive.read_bytes()).hexdigest()
    assert s.listing == ["plan.yaml", "mytask.py", "requirements.txt"]
    assert yaml.safe_load(s.plan_text)["rounds"] == 7


def test_describe_reads_an_openfl_archive(tmp_path: Path) -> None:
    s = describe(openfl_archive(tmp_path, rounds=4, cuda=True, requirements="numpy==2.0\n"),
                 "exp-2", "alice", devices=3)
    assert (s.openfl, s.task, s.rounds, s.gpus, s.user_code, s.requirements) == (
        True, "openfl", 4, 3, True, True)
    assert PLAN_PATH in s.listing and "experiment.py" in s.listing
    assert yaml.safe_load(s.plan_text)["aggregator"]["settings"]["rounds_to_train"] == 4
    # A requirements.txt of comments and blank lines asks to install nothing.
    quiet = describe(openfl_archive(tmp_path, requirements="# none\n\n"), "e", "alice")
    assert (quiet.requirements, quiet.gpus) == (False, 0)


# -- the rules, one by one ----------------------------------------------------------------

def test_the_default_policy_runs_built_in_tasks_only(tmp_path: Path) -> None:
    policy = ShardPolicy()
    assert review(policy, submission(tmp_path)) == ACCEPTED
    refused(review(policy, user_task(tmp_path)), "user code is not allowed",
            "task archive:mytask", "`userCode: true`")
    needs = submission(tmp_path, Plan(task="digits-logreg", install_requirements=True),
                       files={"requirements.txt": b"numpy\n"})
    refused(review(policy, needs), "shard policy: requirements.txt is not allowed")
    openfl = describe(openfl_archive(tmp_path), "exp", "alice")
    refused(review(policy, openfl), "user code is not allowed",
            "an OpenFL experiment runs its own code")


def test_owners_rule(tmp_path: Path) -> None:
    policy = ShardPolicy(owners=["owner:alice"])
    assert review(policy, submission(tmp_path, owner="owner:alice")).decision == "accepted"
    refused(review(policy, submission(tmp_path, owner="owner:bob")),
            "shard policy: owner 'owner:bob' may not use this shard (allowed: owner:alice)")
    # An admin is a principal of its own, and an empty list lets nobody in.
    refused(review(policy, submission(tmp_path, owner="admin:alice")), "'admin:alice'")
    refused(review(ShardPolicy(owners=[]), submission(tmp_path)), "(allowed: nobody)")


def test_tasks_rule(tmp_path: Path) -> None:
    policy = ShardPolicy(tasks=["digits-logreg"])
    assert review(policy, submission(tmp_path)).decision == "accepted"
    refused(review(policy, submission(tmp_path, Plan(task="digits-mlp"))),
            "shard policy: task 'digits-mlp' is not allowed", "(allowed: digits-logreg)")
    with pytest.raises(ValueError, match="userCode or archives"):
        ShardPolicy(tasks=["archive:mytask"])


def test_user_code_is_allowed_by_user_code_or_by_the_archive_digest(tmp_path: Path) -> None:
    s = user_task(tmp_path)
    refused(review(ShardPolicy(), s), f"by the archive's digest {s.digest}")
    assert review(ShardPolicy(user_code=True), s).decision == "accepted"
    assert review(ShardPolicy(archives=[s.digest]), s).decision == "accepted"
    assert review(ShardPolicy(archives=[f"sha256:{s.digest.upper()}"]), s).decision == (
        "accepted")
    other = hashlib.sha256(b"another archive").hexdigest()
    refused(review(ShardPolicy(archives=[other]), s), "user code is not allowed")
    # The digest lets the code run, not its requirements.
    needs = user_task(tmp_path, install_requirements=True)
    refused(review(ShardPolicy(archives=[needs.digest]), needs),
            "requirements.txt is not allowed")
    with pytest.raises(ValueError, match="pattern"):
        ShardPolicy(archives=["not-a-digest"])


def test_requirements_rule(tmp_path: Path) -> None:
    needs = user_task(tmp_path, install_requirements=True)
    refused(review(ShardPolicy(user_code=True), needs), "`requirements: true`")
    assert review(ShardPolicy(user_code=True, requirements=True), needs).decision == (
        "accepted")
    openfl = describe(openfl_archive(tmp_path, requirements="numpy\n"), "exp", "alice")
    refused(review(ShardPolicy(user_code=True), openfl), "requirements.txt is not allowed")
    assert review(ShardPolicy(user_code=True, requirements=True), openfl).decision == (
        "accepted")
    with pytest.raises(ValueError, match="requireHashes goes with requirements"):
        ShardPolicy(require_hashes=True)


def test_rounds_rule(tmp_path: Path) -> None:
    policy = ShardPolicy(max_rounds=20, user_code=True)
    assert review(policy, submission(tmp_path, Plan(task="digits-logreg", rounds=20))
                  ).decision == "accepted"
    refused(review(policy, submission(tmp_path, Plan(task="digits-logreg", rounds=50))),
            "shard policy: 50 rounds, more than the 20 allowed (maxRounds)")
    openfl = describe(openfl_archive(tmp_path, rounds=21), "exp", "alice")
    refused(review(policy, openfl), "21 rounds, more than the 20 allowed")


def test_gpus_rule(tmp_path: Path) -> None:
    policy = ShardPolicy(max_gpus=1, user_code=True)
    one = submission(tmp_path, Plan(task="digits-logreg", gpus_per_collaborator=1))
    assert review(policy, one).decision == "accepted"
    two = submission(tmp_path, Plan(task="digits-logreg", gpus_per_collaborator=2))
    refused(review(policy, two), "shard policy: 2 GPUs per collaborator, more than the 1 "
                                 "allowed (maxGpus)")
    in_resources = submission(tmp_path, Plan(task="digits-logreg", collaborator_resources=
                                             ComputeResources(limits={"nvidia.com/gpu": "4"})))
    refused(review(policy, in_resources), "4 GPUs per collaborator")
    # An OpenFL plan that prefers CUDA gets all the envoy's devices; one on CPU none.
    cuda = describe(openfl_archive(tmp_path, cuda=True), "exp", "alice", devices=2)
    refused(review(policy, cuda), "2 GPUs per collaborator")
    cpu = describe(openfl_archive(tmp_path), "exp", "alice", devices=2)
    assert review(ShardPolicy(max_gpus=0, user_code=True), cpu).decision == "accepted"


def test_cpu_and_memory_rules(tmp_path: Path) -> None:
    policy = ShardPolicy(max_cpu="2", max_memory="8Gi")

    def asking(**resources: dict[str, str]) -> Submission:
        return submission(tmp_path, Plan(task="digits-logreg",
                                         collaborator_resources=ComputeResources(**resources)))

    within = asking(requests={"cpu": "1500m", "memory": "8Gi"},
                    limits={"cpu": "2", "memory": "8192Mi"})
    assert review(policy, within).decision == "accepted"
    assert review(policy, submission(tmp_path)).decision == "accepted"  # names none
    refused(review(policy, asking(limits={"cpu": "2001m"})),
            "shard policy: cpu limit 2001m is more than the 2 allowed (maxCpu)")
    refused(review(policy, asking(requests={"cpu": "3"})), "cpu request 3")
    refused(review(policy, asking(requests={"memory": "9G"})),
            "shard policy: memory request 9G is more than the 8Gi allowed (maxMemory)")
    refused(review(policy, asking(limits={"memory": "1Ti"})), "memory limit 1Ti")
    with pytest.raises(ValueError, match="pattern"):
        ShardPolicy(max_memory="lots")


def test_quantities_parse_as_kubernetes_reads_them() -> None:
    assert parse_quantity("500m") == parse_quantity("0.5") == parse_quantity(0.5)
    assert parse_quantity(2) == 2
    assert parse_quantity("1Gi") == 1 << 30
    assert parse_quantity("1G") == 10**9
    assert parse_quantity("1e3") == parse_quantity("1k") == 1000
    assert parse_quantity("1Ki") == 1024
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("1 GB")


def test_the_rules_apply_in_order(tmp_path: Path) -> None:
    policy = ShardPolicy(owners=["owner:alice"], max_rounds=1)
    both = user_task(tmp_path, rounds=5, install_requirements=True)
    refused(review(policy, describe(both.archive, "exp", "owner:bob")), "owner 'owner:bob'")
    refused(review(policy, both), "user code is not allowed")
    refused(review(policy.model_copy(update={"user_code": True}), both),
            "requirements.txt is not allowed")
    refused(review(ShardPolicy(user_code=True, requirements=True, max_rounds=1), both),
            "5 rounds")


def test_manual_approval_awaits_the_data_owner(tmp_path: Path) -> None:
    policy = ShardPolicy(approval="manual")
    assert review(policy, submission(tmp_path)) == Verdict(
        "awaiting", "waiting for the data owner's approval")
    # A refusal by the rules stands: there is nothing to approve.
    refused(review(policy, user_task(tmp_path)), "user code is not allowed")


# -- the review hooks ---------------------------------------------------------------------

REVIEWER = '''
import pathlib

seen = []

def accept(file_name, file_path):
    seen.append((file_name, pathlib.Path(file_path).read_text()))
    return True

def refuse(file_name, file_path):
    return False

def explode(file_name, file_path):
    raise ValueError("rounds must stay under 3")

async def coroutine(file_name, file_path):
    return True
'''


def test_the_review_callback_accepts_refuses_or_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "plan_reviewer.py").write_text(REVIEWER)
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.delitem(sys.modules, "plan_reviewer", raising=False)
    s = submission(tmp_path)

    def with_callback(name: str) -> Verdict:
        return review(ShardPolicy(review_callback=f"plan_reviewer:{name}"), s)

    assert with_callback("accept") == ACCEPTED
    import plan_reviewer  # type: ignore[import-not-found]

    assert plan_reviewer.seen == [("plan.yaml", s.plan_text)]
    refused(with_callback("refuse"), "review callback refused the plan")
    refused(with_callback("explode"), "review callback refused the plan: rounds must stay "
                                      "under 3")
    refused(with_callback("coroutine"), "plain function")
    refused(with_callback("missing"), "review callback plan_reviewer:missing cannot be loaded")
    refused(review(ShardPolicy(review_callback="no_such_module_here:f"), s), "cannot be loaded")
    # The rules come first: a refused experiment never reaches the callback.
    plan_reviewer.seen.clear()
    refused(review(ShardPolicy(review_callback="plan_reviewer:accept"), user_task(tmp_path)),
            "user code is not allowed")
    assert plan_reviewer.seen == []
    # And a callback's refusal stands under manual approval.
    refused(review(ShardPolicy(review_callback="plan_reviewer:refuse", approval="manual"), s),
            "review callback refused the plan")
    with pytest.raises(ValueError, match="pattern"):
        ShardPolicy(review_callback="not a callable")


def command(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_the_review_command_reads_the_submission_and_accepts(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    script = f"import sys, pathlib; pathlib.Path({str(seen)!r}).write_text(sys.stdin.read())"
    s = user_task(tmp_path, rounds=3)
    policy = ShardPolicy(user_code=True, review_command=command(script))
    assert review(policy, s) == ACCEPTED
    given = json.loads(seen.read_text())
    assert {k: given[k] for k in ("plan", "listing", "owner", "experiment", "digest", "task",
                                  "rounds", "gpus")} == {
        "plan": s.plan_text, "listing": ["plan.yaml", "mytask.py"], "owner": "owner:alice",
        "experiment": "exp-1", "digest": s.digest, "task": "archive:mytask", "rounds": 3,
        "gpus": 0}
    assert given["user_code"] is True and given["openfl"] is False


def test_the_review_command_refuses_with_its_first_line(tmp_path: Path) -> None:
    s = submission(tmp_path)
    script = ("import json, sys; plan = json.load(sys.stdin); "
              "print(); print(f'{plan[\"task\"]} is not reviewed yet'); print('more'); "
              "sys.exit(3)")
    refused(review(ShardPolicy(review_command=command(script)), s),
            "review command refused the plan: digits-logreg is not reviewed yet")
    on_stderr = "import sys; sys.stdin.read(); sys.exit('no GPUs for you')"
    refused(review(ShardPolicy(review_command=command(on_stderr)), s),
            "review command refused the plan: no GPUs for you")
    silent = "import sys; sys.exit(4)"
    refused(review(ShardPolicy(review_command=command(silent)), s), "exited with status 4")
    refused(review(ShardPolicy(review_command=[str(tmp_path / "no-such-reviewer")]), s),
            "cannot start")


def test_a_review_command_that_runs_too_long_refuses(tmp_path: Path) -> None:
    s = submission(tmp_path)
    # A child of the command holds the pipes too: its whole session is stopped.
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")
    started = time.monotonic()
    verdict = review(ShardPolicy(review_command=command(script)), s, command_timeout_s=0.5)
    refused(verdict, "review command timed out after 0.5 s")
    assert time.monotonic() - started < 10


def test_the_callback_runs_before_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "refusing_reviewer.py").write_text("def review(name, path):\n    return False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ran = tmp_path / "command-ran"
    policy = ShardPolicy(review_callback="refusing_reviewer:review",
                         review_command=command(f"open({str(ran)!r}, 'w')"))
    refused(review(policy, submission(tmp_path)), "review callback refused the plan")
    assert not ran.exists()


# -- the policy file ----------------------------------------------------------------------

def test_a_policy_file_takes_camel_case_or_snake_case(tmp_path: Path) -> None:
    camel = tmp_path / "camel.yaml"
    camel.write_text("owners: [owner:alice]\nuserCode: true\nmaxRounds: 5\nmaxCpu: 2\n"
                     "maxMemory: 4Gi\nreviewCommand: [review-plan, --strict]\n"
                     "passEnv: [HTTPS_PROXY]\napproval: manual\n")
    snake = tmp_path / "snake.yaml"
    snake.write_text("owners: [owner:alice]\nuser_code: true\nmax_rounds: 5\nmax_cpu: '2'\n"
                     "max_memory: 4Gi\nreview_command: [review-plan, --strict]\n"
                     "pass_env: [HTTPS_PROXY]\napproval: manual\n")
    assert load_policy(camel) == load_policy(snake)
    policy = load_policy(camel)
    assert (policy.user_code, policy.max_rounds, policy.max_cpu, policy.approval) == (
        True, 5, "2", "manual")
    assert policy.model_dump(by_alias=True, exclude_defaults=True)["reviewCommand"] == [
        "review-plan", "--strict"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_policy(empty) == ShardPolicy()
    with pytest.raises(ValueError, match="frozen"):
        policy.user_code = False


@pytest.mark.parametrize(("text", "message"), [
    ("userCode: maybe\nmaxRounds: 0\n", r"userCode: Input should be a valid boolean.*"
                                         r"\(and 1 more\)$"),
    ("maxRound: 5\n", r"maxRound: Extra inputs are not permitted$"),
    ("approval: sometimes\n", r"approval: Input should be 'automatic' or 'manual'$"),
    ("owners: [alice\nuserCode: true\n", r"not YAML at line \d+: "),
    ("- owners\n", r"the top level must be a mapping$"),
])
def test_policy_file_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"invalid shard policy {path}: ")
    assert re.search(message, str(caught.value)), str(caught.value)


def test_a_missing_policy_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read the shard policy .*missing\.yaml: "
                                          r"No such file or directory$"):
        load_policy(tmp_path / "missing.yaml")


def test_the_documented_example_is_a_valid_policy() -> None:
    text = (ROOT / "docs" / "concepts.md").read_text()
    section = text[text.index("## Shard policy and plan review"):]
    example = re.search(r"```yml\n(.*?)```", section, re.S)
    assert example is not None
    policy = ShardPolicy.model_validate(yaml.safe_load(example.group(1)))
    assert policy.owners == ["owner:alice", "owner:bob"] and policy.max_memory == "16Gi"
    assert set(policy.model_dump(by_alias=True)) <= set(
        yaml.safe_load(example.group(1)))  # every field shown
