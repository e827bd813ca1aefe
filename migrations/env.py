"""Alembic environment for the imapsync ledger.

Run by imapsync.ledger at start (with the open connection in config.attributes), so a
ledger created by an older version upgrades itself; also usable from the alembic CLI
with `-x url=sqlite:///path/to/imapsync.sqlite3`.
"""
from alembic import context
from sqlalchemy import create_engine

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as connection:
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
