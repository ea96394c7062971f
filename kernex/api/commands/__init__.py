"""Signed commands: issued with per-device revisions, recorded, published retained, republished."""
