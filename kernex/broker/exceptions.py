"""Errors of the broker package: the fleet PKI and the Mosquitto process."""

from kernex.protocol.exceptions import KernexError


class BrokerError(KernexError):
    """Root of the errors raised by the broker package."""


class PKIError(BrokerError):
    """The fleet PKI is missing, inconsistent, locked with another passphrase, or refuses a request."""


class BrokerConfigError(BrokerError):
    """A broker configuration or ACL cannot be rendered from the given settings."""


class BrokerStartError(BrokerError):
    """Mosquitto is not installed, exited early, or did not accept TLS connections in time."""
