"""Errors a user can cause. Each message names the field, the value and what was expected."""

from __future__ import annotations


class FmPolicyError(Exception):
    """Base class of the package's own errors."""


class ConfigError(FmPolicyError, ValueError):
    """A config field has an invalid value, or a config dict has an unknown key."""


class InputError(FmPolicyError, ValueError):
    """An observation or batch does not match what the policy expects."""


class CheckpointError(FmPolicyError, ValueError):
    """A saved policy cannot be read: missing file, unknown format version, mismatched weights."""


class DatasetError(FmPolicyError, ValueError):
    """A dataset directory is missing, empty, or holds a file that cannot be read."""


class LockError(FmPolicyError, RuntimeError):
    """Another process holds the writer lock of a run folder or dataset root."""
