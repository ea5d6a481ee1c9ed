"""Failures a user meets, each one line: the CLI prints ``gdml: <message>`` and exits with its code
(``config.ConfigError``: 2, before any work; the rest derive from ``GdmlError``).
"""

from __future__ import annotations


class GdmlError(RuntimeError):
    """A failure with a one-line message meant for the user."""

    exit_code = 1


class TrainingFailed(GdmlError):
    """Training stopped: a worker kept failing (Ray Train gave up) or raised an error; says how to resume."""
