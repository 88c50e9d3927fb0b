"""The agent's few exception types; each names what was refused and why."""

# The mechanisms in agent/kt raise it and import nothing from up here, so it is defined there and
# re-exported: the daemon, the learner and the mechanisms all raise and catch one type.
from agent.kt.errors import KtRejected

__all__ = ["CheckpointError", "ClueError", "ConfigError", "KtRejected"]


class ClueError(Exception):
    """Base of every error CLUE Edge raises on purpose, except the mechanisms' ``KtRejected``."""


class ConfigError(ClueError):
    """A configuration or config patch is invalid; the old configuration stays in force."""


class CheckpointError(ClueError):
    """A checkpoint file is corrupt, truncated, or for another model; the learner was not changed."""
