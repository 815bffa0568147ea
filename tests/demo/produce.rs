//! Demo producer for `tests/demo.sh`: creates a compacted topic and sends
//! sample device-state events, including updates and a tombstone, with a
//! real Kafka producer. Not part of the agent.
//!
//! Usage: demo-produce BROKERS TOPIC

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic] = args.as_slice() else {
        eprintln!("usage: demo-produce BROKERS TOPIC");
        std::process::exit(2);
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new_topic =
        NewTopic::new(topic, 3, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    for result in admin
        .create_topics(&[new_topic], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        match result {
            Ok(name) => println!("created compacted topic {name} (3 partitions)"),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                println!("topic {name} exists")
            }
            Err((name, e)) => panic!("creating {name}: {e}"),
        }
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let events: Vec<(String, Option<String>)> = (0..20)
        .map(|i| {
            let device = format!("sensor-{:02}", i % 8);
            let value = format!(
                r#"{{"device":"{device}","temp_c":{}.{},"online":true,"fw":"2.1.{}","seen":{}}}"#,
                18 + i % 7,
                i % 10,
                i % 3,
                now_s + i
            );
            (device, Some(value))
        })
        // sensor-07 was decommissioned: a tombstone deletes it.
        .chain(std::iter::once(("sensor-07".to_owned(), None)))
        .collect();
    for (key, value) in &events {
        let mut record = FutureRecord::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("deliver");
    }
    println!(
        "produced {} events for 8 devices (the last one a tombstone for sensor-07)",
        events.len()
    );
}
