"""The shards' review of an experiment, as the director keeps it: each shard's decision
(awaiting its data owner, accepted or refused) with its reason, in the experiment's extra
fields as JSON, so a restart finds it and the owner's status shows it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

Decision = Literal["accepted", "refused", "awaiting"]
DECISIONS: tuple[Decision, ...] = ("accepted", "refused", "awaiting")
# The extra field that holds them, {shard: [decision, reason]}; a round's summary keeps it.
REVIEW_EXTRA = "review"


def reviews_of(extra: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Each shard's decision with its reason (only the shards that decided)."""
    text = extra.get(REVIEW_EXTRA)
    return {k: (v[0], v[1]) for k, v in json.loads(text).items()} if text else {}


def encoded_reviews(reviews: Mapping[str, tuple[str, str]]) -> str:
    return json.dumps({k: list(v) for k, v in reviews.items()}, sort_keys=True)
