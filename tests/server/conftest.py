"""The served SmolLM2 and its offline twin, built once for all server tests."""

import openai
import pytest
from fastapi.testclient import TestClient
from server_utils import ENGINE_KW

from orca_jax import LLM
from orca_jax.server import AsyncEngine, build_app


@pytest.fixture(scope="session")
def llm():
    """The served engine (driven by the server's engine thread while the server runs)."""
    return LLM("smollm2-135m", **ENGINE_KW)


@pytest.fixture(scope="session")
def offline():
    """A second engine, same weights and settings, for the expected answers: the served one
    must not be stepped from the test's thread while the server's thread runs it."""
    return LLM("smollm2-135m", **ENGINE_KW)


@pytest.fixture(scope="session")
def served(llm):
    engine = AsyncEngine(llm.engine)
    with TestClient(build_app(engine, "smollm2")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)
        yield http, client, engine
    engine.shutdown()
