"""The operator- and device-facing REST API (FastAPI), grouped by domain."""
