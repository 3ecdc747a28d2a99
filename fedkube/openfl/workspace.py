"""An OpenFL 1.6 interactive-API experiment archive: what its plan asks for, read without
running the owner's code, and its network settings pointed at this director.

`FLExperiment.start` packs the frontend's working directory: `plan/plan.yaml` (the whole
plan, defaults merged in), the pickled interface objects named in its `api_layer`, and a
`requirements.txt`. The director needs three things from it, and takes them as follows:

- the rounds, compression pipeline and straggler policy: plan settings, recognised by the
  template's class name;
- the tasks of each round: the task assigner pickle, inspected (fedkube.openfl.pickles),
  recognised as `FLExperiment.define_task_assigner`'s assigner; its Task objects give the
  names, function names and `apply_local`;
- each task's aggregation function: the aggregation-function pickle, inspected; OpenFL's
  standard classes are recognised by name and run by fedkube's implementation.

Anything else (a custom assigner, a class the owner defined) is refused with a message
naming it: the director never runs an experiment's code.

Collaborators dial `network.settings.agg_addr:agg_port` of the plan they receive. OpenFL's
director opens a port per experiment there (derived from the plan's hash); fedkube serves
every experiment's aggregator on the director's own port (one port for firewalls and
Kubernetes Services, the same TLS and roles), so the plan the envoys download says so:
`agg_port` is the director's port, `agg_addr` its advertised address when it has one, and
`hash_salt` (a setting OpenFL reads nowhere) names the experiment, which makes each
experiment's federation UUID, derived from the plan's hash, its own.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkube.api.errors import FedkubeError
from fedkube.openfl.pickles import BY_VALUE, Inspected, PickleError, Record, inspect_pickle, walk

PLAN_PATH = "plan/plan.yaml"
PLAN_NAME = "plan.yaml"  # OpenFL's Plan.name: the file's name, in its federation UUID
SETTINGS = "settings"
TEMPLATE = "template"

DEFAULT_ASSIGNER = "FLExperiment.define_task_assigner.<locals>.assigner"
ASSIGNER_MODULE = "openfl.interface.interactive_api.experiment"
TASK_CLASSES = "openfl.component.assigner.tasks."
AGGREGATION_PACKAGE = "openfl.interface.aggregation_functions."
# OpenFL's aggregation functions fedkube runs, by class name.
AGGREGATIONS = {"WeightedAverage": "weighted_average", "Median": "median",
                "GeometricMedian": "geometric_median", "AdagradAdaptiveAggregation": "adagrad",
                "AdamAdaptiveAggregation": "adam", "YogiAdaptiveAggregation": "yogi"}
ADAPTIVE = {"adagrad", "adam", "yogi"}
# The optimizer settings an adaptive aggregation's pickled optimizer carries.
OPTIMIZER_SETTINGS = ("learning_rate", "beta_1", "beta_2", "initial_accumulator_value",
                      "epsilon")
NOT_YET = {"FedCurvWeightedAverage"}
NO_COMPRESSION = "openfl.pipelines.NoCompressionPipeline"
STRAGGLER_PACKAGE = "openfl.component.straggler_handling_functions."
CUTOFF_TIME = "CutoffTimeBasedStragglerHandling"
PERCENTAGE = "PercentageBasedStragglerHandling"


# What each pickle may name at all: anything else is refused before its content is read.
ASSIGNER_GLOBALS = ("cloudpickle.", TASK_CLASSES)
# (adaptive aggregations hold an optimizer and numpy arrays: recorded, never built)
AGGREGATION_GLOBALS = ("collections.defaultdict", AGGREGATION_PACKAGE,
                       "openfl.utilities.optimizers.", "numpy.", "_codecs.encode")
OWN_CODE = {"aggregation_function_interface_file": "custom aggregation function",
            "task_assigner_file": "custom task assigner"}


class OpenFLArchiveError(FedkubeError, ValueError):
    """An OpenFL experiment fedkube cannot run as sent; the message says why."""


@dataclass(frozen=True)
class OpenFLTask:
    name: str
    function_name: str
    task_type: str  # "train" or "validate"
    apply_local: bool = False


@dataclass(frozen=True)
class StragglerPolicy:
    """OpenFL's straggler handling: a round ends when every collaborator is done, or
    (cut-off time) once `cutoff_s` have passed since its first tasks went out and at least
    `minimum_reporting` are done, or (percentage) as soon as that share is done."""

    kind: str = "cutoff_time"  # or "percentage"
    cutoff_s: float | None = None  # None: no cut-off (OpenFL's np.inf)
    percent: float = 1.0
    minimum_reporting: int = 1


@dataclass(frozen=True)
class OpenFLPlan:
    rounds: int
    tasks: tuple[OpenFLTask, ...]  # what every collaborator runs each round, in order
    aggregation: Mapping[str, str]  # task name -> fedkube's aggregation (AGGREGATIONS)
    # task name -> its adaptive optimizer's settings (for "adagrad", "adam", "yogi")
    optimizer: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    straggler: StragglerPolicy = field(default_factory=StragglerPolicy)
    federation_uuid: str = ""
    aggregator_uuid: str = ""
    delta_updates: bool = False


def is_openfl_archive(archive: Path | bytes) -> bool:
    try:
        with _open(archive) as z:
            return PLAN_PATH in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _open(archive: Path | bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive if isinstance(archive, Path) else io.BytesIO(archive))


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if not isinstance(section, dict):
        raise OpenFLArchiveError(f"{PLAN_PATH}: section {name!r} is not a mapping")
    return section


def _settings(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    settings = _section(config, name).get(SETTINGS) or {}
    if not isinstance(settings, dict):
        raise OpenFLArchiveError(f"{PLAN_PATH}: {name}.settings is not a mapping")
    return settings


def normalised(config: dict[str, Any]) -> dict[str, Any]:
    """The plan as OpenFL's Plan.parse holds it: every section has `settings`."""
    for name, section in config.items():
        if not isinstance(section, dict):
            raise OpenFLArchiveError(f"{PLAN_PATH}: section {name!r} is not a mapping")
        if section.get(SETTINGS) is None:
            section[SETTINGS] = {}
        section.pop("defaults", None)
    return config


