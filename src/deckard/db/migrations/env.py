"""Alembic environment: runs migrations with a synchronous engine made from the configured URL."""

from alembic import context
from sqlalchemy import create_engine, pool

from deckard.db.schema import metadata

url = context.config.get_main_option("sqlalchemy.url")
assert url
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
