"""``python -m qtool`` and the ``qtool`` console script.

Importing the CLI (onnxruntime, onnx, numpy) takes seconds on a loaded machine; Ctrl-C in
that time ends as quietly as during the work itself: one line, exit 130, no traceback.
"""

import sys

from qtool.errors import EXIT_INTERRUPTED, INTERRUPTED


def run() -> None:
    try:
        from qtool.cli import main
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED + "\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
    main()


if __name__ == "__main__":
    run()
