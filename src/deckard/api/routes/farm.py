"""Routes for the farm of nodes: placement explain and node maintenance (filled in by the farm work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["farm"])
