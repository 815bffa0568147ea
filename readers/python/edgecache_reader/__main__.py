"""``python -m edgecache_reader``: print keys as `edgecache get` prints them.

One line per key: the JSON text, or ``!`` and the error (for scripts and
the equivalence test, which feeds keys on stdin).
"""

import argparse
import sys

import redis

from . import Reader, ReadError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m edgecache_reader")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="edgecache")
    parser.add_argument(
        "--prefix",
        action="append",
        required=True,
        metavar="PREFIX=STORE",
        help="a topic's key_prefix and store (postcard, json or raw); repeatable",
    )
    parser.add_argument("--meta", action="store_true", help='print {"key","format","ts_ms","value"}')
    parser.add_argument("keys", nargs="*", help="keys to read; none: one per line on stdin")
    args = parser.parse_args(argv)
    prefixes = dict(p.rsplit("=", 1) for p in args.prefix)
    reader = Reader(redis.Redis.from_url(args.url), prefixes, namespace=args.namespace)
    keys = args.keys or [line.rstrip("\n") for line in sys.stdin]
    status = 0
    out = sys.stdout
    for key in keys:
        try:
            text = reader.get_meta_json(key) if args.meta else reader.get_json(key)
            out.write(text + "\n")
        except ReadError as e:
            out.write("!%s %s\n" % (e.code, e))
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
