"""Routes for stats (filled in by the admin-plane work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/stats", tags=["stats"])
