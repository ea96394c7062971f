"""The device agent: identity, registration, signed heartbeats over mutual-TLS MQTT.

Imports only `kernex.protocol` and `kernex.kit`: a device never carries server code.
"""