def federation_uuid(config: dict[str, Any]) -> str:
    """`Plan.resolve`'s federation UUID: the plan's name and its hash (SHA-384 of PyYAML's
    dump of the parsed plan)."""
    digest = hashlib.sha384(yaml.dump(config).encode("utf-8")).hexdigest()
    return f"{PLAN_NAME}_{digest[:8]}"


def load_config(text: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise OpenFLArchiveError(f"invalid {PLAN_PATH}: {exc}") from exc
    if not isinstance(config, dict):
        raise OpenFLArchiveError(f"{PLAN_PATH} is not a mapping")
    return normalised(config)


def _pickle(z: zipfile.ZipFile, config: Mapping[str, Any], setting: str,
            allowed: tuple[str, ...]) -> Inspected | None:
    """The inspected object of an api_layer pickle (its records), or None if not named.
    A pickle naming a global outside `allowed` is refused, naming it."""
    filename = _settings(config, "api_layer").get(setting)
    if not filename:
        return None
    try:
        data = z.read(str(filename))
    except KeyError:
        raise OpenFLArchiveError(f"the archive has no {filename} (api_layer {setting})") from None
    try:
        inspected = inspect_pickle(data)
    except PickleError as exc:
        raise OpenFLArchiveError(f"{filename}: {exc}") from exc
    own = [r.qualified.removeprefix(BY_VALUE) for r in inspected.records
           if r.qualified.startswith(BY_VALUE)]
    strange = [r.qualified.removesuffix("()") for r in inspected.records
               if not r.qualified.removesuffix("()").startswith(allowed)]
    if own or strange:
        what = (f"{OWN_CODE.get(setting, 'class')} {own[0]!r}" if own
                else f"{setting} {strange[0]!r}")
        raise OpenFLArchiveError(
            f"{what} is the experiment's own code, which the director does not run; "
            f"fedkube runs FLExperiment's default assigner and OpenFL's "
            f"{sorted(AGGREGATIONS)} aggregation functions")
    return inspected


def _tasks(inspected: Inspected | None) -> tuple[OpenFLTask, ...]:
    """The default assigner's tasks for every collaborator of every round (as
    FLExperiment.define_task_assigner builds it); a custom assigner is refused."""
    if inspected is None:
        raise OpenFLArchiveError("the plan names no task assigner (api_layer "
                                 "task_assigner_file): only interactive-API experiments run")
    names = _function_names(inspected)
    if DEFAULT_ASSIGNER not in names or ASSIGNER_MODULE not in inspected.strings():
        custom = sorted(n for n in names if n != DEFAULT_ASSIGNER) or ["?"]
        raise OpenFLArchiveError(
            f"the experiment's task assigner {custom[0]!r} is its own code, which the "
            f"director does not run; fedkube runs FLExperiment's default assigner (leave "
            f"task_assigner unset in FLExperiment.start)")
    by_name: dict[str, OpenFLTask] = {}
    for record in inspected.named(TASK_CLASSES):
        state = record.state_dict()
        try:
            task = OpenFLTask(name=str(state["name"]), function_name=str(state["function_name"]),
                              task_type=str(state["task_type"]),
                              apply_local=bool(state.get("apply_local", False)))
        except KeyError as exc:
            raise OpenFLArchiveError(f"a task of the assigner lacks {exc}") from None
        by_name[task.name] = task
    train = by_name.get("train")
    local, aggregated = (by_name.get("locally_tuned_model_validate"),
                         by_name.get("aggregated_model_validate"))
    if aggregated is None:
        raise OpenFLArchiveError("the experiment registers no validate task")
    if train is None:
        return (aggregated,)
    if local is None:
        raise OpenFLArchiveError("the experiment's tasks lack locally_tuned_model_validate")
    return (train, local, aggregated)


def _function_names(inspected: Inspected) -> set[str]:
    """The qualified names of the functions a pickle rebuilds (cloudpickle sets each with
    a _function_setstate call whose state holds __qualname__)."""
    return {str(obj["__qualname__"]) for record in inspected.records
            if record.qualified.endswith("._function_setstate")
            for obj in walk(record.args) if isinstance(obj, dict) and "__qualname__" in obj}


def _aggregations(inspected: Inspected | None, tasks: tuple[OpenFLTask, ...]
                  ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Each task's aggregation, from the pickled defaultdict (function name -> an
    AggregationFunction); WeightedAverage where none is set, as OpenFL's Assigner does.
    And the settings of the adaptive ones' optimizers."""
    by_function: dict[str, str] = {}
    settings: dict[str, dict[str, float]] = {}
    if inspected is not None:
        root = inspected.root
        if not (isinstance(root, Record) and root.qualified == "collections.defaultdict"):
            raise OpenFLArchiveError("the aggregation functions' pickle does not hold "
                                     "FLExperiment's mapping of task functions to them")
        for function, value in root.items.items():
            qualified = value.qualified if isinstance(value, Record) else type(value).__name__
            by_function[str(function)] = _aggregation(qualified)
            if by_function[str(function)] in ADAPTIVE and isinstance(value, Record):
                settings[str(function)] = _optimizer_settings(value)
    return ({t.name: by_function.get(t.function_name, "weighted_average") for t in tasks},
            {t.name: settings[t.function_name] for t in tasks if t.function_name in settings})


def _optimizer_settings(aggregation: Record) -> dict[str, float]:
    optimizer = aggregation.state_dict().get("optimizer")
    state = optimizer.state_dict() if isinstance(optimizer, Record) else {}
    found = {k: state[k] for k in OPTIMIZER_SETTINGS if k in state}
    if not all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in found.values()):
        raise OpenFLArchiveError(f"the settings of {aggregation.qualified} are not numbers")
    return {k: float(v) for k, v in found.items()}


