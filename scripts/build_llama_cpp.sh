#!/usr/bin/env bash
# Build llama.cpp's command-line tools (CPU only) from the source vendored in the llama-cpp-python sdist on PyPI,
# into $SLIMLM_CACHE/llama.cpp/<version>-<isa>/bin (default ~/.cache/slimlm). A finished build is reused.
# Usage: bash scripts/build_llama_cpp.sh        (prints the bin folder on its last line)
# About 20 minutes on 2 busy cores; slimlm finds the tools there, or in $SLIMLM_LLAMA_CPP if you set it.
set -euo pipefail
VERSION=0.3.36   # llama-cpp-python release whose vendor/llama.cpp we build; the tests pin behaviour to it
TOOLS=(llama-perplexity llama-bench llama-batched-bench llama-quantize llama-imatrix llama-simple llama-completion
       llama-tokenize)

# Portable flags: no -march=native (a cached build must not crash on a sibling machine); the x86 extensions the
# kernels need for honest speed figures are turned on only when this CPU has them, and named in the folder.
ISA=generic
FLAGS=(-DGGML_NATIVE=OFF)
if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo; then
  ISA=avx2
  FLAGS+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
fi

if [ -n "${SLIMLM_LLAMA_CPP:-}" ] && [ -x "$SLIMLM_LLAMA_CPP/llama-perplexity" ]; then
  echo "$SLIMLM_LLAMA_CPP"; exit 0   # tools you built yourself (or an earlier build) are used as they are
fi
ROOT="${SLIMLM_CACHE:-$HOME/.cache/slimlm}/llama.cpp/$VERSION-$ISA"
BIN="$ROOT/bin"
complete() { [ -f "$ROOT/.complete" ] || return 1; for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if complete; then echo "$BIN"; exit 0; fi   # a build missing a tool added since is redone

WORK="$ROOT.partial"
rm -rf "$WORK" && mkdir -p "$WORK"
echo "downloading the llama-cpp-python $VERSION sdist" >&2
# --no-binary for this package alone: with :all: pip would also build the sdist's build requirements (cmake
# itself) from source just to read its metadata
python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

if ! command -v cmake >/dev/null; then  # a fresh machine may have a compiler but no cmake: PyPI has it
  echo "installing cmake and ninja from PyPI" >&2
  python3 -m pip install -q cmake ninja >&2
  PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
echo "configuring llama.cpp ($ISA)" >&2
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF "${FLAGS[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF >"$WORK/configure.log" 2>&1 \
  || { tail -20 "$WORK/configure.log" >&2; echo "llama.cpp: cmake configure failed (log: $WORK/configure.log)" >&2; exit 1; }
echo "building ${TOOLS[*]} with $(nproc) jobs (log: $WORK/build.log)" >&2
cmake --build "$WORK/build" --target "${TOOLS[@]}" -j "$(nproc)" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log" >&2; echo "llama.cpp: build failed (log: $WORK/build.log)" >&2; exit 1; }

mkdir -p "$WORK/bin"
for tool in "${TOOLS[@]}"; do cp "$WORK/build/bin/$tool" "$WORK/bin/"; done
rm -rf "$WORK/build" "$WORK"/llama_cpp_python-* "$WORK"/*.tar.gz
echo "llama-cpp-python $VERSION vendor/llama.cpp, $ISA, tools: ${TOOLS[*]}" >"$WORK/.complete"
rm -rf "$ROOT" && mv "$WORK" "$ROOT"   # appears whole or not at all
echo "$BIN"
