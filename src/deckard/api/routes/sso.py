"""Single sign-on (OpenID Connect) for the portal and the WAT."""

from __future__ import annotations

from fastapi import APIRouter

from deckard.api.envelope import ERROR_RESPONSES

router = APIRouter(tags=["sso"], include_in_schema=False, responses=ERROR_RESPONSES)
