# tandem — every command a user needs. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := `command -v python3 || command -v python`
# Build outputs and models live outside the clone by default (shared between clones and CI runs).
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
tandem := CARGO_TARGET_DIR / "release/tandem"

default:
    @just --list

# Fetch and verify all model weights (or name some: `just models smollm2 qwen-0.5b`).
models *names:
    {{python}} scripts/fetch_models.py {{names}}

# List the model cache.
models-list:
    {{python}} scripts/fetch_models.py --list

# Build everything native, optimised.
build:
    cargo build --release --workspace

# The main job: the chat page. Fetches the small model, builds the browser engine and the page, and serves them from
# a cloud holding a demo context (this project's ARCHITECTURE.md); open the printed URL.
demo addr="127.0.0.1:8080": (models "smollm2") build web
    {{tandem}} serve --addr {{addr}} --static-dir web/dist --context-file ARCHITECTURE.md

# The chat page in web/dist: its TypeScript compiled, the npm package beside it (imported through an import map).
web: npm
    cd web && npm ci --no-audit --no-fund --loglevel=error && npx tsc -p .
    rm -rf web/dist/pkg && cp -r edge-wasm/npm/dist web/dist/pkg && cp web/index.html web/style.css web/dist/

# Generate with any model: `just generate qwen-0.5b "your prompt"`.
generate model prompt *args: build
    {{tandem}} generate --model {{model}} --prompt "{{prompt}}" {{args}}

# Run the cloud server (KV streaming, OpenAI-style chat, metrics) with a shared context: `just cloud`, or with
# other options: `just cloud --model qwen-0.5b --context-file doc.txt`.
cloud *args: (models "smollm2") build
    {{tandem}} serve {{ if args == "" { "--context-file README.md" } else { args } }}

# Measure how much each layer's keys and values of a model matter (each coded alone, the rest exact: ~20 min for
# qwen-0.5b on 2 cores); the pca codecs then give every layer its own step. Writes `<weights>.kv-steps.json` beside
# the model, where `tandem serve` and `tandem codec-report` find it.
calibrate model="qwen-0.5b" *args: (models model) build
    {{tandem}} calibrate --model {{model}} {{args}}

# Chat on this machine with a context whose KV streams from a cloud: `just chat ID "question"`.
chat context prompt cloud="http://127.0.0.1:8080" *args: build
    {{tandem}} chat --cloud {{cloud}} --context {{context}} --prompt "{{prompt}}" {{args}}

# Fit the alignment of the cloud LLM's context KV to the edge SLM (fetches qwen-1.5b, ~1.1 GB): layer similarity
# (linear CKA), a monotone layer map, ridge maps of keys and values; writes target/align (artifact, manifest, PNG).
align *args: (models "qwen-1.5b" "qwen-0.5b") build
    {{tandem}} align {{args}}

# Score the alignment on held-out text: perplexity and agreement with the LLM for the SLM alone, with exact cloud KV,
# with the projected LLM KV, and split between them; writes target/eval (markdown table, JSON, SVG plot).
eval *args: (models "qwen-1.5b" "qwen-0.5b") build
    [ -f target/align/alignment.bin ] || {{tandem}} align
    {{tandem}} eval {{args}}

# The edge runtime as a WebAssembly component (wasm32-wasip2) for wasmtime hosts: `wit/tandem.wit`'s `edge` world.
component:
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    cargo rustc --release --target wasm32-wasip2 -p tandem-edge --crate-type cdylib

# Chat through the edge component under wasmtime: `just gateway-chat ID "question"` (a cloud must be running).
gateway-chat context prompt cloud="http://127.0.0.1:8080" *args: component build
    {{CARGO_TARGET_DIR}}/release/tandem-gateway chat --cloud {{cloud}} --context {{context}} --prompt "{{prompt}}" {{args}}

# A gateway: a KV cache for nearby edges in front of a cloud (`just gateway http://cloud:8080 0.0.0.0:8081`).
gateway upstream addr="127.0.0.1:8081" *args: (models "smollm2") build
    {{CARGO_TARGET_DIR}}/release/tandem-gateway serve --upstream {{upstream}} --addr {{addr}} {{args}}

