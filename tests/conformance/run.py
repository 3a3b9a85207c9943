"""Run one conformance suite in this interpreter; write each test's outcome.

    python tests/conformance/run.py --suite mp --impl memshare --start spawn --out out.jsonl

Each line appended to ``--out`` is ``{"id", "outcome", "detail"}``; a test
that is still "started" at the end crashed or hung the run (a test that runs
longer than ``--test-timeout`` ends the run with a traceback of every thread
on stderr); ``--skip`` lets the caller go on after it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import traceback
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _Recorder(unittest.TestResult):
    """Writes every outcome as soon as it is known."""

    def __init__(self, out, timeout: float):
        super().__init__()
        self._out = out
        self._timeout = timeout

    def _write(self, test, outcome: str, detail: str = "") -> None:
        self._out.write(json.dumps({"id": test.id(), "outcome": outcome, "detail": detail}))
        self._out.write("\n")
        self._out.flush()

    def startTest(self, test):
        super().startTest(test)
        faulthandler.dump_traceback_later(self._timeout, exit=True)
        self._write(test, "started")
        sys.stderr.write(f"--- {test.id()}\n")

    def stopTest(self, test):
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._write(test, "pass")

    def _error(self, test, err, outcome):
        text = "".join(traceback.format_exception(*err))
        self._write(test, outcome, text[-2000:])

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._error(test, err, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        # setUpModule/setUpClass errors come as a placeholder "test"
        self._error(test, err, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._write(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._write(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._write(test, "xpass")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._error(test, err, "fail")


def _load(suite: str, only: list[str], skip: set[str]) -> unittest.TestSuite:
    loader = unittest.TestLoader()
    tests = unittest.TestSuite()
    if suite == "mp":
        import suite_mp

        classes = [getattr(suite_mp, name) for name in suite_mp.CLASSES]
    else:
        import suite_cf

        classes = [cls for _, cls in suite_cf.classes()]
    for cls in classes:
        for test in loader.loadTestsFromTestCase(cls):
            if test.id() in skip:
                continue
            if not only or any(word in test.id() for word in only):
                tests.addTest(test)
    return tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["mp", "cf"], required=True)
    parser.add_argument("--impl", choices=["stock", "memshare"], required=True)
    parser.add_argument("--start", choices=["fork", "spawn", "forkserver"], required=True)
    parser.add_argument("--out", required=True, help="JSON lines file to write")
    parser.add_argument("-k", action="append", default=[], help="run tests whose id has this")
    parser.add_argument("--skip", help="file of test ids not to run (one a line)")
    parser.add_argument("--test-timeout", type=float, default=400.0)
    args = parser.parse_args()
    # Read by the suite modules, here and in spawn/forkserver children.
    os.environ["MEMSHARE_CONFORMANCE_IMPL"] = args.impl
    os.environ["MEMSHARE_CONFORMANCE_START"] = args.start
    sys.path.insert(0, str(HERE))
    skip = set(Path(args.skip).read_text().split()) if args.skip else set()
    tests = _load(args.suite, args.k, skip)
    with open(args.out, "a") as out:
        result = _Recorder(out, args.test_timeout)
        tests.run(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
