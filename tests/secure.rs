//! End-to-end tests against a second, secure Kafka broker
//! (`tests/services.sh kafka-secure-start`, which tests/check.sh runs; started
//! here if it is not running): the agent binary mirrors a topic into a real
//! redis-server over mTLS (client key encrypted, its password from a file),
//! SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 over TLS, with passwords from
//! files and from systemd credentials (`$CREDENTIALS_DIRECTORY`). A wrong
//! password or a missing client certificate leaves the agent in
//! `kafka-unreachable`, a wrong password is logged as an authentication
//! failure, and no secret ever shows in the agent's log or in `check-config`.
//!
//! Test records are produced through the broker's PLAINTEXT listener: what is
//! under test is the agent's connection, not the producer's.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use util::*;

/// The secure broker's listeners and the credentials services.sh generated.
struct SecureBroker {
    plaintext: String,
    ssl: String,
    sasl_ssl: String,
    /// CA, client certificate and key, password files.
    clients: PathBuf,
}

impl SecureBroker {
    fn file(&self, name: &str) -> String {
        self.clients.join(name).to_str().unwrap().to_owned()
    }

    fn secret(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.clients.join(name)).unwrap();
        assert!(text.len() >= 16, "{name} is too short to search logs for");
        text
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
        .is_ok()
}

/// Starts the secure broker unless it runs already (the test command starts
/// it, and stops it at the end); a broker that cannot start fails the test.
fn broker() -> &'static SecureBroker {
    static BROKER: OnceLock<SecureBroker> = OnceLock::new();
    BROKER.get_or_init(|| {
        let port: u16 = std::env::var("EDGECACHE_SECURE_KAFKA_PORT")
            .map(|p| p.parse().expect("EDGECACHE_SECURE_KAFKA_PORT"))
            .unwrap_or(39192);
        let run = std::env::var("EDGECACHE_SECURE_RUN")
            .unwrap_or_else(|_| "/tmp/edgecache-secure".into());
        if !port_open(port) {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services.sh");
            let status = Command::new("bash")
                .arg(&script)
                .arg("kafka-secure-start")
                .status()
                .expect("run tests/services.sh");
            assert!(
                status.success(),
                "the secure Kafka broker did not start ({status}); see the lines above, \
                 or run `bash tests/services.sh deps && bash tests/services.sh kafka-secure-start`"
            );
            eprintln!(
                "started the secure broker; stop it with `bash tests/services.sh kafka-secure-stop`"
            );
        }
        let clients = Path::new(&run).join("kafka/clients");
        assert!(
            clients.join("ca.pem").exists(),
            "no credentials in {} although a broker answers on port {port}",
            clients.display()
        );
        SecureBroker {
            plaintext: format!("127.0.0.1:{port}"),
            ssl: format!("127.0.0.1:{}", port + 2),
            sasl_ssl: format!("127.0.0.1:{}", port + 3),
            clients,
        }
    })
}

