"""Kill points for tests/test_run_resume.py, loaded by Python at start-up when this folder is on
PYTHONPATH (so in the `facecap run` driver and in every Ray worker it starts).

With ``FACECAP_KILLPOINT="<stage>/<file>:<flag path>"`` set, the process that writes ``<file>``
(``part-00002.tar``, ``_done/part-00002.json``...) into the stage's output folder writes half of
the first chunk, flushes it to the temporary, creates the flag file and waits. The test, seeing
the flag, SIGKILLs the whole run: the kill lands inside that write, in whichever process makes it.
"""

import os

_SPEC = os.environ.get("FACECAP_KILLPOINT")

if _SPEC:
    import contextlib
    import time
    from pathlib import Path

    from facecap.pipeline.storage import Storage

    _target, _flag = _SPEC.split(":", 1)
    _stage, _file = _target.split("/", 1)
    _open_write = Storage.open_write

    class _StallingStream:
        def __init__(self, stream):
            self._stream = stream

        def write(self, data) -> int:
            data = bytes(data)
            self._stream.write(data[: max(1, len(data) // 2)])
            self._stream.flush()
            Path(_flag).touch()
            time.sleep(3600)  # until the test's SIGKILL
            raise AssertionError("the kill -9 never came")

        def __getattr__(self, name):
            return getattr(self._stream, name)

    @contextlib.contextmanager
    def _stalling_open_write(self, name):
        with _open_write(self, name) as stream:
            hit = os.path.basename(self.root) == _stage and name == _file
            yield _StallingStream(stream) if hit else stream

    Storage.open_write = _stalling_open_write
