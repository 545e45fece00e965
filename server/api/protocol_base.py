"""What every OpenAI request model shares: unknown fields are rejected (extra="forbid"), and
checks across fields name the field a 400 reports."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


def conflict(param: str, message: str) -> PydanticCustomError:
    """A check across fields (a model validator, whose errors have no location): the error
    names `param` in its context, which the 400 reports (`server.api.errors`)."""
    return PydanticCustomError("field_conflict", message, {"param": param})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
