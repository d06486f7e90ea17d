#!/usr/bin/env bash
# Build the reader fuzz target with libFuzzer on the stable toolchain and run it.
#
#   bash fuzz/run.sh            # 60 s (what CI runs)
#   bash fuzz/run.sh 3600       # an hour; more libFuzzer flags may follow: -jobs=4 -workers=4
#
# No nightly and no cargo-fuzz: libfuzzer-sys builds libFuzzer (needs a C++ compiler) and the
# coverage instrumentation comes from stable codegen flags (the ones cargo-fuzz passes, without a
# sanitizer). Seeds: spec/vectors/*.qtensors and fuzz/seeds/; the growing corpus lives in
# fuzz/corpus/ (ignored by git) and crashes land in fuzz/artifacts/ with the input that caused
# them: replay one with `fuzz/target/<host>/release/reader fuzz/artifacts/crash-...`.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true

host="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
# --target: the flags then apply to the fuzzed code only, not to build scripts.
cargo build --release --locked --target "$host" --bin reader

mkdir -p corpus/reader artifacts
cp -n ../spec/vectors/*.qtensors seeds/* corpus/reader/ 2>/dev/null || true
# -timeout: one input taking 10 s is a hang; -rss_limit_mb: memory out of proportion to the
# (at most 64 KiB) input is a failure.
exec "target/$host/release/reader" corpus/reader \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix=artifacts/ -print_final_stats=1 "$@"
