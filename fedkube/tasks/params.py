"""Task parameters: each task's schema (a pydantic model: names, types, ranges), and the
check an experiment's `params` pass when it is submitted.

Built-in tasks declare theirs in fedkube.tasks.models; a user module may declare one as a
module-level `PARAMS`, either a pydantic model class or a dict of defaults
(`PARAMS = {"learning_rate": 0.5, "epochs": 1}`: each name takes its default's type). The
model owner's client checks params before it sends anything, and the director checks a
built-in task's again when the experiment arrives (it never imports user modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedkube.api.errors import ConfigError

PARAMS_ATTRIBUTE = "PARAMS"
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class ParamsError(ConfigError):
    """An experiment's params do not fit its task's schema; the message names the
    parameter and says what it takes."""


def schema_from(declared: object, *, module: str) -> type[BaseModel] | None:
    """The schema a user module declares as PARAMS (None if it declares none)."""
    if declared is None:
        return None
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return declared
    if isinstance(declared, Mapping) and all(isinstance(k, str) and k.isidentifier()
                                             for k in declared):
        fields: dict[str, Any] = {name: (type(default), default)
                                  for name, default in declared.items()}
        return create_model(f"{module}_params", __config__=ConfigDict(extra="forbid"),
                            **fields)
    raise ConfigError(f"{module}.py: {PARAMS_ATTRIBUTE} must be a pydantic model class or a "
                      f"dict of parameter names to defaults, not {type(declared).__name__}")


def expectation(field: FieldInfo) -> str:
    """What a field takes, in words: 'a number > 0 and <= 1000 (default 0.5)'."""
    kind: Any = field.annotation
    words: str = _KINDS.get(kind) or str(getattr(kind, "__name__", kind))
    bounds = []
    for constraint in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(constraint, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {getattr(constraint, attr)}")
    if bounds:
        words += " " + " and ".join(bounds)
    if field.default is not PydanticUndefined:
        words += f" (default {field.default})"
    return words


def describe(schema: type[BaseModel]) -> str:
    """Every parameter of a schema with what it takes, for help texts and errors."""
    return "; ".join(f"{name}: {expectation(field)}"
                     for name, field in sorted(schema.model_fields.items()))


def check_params(task: str, schema: type[BaseModel] | None, params: Mapping[str, Any]) -> None:
    """Raises ParamsError, naming the first parameter at fault, unless params fit."""
    if schema is None:
        return
    names = sorted(schema.model_fields)
    unknown = sorted(set(params) - set(names))
    if unknown:
        allowed = ", ".join(names) if names else "none"
        raise ParamsError(f"task {task} has no parameter {', '.join(map(repr, unknown))}; "
                          f"its parameters are: {allowed}")
    try:
        schema.model_validate(dict(params))
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        field = schema.model_fields.get(name)
        shown = f"{name}={params[name]!r}" if name in params else name or "params"
        hint = f"; {name} takes {expectation(field)}" if field is not None else ""
        raise ParamsError(f"task {task} parameter {shown}: {error['msg'].lower()}{hint}"
                          ) from None
