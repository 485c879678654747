"""A warm parent for the tests' CLI runs: `python -m pipeline ARGS` in a forked child.

Every CLI test used to start a fresh interpreter, and most of its seconds went to importing torch
and Ultralytics before the pipeline read its first argument (about 3 s a run on a 2-core machine,
over a hundred runs in the suite). This process imports them once, then, for each request on stdin
(one JSON line: args, cwd, env, out, err), forks a child that runs the `pipeline` package as
`__main__` exactly as `python -m pipeline` does (runpy, argv, cwd, environment, stdout/stderr to the
given files, stdin from /dev/null), ends it as the interpreter would (non-daemon threads joined,
atexit handlers run, so log files are flushed), and answers with one JSON line per event:
{"pid": N} when the child starts, {"rc": N} when it ends (a negative rc is the signal that ended it).

The parent never runs a torch operation, so no thread pool exists to be broken by fork. Runs whose
environment differs from the one this process started with do not come here (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import sys


def _child(req: dict) -> None:
    import atexit
    import runpy
    import threading
    import traceback

    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [str(req["main"]), *req["args"]]
        sys.modules.pop("pipeline.__main__", None)  # run afresh as __main__, as `python -m` does
        try:
            runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter prints for an uncaught exception, and its exit code
            traceback.print_exc()
            code = 1
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def main() -> None:
    before = dict(os.environ)
    # What every CLI run imports before it reads an argument (pipeline.yolo_env first: it sets the
    # offline-safe environment Ultralytics reads at import).
    import pipeline.__main__  # noqa: F401
    import pipeline.app  # noqa: F401
    import torch  # noqa: F401
    import ultralytics.utils  # noqa: F401

    out = sys.stdout
    # The variables those imports set (Ultralytics sets OMP_NUM_THREADS, cv2 LD_LIBRARY_PATH, ...): a
    # fresh run sets them the same way, so they do not make a test's environment differ from ours.
    imported = {k: v for k, v in os.environ.items() if before.get(k) != v}
    print(json.dumps({"ready": True, "imported": imported}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc}), file=out, flush=True)


if __name__ == "__main__":
    main()
