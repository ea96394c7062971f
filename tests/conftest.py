"""Fixtures live in tests/fixtures/, one module per concern (database, broker, processes)."""

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.broker",
    "tests.fixtures.s3",
    "tests.fixtures.auth",
]
