"""The agent's few exception types; each names what was refused and why."""


class ClueError(Exception):
    """Base of every error CLUE Edge raises on purpose."""


class KtRejected(ClueError):
    """A knowledge-transfer blob or request was refused (malformed, hostile, or not for this model)."""


class ConfigError(ClueError):
    """A configuration or config patch is invalid; the old configuration stays in force."""


class CheckpointError(ClueError):
    """A checkpoint file is corrupt, truncated, or for another model; the learner was not changed."""
