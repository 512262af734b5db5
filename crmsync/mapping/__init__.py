"""Field mappings: canonical fields <-> a CRM's fields, read from a small YAML file.

The engine reads and writes CRM data only through a ``Mapping``: no CRM field name appears anywhere
else in ``crmsync/sync``. Each provider ships a default (``crmsync/mappings/<provider>.yaml``, printed
by ``crmsync map init``); a connection may point at its own copy. The file format and every transform
are described for users in docs/mapping.md. Inside: ``fields`` (the canonical vocabulary),
``values`` and ``phone`` (value parsing), ``step`` (the ``Transform`` base), ``transforms`` and
``dates`` (the transform library), ``rules`` (building,
validating and applying rules: ``Mapping``), ``check`` (``map check``), ``edit`` (``map set``/``unset``
text edits) and ``defaults`` (the bundled files).
"""

from __future__ import annotations

from crmsync.mapping.check import Problem, check_rules
from crmsync.mapping.defaults import default_text, has_default
from crmsync.mapping.edit import set_rule, unset_rule
from crmsync.mapping.fields import CANONICAL_FIELDS, ENUMS
from crmsync.mapping.rules import DIRECTIONS, FieldRule, Mapping, RuleRow, dump_rules
from crmsync.mapping.step import Transform, TransformError
from crmsync.mapping.transforms import TRANSFORMS

__all__ = [
    "CANONICAL_FIELDS",
    "DIRECTIONS",
    "ENUMS",
    "TRANSFORMS",
    "FieldRule",
    "Mapping",
    "Problem",
    "RuleRow",
    "Transform",
    "TransformError",
    "check_rules",
    "default_text",
    "dump_rules",
    "has_default",
    "set_rule",
    "unset_rule",
]
