"""What the service refuses: one exception type, answered by one handler in app.main."""

from __future__ import annotations


class Rejected(Exception):
    """A request the service refuses because of what the client sent; `status_code` is the HTTP
    status to answer with, `detail` names the file and the problem."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
