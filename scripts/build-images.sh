#!/usr/bin/env bash
# Builds the project's container images without any network inside the builds:
#
#   1. the airflow-modelopt wheel (from a clean copy of the sources, reproducible bytes);
#   2. the wheelhouses, on this host, with pip (cached until pyproject.toml changes):
#        build/wheelhouse/base/{deps,project}   everything airflow-modelopt[onnx] needs
#        build/wheelhouse/torch/{deps,project}  only what airflow-modelopt[torch] adds
#        build/wheelhouse/tensorflow/{deps,replace,nodeps,project}  what [tensorflow,litert] adds,
#          the base packages it needs at other versions, and onnx2tf (see images/tensorflow/Dockerfile)
#        build/wheelhouse/openvino/{deps,project}  what [openvino] adds to the torch set (OpenVINO,
#          NNCF, MNN), resolved with the torch set's versions
#   3. airflow-modelopt-<family>:<tag> (and :latest) for each family, with `pip install --no-index`
#      from those wheelhouses: base; for torch and tensorflow, first their framework layer
#      (images/base/framework.Dockerfile on base's runtime stage, tagged
#      airflow-modelopt-<family>-framework:<tag>), then images/<family>/Dockerfile adds the project.
#      openvino's framework layer goes on top of torch's (it is the torch image plus OpenVINO, NNCF
#      and MNN), so the two share torch's layers on disk and in a registry.
#
#   scripts/build-images.sh [--base-image IMAGE] [--tag TAG] [--images base,torch,tensorflow,openvino]
#
#   --base-image IMAGE  Python 3.11 Debian-like image to start from. Default: python:3.11-slim-bookworm
#                       if present or pullable, else the debootstrap image of scripts/make-base-image.sh.
#   --tag TAG           image tag (default: the version in airflow_modelopt/version.py)
#   --images LIST       which images (default: base,torch,tensorflow,openvino; base is always built,
#                       openvino needs torch). The
#                       tensorflow image is the big one (~4.8 GB: TensorFlow, torch, jax): leave it
#                       out when no DAG converts to TFLite or prunes Keras models in containers.
#                       images/tensorrt is not built here: it starts from NVIDIA's TensorRT image.
#
# Environment: PY (python with pip used to build the wheelhouses; default .venv/bin/python, then
# python3; must be CPython 3.11 on x86_64 like the images), ALLOW_CUDA_TORCH=1 to accept a CUDA
# torch build, DOCKER_BUILDKIT (default: 1 if `docker buildx` exists, else 0, the legacy builder).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON_SLIM=python:3.11-slim-bookworm
DEBIAN_BASE=airflow-modelopt-debian-base:bookworm
WHEELHOUSE_FORMAT=2 # bump when the wheelhouse layout changes

die() { echo "build-images: error: $*" >&2; exit 1; }
log() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

base_image=""
tag=""
images="base,torch,tensorflow,openvino"
while [ $# -gt 0 ]; do
  case "$1" in
    --base-image) [ $# -ge 2 ] || die "--base-image needs a value"; base_image="$2"; shift 2 ;;
    --base-image=*) base_image="${1#*=}"; shift ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag="$2"; shift 2 ;;
    --tag=*) tag="${1#*=}"; shift ;;
    --images) [ $# -ge 2 ] || die "--images needs a value"; images="$2"; shift 2 ;;
    --images=*) images="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

start_all=$SECONDS
want() { case ",$images," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for img in ${images//,/ }; do
  case "$img" in base|torch|tensorflow|openvino) ;;
    *) die "--images: unknown image '$img' (base, torch, tensorflow, openvino)" ;; esac
done
if want openvino && ! want torch; then images="$images,torch"; fi # openvino's framework layer is on torch's
families=(base)
want torch && families+=(torch)
want tensorflow && families+=(tensorflow)
want openvino && families+=(openvino)

# ---- preconditions --------------------------------------------------------------------------------
version="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' airflow_modelopt/version.py)"
[ -n "$version" ] || die "cannot read __version__ from airflow_modelopt/version.py"
tag="${tag:-$version}"

