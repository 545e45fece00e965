"""The live tests' server (`python -m server.cli serve` on the default model, one process
for the whole session: `tests.api_server.shared_server`) and the official client on it."""

from __future__ import annotations

import openai
import pytest

from tests.api_server import shared_server


@pytest.fixture(scope="module")
def url() -> str:
    return shared_server().url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