/// An agent configuration: `[kafka.properties]` and `[kafka.secret_files]`
/// as given, one topic mirrored under `device:` in postcard.
fn write_config(
    dir: &Path,
    brokers: &str,
    properties: &[(&str, String)],
    secret_files: &[(&str, &str)],
    redis_url: &str,
    topic: &str,
) -> PathBuf {
    let mut text = format!("[kafka]\nbrokers = \"{brokers}\"\n[kafka.properties]\n");
    for (key, value) in properties {
        text.push_str(&format!("{key:?} = {value:?}\n"));
    }
    text.push_str("[kafka.secret_files]\n");
    for (key, file) in secret_files {
        text.push_str(&format!("{key:?} = {file:?}\n"));
    }
    text.push_str(&format!(
        "[redis]\nurl = \"{redis_url}\"\n[[topics]]\nname = \"{topic}\"\nkey_prefix = \"device:\"\n"
    ));
    let path = dir.join("edgecache.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `edgecache check-config` with extra environment: (exit code, stdout, stderr).
fn check_config(config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["check-config", "--config", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_not_leaked(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.trim()),
            "a secret appears in {what}:\n{text}"
        );
    }
}

/// The common story: records produced before the agent starts and while it
/// runs both reach Redis exactly (oracle), through the listener and
/// credentials of `properties`/`secret_files`; the secrets never appear in
/// `check-config`'s output or the agent's log.
fn mirrors_through(
    name: &str,
    brokers: &str,
    properties: &[(&str, String)],
    secret_files: &[(&str, &str)],
    env: &[(&str, &str)],
    secrets: &[&str],
) {
    let broker = broker();
    let topic = unique(name);
    create_topic_at(
        &broker.plaintext,
        &topic,
        2,
        &[("cleanup.policy", "compact")],
    );
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut producer = TestProducer::at(&broker.plaintext, &topic);
    let mut rng = Rng::new(0x5ec0_7e57);
    producer.random_states(&mut rng, 300, 40);

    let config = write_config(
        dir.path(),
        brokers,
        properties,
        secret_files,
        &redis.url(),
        &topic,
    );
    let (code, stdout, stderr) = check_config(&config, env);
    assert_eq!(code, 0, "check-config failed: {stderr}");
    assert!(stdout.contains("[derived.librdkafka]"), "{stdout}");
    assert_not_leaked("check-config output", &format!("{stdout}{stderr}"), secrets);

    let start = Instant::now();
    let mut agent = Agent::start_with_env(&config, env);
    converges(&redis, &producer);
    eprintln!("{name}: backlog mirrored in {:?}", start.elapsed());
    // And live records, on the connection the agent already holds.
    producer.random_states(&mut rng, 100, 40);
    converges(&redis, &producer);
    wait_until(Duration::from_secs(30), "state live", || {
        redis.state().as_deref() == Some("live")
    });

    let (status, _) = agent.sigterm();
    assert!(status.success(), "agent exit: {status}");
    assert_not_leaked("the agent's log", &agent.log_text(), secrets);
}

/// TLS properties every SASL_SSL case shares: the broker's certificate is
/// verified against the test CA, hostname (IP SAN) included.
fn tls_to_broker(broker: &SecureBroker) -> Vec<(&'static str, String)> {
    vec![
        ("ssl.ca.location", broker.file("ca.pem")),
        ("ssl.endpoint.identification.algorithm", "https".into()),
    ]
}

#[test]
fn mtls_with_client_key_password_from_a_file() {
    let broker = broker();
    let key_password = broker.secret("client-key.password");
    let mut properties = tls_to_broker(broker);
    properties.extend([
        ("security.protocol", "ssl".to_owned()),
        ("ssl.certificate.location", broker.file("client.pem")),
        ("ssl.key.location", broker.file("client.key")),
    ]);
    mirrors_through(
        "secure-mtls",
        &broker.ssl,
        &properties,
        // Absolute: no $CREDENTIALS_DIRECTORY and not next to the config.
        &[("ssl.key.password", &broker.file("client-key.password"))],
        &[],
        &[&key_password],
    );
}

/// The unit's `LoadCredential=` can hand over the client key too: the config
/// reads it inline (`ssl.key.pem`) from `$CREDENTIALS_DIRECTORY`, so the
/// agent's dynamic user needs no readable key file on disk.
#[test]
fn mtls_with_client_key_from_systemd_credentials() {
    let broker = broker();
    let key_password = broker.secret("client-key.password");
    let key = broker.secret("client.key");
    // A line from the middle of the PEM: what would show if it leaked.
    let key_line = key.lines().nth(1).unwrap().to_owned();
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("kafka-client-key"), &key).unwrap();
    std::fs::write(credentials.path().join("kafka-key-password"), &key_password).unwrap();
    let mut properties = tls_to_broker(broker);
    properties.extend([
        ("security.protocol", "ssl".to_owned()),
        ("ssl.certificate.location", broker.file("client.pem")),
    ]);
    mirrors_through(
        "secure-mtls-cred",
        &broker.ssl,
        &properties,
        &[
            ("ssl.key.pem", "kafka-client-key"),
            ("ssl.key.password", "kafka-key-password"),
        ],
        &[(
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        )],
        &[&key_password, &key_line],
    );
}

fn sasl(broker: &SecureBroker, mechanism: &str) -> Vec<(&'static str, String)> {
    let mut properties = tls_to_broker(broker);
    properties.extend([
        ("security.protocol", "sasl_ssl".to_owned()),
        ("sasl.mechanism", mechanism.to_owned()),
        ("sasl.username", "edge".to_owned()),
    ]);
    properties
}

#[test]
fn sasl_plain_over_tls_with_password_from_a_file() {
    let broker = broker();
    let password = broker.secret("sasl.password");
    mirrors_through(
        "secure-plain",
        &broker.sasl_ssl,
        &sasl(broker, "PLAIN"),
        &[("sasl.password", &broker.file("sasl.password"))],
        &[],
        &[&password],
    );
}

#[test]
fn scram_sha_256_with_password_from_a_file() {
    let broker = broker();
    let password = broker.secret("sasl.password");
    mirrors_through(
        "secure-scram256",
        &broker.sasl_ssl,
        &sasl(broker, "SCRAM-SHA-256"),
        &[("sasl.password", &broker.file("sasl.password"))],
        &[],
        &[&password],
    );
}

/// systemd's `LoadCredential=kafka-sasl-password:/etc/...` hands the file over
/// in `$CREDENTIALS_DIRECTORY`; the config names it by its credential name.
#[test]
fn scram_sha_512_with_password_from_systemd_credentials() {
    let broker = broker();
    let password = broker.secret("sasl.password");
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(
        credentials.path().join("kafka-sasl-password"),
        format!("{password}\n"),
    )
    .unwrap();
    mirrors_through(
        "secure-scram512",
        &broker.sasl_ssl,
        &sasl(broker, "SCRAM-SHA-512"),
        &[("sasl.password", "kafka-sasl-password")],
        &[(
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        )],
        &[&password],
    );
}