if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys' 2>/dev/null; then die "no usable python (set PY=/path/to/python3.11)"; fi
pytag="$("$PY" -c 'import platform, sys; print(f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')"
[ "$pytag" = "cpython311-x86_64" ] \
  || die "$PY is $pytag; the wheelhouse must be built by CPython 3.11 on x86_64 to match the images (set PY=...)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip"

command -v docker >/dev/null || die "docker CLI not found (scripts/start-dockerd.sh installs and starts the engine)"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (run scripts/start-dockerd.sh)"
if [ -z "${DOCKER_BUILDKIT:-}" ]; then
  if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
fi
log "airflow-modelopt $version, tag $tag, python $PY, DOCKER_BUILDKIT=$DOCKER_BUILDKIT"

WH="$ROOT/build/wheelhouse"
LOGS="$ROOT/build/logs"
mkdir -p "$WH" "$LOGS"
tmp="$(mktemp -d "$ROOT/build/.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Runs a command with its output in a log file; shows the end of the log if it fails.
run_logged() {
  local name="$1"; shift
  if ! "$@" >"$LOGS/$name.log" 2>&1; then
    tail -n 30 "$LOGS/$name.log" >&2
    die "$name failed (full log: $LOGS/$name.log)"
  fi
}

# ---- 1. the base image to start from (first: fail fast) -----------------------------------------
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
if [ -n "$base_image" ]; then
  have_image "$base_image" || timeout 120 docker pull "$base_image" >/dev/null 2>&1 \
    || die "base image $base_image is neither local nor pullable"
elif have_image "$PYTHON_SLIM"; then
  base_image="$PYTHON_SLIM"
elif timeout 60 docker pull "$PYTHON_SLIM" >/dev/null 2>&1; then
  base_image="$PYTHON_SLIM"
else
  log "$PYTHON_SLIM cannot be pulled; using the debootstrap image $DEBIAN_BASE"
  if ! have_image "$DEBIAN_BASE"; then
    if ! command -v debootstrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing debootstrap"
      run_logged apt-debootstrap sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap'
    fi
    t=$SECONDS
    "$ROOT/scripts/make-base-image.sh" "$DEBIAN_BASE" || die "scripts/make-base-image.sh failed"
    log "  made $DEBIAN_BASE ($((SECONDS - t)) s)"
  fi
  base_image="$DEBIAN_BASE"
fi
log "base image: $base_image"

# ---- 2. the project wheel ------------------------------------------------------------------------
t=$SECONDS
log "building the airflow-modelopt wheel"
mkdir -p "$tmp/src" "$tmp/dist"
# A clean copy: no egg-info or build/ in the work tree, no stray __pycache__ in the wheel.
src_files=(pyproject.toml airflow_modelopt)
for f in README.md README.rst LICENSE LICENSE.txt NOTICE MANIFEST.in setup.py setup.cfg; do
  [ -e "$f" ] && src_files+=("$f")
done
tar -c --exclude=__pycache__ --exclude='*.pyc' "${src_files[@]}" | tar -x -C "$tmp/src"
# Fixed timestamps: unchanged sources give the same wheel bytes, so Docker's layer cache holds.
# No build isolation: the environment's own setuptools builds it, so no index is needed here.
run_logged project-wheel env SOURCE_DATE_EPOCH=315532800 \
  "$PY" -m pip wheel --no-deps --no-build-isolation --progress-bar off -w "$tmp/dist" "$tmp/src"
project_whl="$(ls "$tmp/dist"/airflow_modelopt-*.whl 2>/dev/null | head -n1)"
[ -n "$project_whl" ] || die "the project wheel was not built (log: $LOGS/project-wheel.log)"
for img in "${families[@]}"; do
  rm -rf "$WH/$img/project"; mkdir -p "$WH/$img/project"; cp "$project_whl" "$WH/$img/project/"
done
log "  $(basename "$project_whl") ($((SECONDS - t)) s)"

