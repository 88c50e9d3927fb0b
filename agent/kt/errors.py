"""The one exception the knowledge-transfer mechanisms raise on purpose."""


class KtRejected(Exception):
    """A knowledge-transfer blob or request was refused (malformed, hostile, or not for this model)."""
