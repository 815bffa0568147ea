#!/usr/bin/env bash
# The full test suite: formatting, lints (warnings are errors), a fuzz smoke
# (tests/fuzz.sh), unit and property tests, and the end-to-end tests against
# a real Kafka broker and real redis-servers.
# Installs and starts what they need; stops the broker again if it started it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash tests/services.sh deps
rustup component add rustfmt clippy >/dev/null 2>&1 || true

started_kafka=no
if ! bash tests/services.sh kafka-status; then
  bash tests/services.sh kafka-start
  started_kafka=yes
fi
stop_kafka() { [[ $started_kafka == yes ]] && bash tests/services.sh kafka-stop; true; }
trap stop_kafka EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== fuzz smoke (every decoder of outside bytes, 20 s per target)"
bash tests/fuzz.sh 20
echo "== cargo test (unit, properties, end-to-end against real Kafka and Redis)"
# Doc tests are left out: the crate has none, and their empty summary
# would be the run's last line.
cargo test --locked --lib --bins --tests -- --test-threads 2
