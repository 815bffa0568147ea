"""The reader against FORMAT.md's test vectors and serde_json's printing."""

import json
import pathlib
import re
import struct

import pytest

from edgecache_reader import Corrupt, UnknownField, decode_stored, parse_json, to_json

FORMAT_MD = pathlib.Path(__file__).resolve().parents[3] / "FORMAT.md"


def vectors():
    """(json, ts_ms, bytes, table) rows of both version tables."""
    rows = []
    for line in FORMAT_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[2].startswith("`ec "):
            continue
        text, ts, stored = (c.strip("`") for c in cells[:3])
        table = {}
        if len(cells) > 3:
            for number, name in re.findall(r'(\d+) = "([^"]*)"', cells[3]):
                table[int(number)] = name
        rows.append((text, None if ts == "none" else int(ts), bytes.fromhex(stored), table))
    return rows


def test_the_vectors_are_found():
    assert len(vectors()) >= 15


@pytest.mark.parametrize("text,ts_ms,stored,table", vectors())
def test_vector_decodes_to_its_json(text, ts_ms, stored, table):
    value, ts = decode_stored(stored, table)
    assert ts == ts_ms
    assert to_json(value) == to_json(parse_json(text.encode()))


def test_a_missing_field_number_is_an_error():
    with pytest.raises(UnknownField):
        decode_stored(bytes([0xEC, 2, 0, 7, 1, 4, 0]), {})


@pytest.mark.parametrize(
    "stored",
    [
        b"{}",
        bytes([0xEC, 9, 0]),
        bytes([0xEC, 2]),
        bytes([0xEC, 2, 2, 0]),
        bytes([0xEC, 2, 0, 1, 2]),
        bytes([0xEC, 2, 0, 6, 200, 1]),
        bytes([0xEC, 2, 0, 4, 1, 0xFF]),
        bytes([0xEC, 2, 0, 2] + [0xFF] * 9 + [0x7F]),
        bytes([0xEC, 2, 0, 9]),
        bytes([0xEC, 2, 0, 0, 0]),
        bytes([0xEC, 2, 0]) + bytes([6, 1]) * 66 + b"\x00",
    ],
)
def test_corrupt_bytes_are_errors(stored):
    with pytest.raises(Corrupt):
        decode_stored(stored, {})


def test_sixty_four_bit_integers_are_exact():
    for n in [2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1]:
        zigzag = (n << 1) ^ (n >> 63)
        varint = bytearray()
        while True:
            if zigzag < 0x80:
                varint.append(zigzag)
                break
            varint.append(zigzag & 0x7F | 0x80)
            zigzag >>= 7
        value, _ = decode_stored(bytes([0xEC, 2, 0, 2]) + varint, {})
        assert value == n and to_json(value) == str(n)


@pytest.mark.parametrize(
    "x,text",
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (100.0, "100.0"),
        (21.3, "21.3"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (0.0001, "0.0001"),
        (1e16, "1e+16"),
        (1234567890123456.0, "1234567890123456.0"),
        (12345678901234567.0, "1.2345678901234568e+16"),
        (1e300, "1e+300"),
        (-1.5e300, "-1.5e+300"),
        (5e-324, "5e-324"),
        (float("nan"), "null"),
    ],
)
def test_floats_print_as_serde_json_prints_them(x, text):
    assert to_json(x) == text


def test_floats_from_the_wire():
    stored = bytes([0xEC, 2, 0, 3]) + struct.pack("<d", -0.0)
    assert to_json(decode_stored(stored, {})[0]) == "-0.0"


@pytest.mark.parametrize(
    "text,shown",
    [
        ('{"a":1,"b":2,"a":3}', '{"a":3,"b":2}'),
        ("-0", "-0.0"),
        ("18446744073709551615", "18446744073709551615"),
        ("18446744073709551616", "1.8446744073709552e+19"),
        ("-9223372036854775809", "-9.223372036854776e+18"),
        ("1e2", "100.0"),
        ('"\\u00e9\\u0001\\/"', '"\u00e9\\u0001/"'),
        (" [1 , 2] ", "[1,2]"),
    ],
)
def test_json_is_parsed_and_printed_as_serde_json_does(text, shown):
    assert to_json(parse_json(text.encode())) == shown


@pytest.mark.parametrize(
    "text",
    ['"\\ud800"', "1e400", "NaN", "[1,]", "01", "\ufeff{}", "[" * 128 + "]" * 128, b'"\xff"'],
)
def test_what_serde_json_refuses_is_refused(text):
    with pytest.raises(ValueError):
        parse_json(text if isinstance(text, bytes) else text.encode())


def test_deepest_json_accepted():
    assert to_json(parse_json(("[" * 127 + "]" * 127).encode())) == "[" * 127 + "]" * 127


def test_json_round_trips_json_module_output():
    assert json.loads(to_json({"k": [1, 2.5, None, True, "x"]})) == {"k": [1, 2.5, None, True, "x"]}
