#!/usr/bin/env bash
# The shell pipeline users compare edgecache with (issue 14): read a
# compacted topic from the beginning to its end with kcat, turn each record
# into a Redis command in RESP with awk (a tombstone becomes DEL), and
# stream them into redis-cli --pipe. Usage:
#   kcat-pipeline.sh BROKERS TOPIC REDIS_PORT KEY_PREFIX
# %S is the value's size in bytes, -1 for a tombstone (a NULL value, not an
# empty one), so awk needs no length() of its own for the value.
set -euo pipefail
brokers=$1 topic=$2 port=$3 prefix=$4
out=$(kcat -C -q -e -o beginning -b "$brokers" -t "$topic" -f '%S %k %s\n' |
  LC_ALL=C awk -v prefix="$prefix" '
    BEGIN { ORS = "" }
    {
      k = prefix $2
      if ($1 == -1) {
        printf "*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n", length(k), k
      } else {
        printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, $1, substr($0, length($1) + length($2) + 3)
      }
    }' |
  redis-cli -p "$port" --pipe)
# redis-cli --pipe reports errors in its summary; a failed write must fail the run.
echo "$out" >&2
grep -q 'errors: 0,' <<<"$out"
