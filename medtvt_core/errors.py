"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""

from __future__ import annotations


class MedtvtError(Exception):
    """Base class of errors caused by the user's input (config, data, plugin names)."""

    exit_code = 2


class ConfigError(MedtvtError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class UnknownPluginError(MedtvtError, KeyError):
    """A plugin name that no registry holds."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(MedtvtError):
    """Two plugins claim the same name in one registry."""


class PluginContractError(MedtvtError):
    """A plugin object does not satisfy the contract of its kind."""


class DataError(MedtvtError):
    """A data file or record is malformed; the message names file, index and field."""


class CheckpointError(MedtvtError):
    """A checkpoint file is missing, unsafe or does not match the model."""


class PluginError(PluginContractError):
    """A plugin raised, or returned what its contract forbids, while a run used it; the message names
    the plugin, its distribution and version (the plugin's own exception is the ``__cause__``)."""
