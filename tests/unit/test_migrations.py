"""The schema's history is one line: one head, and every revision reachable from it."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from deckard.db.engine import MIGRATIONS


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg)


def test_the_schema_has_one_head() -> None:
    """A second head means two revisions were written in parallel: merge them (see 0008_one_head.py)."""
    assert len(_scripts().get_heads()) == 1


def test_every_revision_leads_to_the_head() -> None:
    scripts = _scripts()
    (head,) = scripts.get_heads()
    reachable = {rev.revision for rev in scripts.walk_revisions("base", head)}
    assert reachable == {rev.revision for rev in scripts.walk_revisions()}