tools := env_var_or_default("TANDEM_TOOLS", env_var("HOME") / ".cache/tandem/tools")

# The browser edge as an npm package in edge-wasm/npm/dist: the engine for wasm32-unknown-unknown (simd128 with
# WebGPU, and a relaxed-SIMD build), its
# wasm-bindgen glue (the CLI at the crate's exact version, installed once under {{tools}}) and the TypeScript layer.
npm:
    #!/usr/bin/env bash
    set -euo pipefail
    version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
    rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
    bindgen="{{tools}}/bin/wasm-bindgen"
    if ! "$bindgen" --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
      # Not --locked: its lock file pins a webpki-roots release that crates.io no longer offers.
      cargo install wasm-bindgen-cli --version "$version" --root "{{tools}}"
    fi
    rm -rf edge-wasm/npm/dist
    # Two engines: simd128 for every browser, with burn's WebGPU backend for those that give an adapter, and one with
    # relaxed SIMD's 8-bit dot products for CPUs that have them (the worker picks at run time). The second builds in
    # its own target dir, so neither invalidates the other.
    cargo rustc --release --target wasm32-unknown-unknown -p tandem-edge --features webgpu --crate-type cdylib
    "$bindgen" --target web --no-typescript --out-dir edge-wasm/npm/dist/wasm "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/tandem_edge.wasm"
    relaxed="$CARGO_TARGET_DIR/wasm-relaxed"
    CARGO_TARGET_DIR="$relaxed" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS='--cfg getrandom_backend="wasm_js" -C target-feature=+simd128,+relaxed-simd' \
      cargo rustc --release --target wasm32-unknown-unknown -p tandem-edge --crate-type cdylib
    "$bindgen" --target web --no-typescript --out-dir edge-wasm/npm/dist/wasm-relaxed "$relaxed/wasm32-unknown-unknown/release/tandem_edge.wasm"
    # A third with threads (atomics, shared memory: kernel threads as Web Workers), where a nightly Rust with
    # rust-src can rebuild std for them; without one the package has single-threaded engines only.
    if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
      threads="$CARGO_TARGET_DIR/wasm-threads"
      CARGO_TARGET_DIR="$threads" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS='--cfg getrandom_backend="wasm_js" -C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128,+relaxed-simd -C link-arg=--shared-memory -C link-arg=--max-memory=4294967296 -C link-arg=--import-memory -C link-arg=--export=__wasm_init_tls -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align -C link-arg=--export=__tls_base' \
        cargo +nightly rustc --release --target wasm32-unknown-unknown -p tandem-edge --crate-type cdylib -Z build-std=panic_abort,std
      "$bindgen" --target web --no-typescript --out-dir edge-wasm/npm/dist/wasm-threads "$threads/wasm32-unknown-unknown/release/tandem_edge.wasm"
    else
      echo "no nightly Rust with rust-src: the package gets no threaded engine" >&2
    fi
    cd edge-wasm/npm
    npm ci --no-audit --no-fund --loglevel=error
    npx tsc -p .

# playwright-core for the browser tests (they drive the system's Chromium: `apt-get install chromium`).
browser-deps:
    cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

# The shared core's unit tests compiled to WebAssembly (wasm32-wasip2, simd128 kernels), run under wasmtime.
test-wasm:
    cargo build --release -p tandem-gateway
    CARGO_TARGET_WASM32_WASIP2_RUNNER="{{CARGO_TARGET_DIR}}/release/tandem-gateway run" cargo test --release --target wasm32-wasip2 -p tandem-common --lib

# All tests (fetches the two models the tests use first, builds the edge component, the npm package and the page,
# and the binaries some tests run: `tandem serve` as a process to kill).
test: (models "smollm2" "qwen-0.5b") component web browser-deps test-wasm
    cargo build --release --workspace
    cargo test --release --workspace

llamacpp_venv := env_var_or_default("TANDEM_LLAMACPP_VENV", env_var("HOME") / ".cache/tandem/llamacpp-venv")

