"""Pickled objects inspected without running them.

An OpenFL experiment archive carries its task assigner and aggregation functions as
cloudpickle files: arbitrary code, which the director must never run. `inspect_pickle`
reads such a file with an unpickler whose every global is a `Record` class: building an
object only records what it was built from (the global's name, the arguments, the state),
so nothing of the owner's, and nothing of Python's beyond this module, is called. What the
file holds is then recognised by the globals' names (fedkube.openfl.workspace) and run by
fedkube's own implementation, or refused.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from fedkube.api.errors import FedkubeError

MAX_PICKLE_BYTES = 16 << 20


class PickleError(FedkubeError, ValueError):
    """A pickle that cannot be read as a record (damaged, or not a pickle)."""


class Record:
    """What an object of global `qualified` would have been built from."""

    qualified: ClassVar[str] = ""
    # Every record the same pickle built, reachable from its object or not (cloudpickle
    # sets a function's closure by a call whose result it drops).
    created: ClassVar[list[Record]]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    values: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls.qualified.endswith(SKELETON_CLASS):
            # cloudpickle rebuilds a class of the owner's (pickled by value) from its name
            # and bases: a record class stands in, so its instances can be recorded too.
            name = args[1] if len(args) > 1 and isinstance(args[1], str) else "?"
            return _record_class(f"{BY_VALUE}{name}", cls.created,
                                 bases=args[2] if len(args) > 2 else ())
        record = super().__new__(cls)
        cls.created.append(record)
        record.args, record.kwargs = args, kwargs
        record.state, record.items, record.values = None, {}, []
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded the arguments

    def __call__(self, *args: Any, **kwargs: Any) -> Record:
        """A record called (a code object's type, a function): the call, recorded."""
        return _record_class(f"{self.qualified}()", self.created)(self, *args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.values.append(value)

    def extend(self, values: Any) -> None:
        self.values.extend(values)

    def __repr__(self) -> str:
        return f"<record of {self.qualified}>"

    def state_dict(self) -> dict[str, Any]:
        """The attributes a BUILD gave it: a dict, or the dict of a (dict, slots) pair."""
        state = self.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = {**state[0], **(state[1] if len(state) > 1 and isinstance(state[1], dict)
                                    else {})}
        return state if isinstance(state, dict) else {}


# How cloudpickle rebuilds a class defined in the pickling script, and how such a class
# reads here.
SKELETON_CLASS = "._make_skeleton_class"
BY_VALUE = "by value: "


def _record_class(qualified: str, created: list[Record], bases: Any = ()) -> type[Record]:
    return type(qualified.rsplit(".", 1)[-1], (Record,),
                {"qualified": qualified, "created": created, "recorded_bases": bases})


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._classes: dict[str, type[Record]] = {}
        self.created: list[Record] = []

    def find_class(self, module: str, name: str) -> type[Record]:
        qualified = f"{module}.{name}"
        if qualified not in self._classes:
            self._classes[qualified] = _record_class(qualified, self.created)
        return self._classes[qualified]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not supported")


@dataclass(frozen=True)
class Inspected:
    root: Any  # the pickle's object, with a Record wherever it names a global
    records: list[Record]  # every record built on the way, in order

    def named(self, prefix: str) -> list[Record]:
        return [r for r in self.records if r.qualified.startswith(prefix)]

    def strings(self) -> set[str]:
        return {o for r in self.records for o in walk(r) if isinstance(o, str)}


def inspect_pickle(data: bytes) -> Inspected:
    if len(data) > MAX_PICKLE_BYTES:
        raise PickleError(f"{len(data)} bytes exceeds {MAX_PICKLE_BYTES}")
    unpickler = _RecordingUnpickler(data)
    try:
        return Inspected(unpickler.load(), unpickler.created)
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError) as exc:
        raise PickleError(f"not a readable pickle: {exc}") from exc


def walk(root: Any) -> Iterator[Any]:
    """Every object reachable from root (records, containers, strings), each once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, Record):
            stack.extend((obj.args, obj.kwargs, obj.state, obj.items, obj.values))
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)

