# syntax=docker/dockerfile:1
# SpecServe images (built with `make images`; not built in this repository's CI, which has no
# container engine):
#   --target engine    torch (CPU wheels) + the [engine] extra; entrypoint `adaspec`
#                      (the operator runs `adaspec serve …` and `adaspec profile …` in it)
#   --target operator  the core package + the [operator] extra only, no torch;
#                      entrypoint `specserve operator` (kopf)
# Both run as the non-root user `specserve` (uid/gid 1000, as the operator's pod specs and the
# Helm chart expect) and need no writable root filesystem except $HOME/.cache (engine models)
# and /tmp.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 1000 specserve \
 && useradd --system --uid 1000 --gid 1000 --create-home --home-dir /home/specserve specserve

# ---------------------------------------------------------------- build the project wheel once
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY operator ./operator
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- operator (no torch)
FROM base AS operator
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/specserve-*.whl)[operator]" \
 && rm -rf /wheels \
 && python -c "import specserve, kopf; import importlib.util as u; assert u.find_spec('torch') is None"
USER 1000:1000
WORKDIR /home/specserve
ENTRYPOINT ["specserve", "operator"]

# ---------------------------------------------------------------- engine (torch CPU)
FROM base AS engine
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/specserve-*.whl)[engine]" \
 && rm -rf /wheels \
 && python -c "import adaspec, torch"
USER 1000:1000
WORKDIR /home/specserve
ENV HF_HOME=/home/specserve/.cache/huggingface
EXPOSE 8000
ENTRYPOINT ["adaspec"]
CMD ["--help"]
