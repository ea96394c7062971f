"""What devices and the server both speak: topics, message schemas, keys and JWS signing.

This package imports nothing else of Kernex, so the device agent can depend on it alone.
"""
