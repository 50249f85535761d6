"""Error types that the CLI turns into one clear line and a non-zero exit.

A `UserError` is a mistake the user can fix (a wrong path, an unknown name); the CLI prints its
message without a traceback. A `MediaError` is one clip that cannot be decoded; preparation
records it per sample and carries on.
"""


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit code 2."""


class MediaError(Exception):
    """One media file could not be decoded; `stage` says where it failed."""

    def __init__(self, message: str, *, path: str | None = None, stage: str = "decode"):
        super().__init__(message)
        self.path = path
        self.stage = stage
