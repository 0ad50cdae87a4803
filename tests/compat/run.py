"""Run the compat tests under the current interpreter with no third-party test runner.

Usage: python tests/compat/run.py  (from the repository root). It builds a throwaway
`lsync` package from protocol/ and agent/ plus msgpack's pure-Python modules when the
interpreter has no msgpack, runs every `test_*` function, and prints
`N passed, N failed` as its last line; the exit status is 1 when anything failed.
"""

import os
import shutil
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def build_namespace(msgpack_dir):
    top = tempfile.mkdtemp(prefix="lsync-compat-ns-")
    pkg = os.path.join(top, "lsync")
    os.mkdir(pkg)
    for name in ("protocol", "agent"):
        os.symlink(os.path.join(REPO, name), os.path.join(pkg, name))
    if msgpack_dir:
        shutil.copytree(msgpack_dir, os.path.join(top, "msgpack"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    tests = os.path.join(top, "tests")
    os.mkdir(tests)
    open(os.path.join(tests, "__init__.py"), "w").close()
    os.symlink(HERE, os.path.join(tests, "compat"))
    return top


def main():
    msgpack_dir = os.environ.get("LSYNC_MSGPACK_SOURCE", "")
    os.environ["MSGPACK_PUREPYTHON"] = "1"
    top = build_namespace(msgpack_dir)
    sys.path.insert(0, top)
    passed = failed = 0
    try:
        import importlib
        for module_name in ("test_protocol", "test_agent", "test_writer", "test_packing",
                            "test_records", "test_hardening", "test_keeping", "test_tmpfile",
                            "test_batches", "test_hashing"):
            module = importlib.import_module("tests.compat." + module_name)
            for name in sorted(dir(module)):
                if not name.startswith("test_"):
                    continue
                try:
                    getattr(module, name)()
                except Exception:
                    failed += 1
                    print(f"FAILED {module_name}.{name}")
                    traceback.print_exc()
                else:
                    passed += 1
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"python {sys.version.split()[0]}: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
