"""OpenFL experiment archives read without running them (fedkube.openfl): the recording
unpickler, what the director recognises, what it refuses, the plan it hands envoys."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.openfl.pickles import Record, inspect_pickle
from fedkube.openfl.workspace import (
    PLAN_PATH,
    OpenFLArchiveError,
    federation_uuid,
    load_config,
    point_at_director,
    read_openfl_plan,
)

AGGREGATION_FILE, ASSIGNER_FILE = "aggregation_function_obj.pkl", "task_assigner_obj.pkl"


class Marker:
    """Unpickled by pickle, it would create a file: the classic malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_is_recorded_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    inspected = inspect_pickle(pickle.dumps({"payload": Marker(marker)}))
    assert not marker.exists()
    record = inspected.root["payload"]
    assert isinstance(record, Record)
    assert record.qualified in ("posix.system", "os.system")
    assert record.args == (f"touch {marker}",)


def test_a_damaged_pickle_is_an_error_not_a_crash() -> None:
    data = pickle.dumps({"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="not a readable pickle"):
        inspect_pickle(data[: len(data) // 2])


@pytest.fixture
def openfl_classes() -> Iterator[dict[str, type]]:
    """Stand-ins importable under OpenFL's module paths, so stdlib pickle names them as
    OpenFL's own objects would be named."""
    made: dict[str, type] = {}
    packages = ["openfl", "openfl.interface", "openfl.interface.aggregation_functions"]
    assert not any(name in sys.modules for name in packages)  # no real OpenFL here
    for name in packages:
        sys.modules[name] = types.ModuleType(name)
    modules = {"openfl.interface.aggregation_functions.weighted_average": "WeightedAverage",
               "openfl.interface.aggregation_functions.median": "Median",
               "openfl.interface.aggregation_functions.adam_adaptive_aggregation":
                   "AdamAdaptiveAggregation"}
    for module_name, class_name in modules.items():
        module = types.ModuleType(module_name)
        cls = type(class_name, (), {"__module__": module_name})
        setattr(module, class_name, cls)
        sys.modules[module_name] = module
        made[class_name] = cls
    yield made
    for module_name in [*modules, *packages]:
        del sys.modules[module_name]


PLAN = {
    "aggregator": {"settings": {"rounds_to_train": 3}, "template": "openfl.component.Aggregator"},
    "collaborator": {"settings": {"delta_updates": True}},
    "network": {"settings": {"agg_addr": "director.example", "agg_port": "auto",
                             "hash_salt": "auto", "tls": False}},
    "compression_pipeline": {"template": "openfl.pipelines.NoCompressionPipeline"},
    "api_layer": {"settings": {"aggregation_function_interface_file": AGGREGATION_FILE,
                               "task_assigner_file": ASSIGNER_FILE}},
    "tasks": {},
}


def archive(tmp_path: Path, aggregation: Any, *, plan: dict[str, Any] | None = None,
            assigner: bytes = b"") -> Path:
    path = tmp_path / "archive.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(PLAN_PATH, yaml.dump(plan or PLAN))
        z.writestr(AGGREGATION_FILE, pickle.dumps(aggregation))
        z.writestr(ASSIGNER_FILE, assigner or pickle.dumps(None))
        z.writestr("experiment.py", "print('the owner's script')\n")
    return path


def test_an_aggregation_pickle_naming_other_code_is_refused(
        tmp_path: Path, openfl_classes: dict[str, type]) -> None:
    marker = tmp_path / "ran"
    evil = defaultdict(openfl_classes["WeightedAverage"], {"train": Marker(marker)})
    with pytest.raises(OpenFLArchiveError, match=r"system.*own code.*does not run"):
        read_openfl_plan(archive(tmp_path, evil))
    assert not marker.exists()


def test_a_lossy_compression_pipeline_is_refused(
        tmp_path: Path, openfl_classes: dict[str, type]) -> None:
    plan = {**PLAN, "compression_pipeline": {"template": "openfl.pipelines.KCPipeline"}}
    functions: defaultdict[str, Any] = defaultdict(openfl_classes["WeightedAverage"])
    with pytest.raises(OpenFLArchiveError, match=r"KCPipeline.*lossy"):
        read_openfl_plan(archive(tmp_path, functions, plan=plan))


def test_the_plan_envoys_download_points_at_this_director(
        tmp_path: Path, openfl_classes: dict[str, type]) -> None:
    path = archive(tmp_path, defaultdict(openfl_classes["WeightedAverage"]))
    before = {i.filename: zipfile.ZipFile(path).read(i) for i in zipfile.ZipFile(path).infolist()}
    point_at_director(path, experiment="exp-1", port=50051, address="fedkube-director")
    with zipfile.ZipFile(path) as z:
        after = {i.filename: z.read(i) for i in z.infolist()}
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k != PLAN_PATH} == {
        k: v for k, v in before.items() if k != PLAN_PATH}
    config = load_config(after[PLAN_PATH].decode())
    network = config["network"]["settings"]
    assert (network["agg_addr"], network["agg_port"], network["hash_salt"]) == (
        "fedkube-director", 50051, "fedkube:exp-1")
    # The salt makes each experiment's federation UUID its own.
    point_at_director(path, experiment="exp-2", port=50051, address="fedkube-director")
    other = load_config(zipfile.ZipFile(path).read(PLAN_PATH).decode())
    assert federation_uuid(other) != federation_uuid(config)
    assert federation_uuid(config).startswith("plan.yaml_")


def test_not_an_archive_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(io.BytesIO(b"not a zip").getvalue())
    with pytest.raises(OpenFLArchiveError, match="cannot read"):
        read_openfl_plan(bad)


# -- real pickles, made by OpenFL 1.6's FLExperiment in its own virtualenv ---------------

MAKE_PICKLES = """
import sys, cloudpickle, numpy
from collections import defaultdict
from pathlib import Path
from openfl.interface.interactive_api.experiment import FLExperiment, TaskInterface
from openfl.interface.aggregation_functions import (AdamAdaptiveAggregation,
                                                    AggregationFunction,
                                                    FedCurvWeightedAverage, Median,
                                                    WeightedAverage)
out = Path(sys.argv[1])
ti = TaskInterface()

class OwnAverage(AggregationFunction):
    def call(self, local_tensors, *_):
        Path(sys.argv[2]).write_text("ran")
        return local_tensors[0].tensor

@ti.set_aggregation_function(Median())
@ti.register_fl_task(model="m", data_loader="d", device="dev", optimizer="o")
def fit(m, d, dev, o): return {}

@ti.register_fl_task(model="m", data_loader="d", device="dev")
def score(m, d, dev): return {}

def own_assigner(collaborators, round_number, **kwargs):
    return {c: [] for c in collaborators}

assigner = FLExperiment.define_task_assigner(FLExperiment.__new__(FLExperiment), ti, 3)
for name, obj in {
        "default_assigner": assigner, "own_assigner": own_assigner,
        "median": ti.aggregation_functions,
        "adam": defaultdict(WeightedAverage, {"fit": AdamAdaptiveAggregation(
            params={"w": numpy.ones(2)}, learning_rate=0.05, betas=(0.8, 0.99))}),
        "fedcurv": defaultdict(WeightedAverage, {"fit": FedCurvWeightedAverage()}),
        "own_class": defaultdict(WeightedAverage, {"fit": OwnAverage()})}.items():
    (out / f"{name}.pkl").write_bytes(cloudpickle.dumps(obj))
"""


@pytest.fixture(scope="module")
def real_pickles(tmp_path_factory: pytest.TempPathFactory, openfl_python: Path
                 ) -> dict[str, bytes]:
    import subprocess

    out = tmp_path_factory.mktemp("pickles")
    result = subprocess.run([str(openfl_python), "-c", MAKE_PICKLES, str(out),
                             str(out / "ran")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {p.stem: p.read_bytes() for p in out.glob("*.pkl")}


def real_archive(tmp_path: Path, pickles: dict[str, bytes], aggregation: str,
                 assigner: str = "default_assigner") -> Path:
    path = tmp_path / f"{aggregation}-{assigner}.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(PLAN_PATH, yaml.dump(PLAN))
        z.writestr(AGGREGATION_FILE, pickles[aggregation])
        z.writestr(ASSIGNER_FILE, pickles[assigner])
    return path


@pytest.mark.compat
def test_flexperiments_assigner_and_aggregation_are_recognised(
        tmp_path: Path, real_pickles: dict[str, bytes]) -> None:
    plan = read_openfl_plan(real_archive(tmp_path, real_pickles, "median"))
    assert [(t.name, t.function_name, t.task_type, t.apply_local) for t in plan.tasks] == [
        ("train", "fit", "train", False),
        ("locally_tuned_model_validate", "score", "validate", True),
        ("aggregated_model_validate", "score", "validate", False)]
    assert dict(plan.aggregation) == {"train": "median",
                                      "locally_tuned_model_validate": "weighted_average",
                                      "aggregated_model_validate": "weighted_average"}
    assert (plan.rounds, plan.delta_updates) == (3, True)


@pytest.mark.compat
def test_an_adaptive_aggregation_is_recognised_with_its_optimizers_settings(
        tmp_path: Path, real_pickles: dict[str, bytes]) -> None:
    plan = read_openfl_plan(real_archive(tmp_path, real_pickles, "adam"))
    assert plan.aggregation["train"] == "adam"
    assert dict(plan.optimizer["train"]) == {"learning_rate": 0.05, "beta_1": 0.8,
                                             "beta_2": 0.99, "initial_accumulator_value": 0.0,
                                             "epsilon": 1e-8}


@pytest.mark.compat
@pytest.mark.parametrize(("aggregation", "assigner", "message"), [
    ("own_class", "default_assigner", "custom aggregation function 'OwnAverage'"),
    ("median", "own_assigner", "task assigner 'own_assigner' is its own code"),
    ("fedcurv", "default_assigner", "FedCurvWeightedAverage is not supported yet"),
])
def test_the_owners_code_is_refused_by_name(
        tmp_path: Path, real_pickles: dict[str, bytes], aggregation: str, assigner: str,
        message: str) -> None:
    with pytest.raises(OpenFLArchiveError, match=message):
        read_openfl_plan(real_archive(tmp_path, real_pickles, aggregation, assigner))
    assert not (tmp_path / "ran").exists()


@pytest.mark.compat
def test_the_federation_uuid_is_the_one_openfls_collaborator_computes(
        tmp_path: Path, openfl_python: Path) -> None:
    import subprocess

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.dump(PLAN))
    result = subprocess.run([str(openfl_python), "-c", (
        # (OpenFL 1.6 uses importlib.util without importing it; fx imports it first)
        "import importlib.util; from pathlib import Path; from openfl.federated import Plan; "
        f"print(Plan.parse(Path('{path}')).federation_uuid)")], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == federation_uuid(load_config(
        path.read_text()))
