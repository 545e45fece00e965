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


class OpenAIBookkeeping(StrictModel):
    """OpenAI request fields about service, caching and abuse monitoring that change nothing
    on this server: accepted, so that clients which send them (SDKs, agent frameworks) are
    served rather than refused."""

    service_tier: str | None = None
    """OpenAI's processing tier: every request is served alike here."""
    prompt_cache_key: str | None = None
    """OpenAI's prompt-cache routing hint: the prefix cache here finds shared beginnings
    by their tokens."""
    safety_identifier: str | None = None
    """OpenAI's end-user id for abuse monitoring."""