/// Starts an agent that cannot get in and waits until its status hash says
/// `kafka-unreachable`; returns the agent for log checks.
fn refused(
    dir: &Path,
    name: &str,
    brokers: &str,
    properties: &[(&str, String)],
    secret_files: &[(&str, &str)],
    env: &[(&str, &str)],
) -> (Agent, Redis) {
    let broker = broker();
    let topic = unique(name);
    create_topic_at(
        &broker.plaintext,
        &topic,
        1,
        &[("cleanup.policy", "compact")],
    );
    let redis = Redis::start(false);
    let mut producer = TestProducer::at(&broker.plaintext, &topic);
    producer.put("sensor-1", Some(r#"{"temp":21}"#));
    producer.flush();
    let config = write_config(dir, brokers, properties, secret_files, &redis.url(), &topic);
    let start = Instant::now();
    let agent = Agent::start_with_env(&config, env);
    wait_until(Duration::from_secs(60), "state kafka-unreachable", || {
        redis
            .hgetall("edgecache:status")
            .get("state")
            .is_some_and(|s| s == "kafka-unreachable")
    });
    eprintln!("{name}: kafka-unreachable after {:?}", start.elapsed());
    assert!(
        redis.dump("device:").is_empty(),
        "a refused client mirrored records"
    );
    (agent, redis)
}

#[test]
fn wrong_scram_password_is_reported_and_never_logged() {
    let broker = broker();
    let right = broker.secret("sasl.password");
    let wrong = format!("Wr0ng{}", unique("pw").replace('-', ""));
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("kafka-sasl-password"), &wrong).unwrap();
    let env = [
        (
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        ),
        // librdkafka's own debug output too: it must not print the password either.
        ("EDGECACHE_LOG", "debug"),
    ];
    let mut properties = sasl(broker, "SCRAM-SHA-256");
    // "all" includes librdkafka's dump of its configuration.
    properties.push(("debug", "all".into()));
    // Declared first so it outlives the agent, whose log it holds.
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _redis) = refused(
        dir.path(),
        "secure-wrongpw",
        &broker.sasl_ssl,
        &properties,
        &[("sasl.password", "kafka-sasl-password")],
        &env,
    );
    // The log says why, in words an operator searches for.
    wait_until(
        Duration::from_secs(30),
        "an authentication failure in the log",
        || {
            agent
                .log_text()
                .to_lowercase()
                .contains("authentication failed")
        },
    );
    let (code, stdout, stderr) = check_config(&dir.path().join("edgecache.toml"), &env[..1]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        agent.is_running(),
        "a wrong password must not stop the agent"
    );
    agent.sigterm();
    let log = agent.log_text();
    // The debug output was there to search (not filtered away).
    assert!(log.contains("DEBUG librdkafka: SASL"), "{log}");
    assert_not_leaked("the agent's log", &log, &[&wrong, &right]);
    assert_not_leaked(
        "check-config output",
        &format!("{stdout}{stderr}"),
        &[&wrong],
    );
}

/// The SSL listener requires a client certificate: without one the broker
/// refuses the handshake, which proves the mTLS test really used its cert.
#[test]
fn tls_without_client_certificate_is_refused() {
    let broker = broker();
    let mut properties = tls_to_broker(broker);
    properties.push(("security.protocol", "ssl".to_owned()));
    // Declared first so it outlives the agent, whose log it holds.
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _redis) = refused(
        dir.path(),
        "secure-nocert",
        &broker.ssl,
        &properties,
        &[],
        &[],
    );
    assert!(agent.is_running());
    let log = agent.log_text();
    assert!(
        log.contains("bad certificate"),
        "the log does not say why:\n{log}"
    );
    agent.sigterm();
}

/// Missing TLS files and secret files are configuration errors (exit 78,
/// naming the field) for check-config and run alike, before any connection.
#[test]
fn missing_tls_and_secret_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem").to_str().unwrap().to_owned();
    let cases = [
        (
            vec![("ssl.ca.location", missing.clone())],
            vec![],
            "kafka.properties.ssl.ca.location",
        ),
        (
            vec![("ssl.key.location", missing.clone())],
            vec![],
            "kafka.properties.ssl.key.location",
        ),
        (
            vec![],
            vec![("sasl.password", "no-such-credential")],
            "kafka.secret_files.sasl.password",
        ),
    ];
    for (properties, secret_files, field) in cases {
        // An unused port: nothing may be contacted anyway.
        let brokers = format!("127.0.0.1:{}", free_port());
        let config = write_config(
            dir.path(),
            &brokers,
            &properties,
            &secret_files,
            "redis://127.0.0.1:1/0",
            "t",
        );
        for command in ["check-config", "run"] {
            let (code, _, stderr) = run_cli(&[command, "--config", config.to_str().unwrap()]);
            assert_eq!(code, 78, "{command} with {field}: {stderr}");
            assert!(stderr.contains(field), "{command}: {stderr}");
        }
    }
}
