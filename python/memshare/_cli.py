"""``memshare`` command line: inspect and clean shared memory.

    memshare ls [--json] [--dir DIR]              list arenas, their processes and usage
    memshare gc [--dry-run] [--json] [--dir DIR]  remove arenas whose every process is dead
    memshare --version

``--dir`` may also come before the command (``memshare --dir DIR ls``).

Exit codes: 0 success, 1 an arena could not be read or removed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import _native

_DIR_HELP = "segment directory (default: $MEMSHARE_DIR or /dev/shm)"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    arenas = _native.list_arenas(args.dir)
    if args.json:
        json.dump(arenas, sys.stdout, indent=2, default=str)
        print()
        return 1 if any("error" in a for a in arenas) else 0
    if not arenas:
        print(f"no memshare arenas in {args.dir or _native.shm_dir()}")
        return 0
    status = 0
    print(f"{'ARENA':<34} {'STATE':<6} {'RESERVED':>10} {'IN USE':>10} {'BLOCKS':>7}  PROCESSES")
    for a in arenas:
        if "error" in a:
            print(f"{a['token']:<34} {'ERROR':<6} {a['error']}")
            status = 1
            continue
        owners = ", ".join(f"{pid}{'' if alive else ' (dead)'}" for pid, alive in a["owners"])
        state = "alive" if a["alive"] else "dead"
        print(
            f"{a['token']:<34} {state:<6} {_size(a['bytes_reserved']):>10} "
            f"{_size(a['bytes_in_use']):>10} {a['live_blocks']:>7}  {owners or '-'}"
        )
    return status


def cmd_gc(args: argparse.Namespace) -> int:
    removed = _native.collect_garbage(args.dir, args.dry_run)
    if args.json:
        json.dump({"removed": removed, "dry_run": args.dry_run}, sys.stdout)
        print()
    else:
        verb = "would remove" if args.dry_run else "removed"
        for token in removed:
            print(f"{verb} arena {token}")
        print(f"{len(removed)} arena(s) {verb}; arenas of live processes are never touched")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memshare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help=_DIR_HELP)
    parser.add_argument("--version", action="version", version=f"memshare {_native.__version__}")
    # --dir after the command too; SUPPRESS keeps a --dir given before it.
    with_dir = argparse.ArgumentParser(add_help=False)
    with_dir.add_argument("--dir", default=argparse.SUPPRESS, help=_DIR_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", parents=[with_dir], help="list arenas with their processes and usage")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    gc = sub.add_parser("gc", parents=[with_dir], help="remove arenas whose every process is dead")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=cmd_gc)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OSError as e:
        print(f"memshare: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