# ---- 3. the wheelhouses --------------------------------------------------------------------------
# Guard: torch must be the CPU build (a CUDA build drags in several GB of nvidia-* wheels).
require_cpu_torch() { # folder
  ls "$1"/torch-*.whl >/dev/null 2>&1 || die "no torch wheel in $1"
  if [ "${ALLOW_CUDA_TORCH:-0}" != 1 ]; then
    if ls "$1"/nvidia_* >/dev/null 2>&1 || ! ls "$1"/torch-*+cpu-*.whl >/dev/null 2>&1; then
      die "pip picked a CUDA torch build ($(basename "$(ls "$1"/torch-*.whl | head -n1)")); put the CPU wheel in a folder and set PIP_FIND_LINKS to it (or ALLOW_CUDA_TORCH=1)"
    fi
  fi
}
norm() { echo "${1%%-*}" | tr 'A-Z-' 'a-z_'; } # distribution name of a wheel file name

t=$SECONDS
key="$( { echo "format $WHEELHOUSE_FORMAT"; echo "$pytag"; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)"
stamp="$WH/.stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] \
   && ls "$WH"/base/deps/pip-*.whl "$WH"/torch/deps/pip-*.whl >/dev/null 2>&1; then
  log "wheelhouses are up to date (pyproject.toml unchanged)"
else
  log "downloading wheels (pip wheel: the full [torch] set, then the [onnx] subset of it)"
  rm -f "$stamp"
  rm -rf "$WH/base/deps" "$WH/torch/deps"
  mkdir -p "$WH/base/deps" "$WH/torch/deps" "$tmp/all"
  # The full torch set first; the base set is then resolved offline from it with the same pins, so
  # a package the two share is the very same file and the torch image only adds new packages.
  # `pip wheel` rather than `pip download`: an sdist-only dependency is built into a wheel here,
  # where there is network for its build requirements.
  run_logged wheelhouse-torch \
    "$PY" -m pip wheel --progress-bar off -w "$tmp/all" "${project_whl}[torch]" pip
  : >"$tmp/pins.txt"
  for f in "$tmp/all"/*.whl; do
    f="${f##*/}"; name="${f%%-*}"; rest="${f#*-}"
    [ "$name" = airflow_modelopt ] || echo "${name}==${rest%%-*}" >>"$tmp/pins.txt"
  done
  run_logged wheelhouse-base \
    "$PY" -m pip wheel --progress-bar off --no-index --find-links "$tmp/all" -c "$tmp/pins.txt" \
    -w "$WH/base/deps" "${project_whl}[onnx]" pip
  rm -f "$WH/base/deps"/airflow_modelopt-*.whl
  # torch/deps = the torch set minus what base has (plus pip, which only installs them).
  for f in "$tmp/all"/*.whl; do
    b="${f##*/}"
    case "$b" in airflow_modelopt-*) continue ;; esac
    [ -e "$WH/base/deps/$b" ] || mv "$f" "$WH/torch/deps/"
  done
  cp "$WH"/base/deps/pip-*.whl "$WH/torch/deps/"
  # Guard: a package in both sets at different versions would leave two copies in the torch image.
  dup="$(for f in "$WH"/base/deps/*.whl "$WH"/torch/deps/*.whl; do norm "${f##*/}"; done \
         | sort | uniq -d | grep -vx pip || true)"
  [ -z "$dup" ] || die "packages in both wheelhouses: $dup"
  require_cpu_torch "$WH/torch/deps"
  echo "$key" >"$stamp"
  log "  wheelhouses ready ($((SECONDS - t)) s)"
fi
log "  base: $(ls "$WH"/base/deps/*.whl | wc -l) wheels, $(du -sh "$WH/base/deps" | cut -f1); torch adds $(($(ls "$WH"/torch/deps/*.whl | wc -l) - 1)) wheels, $(du -sh "$WH/torch/deps" | cut -f1)"

