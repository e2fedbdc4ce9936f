#!/usr/bin/env bash
# Make a Python base image from Debian packages, for machines that reach a Debian mirror but no
# image registry (where python:3.11-slim-bookworm cannot be pulled):
#
#   docker/make_base.sh [NAME]          default NAME: localhost/hsf-bids-base:bookworm
#   docker build --build-arg PYTHON_IMAGE=localhost/hsf-bids-base:bookworm ...
#
# Debian bookworm's Python is 3.11, as in python:3.11-slim-bookworm; python-is-python3 gives the
# `python` the Dockerfile calls. mmdebstrap uses this machine's apt sources; the tarball is
# imported into podman or docker (whichever HSF_BIDS_ENGINE names, else the first found).
# Needs root (or a working `mmdebstrap --mode=unshare`). An image of that name already there is
# kept unless --force is given.
set -euo pipefail

force=0
if [[ ${1:-} == --force ]]; then
    force=1
    shift
fi
name=${1:-localhost/hsf-bids-base:bookworm}
suite=${HSF_BIDS_BASE_SUITE:-bookworm}
packages=python3,python3-venv,python-is-python3,ca-certificates

engine=${HSF_BIDS_ENGINE:-}
if [[ -z $engine ]]; then
    for candidate in podman docker; do
        if command -v "$candidate" >/dev/null && "$candidate" info >/dev/null 2>&1; then
            engine=$candidate
            break
        fi
    done
fi
if [[ -z $engine ]]; then
    echo "make_base: neither podman nor docker runs here" >&2
    exit 69
fi
command -v mmdebstrap >/dev/null || { echo "make_base: mmdebstrap is not installed" >&2; exit 69; }

if ((!force)) && "$engine" image inspect "$name" >/dev/null 2>&1; then
    echo "make_base: $name exists (--force to make it again)" >&2
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# minbase: essential packages and apt only. The apt lists are dropped: the image never runs apt.
mmdebstrap --quiet --variant=minbase --include="$packages" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$suite" "$tmp/base.tar"
"$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$tmp/base.tar" "$name" >/dev/null
"$engine" image inspect --format '{{.Id}}' "$name"
