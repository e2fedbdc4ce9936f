# syntax=docker/dockerfile:1
# hsf_bids, the Hippocampal Segmentation Factory as a BIDS App, with everything it needs inside:
# the HSF 4.0.0 models of both presets (bagging_*, single_*) and the MNI152NLin2009cSym template,
# fetched and verified at build time. It runs offline, read-only and as a non-root user.
#
#   docker build -t hsf-bids/hsf_bids:0.1.0.dev0 .                       CPU image (default)
#   docker build --target gpu -t hsf-bids/hsf_bids:0.1.0.dev0-gpu .      onnxruntime with CUDA
#   docker run --rm --read-only --tmpfs /tmp -v /data/ds:/data:ro -v /data/out:/out \
#       hsf-bids/hsf_bids:0.1.0.dev0 /data /out participant --participant-label 01
#
# Build arguments (docker/build.sh sets them for you, and makes the build work with podman):
#   PYTHON_IMAGE  the base: any Debian-like image with python 3.10+ (python, venv, CA
#                 certificates); docker/make_base.sh makes one from Debian packages
#   HUB           empty: the published presets above; else a hub YAML in the build context,
#                 in a folder of its own under docker/ (docker/hub/my.yaml next to its model
#                 files): that hub is baked instead, as /opt/hsf_bids/hub/my.yaml
#   TEMPLATES     empty: fetched from TemplateFlow and checked; else a TemplateFlow home in
#                 the build context under docker/ (docker/templateflow), checked for content
#   QUANTIZE      1: int8 versions of the models (NNCF); 0: none
#
# Paths inside: the app in /opt/venv, models in /opt/hsf_bids/models ($HSF_BIDS_MODELS_DIR),
# templates in /opt/hsf_bids/templateflow ($TEMPLATEFLOW_HOME). Caches go to a private folder in
# /tmp (hsf_bids/runtime.py); nothing else is written outside the output and work folders.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VERSION=0.1.0.dev0
ARG HUB=""
ARG TEMPLATES=""
ARG QUANTIZE=1

# ---- the app in a virtual environment ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY hsf_bids ./hsf_bids
RUN pip install --no-cache-dir . \
    && pip check \
    && hsf-bids --version

# ---- the same with onnxruntime for CUDA (CUDA and cuDNN libraries from their wheels) ---------
# onnxruntime-gpu 1.31.1's extras bring CUDA 13 and cuDNN 9: the host driver must support CUDA 13.
FROM build AS build-gpu
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
RUN pip uninstall --yes onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_GPU_VERSION}" \
    && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"

# ---- models and templates, verified by checksum: a mismatch fails the build -----------------
FROM build AS assets
ARG HUB
ARG TEMPLATES
ARG QUANTIZE
ENV HSF_BIDS_MODELS_DIR=/opt/hsf_bids/models \
    TEMPLATEFLOW_HOME=/opt/hsf_bids/templateflow
COPY docker/ /src/docker/
# fetch re-hashes every download against the preset's XXH3-64 and exits 1 on a mismatch; the
# *_fast presets use the same files as the *_accurate ones. A baked hub goes to /opt/hsf_bids/hub
# with the files of its folder; the app uses model files named by a relative path where they are
# (checked against their XXH3-64, like downloads), and keeps what it derives from them (int8
# versions) in a models subfolder named after the hub file's path, the same at run time.
RUN if [ -n "$HUB" ]; then \
        hub="/opt/hsf_bids/hub/$(basename "$HUB")" \
        && mkdir -p /opt/hsf_bids \
        && cp -r "$(dirname "/src/$HUB")" /opt/hsf_bids/hub \
        && hsf-bids-models fetch --hub "$hub" --no-progress \
        && hsf-bids-models verify --hub "$hub"; \
    else \
        hsf-bids-models fetch --preset bagging_accurate --no-progress \
        && hsf-bids-models fetch --preset single_accurate --no-progress \
        && for preset in bagging_accurate bagging_fast single_accurate single_fast; do \
            hsf-bids-models verify --preset "$preset" || exit 1; \
        done; \
    fi
