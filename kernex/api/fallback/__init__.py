"""The HTTP fallback for devices whose network blocks MQTT: signed heartbeats and events over HTTPS."""
