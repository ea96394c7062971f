"""Persistence: SQLModel models, Alembic migrations, engines for PostgreSQL and SQLite."""
