"""Contract checks shared by both servers' OpenAPI tests: the routes an aiohttp app serves against the operations its
document names; schemathesis over every operation (``bench._contract``, which ``muai bench fuzz`` runs longer)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from bench._contract import FuzzReport, fuzz, no_server_error

_PATH_REGEX = re.compile(r"\{(\w+):[^}]+\}")


def served_operations(app: web.Application) -> set[tuple[str, str]]:
    """``(method, path)`` of every route ``app`` serves, paths in OpenAPI's form (aiohttp's ``{name:regex}`` is
    ``{name}``); the ``HEAD`` aiohttp adds beside every ``GET`` is not a route of ours."""
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or _PATH_REGEX.sub(r"{\1}", info.get("formatter", ""))
        out.add((route.method.lower(), path))
    return out


def documented_operations(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


__all__ = ["FuzzReport", "documented_operations", "fuzz", "no_server_error", "served_operations"]
