"""User-facing errors: the CLI prints these as one line and exits with status 2, never a traceback."""


class EclipsePriorError(Exception):
    """Base class for errors whose message tells the user what to fix."""


class ConfigError(EclipsePriorError, ValueError):
    """A configuration value or file that cannot be used."""


class StoreError(EclipsePriorError):
    """An embedding store that is missing, corrupt, empty or incompatible."""


class ModelNotFoundError(EclipsePriorError):
    """A model id that cannot be loaded (offline, or no such folder)."""
