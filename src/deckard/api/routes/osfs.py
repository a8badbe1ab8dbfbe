"""Routes for osfs (filled in by the admin-plane work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/osfs", tags=["osfs"])
