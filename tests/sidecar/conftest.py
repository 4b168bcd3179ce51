"""Fixtures: a sidecar app served on a free 127.0.0.1 port, and a client session for it."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import STATE, create_app
from sidecar.config import SidecarConfig
from sidecar_helpers import quiet_config


@pytest.fixture
async def start_sidecar():
    """``await start_sidecar(config, **create_app_kwargs)`` -> (server, state); all are closed at teardown."""
    servers: list[TestServer] = []

    async def start(config: SidecarConfig | None = None, *, server_kwargs: dict | None = None, **kwargs):
        app = create_app(config or quiet_config(), **kwargs)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server(**(server_kwargs or {}))
        servers.append(server)
        return server, app[STATE]

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
