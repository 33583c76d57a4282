"""DynamoDB's wire format and expression language, built safely.

`serialize`/`deserialize` turn plain Python values (floats included, which boto3 refuses)
into attribute values and back. `Update` builds `SET … REMOVE …` update expressions and their
conditions with a placeholder for every attribute name, because half of the natural names
(status, key, from, date) are DynamoDB reserved words.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import DYNAMODB_CONTEXT, TypeDeserializer, TypeSerializer

_ser = TypeSerializer()
_de = TypeDeserializer()
#: DynamoDB numbers hold 38 significant digits; a longer int goes to boto3, which refuses it.
_INT_LIMIT = 10**38


def _to_dynamo(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(str(round(value, 3)))
    if isinstance(value, dict):
        return {k: _to_dynamo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_dynamo(v) for v in value]
    return value


def _from_dynamo(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(v) for v in value]
    return value


def attribute_value(value: Any) -> dict[str, Any]:  # noqa: PLR0911 - one return per wire type
    """One plain value as a DynamoDB attribute value (`{"S": …}`, `{"N": …}`, …).

    The types an item of mailflow's holds are written here directly; anything else (sets,
    Decimal, binary, a float that is not finite) goes through boto3's TypeSerializer, which
    these match value for value (tests/unit/test_expressions.py). boto3's walk cost ~8 % of
    the worker's CPU: a delivery writes about fifty values.
    """
    kind = type(value)
    if kind is str:
        return {"S": value}
    if kind is bool:
        return {"BOOL": value}
    if kind is int and -_INT_LIMIT < value < _INT_LIMIT:
        return {"N": str(value)}
    if kind is float and math.isfinite(value):
        return {"N": str(DYNAMODB_CONTEXT.create_decimal(Decimal(str(round(value, 3)))))}
    if value is None:
        return {"NULL": True}
    if kind is dict:
        return {"M": {k: attribute_value(v) for k, v in value.items()}}
    if kind is list or kind is tuple:
        return {"L": [attribute_value(v) for v in value]}
    serialized: dict[str, Any] = _ser.serialize(_to_dynamo(value))
    return serialized


def serialize(item: Mapping[str, Any]) -> dict[str, Any]:
    """A plain item (str, int, float, bool, list, dict values) in DynamoDB's wire format."""
    return {k: attribute_value(v) for k, v in item.items()}


def plain_value(wire: Mapping[str, Any]) -> Any:  # noqa: PLR0911 - one return per wire type
    """One attribute value as a plain value (whole numbers as int): `attribute_value` undone.
    Sets and binary go through boto3's TypeDeserializer."""
    if len(wire) == 1:
        ((kind, inner),) = wire.items()
        if kind == "S":
            return inner
        if kind == "N":
            try:
                return int(inner)
            except ValueError:
                return _from_dynamo(Decimal(inner))
        if kind == "BOOL":
            return inner
        if kind == "NULL":
            return None
        if kind == "M":
            return {k: plain_value(v) for k, v in inner.items()}
        if kind == "L":
            return [plain_value(v) for v in inner]
    return _from_dynamo(_de.deserialize(wire))


def deserialize(item: Mapping[str, Any] | None) -> dict[str, Any]:
    """A wire-format item as plain values (whole numbers as int); {} for None or empty."""
    if not item:
        return {}
    return {k: plain_value(v) for k, v in item.items()}


class Update:
    """An update expression under construction: its SET and REMOVE clauses, and the name and
    value placeholders that it (and the condition built with it) use."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.sets: list[str] = []
        self.removes: list[str] = []

    def name(self, attr: str) -> str:
        """The placeholder (`#attr`) for an attribute name."""
        ref = f"#{attr}"
        self.names[ref] = attr
        return ref

    def value(self, label: str, value: Any) -> str:
        """The placeholder (`:label`) for a value."""
        ref = f":{label}"
        self.values[ref] = attribute_value(value)
        return ref

    def set(self, attr: str, value: Any) -> None:
        """`SET attr = value`."""
        self.sets.append(f"{self.name(attr)} = {self.value(attr, value)}")

    def set_raw(self, clause: str) -> None:
        """A SET clause written by the caller with placeholders from this builder."""
        self.sets.append(clause)

    def set_if_absent(self, attr: str, value: Any) -> None:
        """`SET attr = value` unless the item already has the attribute."""
        n = self.name(attr)
        self.sets.append(f"{n} = if_not_exists({n}, {self.value(attr, value)})")

    def assign(self, fields: Mapping[str, Any]) -> None:
        """Set every field; a None value removes the attribute instead."""
        for attr, value in fields.items():
            if value is None:
                self.remove(attr)
            else:
                self.set(attr, value)

    def append_history(self, entry: Mapping[str, Any]) -> None:
        """One attempt's entry at the end of `history` (created on first use)."""
        history = self.name("history")
        empty, new = self.value("empty", []), self.value("entry", [dict(entry)])
        self.sets.append(f"{history} = list_append(if_not_exists({history}, {empty}), {new})")

    def remove(self, attr: str) -> None:
        """`REMOVE attr`."""
        self.removes.append(self.name(attr))

    def one_of(self, attr: str, allowed: Iterable[str]) -> str:
        """A condition: `attr` equals one of `allowed` (parenthesised, safe to AND)."""
        ref = self.name(attr)
        terms = [f"{ref} = {self.value(f'{attr}_{i}', v)}" for i, v in enumerate(allowed)]
        return "(" + " OR ".join(terms) + ")"

    def item_exists(self, key_attr: str, exists: bool = True) -> str:
        """A condition on the item itself, by its key attribute: it exists (or it does not)."""
        ref = self.name(key_attr)
        return f"attribute_exists({ref})" if exists else f"attribute_not_exists({ref})"

    def expression(self) -> str:
        """The update expression: `SET …` then `REMOVE …`."""
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        return " ".join(parts)
