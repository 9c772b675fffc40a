#!/usr/bin/env bash
# Run diffusers' own pipeline tests (PipelineTesterMixin, unmodified) against both mmdiff pipelines.
#
# usage: assets/conformance/run.sh DIFFUSERS_GIT_DIR [extra pytest args...]
#   DIFFUSERS_GIT_DIR: a clone (or bare mirror) of github.com/huggingface/diffusers.
# environment:
#   PYTHON          interpreter with mmdiff installed (default: python)
#   DIFFUSERS_REF   the diffusers commit/tag whose tests/ to use (default: the tag of the installed version, else the
#                   newest release tag not newer than it, with a warning)
#   TALLY_OUT       also write the tally to this file (with a timestamp)
#   MMDIFF_CONFORMANCE_SAFETENSORS=1  probe, not the conformance result: the tests that save with
#                   safe_serialization=False (refused by mmdiff) save safetensors instead, to see what lies behind
# It exports diffusers' tests/ tree at that ref into a temporary folder, puts it on PYTHONPATH (so
# `tests.pipelines.test_pipelines_common` imports as in diffusers), installs the two packages that tree imports and
# mmdiff does not depend on (parameterized, requests-mock) into that folder if they are missing, runs pytest on
# test_diffusers_mixin.py and prints a tally. Nothing is written into the repository.
set -euo pipefail

GIT_DIR_ARG=${1:?usage: run.sh DIFFUSERS_GIT_DIR [pytest args...]}
shift
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ -d "$GIT_DIR_ARG/.git" ]; then GD="$GIT_DIR_ARG/.git"; else GD="$GIT_DIR_ARG"; fi
git --git-dir="$GD" rev-parse --git-dir >/dev/null 2>&1 || { echo "not a git repository: $GIT_DIR_ARG" >&2; exit 2; }

VERSION=$("$PYTHON" -c "import diffusers; print(diffusers.__version__)")
NOTE=""
if [ -n "${DIFFUSERS_REF:-}" ]; then
    REF=$DIFFUSERS_REF
    NOTE="(DIFFUSERS_REF given)"
elif git --git-dir="$GD" rev-parse -q --verify "refs/tags/v$VERSION^{commit}" >/dev/null; then
    REF="v$VERSION"
    NOTE="(the installed version's tag)"
else
    # the newest release tag vX.Y.Z that is not newer than the installed version
    REF=$({ git --git-dir="$GD" tag -l 'v*' | grep -E '^v[0-9]+\.[0-9]+\.[0-9]+$'; echo "v$VERSION~"; } \
        | sort -V | sed -n "/^v$VERSION~\$/q;p" | tail -1)
    [ -n "$REF" ] || { echo "no release tag at or below v$VERSION in $GIT_DIR_ARG" >&2; exit 2; }
    NOTE="(WARNING: tag v$VERSION is not in $GIT_DIR_ARG; using the newest older release tag)"
    echo "WARNING: tag v$VERSION is not in $GIT_DIR_ARG; using $REF" >&2
fi
COMMIT=$(git --git-dir="$GD" rev-parse "$REF^{commit}")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmdiff-conformance.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
git --git-dir="$GD" archive "$COMMIT" tests | tar -x -C "$WORK"

# test-only imports of diffusers' tests tree that mmdiff's environment need not have
MISSING=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(p for m, p in [("parameterized", "parameterized"), ("requests_mock", "requests-mock")]
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$MISSING" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --target "$WORK/deps" --no-deps $MISSING >&2
fi

export PYTHONPATH="$WORK:$WORK/deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export DIFFUSERS_TEST_DEVICE=${DIFFUSERS_TEST_DEVICE:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread is enough

HEADER=(
    "mmdiff conformance: diffusers PipelineTesterMixin vs mmdiff pipelines, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    "diffusers installed $VERSION; tests/ from $REF ($COMMIT) $NOTE; device $DIFFUSERS_TEST_DEVICE"
)
if [ "${MMDIFF_CONFORMANCE_SAFETENSORS:-}" = 1 ]; then
    HEADER+=("PROBE MODE (MMDIFF_CONFORMANCE_SAFETENSORS=1): safe_serialization=False replaced by True; not the conformance result")
fi
printf '%s\n' "${HEADER[@]}"

set +e
# from the temporary folder, so `python -m pytest` puts diffusers' tests package first on sys.path
(cd "$WORK" && "$PYTHON" -m pytest "$HERE/test_diffusers_mixin.py" -p no:cacheprovider -rA \
    --junitxml="$WORK/report.xml" "$@")
STATUS=$?
set -e
[ -f "$WORK/report.xml" ] || exit "$STATUS"

echo
"$PYTHON" "$HERE/tally.py" "$WORK/report.xml" "${HEADER[@]}" | tee "$WORK/tally.txt" | sed -n '3,$p' || true
if [ -n "${TALLY_OUT:-}" ]; then
    cp "$WORK/tally.txt" "$TALLY_OUT.tmp" && mv "$TALLY_OUT.tmp" "$TALLY_OUT"
fi
exit "$STATUS"
