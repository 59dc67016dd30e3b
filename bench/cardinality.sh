#!/usr/bin/env bash
# Memory under hostile cardinality: 1,000,000 distinct user ids and client IPs through one
# route's per-user and per-IP limiters (tests/cardinality.rs), in a release build. Prints the
# key counts (capped at max_keys), the time taken and the RSS before, at the peak and after
# evict_idle().
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test cardinality -- --ignored --nocapture --test-threads 1 2>&1 |
    grep -E 'cardinality:|test result|panicked|assert'
