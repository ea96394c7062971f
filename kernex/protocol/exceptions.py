"""The root of every Kernex error, and the errors of the wire protocol."""


class KernexError(Exception):
    """Root of every error Kernex raises on purpose."""


class ProtocolError(KernexError):
    """A message, key or topic does not follow the wire contract."""


class InvalidKeyError(ProtocolError):
    """A key is malformed, of an unsupported type, or too weak."""


class InvalidCSRError(ProtocolError):
    """A certificate signing request is malformed or its signature does not verify."""


class SignatureError(ProtocolError):
    """A JWS is malformed, uses an algorithm other than the key's, or its signature fails."""


class StaleKeySetError(SignatureError):
    """A signed command key set is not newer than the set the device already pins (a rollback)."""

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class MessageError(ProtocolError):
    """A message's claims are not valid JSON or do not match its schema."""


class TopicError(ProtocolError):
    """A topic is not one of the Kernex topics."""
