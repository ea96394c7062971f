"""Device tags and groups: static (listed members) and dynamic (a saved filter evaluated when read)."""
