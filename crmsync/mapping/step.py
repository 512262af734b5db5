"""One step of a mapping rule: the ``Transform`` base class, what it knows of its rule, and its error.

The transforms themselves are in ``transforms.py`` (and ``dates.py``), by the name mapping files use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from crmsync.errors import MappingError
from crmsync.mapping.values import NOARG, is_empty


class TransformError(MappingError):
    """A value could not be converted by a rule (push or pull); names the rule and the value."""

    def __init__(self, message: str, *, obj: str = "", canonical: str = "", field: str = "") -> None:
        super().__init__(message)
        self.obj, self.canonical, self.field = obj, canonical, field


@dataclass
class TransformContext:
    """What a transform may need to know about the rule it sits in."""

    obj: str
    canonical: str
    default_region: str


class Transform:
    """One step of a rule. ``push`` goes canonical -> CRM, ``pull`` undoes it."""

    name: ClassVar[str] = ""
    #: no | optional | required
    takes: ClassVar[str] = "no"
    #: False for push-only transforms (template, constant): a pulled field may not use them.
    invertible: ClassVar[bool] = True
    #: True when two rules may write the same CRM field through this transform (fullname).
    shares_field: ClassVar[bool] = False

    def __init__(self, arg: Any, ctx: TransformContext) -> None:
        self.arg = arg
        self.ctx = ctx
        self.setup(arg)

    def setup(self, arg: Any) -> None:
        """Validate the argument (raise BadValue)."""

    @property
    def spec(self) -> Any:
        """The transform as written in YAML."""
        return self.name if self.arg is NOARG else {self.name: self.arg}

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        """Canonical value -> CRM value. Missing and ``""`` pass through unless overridden."""
        if is_empty(value):
            return value
        return self.push_value(value, record)

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value

    def pull(self, value: Any) -> Any:
        """CRM value -> canonical value (never called with MISSING)."""
        return value

    def out_kind(self, kind: str) -> str:
        """The kind of value this step produces from a ``kind`` input (for ``map check``)."""
        return kind
