"""Exceptions of the verifier core; the gRPC layer maps each to one status code in one place."""

from shared.errors import UserFacingError


class VerifierError(UserFacingError):
    """Base class: the message is one line, fit to show a user."""


class ServeConfigError(VerifierError, ValueError):
    """A serve setting out of its valid range."""


class ProposalError(VerifierError, ValueError):
    """A malformed draft proposal (INVALID_ARGUMENT)."""


class SessionNotFoundError(VerifierError, LookupError):
    """No live session under that id (NOT_FOUND)."""


class CapacityError(VerifierError):
    """The verifier holds as many sessions as it may (RESOURCE_EXHAUSTED); a retry after `retry_after_ms` may find room."""

    # Sessions last seconds: half a second lets a freed slot be taken soon without a storm of refused retries.
    DEFAULT_RETRY_AFTER_MS = 500

    def __init__(self, message: str, retry_after_ms: int = DEFAULT_RETRY_AFTER_MS) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class SessionFinishedError(VerifierError):
    """A proposal for a session that already ended (FAILED_PRECONDITION)."""


class NoChatTemplateError(VerifierError):
    """Chat messages for a target whose tokenizer has no chat template (FAILED_PRECONDITION)."""


class ChatMessagesError(VerifierError, ValueError):
    """Chat messages the target's chat template refuses to render (INVALID_ARGUMENT)."""


class VerifierUnavailableError(VerifierError):
    """The verifier cannot take this work now: draining for shutdown, or its batch worker stopped (UNAVAILABLE)."""


class LimitExceededError(VerifierError):
    """A request larger than one of this verifier's per-request limits; the message names the setting (RESOURCE_EXHAUSTED)."""


class ContextLengthError(VerifierError):
    """A prompt plus its output budget past the target model's positions (OUT_OF_RANGE)."""


class IdleSessionError(VerifierError):
    """A session that sent nothing for longer than the idle timeout (DEADLINE_EXCEEDED)."""
