"""The agent's few exception types; each names what was refused and why."""

# The mechanisms in agent/kt raise it and import nothing from up here, so it is defined there and
# re-exported: the daemon, the learner and the mechanisms all raise and catch one type.
from agent.kt.errors import KtRejected

# One type for every bad setting, whether the shared settings loader or the agent found it, so a
# daemon maps it to exit 78 in one place (service.runner).
from service.settings import ConfigError

__all__ = ["CheckpointError", "ClueError", "ConfigError", "KtRejected"]


class ClueError(Exception):
    """Base of every error CLUE Edge raises on purpose, except the mechanisms' ``KtRejected``."""


class CheckpointError(ClueError):
    """A checkpoint file is corrupt, truncated, or for another model; the learner was not changed."""