def _aggregation(qualified: str) -> str:
    class_name = qualified.rsplit(".", 1)[-1]
    if qualified.startswith(AGGREGATION_PACKAGE) and class_name in AGGREGATIONS:
        return AGGREGATIONS[class_name]
    if qualified.startswith(AGGREGATION_PACKAGE) and class_name in NOT_YET:
        raise OpenFLArchiveError(f"aggregation function {class_name} is not supported yet; "
                                 f"fedkube runs {sorted(AGGREGATIONS)}")
    name = qualified.removeprefix(BY_VALUE)
    raise OpenFLArchiveError(
        f"custom aggregation function {name!r} is the experiment's own code, which the "
        f"director does not run; fedkube runs OpenFL's {sorted(AGGREGATIONS)}")


def _straggler(config: Mapping[str, Any]) -> StragglerPolicy:
    section = _section(config, "straggler_handling_policy")
    template = str(section.get(TEMPLATE, STRAGGLER_PACKAGE + CUTOFF_TIME))
    settings = section.get(SETTINGS) or {}
    class_name = template.rsplit(".", 1)[-1]
    if not template.startswith(STRAGGLER_PACKAGE) or class_name not in (CUTOFF_TIME,
                                                                         PERCENTAGE):
        raise OpenFLArchiveError(f"straggler handling policy {template!r} is not one of "
                                 f"OpenFL's ({CUTOFF_TIME}, {PERCENTAGE})")
    try:
        minimum = int(settings.get("minimum_reporting", 1))
        if minimum <= 0:
            raise ValueError("minimum_reporting must be > 0")
        if class_name == PERCENTAGE:
            return StragglerPolicy("percentage", minimum_reporting=minimum,
                                   percent=float(settings.get("percent_collaborators_needed",
                                                              1.0)))
        cutoff = float(settings.get("straggler_cutoff_time", math.inf))
    except (TypeError, ValueError) as exc:
        raise OpenFLArchiveError(f"straggler_handling_policy settings: {exc}") from exc
    return StragglerPolicy("cutoff_time", cutoff_s=None if math.isinf(cutoff) else cutoff,
                           minimum_reporting=minimum)


