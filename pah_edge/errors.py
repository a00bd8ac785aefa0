"""Errors the user can fix. The CLI prints them as one line and exits with code 1."""


class PahEdgeError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


class DataError(PahEdgeError):
    """A dataset or image folder is missing, empty or malformed."""


class ConfigError(PahEdgeError):
    """An option is invalid or options contradict each other."""


class CheckpointError(PahEdgeError):
    """A checkpoint or run directory is missing, incompatible or corrupt."""


class StorageError(PahEdgeError):
    """A write failed: full disk, file-size limit, read-only or failing storage."""


class FrameError(PahEdgeError):
    """An in-memory frame is not an H x W x 3 (or H x W) uint8 image."""
