#!/usr/bin/env bash
# Build the hsf_bids image with docker or podman (the Dockerfile is the same; the image does not
# depend on which engine built it).
#
#   docker/build.sh [options] [-- extra build options]
#
#   --engine docker|podman  default: $HSF_BIDS_ENGINE, else docker if its daemon answers,
#                           else podman
#   --target cpu|gpu        default cpu
#   --tag TAG               default hsf-bids/hsf_bids:<version> (<version>-gpu for gpu)
#   --base IMAGE            the Python base image (build argument PYTHON_IMAGE)
#   --make-base             make the base from Debian packages first (docker/make_base.sh), for
#                           machines that reach no image registry
#   --hub FILE              bake this hub YAML and the model files next to it instead of the
#                           published presets
#   --templates DIR         take the template files from this TemplateFlow home instead of
#                           downloading them from TemplateFlow
#   --no-quantize           no int8 versions of the models (saves the NNCF step)
#   --no-host-pip           do not lend the build this machine's pip configuration
#
# With --hub or --templates the build context is a temporary copy of what the Dockerfile needs,
# with the hub in docker/hub/ and the templates in docker/templateflow/; nothing is written into
# the checkout. With podman: the runc runtime where it is installed (crun fails on hosts with
# hybrid cgroups), explicit open-file and process limits (podman's defaults are refused on some
# hosts), and the host network so that pip reaches the package index. The host's pip
# configuration files, the CA bundle and the local folders they name (wheel folders, file://
# indexes) are mounted read-only into the build's RUN steps, never copied into the image.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^ARG VERSION=//p' "$repo/Dockerfile")
engine=${HSF_BIDS_ENGINE:-}
target=cpu
tag=""
base=""
make_base=0
hub=""
templates=""
quantize=1
host_pip=1
extra=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --engine) engine=$2; shift 2 ;;
        --target) target=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --make-base) make_base=1; shift ;;
        --hub) hub=$(realpath "$2"); shift 2 ;;
        --templates) templates=$(realpath "$2"); shift 2 ;;
        --no-quantize) quantize=0; shift ;;
        --no-host-pip) host_pip=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "build.sh: unknown option $1 (--help)" >&2; exit 64 ;;
    esac
done
[[ $target == cpu || $target == gpu ]] || { echo "build.sh: --target cpu or gpu" >&2; exit 64; }
if [[ -z $tag ]]; then
    tag="hsf-bids/hsf_bids:$version"
    [[ $target == gpu ]] && tag+="-gpu"
fi
if [[ -z $engine ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "build.sh: neither a docker daemon nor podman is available" >&2
        exit 69
    fi
fi

if ((make_base)); then
    base=${base:-localhost/hsf-bids-base:bookworm}
    HSF_BIDS_ENGINE=$engine "$repo/docker/make_base.sh" "$base" >/dev/null
fi

args=(--target "$target" --tag "$tag" --build-arg "QUANTIZE=$quantize")
[[ -n $base ]] && args+=(--build-arg "PYTHON_IMAGE=$base")
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # The commit's date, not the clock's: a rebuild of one commit gives the same labels.
    args+=(--build-arg "VCS_REF=$(git -C "$repo" rev-parse --short HEAD)"
           --build-arg "BUILD_DATE=$(git -C "$repo" log -1 --format=%cI)")
fi

context=$repo
if [[ -n $hub || -n $templates ]]; then
    context=$(mktemp -d)
    trap 'rm -rf "$context"' EXIT
    # What .dockerignore lets through, and the Dockerfile itself.
    cp -r "$repo/Dockerfile" "$repo/.dockerignore" "$repo/pyproject.toml" "$repo/setup.cfg" \
        "$repo/README.md" "$repo/LICENSE" "$repo/hsf_bids" "$repo/docker" "$context/"
    find "$context" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    if [[ -n $hub ]]; then
        [[ -f $hub ]] || { echo "build.sh: no hub file $hub" >&2; exit 66; }
        rm -rf "$context/docker/hub"
        cp -rL "$(dirname "$hub")" "$context/docker/hub"
        args+=(--build-arg "HUB=docker/hub/$(basename "$hub")")
    fi
    if [[ -n $templates ]]; then
        [[ -d $templates ]] || { echo "build.sh: no folder $templates" >&2; exit 66; }
        rm -rf "$context/docker/templateflow"
        cp -rL "$templates" "$context/docker/templateflow"
        args+=(--build-arg "TEMPLATES=docker/templateflow")
    fi
fi

if [[ $engine == podman ]]; then
    command -v runc >/dev/null && args+=(--runtime runc)
    args+=(--ulimit nofile=10000:10000 --ulimit nproc=10000:10000 --network host)
    if ((host_pip)); then
        configs=()
        for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" \
                 "$HOME/.pip/pip.conf" ${PIP_CONFIG_FILE:+"$PIP_CONFIG_FILE"}; do
            [[ -f $f ]] && configs+=("$f")
        done
        mounts=()
        for f in "${configs[@]}"; do
            case $f in
                "$HOME"/*) mounts+=("$f:/root/${f#"$HOME"/}") ;;
                *) mounts+=("$f:$f") ;;
            esac
        done
        # Local paths the configuration names: CA bundle, constraints, wheel folders, indexes.
        if ((${#configs[@]})); then
            while read -r path; do
                path=${path#file://}
                # A file:// index links from <root>/simple to files elsewhere below <root>.
                [[ $path == */simple || $path == */simple/ ]] && path=$(dirname "$path")
                [[ -e $path ]] && mounts+=("$path:$path")
            done < <(grep -hoE '(file://)?/[^[:space:],"]+' "${configs[@]}" | sort -u)
        fi
        for var in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE; do
            [[ -f ${!var:-} ]] && mounts+=("${!var}:${!var}")
        done
        if ((${#mounts[@]})); then
            while read -r m; do
                args+=(--volume "$m:ro")
            done < <(printf '%s\n' "${mounts[@]}" | sort -u)
        fi
    fi
fi

echo "build.sh: $engine build ${args[*]} ${extra[*]} $context" >&2
# Not exec: the trap removes the temporary context afterwards.
"$engine" build "${args[@]}" "${extra[@]}" "$context"
