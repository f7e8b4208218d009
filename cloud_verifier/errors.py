"""Exceptions of the verifier core; the gRPC layer maps each to one status code in one place."""


class VerifierError(Exception):
    """Base class: the message is one line, fit to show a user."""


class ProposalError(VerifierError, ValueError):
    """A malformed draft proposal (INVALID_ARGUMENT)."""


class SessionNotFoundError(VerifierError, LookupError):
    """No live session under that id (NOT_FOUND)."""


class CapacityError(VerifierError):
    """The verifier holds as many sessions as it may (RESOURCE_EXHAUSTED)."""


class SessionFinishedError(VerifierError):
    """A proposal for a session that already ended (FAILED_PRECONDITION)."""


class NoChatTemplateError(VerifierError):
    """Chat messages for a target whose tokenizer has no chat template (FAILED_PRECONDITION)."""


class ChatMessagesError(VerifierError, ValueError):
    """Chat messages the target's chat template refuses to render (INVALID_ARGUMENT)."""
