"""A request refused before it is queued: HTTP status, the field at fault, and why."""
from __future__ import annotations

from typing import Any, Optional

KIND_OF_STATUS = {413: "too_large", 422: "invalid"}


class Rejected(Exception):
    def __init__(self, field: Optional[str], message: str, *, status: int = 422, value: Any = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.status, self.value = field, message, status, value

    @property
    def kind(self) -> str:
        return KIND_OF_STATUS.get(self.status, "invalid")
