"""The errors hlss_hf raises for problems a user can fix: each message names the offending item (config key,
file, patient, slide, checkpoint), and the programs print it as one line ``error: ...``.

This module imports nothing of hlss_hf: every other module may import it.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class OutputInUseError(RuntimeError):
    """Another run holds the lock on this output; the message names the output and the holder."""


class ConversionError(Exception):
    """An input item (file, patient, slide, manifest row, ...) cannot be converted; the message names it."""


class DiskFullError(OSError):
    """A write failed for want of space (a full disk, a quota, a file-size limit); the message names the path and
    the bytes it needed."""


class SourceError(ValueError):
    """A model or dataset named on the command line is neither an existing local folder nor a reachable Hub repo."""


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss (on any process)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed (unsafe content, another run's settings); the message names the item."""


class DatasetError(ValueError):
    """A dataset that cannot be used as asked (a missing or empty split or column, no data files); the message
    names the dataset, the split and the setting that chose them."""
