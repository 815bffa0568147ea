#!/usr/bin/env python3
"""Where a linked edgecache's bytes come from: each symbol of an unstripped
binary (nm -S) is charged to the static archive that defines it; symbols no
archive defines are Rust (mangled names) or "other" (musl or glibc, compiler
runtime). Section sizes from `size -A` are printed too: unwind tables and
string tables belong to no symbol.

    python3 targets/size.py BINARY ARCHIVE.a...

targets/build.sh runs it when EDGECACHE_SIZE_REPORT=1 (BENCHMARKS.md,
"Binary size"). A local (static) symbol name defined in two archives is
charged to the first; the error is a few KB at most.
"""
import collections
import os
import subprocess
import sys


def nm(*args):
    return subprocess.run(["nm", *args], capture_output=True, text=True, check=True).stdout


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary, archives = sys.argv[1], sys.argv[2:]
    owner = {}
    for archive in archives:
        name = os.path.basename(archive)
        for line in nm("--defined-only", archive).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].lower() in "tdrbv":
                owner.setdefault(parts[2], name)
    total = collections.Counter()
    code = collections.Counter()
    for line in nm("-S", binary).splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        size, kind, symbol = int(parts[1], 16), parts[2].lower(), parts[3]
        who = owner.get(symbol)
        if who is None:
            who = "rust" if symbol.startswith(("_ZN", "_R")) else "other"
        total[who] += size
        if kind in "tw":
            code[who] += size
    print("| part | bytes | code | data |")
    print("|---|---|---|---|")
    for who, size in total.most_common():
        print(f"| {who} | {size:,} | {code[who]:,} | {size - code[who]:,} |")
    print(f"| all symbols | {sum(total.values()):,} | | |")
    sections = subprocess.run(["size", "-A", binary], capture_output=True, text=True, check=True)
    print()
    print("| section | bytes |")
    print("|---|---|")
    for line in sections.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and not parts[0].startswith(".debug"):
            if int(parts[1]) >= 4096:
                print(f"| {parts[0]} | {int(parts[1]):,} |")


if __name__ == "__main__":
    main()
