#!/usr/bin/env bash
# The full test suite: formatting, lints (warnings are errors), a fuzz smoke
# (tests/fuzz.sh), unit and property tests, and the end-to-end tests against
# a real Kafka broker and real redis-servers.
# Installs and starts what they need (the plain broker and the secure one);
# stops again the brokers it started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash tests/services.sh deps
rustup component add rustfmt clippy >/dev/null 2>&1 || true

started_kafka=no started_secure=no
stop_kafka() {
  [[ $started_secure == yes ]] && bash tests/services.sh kafka-secure-stop
  [[ $started_kafka == yes ]] && bash tests/services.sh kafka-stop
  true
}
trap stop_kafka EXIT
if ! bash tests/services.sh kafka-status; then
  started_kafka=yes
  bash tests/services.sh kafka-start
fi
# The second broker, with TLS and SASL listeners, for tests/secure.rs (5-8 s
# to start, credentials generated fresh); a failed start ends the run here.
if ! bash tests/services.sh kafka-secure-status; then
  started_secure=yes
  bash tests/services.sh kafka-secure-start
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== fuzz smoke (every decoder of outside bytes, 20 s per target)"
bash tests/fuzz.sh 20
echo "== Python reader (pytest: FORMAT.md's vectors, serde_json's printing)"
python3 -m pytest -q -p no:cacheprovider readers/python/tests
echo "== cargo test (unit, properties, end-to-end against real Kafka and Redis)"
# Doc tests are left out: the crate has none, and their empty summary
# would be the run's last line.
cargo test --locked --lib --bins --tests -- --test-threads 2
