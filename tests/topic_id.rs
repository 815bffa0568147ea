//! Topic IDs (KIP-516) through `Source::topic_ids_task` against the real
//! broker: a topic deleted and recreated under the same name gets a new ID,
//! a topic that does not exist has none, and the ID is the one Kafka's own
//! CLI prints.

mod util;

use edgecache::source::Source;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One round of `topic_ids_task`, which must not fail against a live broker.
fn read_ids(rt: &tokio::runtime::Runtime, source: &Source) -> Vec<Option<String>> {
    let started = Instant::now();
    let ids = rt
        .block_on(async { source.topic_ids_task().await })
        .expect("task panicked")
        .expect("DescribeTopics request");
    assert!(
        started.elapsed() <= Duration::from_secs(11),
        "topic_ids_task took {:?}",
        started.elapsed()
    );
    ids
}

/// Reads until `accept` holds (metadata reaches the broker's cache shortly
/// after a create or delete), within 30 s.
fn read_until(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    what: &str,
    accept: impl Fn(&[Option<String>]) -> bool,
) -> Vec<Option<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids = read_ids(rt, source);
        if accept(&ids) {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {ids:?} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

fn delete_topic(rt: &tokio::runtime::Runtime, name: &str) {
    let results = rt
        .block_on(admin().delete_topics(&[name], &AdminOptions::new()))
        .expect("delete_topics request");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("deleting topic {t}: {e}"));
    }
}

/// Creates the topic again, retrying while the broker still finishes the
/// deletion (TOPIC_ALREADY_EXISTS for a moment).
fn recreate_topic(rt: &tokio::runtime::Runtime, name: &str) {
    use rdkafka::admin::{NewTopic, TopicReplication};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let topic =
            NewTopic::new(name, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
        let results = rt
            .block_on(admin().create_topics(&[topic], &AdminOptions::new()))
            .expect("create_topics request");
        match results.into_iter().next().expect("one result") {
            Ok(_) => return,
            Err((t, e)) => {
                assert!(Instant::now() < deadline, "recreating topic {t}: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

/// The ID `kafka-topics.sh --describe` prints ("TopicId: ...").
fn cli_topic_id(name: &str) -> String {
    let output = Command::new("bash")
        .args([
            "tests/services.sh",
            "kafka-tool",
            "org.apache.kafka.tools.TopicCommand",
            "--describe",
            "--topic",
            name,
            "--bootstrap-server",
            &brokers(),
        ])
        .output()
        .expect("running TopicCommand");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "TopicCommand --describe failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .split_whitespace()
        .skip_while(|word| *word != "TopicId:")
        .nth(1)
        .unwrap_or_else(|| panic!("no TopicId in {stdout}"))
        .to_owned()
}

#[test]
fn topic_id_changes_when_the_topic_is_recreated() {
    let rt = runtime();
    let topic = unique("topic-id");
    let missing = unique("topic-id-missing");
    create_topic(&topic, 1);
    let properties = BTreeMap::from([("bootstrap.servers".to_owned(), brokers())]);
    // The missing topic twice over: duplicates must not fail the request,
    // and every configured topic gets its own entry, in order.
    let source = Source::new(
        &properties,
        vec![missing.clone(), topic.clone(), missing.clone()],
    )
    .expect("source");

    let first = read_until(&rt, &source, "the new topic's ID", |ids| ids[1].is_some());
    assert_eq!(first.len(), 3);
    assert_eq!(first[0], None, "a topic that does not exist has no ID");
    assert_eq!(first[2], None);
    let old = first[1].clone().unwrap();
    eprintln!("{topic}: {old}");
    assert_eq!(old.len(), 22, "22 base64 characters: {old}");
    assert!(
        old.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "URL-safe base64: {old}"
    );
    assert_eq!(old, cli_topic_id(&topic), "the ID Kafka's CLI prints");
    // Stable while the topic lives.
    assert_eq!(read_ids(&rt, &source)[1].as_deref(), Some(old.as_str()));

    delete_topic(&rt, &topic);
    read_until(&rt, &source, "the deleted topic's ID", |ids| {
        ids[1].is_none()
    });

    recreate_topic(&rt, &topic);
    let second = read_until(&rt, &source, "the recreated topic's ID", |ids| {
        ids[1].is_some()
    });
    let new = second[1].clone().unwrap();
    eprintln!("{topic} recreated: {new}");
    assert_ne!(new, old, "a recreated topic gets a new ID");
    assert_eq!(new, cli_topic_id(&topic));
    assert_eq!(second[0], None);
    assert_eq!(second[2], None);

    delete_topic(&rt, &topic);
}

#[test]
fn no_topics_no_request() {
    let rt = runtime();
    let properties = BTreeMap::from([("bootstrap.servers".to_owned(), brokers())]);
    let source = Source::new(&properties, Vec::new()).expect("source");
    assert!(read_ids(&rt, &source).is_empty());
}

#[test]
fn unreachable_broker_is_an_error_within_the_timeout() {
    let rt = runtime();
    // Nothing listens there: the request times out (librdkafka's request
    // timeout, 10 s) and is an error, not a list of Nones.
    let properties = BTreeMap::from([(
        "bootstrap.servers".to_owned(),
        format!("127.0.0.1:{}", free_port()),
    )]);
    let source = Source::new(&properties, vec![unique("topic-id-nowhere")]).expect("source");
    let started = Instant::now();
    let result = rt
        .block_on(async { source.topic_ids_task().await })
        .expect("task panicked");
    assert!(result.is_err(), "{result:?}");
    eprintln!("after {:?}: {result:?}", started.elapsed());
    assert!(
        started.elapsed() <= Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
}
