"""Identity normalization and blocked values (spec A2.12, A2.13)."""

import pytest

from engine.normalize import IdentityNormalizer, default_normalization

NORMALIZER = IdentityNormalizer(default_normalization(), ["test@example.com"], [r"fake-\d+"])


@pytest.mark.parametrize("identity_type, raw, expected", [
    ("email", "  Ed.Hyde@Example.COM ", "ed.hyde@example.com"),
    ("mobile_number", "+1 (555) 010-9999", "+15550109999"),
    ("mobile_number", "555.010.9999", "5550109999"),
    ("ios_idfv", "AB-CD", "ab-cd"),
    ("customerid", "  Cust-1 ", "Cust-1"),
    ("mobile_number", "-1", None),
    ("mobile_number", -1, None),
    ("ios_idfa", "00000000-0000-0000-0000-000000000000", None),
    ("customerid", "NULL", None),
    ("email", "Test@Example.com", None),
    ("other", "fake-123", None),
    ("other", True, None),
])
def test_normalize(identity_type, raw, expected):
    assert NORMALIZER.normalize(identity_type, raw) == expected
