"""The wire contract: generated code is fresh, and our descriptors equal OpenFL 1.6's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from fedkube.proto import aggregator_pb2, base_pb2, director_pb2

ROOT = Path(__file__).resolve().parent.parent

# Prints, for each OpenFL protocol file, its messages, enums and services as plain data.
DUMP = r"""
import json, sys
from google.protobuf import descriptor_pb2
from openfl.protocols import base_pb2, director_pb2, aggregator_pb2
out = {}
for key, mod in (("base", base_pb2), ("director", director_pb2), ("aggregator", aggregator_pb2)):
    proto = descriptor_pb2.FileDescriptorProto()
    mod.DESCRIPTOR.CopyToProto(proto)
    out[key] = proto.SerializeToString().hex()
json.dump(out, sys.stdout)
"""


class Shape(TypedDict):
    package: str
    syntax: str
    messages: dict[str, dict[str, object]]
    enums: dict[str, list[tuple[str, int]]]
    services: dict[str, list[tuple[str, str, str, bool, bool]]]


def _shape(file: descriptor_pb2.FileDescriptorProto) -> Shape:
    """Everything that reaches the wire; file names and imports do not."""

    def message(m: descriptor_pb2.DescriptorProto) -> dict[str, object]:
        return {
            "fields": [(f.name, f.number, f.label, f.type, f.type_name, f.json_name)
                       for f in m.field],
            "nested": {n.name: message(n) for n in m.nested_type},
            "enums": {e.name: [(v.name, v.number) for v in e.value] for e in m.enum_type},
            "oneofs": [o.name for o in m.oneof_decl],
        }

    return {
        "package": file.package,
        "syntax": file.syntax,
        "messages": {m.name: message(m) for m in file.message_type},
        "enums": {e.name: [(v.name, v.number) for v in e.value] for e in file.enum_type},
        "services": {
            s.name: [(m.name, m.input_type, m.output_type, m.client_streaming,
                      m.server_streaming) for m in s.method]
            for s in file.service
        },
    }


def _ours(descriptor: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools/gen_protos.py"), str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted((tmp_path / "fedkube/proto").glob("*_pb2*.py*"))
    # base, director, aggregator, the streaming and review extensions and the director's own
    # frontend API: for each the messages (.py, .pyi) and the gRPC stubs (.py, .pyi)
    assert len(generated) == 24
    for path in generated:
        committed = ROOT / "fedkube/proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `make protos`")


def test_director_service_has_the_14_openfl_rpcs() -> None:
    service = director_pb2.DESCRIPTOR.services_by_name["Director"]
    assert service.full_name == "openfl.director.Director"
    assert len(service.methods) == 14
    assert aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name == (
        "openfl.aggregator.Aggregator")


@pytest.mark.compat
def test_descriptors_match_openfl_field_by_field(openfl_python: Path) -> None:
    dumped = subprocess.run([str(openfl_python), "-c", DUMP], check=True,
                            capture_output=True, text=True).stdout
    theirs = {key: descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(value))
              for key, value in json.loads(dumped).items()}
    ours = {"base": _ours(base_pb2.DESCRIPTOR), "director": _ours(director_pb2.DESCRIPTOR),
            "aggregator": _ours(aggregator_pb2.DESCRIPTOR)}
    for key in ("base", "director", "aggregator"):
        mine, reference = _shape(ours[key]), _shape(theirs[key])
        assert mine["package"] == reference["package"], key
        assert mine["services"] == reference["services"], key
        assert mine["enums"] == reference["enums"], key
        assert mine["messages"].keys() == reference["messages"].keys(), key
        for name, fields in reference["messages"].items():
            assert mine["messages"][name] == fields, f"{key}: message {name} differs"
