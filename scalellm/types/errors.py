"""InvalidParameter: the one error a bad request value raises, naming its field."""

from __future__ import annotations


class InvalidParameter(ValueError):
    """A bad value of one field: the message is ``'<field>' <problem>``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"'{field}' {problem}")
        self.field = field
        self.problem = problem

    def message_for(self, param: str) -> str:
        """The message with the field under a boundary's own name ("sampling.top_p", ...)."""
        return f"'{param}' {self.problem}"
