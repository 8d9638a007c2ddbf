#!/usr/bin/env python3
"""Regenerate test fixtures under tests/fixtures/ (run by hand; tests also create missing ones on first use).

    python tools/make_fixtures.py            # create the missing fixtures
    python tools/make_fixtures.py --force    # retrain / rewrite all of them
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def digits_teacher(force: bool) -> str:
    import digits
    path = digits.make_teacher(force=force)
    import graphopt
    from graphopt.distill import evaluate
    _, _, x_te, y_te = digits.load_digits_split()
    acc = evaluate(graphopt.load(path), {"x": x_te}, y_te)["top1"]
    return f"{path.relative_to(ROOT)} (test accuracy {acc:.4f})"


FIXTURES = {"digits_teacher": digits_teacher}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="regenerate fixtures that already exist")
    ap.add_argument("names", nargs="*", help=f"fixtures to make: {', '.join(FIXTURES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in FIXTURES]
    if unknown:
        ap.error(f"unknown fixture '{unknown[0]}'; known: {', '.join(FIXTURES)}")
    for name in args.names or FIXTURES:
        print(f"{name}: {FIXTURES[name](args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
