"""The DynamoDB value codec's direct path gives what boto3's TypeSerializer/Deserializer give.

`attribute_value` and `plain_value` write and read mailflow's own value types by hand (boto3's
walk cost ~8 % of the worker's CPU); boto3 stays the reference for every value, including the
ones the direct path hands over to it (sets, non-finite floats, numbers too long).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from hypothesis import given
from hypothesis import strategies as st

from mailflow.aws.expressions import _from_dynamo, _to_dynamo, attribute_value, deserialize

PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def boto3_attribute_value(value: Any) -> Any:
    try:
        return TypeSerializer().serialize(_to_dynamo(value))
    except Exception as exc:
        return type(exc)


def ours(value: Any) -> Any:
    try:
        return attribute_value(value)
    except Exception as exc:
        return type(exc)


@given(PLAIN)
def test_attribute_value_matches_boto3(value: Any) -> None:
    assert ours(value) == boto3_attribute_value(value)


@given(st.dictionaries(st.text(min_size=1, max_size=8), PLAIN, max_size=6))
def test_deserialize_matches_boto3(item: dict[str, Any]) -> None:
    wire = {}
    for key, value in item.items():
        serialized = boto3_attribute_value(value)
        if isinstance(serialized, dict):
            wire[key] = serialized
    try:
        expected: Any = {
            k: _from_dynamo(TypeDeserializer().deserialize(v)) for k, v in wire.items()
        }
    except Exception as exc:
        expected = type(exc)
    try:
        got: Any = deserialize(wire)
    except Exception as exc:
        got = type(exc)
    assert got == expected


@pytest.mark.parametrize(
    ("wire", "plain"),
    [
        ({"SS": ["a", "b"]}, {"a", "b"}),
        ({"N": "1E+20"}, 10**20),
        ({"N": "2.50"}, 2.5),
        ({"N": "-0.0"}, 0),
    ],
)
def test_deserialize_hands_other_types_to_boto3(wire: dict[str, Any], plain: Any) -> None:
    assert deserialize({"v": wire}) == {"v": plain}
    assert ours({"x"}) == {"SS": ["x"]}
    assert ours(Decimal("1.5")) == {"N": "1.5"}
