"""Shared infrastructure every Kernex process uses (logging, retry timing); imports nothing of ours."""