# The tensorflow set is resolved on its own (litert-torch caps pydantic, so it cannot share the
# base set's pins). What base already has as the same file is left out; a package base has at
# another version goes to replace/, which the Dockerfile installs over base's version.
if want tensorflow; then
  t=$SECONDS
  TFW="$WH/tensorflow"
  tf_key="$( { echo "$key"; cat images/tensorflow/requirements-nodeps.txt; ls "$WH"/base/deps; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$TFW/.stamp" ] && [ "$(cat "$TFW/.stamp")" = "$tf_key" ] && ls "$TFW"/deps/pip-*.whl >/dev/null 2>&1; then
    log "tensorflow wheelhouse is up to date"
  else
    log "downloading wheels for the tensorflow image ([tensorflow,litert] + onnx2tf; about 1.5 GB the first time)"
    rm -f "$TFW/.stamp"
    rm -rf "$TFW/deps" "$TFW/replace" "$TFW/nodeps"
    mkdir -p "$TFW/deps" "$TFW/replace" "$TFW/nodeps" "$tmp/tf"
    run_logged wheelhouse-tensorflow \
      "$PY" -m pip wheel --progress-bar off -w "$tmp/tf" "${project_whl}[tensorflow,litert]" pip
    run_logged wheelhouse-tensorflow-nodeps \
      "$PY" -m pip wheel --no-deps --progress-bar off -w "$TFW/nodeps" -r images/tensorflow/requirements-nodeps.txt
    base_names=" $(for f in "$WH"/base/deps/*.whl; do norm "${f##*/}"; done | tr '\n' ' ')"
    for f in "$tmp/tf"/*.whl; do
      b="${f##*/}"
      case "$b" in airflow_modelopt-*) continue ;; esac
      if [ "$(norm "$b")" = pip ]; then mv "$f" "$TFW/deps/" # installs deps/, not itself installed
      elif [ -e "$WH/base/deps/$b" ]; then continue
      elif [[ "$base_names" == *" $(norm "$b") "* ]]; then mv "$f" "$TFW/replace/"
      else mv "$f" "$TFW/deps/"
      fi
    done
    require_cpu_torch "$TFW/deps"
    echo "$tf_key" >"$TFW/.stamp"
    log "  tensorflow wheelhouse ready ($((SECONDS - t)) s)"
  fi
  replaced_pkgs="$(ls "$TFW/replace" | sed 's/-py3.*\|-cp3.*//' | tr '\n' ' ')"
  log "  tensorflow adds $(($(ls "$TFW"/deps/*.whl | wc -l) - 1)) wheels, $(du -sh "$TFW/deps" | cut -f1); replaces: ${replaced_pkgs:-nothing}"
fi

# The openvino set: [openvino] resolved with the versions of the base and torch sets (the same
# files, found locally), so its deps/ holds only what it adds on top of the torch image.
if want openvino; then
  t=$SECONDS
  OVW="$WH/openvino"
  ov_key="$( { echo "$key"; ls "$WH"/base/deps "$WH"/torch/deps; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$OVW/.stamp" ] && [ "$(cat "$OVW/.stamp")" = "$ov_key" ] && ls "$OVW"/deps/pip-*.whl >/dev/null 2>&1; then
    log "openvino wheelhouse is up to date"
  else
    log "downloading wheels for the openvino image ([openvino] on top of the torch set)"
    rm -f "$OVW/.stamp"
    rm -rf "$OVW/deps"
    mkdir -p "$OVW/deps" "$tmp/ov"
    : >"$tmp/ov-pins.txt"
    for f in "$WH"/base/deps/*.whl "$WH"/torch/deps/*.whl; do
      f="${f##*/}"; echo "$(norm "$f")==$(echo "$f" | cut -d- -f2)" >>"$tmp/ov-pins.txt"
    done
    run_logged wheelhouse-openvino \
      "$PY" -m pip wheel --progress-bar off --find-links "$WH/base/deps" --find-links "$WH/torch/deps" \
      -c "$tmp/ov-pins.txt" -w "$tmp/ov" "${project_whl}[openvino]" pip
    for f in "$tmp/ov"/*.whl; do
      b="${f##*/}"
      case "$b" in airflow_modelopt-*) continue ;; esac
      [ -e "$WH/base/deps/$b" ] || [ -e "$WH/torch/deps/$b" ] || mv "$f" "$OVW/deps/"
    done
    cp "$WH"/base/deps/pip-*.whl "$OVW/deps/"
    ! ls "$OVW"/deps/torch-*.whl >/dev/null 2>&1 || die "the openvino set resolved another torch than the torch set's"
    echo "$ov_key" >"$OVW/.stamp"
    log "  openvino wheelhouse ready ($((SECONDS - t)) s)"
  fi
  log "  openvino adds $(($(ls "$OVW"/deps/*.whl | wc -l) - 1)) wheels, $(du -sh "$OVW/deps" | cut -f1)"
