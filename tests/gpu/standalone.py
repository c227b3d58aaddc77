"""Run a GPU test file without pytest (a bare GPU image may lack it): a stand-in for the few parts of
``pytest`` the GPU tests use, and a small runner over each test's parametrizations.

    from standalone import pytest, run_file      # pytest itself when installed, else the stand-in
    ...
    if __name__ == "__main__":
        run_file(__file__, globals())
"""

from __future__ import annotations

import inspect
import itertools
import os
import random
import sys
import traceback

try:
    import pytest
except ImportError:  # a stand-in that records parametrizations for the runner below
    class _Mark:
        gpu = staticmethod(lambda fn: fn)

        @staticmethod
        def skipif(*args, **kwargs):
            return lambda fn: fn

        @staticmethod
        def parametrize(names, values):
            def record(fn):
                fn.__dict__.setdefault("params", []).append((names, values))
                return fn
            return record

    class pytest:  # noqa: N801 - mimics the module
        mark = _Mark()

        @staticmethod
        def skip(reason):
            raise RuntimeError(f"skipped: {reason}")


def run_without_pytest(namespace: dict) -> int:
    """Every ``test_*`` function of ``namespace`` over the product of its parametrizations, with one seed
    for the whole run (printed, replayable with MINIINFER_TEST_SEED); returns the number of failures."""
    import torch

    seed = int(os.environ.get("MINIINFER_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed} (replay with MINIINFER_TEST_SEED={seed})")
    passed = failed = skipped = 0
    for name, fn in list(namespace.items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        params = fn.__dict__.get("params", [])
        names = [[n.strip() for n in spec.split(",")] for spec, _ in params]
        for combo in itertools.product(*(values for _, values in params)):
            kwargs = {}
            for keys, value in zip(names, combo):
                kwargs.update(zip(keys, value if len(keys) > 1 else (value,)))
            if "seed" in inspect.signature(fn).parameters:
                kwargs["seed"] = seed
                torch.manual_seed(seed)
            try:
                fn(**kwargs)
                passed += 1
            except Exception as error:  # noqa: BLE001 - report and go on
                if str(error).startswith("skipped:"):
                    skipped += 1
                    continue
                failed += 1
                print(f"FAILED {name} {kwargs}")
                traceback.print_exc(limit=4)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return failed


def run_file(path: str, namespace: dict) -> None:
    """The ``__main__`` of a GPU test file: pytest when installed, else :func:`run_without_pytest`."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to test")
    if hasattr(pytest, "main"):
        sys.exit(pytest.main([path, "-m", "gpu", "-q", "-p", "no:cacheprovider"]))
    sys.exit(1 if run_without_pytest(namespace) else 0)
