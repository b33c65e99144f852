#!/usr/bin/env bash
# Build the serving image from k8s/Dockerfile, with Docker where an engine runs, else with buildah.
#
#   k8s/build-image.sh --image NAME[:TAG] [--base IMAGE|FILE.tar] [--offline] [--model-store DIR] [--output FILE.tar]
#
#   --base      the Dockerfile's BASE_IMAGE: a name, or a docker-archive tar to load first
#               (k8s/cluster/base-image.sh makes one from Debian packages alone)
#   --offline   install the Python packages only from k8s/wheelhouse, which is filled first on this
#               host with `pip download` of the pinned versions (CPU torch where the host's pip finds it)
#   --model-store  the archives to bake in (default model-store/, from `make archive`); the held-out
#               test examples of their models, for the model-quality gate, are written to k8s/heldout
#               first from their checkpoints (python -m scripts.gate export)
#   --output    also write the image as a docker-archive tar (what `ctr images import` and
#               `docker load` read)
#   --engine    docker or buildah (default: docker when `docker info` answers, else buildah)
set -euo pipefail
cd "$(dirname "$0")/.."

image="" base="" offline=0 store=model-store output="" engine=""
while (($#)); do
  case $1 in
    --image) image=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --offline) offline=1; shift ;;
    --model-store) store=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$image" ] || { echo "build-image: --image is required" >&2; exit 2; }
[ -f "$store/manifest.json" ] || { echo "build-image: $store/manifest.json not found; run \`make archive\` first" >&2; exit 2; }
case $store in /*) echo "build-image: --model-store must be inside the repository (the build context)" >&2; exit 2 ;; esac
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v buildah >/dev/null; then engine=buildah
  else echo "build-image: no Docker engine answers and buildah is not installed (apt-get install buildah)" >&2; exit 2
  fi
fi

# The Dockerfile bind-mounts k8s/wheelhouse; it stays empty for an online build.
# The model-quality gate's held-out sets, for the models of the store whose checkpoints are here.
py=${PYTHON:-.venv/bin/python}
rm -rf k8s/heldout && mkdir -p k8s/heldout
mapfile -t gated < <("$py" -c 'import json, sys, pathlib
for m in json.load(open(sys.argv[1]))["archives"]:
    if pathlib.Path("checkpoints", m, "checkpoint.pt").is_file(): print(m)' "$store/manifest.json")
if ((${#gated[@]})); then
  "$py" -m scripts.gate export --out k8s/heldout --models "${gated[@]}"
else
  echo "build-image: no checkpoints/<model>/checkpoint.pt for the store's models: the image has no held-out sets (the quality gate cannot run)"
fi
mkdir -p k8s/wheelhouse
pip_options=""
if ((offline)); then
  echo "build-image: filling k8s/wheelhouse with the pinned wheels"
  # (grep: this machine's pip configuration warns about every extra index folder it lacks.)
  "$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d k8s/wheelhouse \
    -c requirements.txt -r k8s/image-requirements.txt 2> >(grep -v '^WARNING: Location' >&2)
  pip_options="--no-index"
fi

export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
if [[ $base == *.tar ]]; then
  echo "build-image: loading the base image from $base"
  if [ "$engine" = docker ]; then
    base=$(docker load -i "$base" | sed -n 's/^Loaded image: //p' | tail -1)
  else
    tar_file=$base
    base=$(tar -xOf "$tar_file" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')
    # Loaded once: later builds find it in buildah's storage, and its layer cache with it.
    buildah inspect --type image "$base" >/dev/null 2>&1 || buildah pull --quiet "docker-archive:$tar_file" >/dev/null
  fi
fi

args=(-f k8s/Dockerfile -t "$image" --build-arg "PIP_OPTIONS=$pip_options" --build-arg "MODEL_STORE=$store")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
echo "build-image: $engine building $image${base:+ on $base}"
if [ "$engine" = docker ]; then
  DOCKER_BUILDKIT=1 docker build "${args[@]}" .
  [ -z "$output" ] || docker save -o "$output" "$image"
else
  buildah bud --layers --pull=false --quiet "${args[@]}" .
  if [ -n "$output" ]; then
    rm -f "$output"
    buildah push --quiet "$image" "docker-archive:$output:$image"
  fi
fi
echo "build-image: built $image${output:+, written to $output}"
