"""``python -m qtool`` and the ``qtool`` console script.

Importing the CLI (onnxruntime, onnx, numpy) takes seconds on a loaded machine; Ctrl-C in
that time ends as quietly as during the work itself: one line, exit 130, no traceback.
"""

import os
import sys

from qtool.errors import EXIT_INTERRUPTED, INTERRUPTED


def run() -> None:
    try:
        from qtool.cli import main
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED + "\n")
        sys.stderr.flush()
        # Not SystemExit: a half-imported extension may have started threads that an orderly
        # shutdown would wait for; nothing has been written yet, so nothing is lost.
        os._exit(EXIT_INTERRUPTED)
    main()


if __name__ == "__main__":
    run()
