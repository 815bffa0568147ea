#!/usr/bin/env bash
# CI's edge-deployment checks (called by .ci/run after the test suite):
# 1. build the fully static aarch64 binary (musl, targets/build.sh, built
#    for size with the trimmed OpenSSL) and check it stays within 6 MiB;
# 2. run it under qemu-user: the smoke in targets/qemu-smoke.sh, then the
#    end-to-end tests that cover mirror, tombstones, restart-resume, kill,
#    rehydrate and every store format, against the real broker and Redis,
#    and tests/secure.rs (mTLS, SASL PLAIN and SCRAM over TLS, refusals)
#    against the secure broker: the trimmed OpenSSL still does what Kafka
#    needs;
# 3. check the systemd unit (verify + security exposure <= 2.0);
# 4. build the arm64 .deb and inspect it (targets/deb.sh);
# 5. run the unit under a real systemd: the host-arch .deb booted in a
#    Debian 12 container (targets/systemd-test.sh, about 1.5 min with the
#    root filesystem cached, 1-2 min more to make it);
# 6. build the static binary without TLS (EDGECACHE_TLS=no), print its
#    size, check it refuses a TLS configuration with exit 78, and run the
#    end-to-end basics with it under qemu (last, so a test summary closes
#    the log).
# The broker is 127.0.0.1:$EDGECACHE_KAFKA_PORT (default 39092) for every
# step, the Rust tests included (tests/util/mod.rs reads the same variable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=aarch64-unknown-linux-musl

bash targets/build.sh "$T"
# The size the project promises for the static build with TLS (README).
limit=6291456 size=$(stat -c %s "target/$T/release/edgecache")
echo "== static $T binary: $size bytes (at most $limit, 6 MiB)"
((size <= limit)) || { echo "the static binary grew past 6 MiB; see BENCHMARKS.md, Binary size" >&2; exit 1; }
bash targets/qemu-smoke.sh "$T"
bash targets/check-unit.sh
bash targets/deb.sh "$T"

started_kafka=no started_secure=no
if ! bash tests/services.sh kafka-status; then
  bash tests/services.sh kafka-start
  started_kafka=yes
fi
stop_kafka() {
  [[ $started_secure == yes ]] && bash tests/services.sh kafka-secure-stop
  [[ $started_kafka == yes ]] && bash tests/services.sh kafka-stop
  true
}
trap stop_kafka EXIT

bash targets/systemd-test.sh

wrapper=$(bash targets/qemu-smoke.sh --make-wrapper target/qemu/edgecache "$T")
echo "== end-to-end tests with the $T binary under qemu ($wrapper)"
if ! bash tests/services.sh kafka-secure-status; then
  bash tests/services.sh kafka-secure-start
  started_secure=yes
fi
EDGECACHE_TEST_BIN=$wrapper cargo test --locked --test secure -- --test-threads 2
EDGECACHE_TEST_BIN=$wrapper cargo test --locked --test e2e -- --test-threads 2 \
  a_updates b_restart c_sigkill d_flushall e_bad f_store sigterm_while

# Without TLS: the build for gateways that reach Kafka over a VPN or on site.
EDGECACHE_TLS=no bash targets/build.sh "$T"
notls=target/$T/release/edgecache-notls
echo "== static $T binary without TLS: $(stat -c %s "$notls") bytes"
EDGECACHE_BIN=$notls bash targets/qemu-smoke.sh "$T"
# TLS, and SASL SCRAM (which librdkafka builds only with OpenSSL), must be
# refused by check-config with exit 78, naming the feature.
tls_config=$(mktemp --suffix .toml)
for wants in '"security.protocol" = "ssl"' '"sasl.mechanisms" = "SCRAM-SHA-256"'; do
  sed "s/^# \"security.protocol\" = \"ssl\".*/$wants/" systemd/edgecache.toml >"$tls_config"
  grep -qF "$wants" "$tls_config"
  set +e
  refusal=$($(bash targets/qemu-smoke.sh --wrapper "$T") "$notls" check-config --config "$tls_config" 2>&1)
  code=$?
  set -e
  if [[ $code != 78 || $refusal != *"the \`tls\` feature"* ]]; then
    echo "the build without TLS did not refuse $wants clearly (exit $code): $refusal" >&2
    exit 1
  fi
  echo "== OK: without TLS, $wants is refused (exit 78)"
done
rm -f "$tls_config"
wrapper=$(EDGECACHE_BIN=$notls bash targets/qemu-smoke.sh --make-wrapper target/qemu/edgecache-notls "$T")
echo "== end-to-end tests with the $T binary without TLS under qemu ($wrapper)"
EDGECACHE_TEST_BIN=$wrapper cargo test --locked --test e2e -- --test-threads 2 a_updates c_sigkill f_store
