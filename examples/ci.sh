#!/usr/bin/env bash
# qtool in CI: gate a compressed model on accuracy and output fidelity.
#
#   examples/ci.sh [CANDIDATE.onnx]
#
# Without CANDIDATE the demo model is converted to static int8 first (calibrated on data/calib). Two gates run:
#   1. --max-drop 0.01: top-1 may drop by at most one point        -> passes (exit 0)
#   2. --min-sqnr 60:   logits within 60 dB of the float model     -> int8 cannot: exit 3
# A real pipeline stops at the first non-zero exit; this demo runs both and checks that the
# second one failed *as a gate* (exit 3, not 1 or 2). Reports: $OUT/*.json and *.md (the .md
# is ready to post as a pull-request comment).
#
# GitHub Actions equivalent:
#   - run: qtool eval int8.onnx --reference model.onnx --data eval/ --max-drop 0.01
#          --json report.json --markdown report.md
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# qtool from PATH (after `source .venv/bin/activate`), else the repository's .venv, else $QTOOL.
if [ -z "${QTOOL:-}" ]; then
    if command -v qtool >/dev/null 2>&1; then
        QTOOL=qtool
    elif [ -x "$HERE/../.venv/bin/qtool" ]; then
        QTOOL="$HERE/../.venv/bin/qtool"
    else
        echo "qtool is not on PATH: run 'make install' then 'source .venv/bin/activate' (or set QTOOL)" >&2
        exit 2
    fi
fi
OUT="${OUT:-$(mktemp -d)}"
REF="$HERE/digits_cnn.onnx"
DATA="$HERE/data/eval"
CAND="${1:-}"

if [ -z "$CAND" ]; then
    CAND="$OUT/digits_int8.onnx"
    $QTOOL convert "$REF" -o "$CAND" --data "$HERE/data/calib" || exit $?
fi

echo "== gate 1: accuracy drop <= 0.01"
$QTOOL eval "$CAND" --reference "$REF" --data "$DATA" --metric top1 --max-drop 0.01 \
    --json "$OUT/accuracy.json" --markdown "$OUT/accuracy.md"
status=$?
if [ $status -ne 0 ]; then
    echo "accuracy gate: exit $status (expected 0)"
    exit $status
fi
echo "accuracy gate passed (exit 0)"

echo "== gate 2: output SQNR >= 60 dB"
$QTOOL eval "$CAND" --reference "$REF" --data "$DATA" --min-sqnr 60 \
    --json "$OUT/sqnr.json" --markdown "$OUT/sqnr.md"
status=$?
if [ $status -ne 3 ]; then
    echo "sqnr gate: exit $status (expected 3, a failed gate)"
    exit 1
fi
echo "sqnr gate failed as expected (exit 3)"
echo "reports in $OUT"
