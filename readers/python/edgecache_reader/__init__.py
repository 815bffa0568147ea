"""Read what edgecache mirrored into Redis, decoded on the client side.

Decodes the postcard store (FORMAT.md, stored formats 2 and 1), the json
store, the raw store and the hash store into Python values, and prints any of them as
exactly the JSON text ``edgecache get`` prints::

    import redis
    from edgecache_reader import Reader

    reader = Reader(redis.Redis(), {"device:": "postcard"})
    reader.get("device:sensor-1")       # {'temp_c': 21.5, 'online': True}
    reader.get_json("device:sensor-1")  # '{"temp_c":21.5,"online":true}'

Values: JSON null, booleans, strings, lists and objects as None, bool, str,
list and dict; integers as int; other numbers as float; postcard Bytes as
bytes (printed as a hex string).

The field table (``<namespace>:fields``) is cached per Reader together with
the agent's marker: under one marker a number never changes its name, so
the cache stays valid until the marker changes (Redis lost its data and the
agent started over) and is reloaded when a value uses a number it lacks.
"""

import json
import math
import struct

from redis import exceptions as redis_errors

__all__ = [
    "Reader",
    "ReadError",
    "NotFound",
    "NoPrefix",
    "Corrupt",
    "decode_stored",
    "hash_text_is_json",
    "parse_json",
    "to_json",
]

MAGIC = 0xEC
MAX_DEPTH = 64
MAX_FIELDS = 1024
MAX_FIELD_NAME = 64
# serde_json's recursion limit: the 128th nested bracket is an error.
JSON_MAX_LEVELS = 128


class ReadError(Exception):
    """A key that cannot be read. ``code`` is the error code the Redis
    functions give for the same case (README, "Reading from Redis")."""

    code = "EDGECACHE_ERROR"


class NotFound(ReadError):
    code = "EDGECACHE_NOT_FOUND"


class NoPrefix(ReadError):
    code = "EDGECACHE_NO_PREFIX"


class Corrupt(ReadError):
    code = "EDGECACHE_CORRUPT"


class UnknownField(Corrupt):
    """A field number the table does not hold (yet)."""

    def __init__(self, number, table_key):
        super().__init__(
            "the value is not valid postcard data: field number %d is not in the field table (%s)"
            % (number, table_key)
        )
        self.number = number


def _corrupt(detail):
    return Corrupt("the value is not valid postcard data: " + detail)


class _Cursor:
    __slots__ = ("data", "pos", "names", "v1")

    def __init__(self, data, names, v1):
        self.data = data
        self.pos = 2
        self.names = names
        self.v1 = v1

    def byte(self):
        if self.pos >= len(self.data):
            raise _corrupt("length beyond the end")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, max_bytes=10, last_max=1):
        # postcard's varint: u64 at most 10 bytes (last holds 1 bit), u32 at
        # most 5 (last holds 4 bits).
        n = 0
        for i in range(max_bytes):
            b = self.byte()
            bits = b & 0x7F
            if i == max_bytes - 1 and (b & 0x80 or bits > last_max):
                break
            n |= bits << (7 * i)
            if not b & 0x80:
                return n
        raise _corrupt("bad varint")

    def tag(self):
        return self.varint(5, 15) if self.v1 else self.varint()

    def signed(self):
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise _corrupt("length beyond the end")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self):
        try:
            return self.take(self.varint()).decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt("string is not UTF-8") from None

    def count(self):
        n = self.varint()
        if n > len(self.data) - self.pos:
            raise _corrupt("count %d beyond the end" % n)
        return n

    def value(self, depth):
        if depth > MAX_DEPTH:
            raise _corrupt("nesting deeper than 64 levels")
        tag = self.tag()
        if tag == 0:
            return None
        if tag == 1:
            b = self.byte()
            if b > 1:
                raise _corrupt("bool byte %d" % b)
            return b == 1
        if tag == 2:
            return self.signed()
        if tag == 3:
            return struct.unpack("<d", self.take(8))[0]
        if tag == 4:
            return self.string()
        if tag == 5:
            return bytes(self.take(self.varint()))
        if tag == 6:
            return [self.value(depth + 1) for _ in range(self.count())]
        if tag == 7:
            out = {}
            for _ in range(self.count()):
                if self.v1:
                    key = self.string()
                else:
                    ref = self.varint()
                    key = self.string() if ref == 0 else self.names(ref - 1)
                # A repeated key keeps its first place and takes the last
                # value, as in edgecache get (and as dict assignment does).
                out[key] = self.value(depth + 1)
            return out
        if tag == 8:
            mantissa = self.signed()
            scale = min(self.byte(), 15)
            # int -> float rounds to nearest, 10**scale is exact: the same
            # division as codec::decimal_to_f64.
            return float(mantissa) / float(10**scale)
        raise _corrupt("unknown tag %d" % tag)


