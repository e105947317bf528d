# fhirsynth container: CPU by default; for CUDA pass a CUDA runtime base and a CUDA torch, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# Run:  docker run -p 8080:8080 -v $PWD/model:/models -v $PWD/export:/data fhirsynth serve --data /data
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- build stage: a virtualenv with torch (pinned) and fhirsynth -------------------------------------------
FROM python:3.11-slim AS build
ARG TORCH_SPEC
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhirsynth ./fhirsynth
# fhirsynth/data/mappings and fhirsynth/data/sample link to these: the wheel carries them as package data
COPY mappings ./mappings
COPY fixtures/sample ./fixtures/sample
RUN pip install .

# ---- runtime stage: slim, non-root ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 FHIRSYNTH_PROGRESS=0 FHIRSYNTH_MAPPINGS_DIR=/app/mappings
RUN groupadd --system fhirsynth && useradd --system --gid fhirsynth --home-dir /app --create-home fhirsynth
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=fhirsynth:fhirsynth mappings ./mappings
COPY --chown=fhirsynth:fhirsynth fixtures/sample ./fixtures/sample
RUN mkdir -p /models /data /db && chown fhirsynth:fhirsynth /models /data /db
VOLUME ["/models", "/data", "/db"]
USER fhirsynth
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/metadata', timeout=4).status == 200 else 1)"
ENTRYPOINT ["fhirsynth"]
CMD ["serve", "--data", "/data", "--db", "/db/fhirsynth.sqlite", "--host", "0.0.0.0", "--port", "8080"]