# Install llama-cpp-python (a ~10-minute source build) into a venv; used only for fixtures and benchmarks.
# Built for the instruction sets this CPU has (AMX left out: ggml's AMX kernels crash on these VMs); a venv built
# on another CPU is rebuilt (one built with AVX-VNNI stopped on "Illegal instruction" on an AMD EPYC without it).
llamacpp:
    #!/usr/bin/env bash
    set -euo pipefail
    args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    for pair in avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
      case "$flags" in *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;; esac
    done
    venv="{{llamacpp_venv}}"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/cmake-args" 2>/dev/null)" = "$args" ] \
      && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then exit 0; fi
    rm -rf "$venv"
    {{python}} -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$venv/bin/pip" install --no-cache-dir llama-cpp-python==0.3.36 numpy
    echo "$args" > "$venv/cmake-args"

# Regenerate the llama.cpp reference fixtures in tests/fixtures (not run by CI).
fixtures: (models "smollm2" "qwen-0.5b") llamacpp
    "{{llamacpp_venv}}/bin/python" scripts/make_fixtures.py

# Decode and prefill speed of tandem vs llama.cpp side by side, and peak memory (installs llama-cpp-python once).
bench-decode: (models "smollm2" "qwen-0.5b") llamacpp
    cargo run --release -p tandem-tests --bin bench-decode -- --llamacpp-python "{{llamacpp_venv}}/bin/python"

# Time to first token with context KV streamed over an emulated 100 Mb/s, 20 ms link, pipelined or not, vs local
# prefill; wire bytes per codec (`just bench-stream --quick` for the small model).
bench-stream *args: (models "smollm2" "qwen-0.5b")
    cargo run --release -p tandem-tests --bin bench-stream -- {{args}}

# Decode and prefill speed of the wasm edge — the component under wasmtime (one thread) and the npm package in
# headless Chromium (one and two threads) — vs native tandem (one) and llama.cpp (one and two); the browser's peak
# memory; every .wasm's size.
bench-wasm: (models "smollm2" "qwen-0.5b") llamacpp component npm browser-deps
    cargo run --release -p tandem-tests --bin bench-wasm -- --llamacpp-python "{{llamacpp_venv}}/bin/python"

# CE-LSLM's experiments side by side: edge-only, cloud-only and tandem (with and without pipelining and
# compression) under emulated 6G/5G/4G/poor links, one user and up to 64; writes BENCHMARKS.md, bench/results.json
# and bench/*.png (`just bench --quick`: about two minutes, into target/bench-quick).
bench *args: (models "smollm2" "qwen-0.5b")
    cargo build --release -p tandem-cloud -p tandem-tests
    {{CARGO_TARGET_DIR}}/release/bench {{args}}

# Fault-injection soak: 10,000 chat requests from 8 edges while connections are cut and corrupted mid-stream and the
# cloud is killed and restarted; every answer checked (`just soak --quick`: 500 requests, two minutes).
soak *args: (models "smollm2")
    cargo build --release -p tandem-cloud -p tandem-tests
    {{CARGO_TARGET_DIR}}/release/soak {{args}}

# Fuzz the parsers that take bytes from the network or disk — wire frames, KV codec payloads, GGUF files — each for
# `seconds` (nightly Rust; installs cargo-fuzz once under the tools dir). Starts from the small committed seeds in
# fuzz/corpus; the corpus it grows lives in {{fuzz_corpus}}. A crash stops it and is left in fuzz/artifacts.
fuzz seconds="60":
    #!/usr/bin/env bash
    set -euo pipefail
    export PATH="{{tools}}/bin:$PATH"
    cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --root "{{tools}}"
    for target in wire_frame kv_codec gguf; do
      mkdir -p "{{fuzz_corpus}}/$target"
      cargo +nightly fuzz run --fuzz-dir fuzz "$target" "{{fuzz_corpus}}/$target" "fuzz/corpus/$target" -- \
        -max_total_time={{seconds}} -rss_limit_mb=2048 -timeout=10
    done

fuzz_corpus := env_var_or_default("TANDEM_FUZZ_CORPUS", env_var("HOME") / ".cache/tandem/fuzz-corpus")

# Every benchmark.
bench-all: bench bench-decode bench-stream bench-wasm
