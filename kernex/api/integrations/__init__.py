"""Integrators: read-only MQTT credentials for the verified fleet topics, managed by admins."""
