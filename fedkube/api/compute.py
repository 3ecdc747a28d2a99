"""A container's compute resources as a Pod spec takes them: quantities and
requests/limits, shared by the custom resources, the experiment plan and the shard policy."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

# A resource quantity as a Pod's requests and limits take it (cpu in millicores too).
RESOURCE_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


def quantity_text(value: object) -> object:
    """`cpu: 2` in YAML is an integer: a quantity all the same, as in a Pod spec."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# An int-or-string with a pattern, as controller-gen writes resource.Quantity.
Quantity = Annotated[str, BeforeValidator(quantity_text),
                     Field(pattern=RESOURCE_QUANTITY, max_length=64),
                     WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}],
                                     "pattern": RESOURCE_QUANTITY, "maxLength": 64,
                                     "x-kubernetes-int-or-string": True})]
# Resource names are checked by the apiserver when the operator creates the Pods (a
# structural schema cannot constrain map keys); the quantities are checked here.
_Quantities = Annotated[dict[str, Quantity], Field(max_length=16)]


class ComputeResources(BaseModel):
    """A container's requests and limits, as in a Pod spec."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    requests: _Quantities = Field(default_factory=dict,
                                  description="e.g. cpu: 500m, memory: 1Gi")
    limits: _Quantities = Field(default_factory=dict,
                                description="e.g. memory: 4Gi; the container may use no more")