def decode_stored(data, names):
    """Decodes a postcard-stored value: returns ``(value, ts_ms)``.

    ``names`` maps a field number to its name: a dict, or a callable that
    raises :class:`UnknownField` for a number it lacks.
    """
    data = bytes(data)
    if callable(names):
        lookup = names
    else:

        def lookup(number):
            try:
                return names[number]
            except KeyError:
                raise UnknownField(number, "<namespace>:fields") from None

    if len(data) < 2 or data[0] != MAGIC:
        raise _corrupt("not an edgecache stored value (bad magic byte)")
    version = data[1]
    if version not in (1, 2):
        raise _corrupt("stored format version %d is newer than this reader understands" % version)
    cursor = _Cursor(data, lookup, version == 1)
    # Format 1 is postcard's own encoding: the option is one byte and bytes
    # after the value are ignored. Format 2: a varint, nothing may follow.
    option = cursor.byte() if cursor.v1 else cursor.varint()
    if option == 1:
        ts_ms = cursor.signed()
    elif option == 0:
        ts_ms = None
    else:
        raise _corrupt("timestamp option %d" % option)
    value = cursor.value(0)
    if not cursor.v1 and cursor.pos < len(data):
        raise _corrupt("%d bytes after the value" % (len(data) - cursor.pos))
    return value, ts_ms


class _NotJson(ValueError):
    pass


def _parse_int(text):
    # serde_json: integers that fit u64 (or i64 when negative) stay
    # integers; "-0" and anything larger are floats.
    n = int(text)
    if text.startswith("-"):
        if n == 0 or n < -(2**63):
            return float(text)
    elif n > 2**64 - 1:
        return float(text)
    return n


def _parse_float(text):
    x = float(text)
    if math.isinf(x):
        raise _NotJson("number out of range")
    return x


def _no_constant(name):
    raise _NotJson("not JSON: " + name)


def _check(value, levels):
    """serde_json's rules that Python's json module lacks: no lone
    surrogates, at most 127 nested levels."""
    if isinstance(value, str):
        value.encode("utf-8")  # raises on a lone surrogate
    elif isinstance(value, list):
        if levels + 1 >= JSON_MAX_LEVELS:
            raise _NotJson("recursion limit exceeded")
        for item in value:
            _check(item, levels + 1)
    elif isinstance(value, dict):
        if levels + 1 >= JSON_MAX_LEVELS:
            raise _NotJson("recursion limit exceeded")
        for key, item in value.items():
            key.encode("utf-8")
            _check(item, levels + 1)


def parse_json(data):
    """Parses JSON bytes as edgecache (serde_json) does; raises ValueError
    for anything it would refuse."""
    try:
        text = bytes(data).decode("utf-8")
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_no_constant,
        )
        _check(value, 0)
        return value
    except (ValueError, RecursionError, UnicodeError) as e:
        raise ValueError(str(e)) from None


def _float_text(x):
    """A float as serde_json prints it: the shortest digits that read back,
    plain notation for decimal exponents -5..=15, else d.ddde+NN/e-NN."""
    if x != x or math.isinf(x):
        return "null"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that read back, closest to x, as
    # serde_json does.
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    k = (int(exp) if exp else 0) - len(frac)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    d, n = stripped, len(stripped)
    e = n + k - 1  # d[0].d[1:] x 10**e
    if -5 <= e <= 15:
        if n - 1 <= e:
            s = d + "0" * (e - n + 1) + ".0"
        elif e >= 0:
            s = d[: e + 1] + "." + d[e + 1 :]
        else:
            s = "0." + "0" * (-e - 1) + d
    else:
        s = d[0] + ("." + d[1:] if n > 1 else "") + ("e+%d" % e if e >= 0 else "e-%d" % -e)
    return sign + s


def _string_text(s):
    # Same escapes as serde_json: \" \\ \b \f \n \r \t, other controls as
    # \u00xx; everything else as is.
    return json.dumps(s, ensure_ascii=False)


def to_json(value):
    """The JSON text of a decoded value, exactly as ``edgecache get`` prints
    it (compact; bytes as a hex string)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return _string_text(value)
    if isinstance(value, (bytes, bytearray)):
        return '"' + bytes(value).hex() + '"'
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_string_text(k) + ":" + to_json(v) for k, v in value.items()) + "}"
    raise TypeError("not a decoded value: %r" % (value,))


def hash_text_is_json(text):
    """Whether a hash store field's text is read as JSON (FORMAT.md)."""
    return text[:1] in (b'"', b"{", b"[", b"-") or text[:1].isdigit() or text in (b"true", b"false", b"null")


def _key_bytes(key):
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