# From TemplateFlow: each file's checksum as its server reports it, the SHA-256 pinned in
# docker/templateflow.sha256 if that file exists, and content; from the build context
# (re-encoded copies, say): content only.
RUN if [ -n "$TEMPLATES" ]; then \
        python /src/docker/fetch_templates.py --home "$TEMPLATEFLOW_HOME" \
            --from "/src/$TEMPLATES"; \
    elif [ -f /src/docker/templateflow.sha256 ]; then \
        python /src/docker/fetch_templates.py --home "$TEMPLATEFLOW_HOME" \
            --checksums /src/docker/templateflow.sha256; \
    else \
        python /src/docker/fetch_templates.py --home "$TEMPLATEFLOW_HOME"; \
    fi
# int8 versions (OpenVINO, NNCF post-training quantisation on the template's hippocampus crops):
# NNCF is installed in this stage only; an int8 version whose fused labels disagree with
# onnxruntime fp32 (the gate of engine auto) on the build machine is not kept. At run time the
# gate is measured again on the user's CPU (cached in $HOME/.cache when the image is read-only).
RUN if [ "$QUANTIZE" = 1 ]; then \
        pip install --no-cache-dir "nncf>=2.14" \
        && if [ -n "$HUB" ]; then \
            hsf-bids-models quantize --hub "/opt/hsf_bids/hub/$(basename "$HUB")" \
                --remove-failing --offline; \
        else \
            hsf-bids-models quantize --preset bagging_accurate --remove-failing --offline \
            && hsf-bids-models quantize --preset single_accurate --remove-failing --offline; \
        fi \
        && rm -rf "$HSF_BIDS_MODELS_DIR"/*/agreement; \
    fi

# ---- what every runtime image shares -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION
ARG HUB
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="hsf_bids" \
      org.opencontainers.image.description="Hippocampal subfield segmentation (HSF models) as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/hsf-bids/hsf_bids" \
      org.opencontainers.image.url="https://github.com/hsf-bids/hsf_bids" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="MIT" \
      io.github.hsf-bids.models="${HUB:-HSF 4.0.0: bagging_accurate, bagging_fast, single_accurate, single_fast}" \
      io.github.hsf-bids.templates="MNI152NLin2009cSym res-1 T1w, T2w, atlas-CerebrA (TemplateFlow)"
RUN useradd --create-home --home-dir /home/hsf --uid 1000 --user-group --shell /bin/sh hsf
COPY --from=assets /opt/hsf_bids /opt/hsf_bids
ENV PATH=/opt/venv/bin:$PATH \
    HSF_BIDS_MODELS_DIR=/opt/hsf_bids/models \
    TEMPLATEFLOW_HOME=/opt/hsf_bids/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    HOME=/home/hsf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    NIPYPE_NO_ET=1 \
    DENO_NO_UPDATE_CHECK=1 \
    HSF_BIDS_CONTAINER="docker:hsf-bids/hsf_bids:${VERSION}"
WORKDIR /tmp
ENTRYPOINT ["hsf-bids"]
CMD ["--help"]

# ---- GPU image: docker build --target gpu; docker run --gpus all ... --device cuda ----------
FROM runtime AS gpu
ARG VERSION
ARG HUB
COPY --from=build-gpu /opt/venv /opt/venv
# The CUDA libraries live in the nvidia-* wheels; the dynamic loader is told where once.
RUN find /opt/venv -path "*/site-packages/nvidia/*/lib" -type d > /etc/ld.so.conf.d/hsf-bids-cuda.conf \
    && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HSF_BIDS_CONTAINER="docker:hsf-bids/hsf_bids:${VERSION}-gpu"
USER 1000:1000
# OpenVINO's telemetry reads its opt-out from $HOME (/home/hsf); the models are checked again.
RUN opt_in_out --opt_out \
    && hsf-bids --version \
    && if [ -n "$HUB" ]; then \
        hsf-bids-models verify --hub "/opt/hsf_bids/hub/$(basename "$HUB")"; \
    else \
        hsf-bids-models verify --preset bagging_accurate \
        && hsf-bids-models verify --preset single_accurate; \
    fi

# ---- CPU image, the default target ---------------------------------------------------------
FROM runtime AS cpu
ARG HUB
COPY --from=build /opt/venv /opt/venv
USER 1000:1000
RUN opt_in_out --opt_out \
    && hsf-bids --version \
    && if [ -n "$HUB" ]; then \
        hsf-bids-models verify --hub "/opt/hsf_bids/hub/$(basename "$HUB")"; \
    else \
        hsf-bids-models verify --preset bagging_accurate \
        && hsf-bids-models verify --preset single_accurate; \
    fi
