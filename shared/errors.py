"""The one base class of mistakes a user can fix: bad input or settings, a missing file, an unreachable peer.

The CLI shows such an error as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserFacingError(Exception):
    """Its message is one line, fit to show the user as it is."""
