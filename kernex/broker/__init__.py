"""The broker side of Kernex: the fleet PKI, the rendered Mosquitto config and ACL, and the broker process.

Imports only `kernex.protocol` and `kernex.kit`; ingest and the API build on it.
"""