def read_openfl_plan(archive: Path | bytes) -> OpenFLPlan:
    """What the archive's plan asks of the aggregator; raises OpenFLArchiveError for what
    fedkube cannot run."""
    try:
        with _open(archive) as z:
            try:
                text = z.read(PLAN_PATH).decode()
            except KeyError:
                raise OpenFLArchiveError(f"the archive has no {PLAN_PATH}") from None
            config = load_config(text)
            assigner = _pickle(z, config, "task_assigner_file", ASSIGNER_GLOBALS)
            aggregation = _pickle(z, config, "aggregation_function_interface_file",
                                  AGGREGATION_GLOBALS)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise OpenFLArchiveError(f"cannot read the archive: {exc}") from exc
    pipeline = str(_section(config, "compression_pipeline").get(TEMPLATE, NO_COMPRESSION))
    if pipeline != NO_COMPRESSION:
        raise OpenFLArchiveError(
            f"compression pipeline {pipeline!r} is lossy: fedkube decodes "
            f"{NO_COMPRESSION} only (remove compression_pipeline from the plan)")
    try:
        rounds = int(_settings(config, "aggregator")["rounds_to_train"])
    except (KeyError, TypeError, ValueError):
        raise OpenFLArchiveError("aggregator.settings.rounds_to_train is not a number") from None
    if not 1 <= rounds <= 100_000:
        raise OpenFLArchiveError(f"rounds_to_train {rounds} is not within 1..100000")
    tasks = _tasks(assigner)
    uuid = federation_uuid(config)
    by_task, optimizer = _aggregations(aggregation, tasks)
    return OpenFLPlan(
        rounds=rounds, tasks=tasks, aggregation=by_task, optimizer=optimizer,
        straggler=_straggler(config), federation_uuid=uuid, aggregator_uuid=f"aggregator_{uuid}",
        delta_updates=bool(_settings(config, "collaborator").get("delta_updates", False)))


def prefers_cuda(archive: Path | bytes) -> bool:
    """Whether the plan's collaborators use CUDA devices when they have some."""
    try:
        with _open(archive) as z:
            config = load_config(z.read(PLAN_PATH).decode())
    except (KeyError, zipfile.BadZipFile, OSError, UnicodeDecodeError):
        return False
    policy = _settings(config, "collaborator").get("device_assignment_policy", "CPU_ONLY")
    return str(policy) == "CUDA_PREFERRED"


def point_at_director(archive: Path, *, experiment: str, port: int,
                      address: str | None = None) -> None:
    """Rewrites the archive's plan so its collaborators dial this director (see the
    module's docstring); every other member is copied unchanged."""
    with zipfile.ZipFile(archive) as z:
        config = load_config(z.read(PLAN_PATH).decode())
        network = config.setdefault("network", {SETTINGS: {}})[SETTINGS]
        network["agg_port"] = port
        if address:
            network["agg_addr"] = address
        network["hash_salt"] = f"fedkube:{experiment}"
        fd, tmp_name = tempfile.mkstemp(dir=archive.parent, prefix=".archive-")
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info.filename == PLAN_PATH:
                    out.writestr(info, yaml.dump(config))
                else:
                    with z.open(info) as src, out.open(info, "w") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
    os.replace(tmp_name, archive)