fi

# ---- 4. the images ------------------------------------------------------------------------------
replaced=() # image IDs that this run's builds untagged; removed at the end, children first
build() { # name dockerfile context build-args...
  local name="$1" dockerfile="$2" context="$3"; shift 3
  local t=$SECONDS old
  old="$(docker image inspect -f '{{.Id}}' "$name:$tag" 2>/dev/null || true)"
  log "building $name:$tag"
  docker build -f "$dockerfile" "$@" --build-arg "MODELOPT_VERSION=$version" \
    -t "$name:$tag" -t "$name:latest" "$context" || die "docker build of $name:$tag failed"
  log "  $name:$tag built ($((SECONDS - t)) s)"
  [ -z "$old" ] || [ "$old" = "$(docker image inspect -f '{{.Id}}' "$name:$tag")" ] || replaced=("$old" "${replaced[@]}")
}
build airflow-modelopt-base images/base/Dockerfile "$WH/base" --build-arg "BASE_IMAGE=$base_image"
if [ ${#families[@]} -gt 1 ]; then
  # The base image without the project (all cached by the build above): what the others start from.
  build airflow-modelopt-base-runtime images/base/Dockerfile "$WH/base" --build-arg "BASE_IMAGE=$base_image" \
    --target runtime
fi
for family in "${families[@]:1}"; do
  # One recipe for every family's frameworks (images/base/framework.Dockerfile); replace/ and
  # nodeps/ are empty where a family needs neither.
  mkdir -p "$WH/$family/replace" "$WH/$family/nodeps"
  runtime="airflow-modelopt-base-runtime:$tag"
  [ "$family" != openvino ] || runtime="airflow-modelopt-torch-framework:$tag"
  build "airflow-modelopt-$family-framework" images/base/framework.Dockerfile "$WH/$family" \
    --build-arg "RUNTIME_IMAGE=$runtime" --build-arg "PYTHON_IMAGE=$base_image"
  build "airflow-modelopt-$family" "images/$family/Dockerfile" "$WH/$family" \
    --build-arg "FRAMEWORK_IMAGE=airflow-modelopt-$family-framework:$tag"
done

# ---- 5. smoke test ------------------------------------------------------------------------------
log "smoke test"
declare -A smoke=(
  [base]='import airflow_modelopt, onnx, onnxruntime, mlflow'
  [torch]='import airflow_modelopt, torch, sklearn, onnxruntime'
  [tensorflow]='import airflow_modelopt, tensorflow, tf_keras, onnx2tf, litert_torch, onnxruntime'
  [openvino]='import airflow_modelopt, torch, openvino, nncf, MNN, onnxruntime'
)
for family in "${families[@]}"; do
  docker run --rm "airflow-modelopt-$family:$tag" python -c "${smoke[$family]}" \
    || die "airflow-modelopt-$family:$tag does not import its packages"
done

# The previous build of each image, if now untagged (else every code change would leave a
# dangling GB behind). `docker rmi` refuses images still tagged or used by a container.
for id in "${replaced[@]}"; do docker rmi "$id" >/dev/null 2>&1 || true; done

for family in "${families[@]}"; do
  log "airflow-modelopt-$family:$tag  $(docker image inspect -f '{{.Size}}' "airflow-modelopt-$family:$tag" | awk '{printf "%.0f MB", $1/1e6}')"
done
log "done in $((SECONDS - start_all)) s"
