"""``GET /healthz``: liveness and database reachability."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vectorgeo import store
from vectorgeo.api.assets import maplibre_dir
from vectorgeo.api.models import ERRORS, Health
from vectorgeo.api.state import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: ERRORS[503]})
def healthz(state: StateDep) -> Any:
    """Liveness and database reachability (503 when the database is down or holds nothing)."""
    viewer = maplibre_dir() is not None
    with state.connection() as conn:
        ds = store.dataset(conn)
        n = sum(int(d["rows"]) for d in store.datasets(conn) if d["model_version"] == ds.model_version)
    vectors = state.scores.in_memory()
    in_memory = vectors.n if vectors is not None and vectors.model_version == ds.model_version else 0
    return {
        "status": "ok",
        "database": "ok",
        "model_version": ds.model_version,
        "cells": n,
        "viewer_assets": viewer,
        "embeddings_in_memory": in_memory,
    }