class Reader:
    """Reads mirrored keys through a redis-py client.

    ``prefixes`` maps each topic's ``key_prefix`` to its ``store``
    (``"postcard"``, ``"json"``, ``"raw"`` or ``"hash"``), as in the agent's
    configuration; ``namespace`` is ``redis.namespace``.
    """

    def __init__(self, client, prefixes, namespace="edgecache"):
        self.client = client
        self.prefixes = [(_key_bytes(p), s) for p, s in prefixes.items()]
        for _, store in self.prefixes:
            if store not in ("postcard", "json", "raw", "hash"):
                raise ValueError("unknown store %r" % store)
        self.fields_key = namespace + ":fields"
        self.marker_key = namespace + ":marker"
        self._names = {}
        self._marker = None

    def store_of(self, key):
        key = _key_bytes(key)
        for prefix, store in self.prefixes:
            if key.startswith(prefix):
                return store
        raise NoPrefix("no configured key_prefix matches this key")

    def _load_fields(self):
        # As codec::Fields::from_pairs: decimal numbers below MAX_FIELDS,
        # names of at most MAX_FIELD_NAME bytes; anything else is left out.
        names = {}
        for number, name in self.client.hgetall(self.fields_key).items():
            number = number.decode("ascii", "replace")
            digits = number[1:] if number.startswith("+") else number
            if not (digits.isascii() and digits.isdigit()):
                continue
            if int(digits) < MAX_FIELDS and len(name) <= MAX_FIELD_NAME:
                names[int(digits)] = name.decode("utf-8")
        self._names = names

    def _get(self, key, store):
        try:
            return self.client.get(key)
        except redis_errors.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise Corrupt(
                    "the value is not valid %s data: the key holds another Redis type" % store
                ) from None
            raise

    def _read_hash(self, key):
        # FORMAT.md, "The hash store": a field's text is JSON when it starts
        # as JSON text does or is a JSON word, a string otherwise.
        try:
            fields = self.client.hgetall(key)
        except redis_errors.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise Corrupt(
                    "the value is not valid hash data: the key holds another Redis type"
                ) from None
            raise
        if not fields:
            raise NotFound("key not found")
        out = {}
        for name, text in fields.items():
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                raise Corrupt("the value is not valid hash data: a field name is not valid UTF-8") from None
            if hash_text_is_json(text):
                try:
                    out[name] = parse_json(text)
                except ValueError:
                    raise Corrupt(
                        "the value is not valid hash data: field %s is not valid JSON" % _string_text(name)
                    ) from None
            else:
                try:
                    out[name] = text.decode("utf-8")
                except UnicodeDecodeError:
                    raise Corrupt(
                        "the value is not valid hash data: field %s is not valid UTF-8" % _string_text(name)
                    ) from None
        return out

    def read(self, key):
        """``(store, value, ts_ms)`` of a key; ts_ms is None but for postcard."""
        store = self.store_of(key)
        if store == "hash":
            return store, self._read_hash(key), None
        if store != "postcard":
            data = self._get(key, store)
            if data is None:
                raise NotFound("key not found")
            try:
                return store, parse_json(data), None
            except ValueError:
                if store == "json":
                    raise Corrupt("the value is not valid json data") from None
            # Raw values that are not JSON: text as a string, else hex.
            try:
                return store, data.decode("utf-8"), None
            except UnicodeDecodeError:
                return store, bytes(data), None
        # The value first, then the marker (and the table if needed): names
        # are written no later than the values that use them.
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.get(self.marker_key)
        data, marker = pipe.execute()
        if data is None:
            raise NotFound("key not found")
        if marker is None or marker != self._marker:
            self._load_fields()
            self._marker = marker
            reloaded = [True]
        else:
            reloaded = [False]

        def lookup(number):
            if number not in self._names and not reloaded[0]:
                # A name added since the cache was filled: the table grows.
                reloaded[0] = True
                self._load_fields()
            try:
                return self._names[number]
            except KeyError:
                raise UnknownField(number, self.fields_key) from None

        value, ts_ms = decode_stored(data, lookup)
        return store, value, ts_ms

    def get(self, key):
        """The value at ``key`` as a Python value."""
        return self.read(key)[1]

    def get_with_ts(self, key):
        """``(value, ts_ms)``: the record timestamp (ms) for postcard keys."""
        _, value, ts_ms = self.read(key)
        return value, ts_ms

    def get_json(self, key):
        """The JSON text ``edgecache get`` and ``FCALL_RO edgecache_get`` give."""
        return to_json(self.read(key)[1])

    def get_meta_json(self, key):
        """The JSON text ``edgecache get --meta`` gives."""
        store, value, ts_ms = self.read(key)
        shown = _key_bytes(key).decode("utf-8", "replace")
        return '{"key":%s,"format":"%s","ts_ms":%s,"value":%s}' % (
            _string_text(shown),
            store,
            "null" if ts_ms is None else ts_ms,
            to_json(value),
        )
