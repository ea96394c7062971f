"""Bundles: streamed, validated and signed uploads; authorized, resumable, integrity-checked downloads."""
