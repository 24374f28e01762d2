# The framework layer the torch and tensorflow images share: the base image's `runtime` stage plus
# the wheels a family adds, without the project. scripts/build-images.sh builds it once per family
# as airflow-modelopt-<family>-framework:<tag>, with that family's wheelhouse as the context:
#   deps/     the wheels of packages the family adds that the base image does not have at all
#             (+ pip, used to install them and not itself installed)
#   replace/  wheels of packages the base image has at another version, installed as they are
#             (the versions resolved together with the new packages). May be empty.
#   nodeps/   wheels installed without their declared dependencies (tensorflow: onnx2tf, whose
#             metadata pins an older stack). May be empty.
# The family's own Dockerfile (images/<family>/Dockerfile) starts FROM this image and adds the
# project: a code change rebuilds that small layer, not the GBs of frameworks here.
# Nothing is downloaded during the build (pip --no-index).
#
# RUNTIME_IMAGE the base image's `runtime` stage (images/base/Dockerfile --target runtime): user,
#               environment and the base dependencies, without the project.
# PYTHON_IMAGE  the image the base image was built FROM (its BASE_IMAGE). The new wheels are
#               installed in a stage of their own on it and only the new files are copied over, so
#               no wheel layer stays in the image's history.
ARG MODELOPT_VERSION=0.1.0
ARG RUNTIME_IMAGE=airflow-modelopt-base-runtime:${MODELOPT_VERSION}
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- stage 1: the new packages, in an empty venv at the same path as the base image's -------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
COPY deps/ /wheels/
RUN set -eu; \
    python3 -m venv --without-pip /opt/modelopt; \
    mkdir /tmp/pip; mv /wheels/pip-*.whl /tmp/pip/; set -- /tmp/pip/pip-*.whl; \
    touch /tmp/stamp; \
    /opt/modelopt/bin/python "$1/pip" install --no-index --no-deps /wheels/*.whl; \
    mkdir /staging; cd /; \
    find opt/modelopt -cnewer /tmp/stamp \( -type f -o -type l \) -print0 \
      | xargs -0 -r cp -a --parents -t /staging; \
    rm -rf /wheels /tmp/pip

# ---- the framework layer ----------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
USER root
COPY --from=deps /staging/opt/modelopt/ /opt/modelopt/
COPY replace/ /tmp/modelopt-replace/
COPY nodeps/ /tmp/modelopt-nodeps/
RUN set -eu; \
    if ls /tmp/modelopt-replace/*.whl >/dev/null 2>&1; then \
      pip install --no-index --no-deps /tmp/modelopt-replace/*.whl; fi; \
    if ls /tmp/modelopt-nodeps/*.whl >/dev/null 2>&1; then \
      pip install --no-index --no-deps /tmp/modelopt-nodeps/*.whl; fi; \
    rm -rf /tmp/modelopt-replace /tmp/modelopt-nodeps
WORKDIR /home/modelopt
USER modelopt
