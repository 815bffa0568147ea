//! Reading the mirror without edgecache: the Redis Functions library
//! (src/functions.lua) and the Python reader (readers/python) against
//! `edgecache get`, on a real redis-server.
//!
//! - `functions_python_and_get_agree_on_every_corpus_value`: every value of
//!   the fuzz seeds, of samples of the property tests' strategies and of
//!   number edge cases, stored in every store format, read three ways.
//! - `agent_installs_functions_that_match_get`: end to end with the agent
//!   and Kafka: `redis-cli FCALL_RO` prints what `edgecache get` prints, a
//!   read-only ACL user can call the functions, and the library comes back
//!   after Redis lost everything.

mod util;

use edgecache::codec::{
    self, decode_input, encode_store, stored_to_json, Fields, InputFormat, StoreFormat, Value,
};
use edgecache::config::TopicSettings;
use proptest::collection::vec;
use proptest::prelude::*;
#[path = "util/strategies.rs"]
mod strategies;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use strategies::{any_value, json_text};
use util::*;

const CONVERGE: Duration = Duration::from_secs(60);

const STORES: [(StoreFormat, &str); 4] = [
    (StoreFormat::Postcard, "p:"),
    (StoreFormat::Json, "j:"),
    (StoreFormat::Raw, "r:"),
    (StoreFormat::Hash, "h:"),
];

fn topic(prefix: &str, store: StoreFormat) -> TopicSettings {
    TopicSettings {
        name: format!("t-{store}"),
        key_prefix: prefix.as_bytes().to_vec(),
        input: InputFormat::Json,
        store,
        only_prefix: None,
        only_matching: None,
        partitions: None,
        ttl_ms: None,
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn seeds(dir: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("fuzz/seeds").join(dir))
        .unwrap_or_else(|e| panic!("fuzz/seeds/{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in fuzz/seeds/{dir}");
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// `n` samples of a proptest strategy, from a fixed seed.
fn samples<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// JSON texts at the edges of the readers' rules: integers at the i64/u64
/// limits, floats printed in every layout, escapes, surrogates, nesting at
/// serde_json's limit, whitespace, and things that are not JSON.
fn edge_json() -> Vec<String> {
    let mut texts: Vec<String> = [
        "0",
        "-0",
        "-0.0",
        "0.0",
        "1.0",
        "1e2",
        "1E+2",
        "-1e-2",
        "100",
        "1e15",
        "1e16",
        "1e17",
        "123456789012345678",
        "0.001",
        "0.0001",
        "0.00001",
        "0.000001",
        "1.5e-5",
        "9007199254740993",
        "-9007199254740993",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "-18446744073709551616",
        "1e308",
        "1.7976931348623157e308",
        "1e309",
        "-1e309",
        "1e-400",
        "-1e-400",
        "5e-324",
        "2.2250738585072014e-308",
        "2.225073858507201e-308",
        "4.9406564584124654e-324",
        "0.1",
        "0.2",
        "0.30000000000000004",
        "21.3",
        "123456.789",
        "1e-7",
        "1.0000000000000002",
        "9.999999999999999e22",
        "1e23",
        "8.41e21",
        "5e-310",
        "1.7e-310",
        "6.02214076e23",
        "3.141592653589793",
        r#""esc\u00e9\n\"q\"\/\b\f\r\t\u0000\u001f\u007f""#,
        r#""\ud83d\ude00""#,
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        "\"tab\there\"",
        "\"del\u{7f}\"",
        "  null  ",
        "\t[1 ,\n2]\r",
        "true false",
        "[1,2,",
        "[1,]",
        "{\"a\"}",
        "{\"a\":1,}",
        "01",
        "-",
        "1.",
        ".5",
        "1e",
        "+1",
        "NaN",
        "Infinity",
        "nul",
        "",
        "{}",
        "[]",
        "\u{feff}{}",
        r#"{"a":1,"b":2,"a":3}"#,
        r#"{"a":{"x":1},"a":null,"b":[1,{"c":2,"c":3}]}"#,
        r#"{"":0,"é":"ü","\u0000":1}"#,
        "\"\u{10ffff}\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for n in [63, 64, 65, 66, 126, 127, 128, 200] {
        texts.push("[".repeat(n) + &"]".repeat(n));
        texts.push("{\"a\":".repeat(n) + "1" + &"}".repeat(n));
    }
    texts
}

/// Bytes that are not JSON or text, for the raw store's fallback.
fn edge_raw() -> Vec<Vec<u8>> {
    vec![
        b"\xff\x00".to_vec(),
        b"plain text".to_vec(),
        b"caf\xc3\xa9".to_vec(),
        b"\xc3".to_vec(),
        b"\xed\xa0\x80".to_vec(),
        b"\xf4\x90\x80\x80".to_vec(),
        b"\xe0\x80\x80".to_vec(),
        b"\"\xff\"".to_vec(),
        b"{\"k\":1} \xff".to_vec(),
        b"line\nbreak\x01".to_vec(),
        Vec::new(),
    ]
}

/// One key to read: its store and the bytes it holds.
struct Case {
    key: String,
    store: StoreFormat,
    bytes: Vec<u8>,
    what: String,
}

/// Every corpus value, as each store format stores it (when it can), plus
/// stored bytes as they are (fuzz/seeds/stored_value: corrupt ones too).
fn corpus(fields: &mut Fields) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut push = |store: StoreFormat, bytes: Vec<u8>, what: String| {
        if store == StoreFormat::Hash && bytes.is_empty() {
            return; // `{}`: the agent deletes the key
        }
        let prefix = STORES.iter().find(|(s, _)| *s == store).unwrap().1;
        let key = format!("{prefix}{}", cases.len());
        cases.push(Case {
            key,
            store,
            bytes,
            what,
        });
    };
    let mut payloads: Vec<(InputFormat, Vec<u8>)> = Vec::new();
    payloads.extend(
        seeds("json_input")
            .into_iter()
            .map(|p| (InputFormat::Json, p)),
    );
    payloads.extend(
        seeds("raw_input")
            .into_iter()
            .map(|p| (InputFormat::Raw, p)),
    );
    payloads.extend(
        seeds("raw_input")
            .into_iter()
            .map(|p| (InputFormat::Json, p)),
    );
    payloads.extend(
        seeds("postcard_input")
            .into_iter()
            .map(|p| (InputFormat::Postcard, p)),
    );
    payloads.extend(
        edge_json()
            .into_iter()
            .map(|t| (InputFormat::Json, t.into_bytes())),
    );
    payloads.extend(edge_raw().into_iter().map(|b| (InputFormat::Raw, b)));
    payloads.extend(
        samples(json_text(), 600)
            .into_iter()
            .map(|t| (InputFormat::Json, t.into_bytes())),
    );
    let ts = [
        None,
        Some(0),
        Some(-1),
        Some(1_767_225_600_000),
        Some(i64::MIN),
    ];
    let mut out = Vec::new();
    for (i, (input, payload)) in payloads.iter().enumerate() {
        let what = format!("{input} input {:?}", String::from_utf8_lossy(payload));
        let Ok(value) = decode_input(*input, payload) else {
            // What the agent skips never reaches Redis, but the raw store
            // would hold such bytes from another writer: read them anyway.
            push(StoreFormat::Raw, payload.clone(), what);
            continue;
        };
        for (store, _) in STORES {
            if encode_store(store, &value, payload, ts[i % 5], fields, &mut out).is_ok() {
                push(store, out.clone(), what.clone());
            }
        }
        // Every value as a field of the hash store too.
        let wrapped = hash_wrap(&value);
        if encode_store(StoreFormat::Hash, &wrapped, b"", None, fields, &mut out).is_ok() {
            push(StoreFormat::Hash, out.clone(), format!("field of {what}"));
        }
    }
    for (i, value) in samples(any_value(), 600).into_iter().enumerate() {
        let wrapped = hash_wrap(&value);
        for (store, value) in [
            (StoreFormat::Postcard, &value),
            (StoreFormat::Json, &value),
            (StoreFormat::Hash, &value),
            (StoreFormat::Hash, &wrapped),
        ] {
            if encode_store(store, value, b"", ts[i % 5], fields, &mut out).is_ok() {
                push(store, out.clone(), format!("{value:?}"));
            }
        }
    }
    // The hash store's quoting rule at its edges: strings that would read
    // as JSON, and strings that only nearly would.
    let edges = [
        "", "true", "false", "null", "tru", "nullx", "True", "0", "-", "-1", "1.0", "9x", "\"",
        "\"q\"", "{", "}", "[]", " 1", "x1", "é", "\u{7f}", "\n", "0x10", "NaN", "Infinity",
    ];
    let object = Value::Map(
        edges
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("s{i}"), Value::String((*e).to_owned())))
            .collect(),
    );
    encode_store(StoreFormat::Hash, &object, b"", None, fields, &mut out).unwrap();
    push(StoreFormat::Hash, out.clone(), "string edges".into());
    // What another writer could leave in a hash: never from the agent.
    let corrupt: [&[(&[u8], &[u8])]; 6] = [
        &[(b"a", b"{\"x\":")],
        &[(b"a", b"1.5.2")],
        &[(b"a", b"\xff\xfe")],
        &[(b"\xff", b"1")],
        &[(b"a", b"-")],
        &[(b"a", b"\"unterminated")],
    ];
    for pairs in corrupt {
        push(
            StoreFormat::Hash,
            codec::pack_hash_pairs(pairs.iter().copied()),
            "corrupt hash".into(),
        );
    }
    // Floats of every kind, many per key: every bit pattern class, and
    // Decimals of every scale.
    let floats = samples(vec(any::<u64>(), 200), 60);
    for bits in floats {
        let list = Value::List(
            bits.iter()
                .map(|b| Value::Float(f64::from_bits(*b)))
                .collect(),
        );
        encode_store(StoreFormat::Postcard, &list, b"", None, fields, &mut out).unwrap();
        push(StoreFormat::Postcard, out.clone(), "floats".into());
    }
    // Powers of two (the rounding interval is narrower below than above)
    // and their neighbours, and subnormals: where shortest digits are
    // hardest to get right.
    let mut special: Vec<f64> = Vec::new();
    for exponent in 0..2047u64 {
        let bits = exponent << 52;
        special.extend([bits, bits + 1, bits.wrapping_sub(1)].map(f64::from_bits));
    }
    special.extend(
        samples(0u64..(1 << 52), 1000)
            .into_iter()
            .map(f64::from_bits),
    );
    for chunk in special.chunks(250) {
        let list = Value::List(chunk.iter().map(|f| Value::Float(*f)).collect());
        encode_store(StoreFormat::Postcard, &list, b"", None, fields, &mut out).unwrap();
        push(
            StoreFormat::Postcard,
            out.clone(),
            "powers of two, subnormals".into(),
        );
    }
    let decimals = samples(vec((any::<i64>(), 0u8..20), 200), 20);
    for pairs in decimals {
        let list = Value::List(
            pairs
                .iter()
                .map(|&(mantissa, scale)| Value::Decimal { mantissa, scale })
                .collect(),
        );
        encode_store(StoreFormat::Postcard, &list, b"", None, fields, &mut out).unwrap();
        push(StoreFormat::Postcard, out.clone(), "decimals".into());
    }
    for stored in seeds("stored_value") {
        for (store, _) in &STORES[..3] {
            let store = *store;
            push(store, stored.clone(), "stored_value seed".into());
        }
    }
    cases
}

/// A value as the one field of an object, for the hash store.
fn hash_wrap(value: &Value) -> Value {
    Value::Map(vec![("v".into(), value.clone())])
}

/// What `edgecache get` prints for these bytes (its own function, the
/// one its stdout is `println!` of), or None for its exit 4.
fn get_output(store: StoreFormat, bytes: &[u8], fields: &Fields) -> Option<String> {
    stored_to_json(store, bytes, fields)
        .ok()
        .map(|(json, _)| json.to_string())
}

/// `FCALL_RO edgecache_mget` over many keys: each key's JSON text or error.
fn fcall_mget(conn: &mut redis::Connection, keys: &[&str]) -> Vec<Result<String, String>> {
    let mut results = Vec::new();
    for chunk in keys.chunks(200) {
        // The raw reply: an error inside the array is that key's result.
        let mut command = redis::cmd("FCALL_RO");
        command.arg("edgecache_mget").arg(chunk.len()).arg(chunk);
        let reply = match redis::ConnectionLike::req_command(conn, &command) {
            Ok(redis::Value::Array(items)) => items,
            other => panic!("FCALL_RO edgecache_mget: {other:?}"),
        };
        results.extend(reply.into_iter().map(|v| match v {
            redis::Value::BulkString(bytes) => Ok(String::from_utf8(bytes).unwrap()),
            redis::Value::ServerError(e) => {
                Err(format!("{} {}", e.code(), e.details().unwrap_or("")))
            }
            other => Err(format!("unexpected reply {other:?}")),
        }));
    }
    results
}

/// The Python reader (`python3 -m edgecache_reader`) over many keys.
fn python_reader(
    redis_url: &str,
    namespace: &str,
    prefixes: &[&str],
    keys: &[&str],
) -> Vec<Result<String, String>> {
    let mut child = Command::new("python3")
        .args([
            "-m",
            "edgecache_reader",
            "--url",
            redis_url,
            "--namespace",
            namespace,
        ])
        .args(prefixes.iter().flat_map(|p| ["--prefix", p]))
        .env("PYTHONPATH", repo().join("readers/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (apt-get install python3; pip install redis)");
    let input = keys.join("\n") + "\n";
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8(out.stdout).expect("the reader prints UTF-8");
    let lines: Vec<Result<String, String>> = text
        .lines()
        .map(|line| match line.strip_prefix('!') {
            Some(error) => Err(error.to_owned()),
            None => Ok(line.to_owned()),
        })
        .collect();
    assert_eq!(lines.len(), keys.len(), "python reader: one line per key");
    lines
}

fn load_library(conn: &mut redis::Connection, namespace: &str) {
    let topics: Vec<TopicSettings> = STORES.iter().map(|(s, p)| topic(p, *s)).collect();
    let code = edgecache::functions::library(namespace, &topics);
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(code)
        .query(conn)
        .expect("FUNCTION LOAD");
    assert_eq!(name, edgecache::functions::LIBRARY_NAME);
}

#[test]
fn functions_python_and_get_agree_on_every_corpus_value() {
    let redis = Redis::start(false);
    let mut conn = redis.conn();
    let namespace = "ns";
    load_library(&mut conn, namespace);
    let mut fields = Fields::new();
    let cases = corpus(&mut fields);
    // The table as the agent writes it, and a marker (the readers cache
    // the table per marker).
    let mut table = redis::cmd("HSET");
    table.arg(format!("{namespace}:fields"));
    for id in 0..fields.len() as u32 {
        table.arg(id).arg(fields.name(id).unwrap());
    }
    let _: () = table.query(&mut conn).unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{namespace}:marker"))
        .arg("m1")
        .query(&mut conn)
        .unwrap();
    for chunk in cases.chunks(500) {
        let mut pipe = redis::pipe();
        for case in chunk {
            if case.store == StoreFormat::Hash {
                let mut hset = redis::cmd("HSET");
                hset.arg(&case.key);
                for (name, text) in codec::hash_pairs(&case.bytes) {
                    hset.arg(name).arg(text);
                }
                pipe.add_command(hset).ignore();
            } else {
                pipe.set(&case.key, &case.bytes).ignore();
            }
        }
        let _: () = pipe.query(&mut conn).unwrap();
    }
    let keys: Vec<&str> = cases.iter().map(|c| c.key.as_str()).collect();
    let functions = fcall_mget(&mut conn, &keys);
    let python = python_reader(
        &redis.url(),
        namespace,
        &["p:=postcard", "j:=json", "r:=raw", "h:=hash"],
        &keys,
    );
    // `edgecache get` reads a hash in HGETALL order, which is Redis's own
    // beyond the small (listpack) hashes: read the fields back as it does.
    let hashes = redis.dump("h:");
    let (mut n_ok, mut n_err) = (0, 0);
    for ((case, function), python) in cases.iter().zip(&functions).zip(&python) {
        let bytes = match case.store {
            StoreFormat::Hash => &hashes[case.key.as_bytes()],
            _ => &case.bytes,
        };
        let expected = get_output(case.store, bytes, &fields);
        let context = format!(
            "{} ({}, {}): bytes {}",
            case.key,
            case.store,
            case.what,
            codec::hex(&case.bytes)
        );
        match expected {
            Some(text) => {
                n_ok += 1;
                assert_eq!(function.as_ref(), Ok(&text), "function, {context}");
                assert_eq!(python.as_ref(), Ok(&text), "python, {context}");
            }
            None => {
                n_err += 1;
                assert!(
                    matches!(function, Err(e) if e.starts_with("EDGECACHE_CORRUPT ")),
                    "function must refuse what get refuses: {function:?}, {context}"
                );
                assert!(
                    matches!(python, Err(e) if e.starts_with("EDGECACHE_CORRUPT ")),
                    "python must refuse what get refuses: {python:?}, {context}"
                );
            }
        }
    }
    // Both sides were exercised, in every store.
    assert!(n_ok > 1500 && n_err > 20, "{n_ok} read, {n_err} refused");
    for (store, _) in STORES {
        assert!(
            cases.iter().filter(|c| c.store == store).count() > 300,
            "{store}"
        );
    }
    // The single-key function is the same code path as the multi-key one.
    for case in cases.iter().step_by(37) {
        let one: redis::RedisResult<String> = redis::cmd("FCALL_RO")
            .arg("edgecache_get")
            .arg(1)
            .arg(&case.key)
            .query(&mut conn);
        let many = &functions[cases.iter().position(|c| c.key == case.key).unwrap()];
        match (one, many) {
            (Ok(a), Ok(b)) => assert_eq!(&a, b),
            (Err(a), Err(b)) => assert_eq!(
                format!("{} {}", a.code().unwrap(), a.detail().unwrap_or("")),
                *b
            ),
            (a, b) => panic!("{}: edgecache_get {a:?}, edgecache_mget {b:?}", case.key),
        }
    }
}

/// The field table grows while readers hold it cached; a new marker (Redis
/// lost everything, the agent started over) renames numbers.
#[test]
fn cached_field_tables_follow_growth_and_a_new_marker() {
    let redis = Redis::start(false);
    let mut conn = redis.conn();
    let namespace = "ns";
    load_library(&mut conn, namespace);
    let store =
        |conn: &mut redis::Connection, key: &str, json: &str, fields: &mut Fields, marker: &str| {
            let mut out = Vec::new();
            let value = decode_input(InputFormat::Json, json.as_bytes()).unwrap();
            encode_store(StoreFormat::Postcard, &value, b"", None, fields, &mut out).unwrap();
            let mut table = redis::cmd("HSET");
            table.arg(format!("{namespace}:fields"));
            for id in 0..fields.len() as u32 {
                table.arg(id).arg(fields.name(id).unwrap());
            }
            let _: () = table.query(conn).unwrap();
            let _: () = redis::cmd("MSET")
                .arg(key)
                .arg(out)
                .arg(format!("{namespace}:marker"))
                .arg(marker)
                .query(conn)
                .unwrap();
        };
    let get = |conn: &mut redis::Connection, key: &str| -> String {
        redis::cmd("FCALL_RO")
            .arg("edgecache_get")
            .arg(1)
            .arg(key)
            .query(conn)
            .unwrap()
    };
    let script = "import redis, sys\n\
        from edgecache_reader import Reader\n\
        r = Reader(redis.Redis.from_url(sys.argv[1]), {'p:': 'postcard'}, namespace='ns')\n\
        for line in sys.stdin:\n    print(r.get_json(line.strip()), flush=True)\n";
    let mut python = Command::new("python3")
        .args(["-c", script, &redis.url()])
        .env("PYTHONPATH", repo().join("readers/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut py_in = python.stdin.take().unwrap();
    let mut py_out = std::io::BufReader::new(python.stdout.take().unwrap());
    let mut py_get = |key: &str| -> String {
        use std::io::BufRead;
        writeln!(py_in, "{key}").unwrap();
        let mut line = String::new();
        py_out.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    };
    let mut fields = Fields::new();
    store(&mut conn, "p:1", r#"{"a":1}"#, &mut fields, "m1");
    assert_eq!(get(&mut conn, "p:1"), r#"{"a":1}"#);
    assert_eq!(py_get("p:1"), r#"{"a":1}"#);
    // Both caches hold {0: "a"}; "b" is number 1, new to them.
    store(&mut conn, "p:2", r#"{"b":2,"a":3}"#, &mut fields, "m1");
    assert_eq!(get(&mut conn, "p:2"), r#"{"b":2,"a":3}"#);
    assert_eq!(py_get("p:2"), r#"{"b":2,"a":3}"#);
    // Redis lost everything; the agent numbers names afresh under a new
    // marker: number 0 is now "z".
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    let mut fields = Fields::new();
    store(&mut conn, "p:3", r#"{"z":0}"#, &mut fields, "m2");
    assert_eq!(get(&mut conn, "p:3"), r#"{"z":0}"#);
    assert_eq!(py_get("p:3"), r#"{"z":0}"#);
    drop(py_in);
    assert!(python.wait().unwrap().success());
}

fn redis_cli(redis: &Redis, args: &[&str]) -> (String, String) {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-server)");
    (
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn cli_get(config: &Path, key: &str, meta: bool) -> (i32, String) {
    let mut args = vec!["get", "--config", config.to_str().unwrap()];
    if meta {
        args.push("--meta");
    }
    args.push(key);
    let (code, stdout, _) = run_cli(&args);
    (code, stdout.trim_end().to_owned())
}

#[test]
fn agent_installs_functions_that_match_get() {
    let mut redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), "unused", "unused:");
    config.topics.clear();
    let values = [
        r#"{"device":"sensor-1","temp_c":21.5,"battery_v":3.7,"online":true,"alarms":[]}"#,
        r#"{"big":9223372036854775807,"bigger":18446744073709551615,"neg":-9007199254740993,"f":0.30000000000000004,"z":-0.0,"e":1e-7,"huge":1e300}"#,
        r#"{"nested":{"a":[1,{"b":null}],"s":"é\n\"q\"\u0001"},"dup":1,"dup":2}"#,
        r#"[1.5,false,"x",123456789012345678]"#,
        r#""just a string""#,
    ];
    for store in ["postcard", "json", "raw"] {
        let topic = unique(&format!("read-{store}"));
        create_topic(&topic, 1);
        let mut producer = TestProducer::new(&topic);
        for (i, value) in values.iter().enumerate() {
            producer.put(&format!("k{i}"), Some(value));
        }
        producer.flush();
        config
            .topics
            .push((topic, format!("{store}:"), "json", store));
    }
    let config = config.write(dir.path());
    // A library of an older stored format holds the function names: the
    // agent replaces it.
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("#!lua name=edgecache_f1\nredis.register_function('edgecache_get', function() return 'old' end)")
        .query(&mut redis.conn())
        .unwrap();
    let mut agent = Agent::start(&config);
    let stores = [StoreFormat::Postcard, StoreFormat::Json, StoreFormat::Raw];
    // Every key written (the convergence oracle compares numbers as
    // edgecache stores them, which these values are chosen to stress).
    let all_written = |redis: &Redis| {
        wait_until(CONVERGE, "every key mirrored", || {
            stores
                .iter()
                .all(|store| redis.dump(&format!("{store}:")).len() == values.len())
        });
    };
    all_written(&redis);
    let check_all = |redis: &Redis| {
        for store in stores {
            for i in 0..values.len() {
                let key = format!("{store}:k{i}");
                let (code, expected) = cli_get(&config, &key, false);
                assert_eq!(code, 0, "edgecache get {key}");
                let (got, stderr) = redis_cli(redis, &["FCALL_RO", "edgecache_get", "1", &key]);
                assert_eq!(got, expected, "{key}: {stderr}");
                let (code, expected) = cli_get(&config, &key, true);
                assert_eq!(code, 0);
                let (got, _) = redis_cli(redis, &["FCALL_RO", "edgecache_get_meta", "1", &key]);
                assert_eq!(got, expected, "{key} --meta");
            }
        }
    };
    check_all(&redis);
    // The Python reader, against the same live agent.
    let keys: Vec<String> = stores
        .iter()
        .flat_map(|store| (0..values.len()).map(move |i| format!("{store}:k{i}")))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let python = python_reader(
        &redis.url(),
        "edgecache",
        &["postcard:=postcard", "json:=json", "raw:=raw"],
        &keys,
    );
    for (key, got) in keys.iter().zip(python) {
        assert_eq!(
            got,
            Ok(cli_get(&config, key, false).1),
            "python reader, {key}"
        );
    }
    let (libraries, _) = redis_cli(&redis, &["FUNCTION", "LIST"]);
    assert!(!libraries.contains("edgecache_f1"), "{libraries}");
    // The documented errors, distinct from each other.
    let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", "postcard:nope"]);
    assert_eq!(got, "EDGECACHE_NOT_FOUND key not found");
    let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", "elsewhere:k0"]);
    assert_eq!(
        got,
        "EDGECACHE_NO_PREFIX no configured key_prefix matches this key"
    );
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("json:broken")
        .arg("{\"a\":")
        .query(&mut conn)
        .unwrap();
    let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", "json:broken"]);
    assert_eq!(got, "EDGECACHE_CORRUPT the value is not valid json data");
    // Several keys in one call: a missing key is nil, as with MGET.
    let (got, _) = redis_cli(
        &redis,
        &[
            "FCALL_RO",
            "edgecache_mget",
            "3",
            "json:k4",
            "raw:nope",
            "postcard:k3",
        ],
    );
    assert_eq!(
        got,
        "\"just a string\"\n\n[1.5,false,\"x\",123456789012345678]"
    );
    // A read-only user: read access to the mirrored keys and `<ns>:*`,
    // FCALL_RO and the commands the functions run as their caller.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "reader",
            "on",
            ">pw",
            "resetkeys",
            "%R~postcard:*",
            "%R~edgecache:*",
        ])
        .arg(&["resetchannels", "-@all", "+fcall_ro", "+get", "+hgetall"])
        .query(&mut conn)
        .unwrap();
    let as_reader = |args: &[&str]| {
        let mut all = vec!["--user", "reader", "--pass", "pw", "--no-auth-warning"];
        all.extend_from_slice(args);
        redis_cli(&redis, &all).0
    };
    let (expected, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", "postcard:k0"]);
    assert_eq!(
        as_reader(&["FCALL_RO", "edgecache_get", "1", "postcard:k0"]),
        expected
    );
    assert!(as_reader(&["SET", "postcard:k0", "x"]).starts_with("NOPERM"));
    // The functions flushed while the data stays: loaded again within
    // seconds (checked every 5 s).
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut conn)
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the library to be loaded again",
        || {
            let (got, _) = redis_cli(&redis, &["FUNCTION", "LIST", "LIBRARYNAME", "edgecache_f2"]);
            got.contains("edgecache_f2")
        },
    );
    check_all(&redis);
    // Redis lost everything (no persistence): the agent recreates its
    // marker, reloads the library and rehydrates.
    redis.restart();
    wait_until(
        Duration::from_secs(60),
        "the library to be reinstalled",
        || {
            let (got, _) = redis_cli(&redis, &["FUNCTION", "LIST", "LIBRARYNAME", "edgecache_f2"]);
            got.contains("edgecache_f2")
        },
    );
    all_written(&redis);
    check_all(&redis);
    assert!(agent.is_running());
}

/// `store = "hash"` end to end with the agent: plain `HGET` reads a field;
/// a record replaces the whole hash (a field it lacks is gone), `{}` and a
/// tombstone delete, a value that is not an object is skipped and counted
/// (the key keeps its last object), a foreign string at a mirrored key is
/// replaced; `edgecache get`, `FCALL_RO edgecache_get` and the Python
/// reader print the same object; the TTL applies to the hash; a Redis that
/// lost everything gets every hash back; a resync after missed deletes
/// sweeps hash keys like any other.
#[test]
fn hash_store_end_to_end() {
    let mut redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("read-hash");
    create_topic(&topic, 2);
    let mut config = AgentConfig::new(redis.url(), &topic, "h:");
    config.topics[0].3 = "hash";
    let ttl_topic = unique("read-hash-ttl");
    create_topic(&ttl_topic, 1);
    let config_path = config.write(dir.path());
    // The TTL topic in the same file (AgentConfig has no per-topic extras).
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str(&format!(
        "[[topics]]\nname = \"{ttl_topic}\"\nkey_prefix = \"ht:\"\nstore = \"hash\"\nttl_secs = 3600\n"
    ));
    std::fs::write(&config_path, text).unwrap();
    let state = r#"{"device":"sensor-1","temp_c":21.5,"status":"online","fw":"1.0","flag":"true","empty":"","nested":{"a":[1,{"b":null}]},"big":9223372036854775807,"z":-0.0,"s":"é\n\"q\""}"#;
    let mut producer = TestProducer::new(&topic);
    producer.put("k0", Some(state));
    producer.put("k1", Some(r#"{"a":1,"b":2}"#));
    producer.put("k1", Some(r#"{"a":3}"#));
    producer.put("k2", Some(r#"{"x":1}"#));
    producer.put("k2", Some("{}"));
    producer.put("k3", Some(r#"{"x":1}"#));
    producer.put("k3", Some("42"));
    producer.put("k4", Some(r#"{"y":1}"#));
    producer.put("k4", None);
    producer.put("k5", Some("[1,2]"));
    producer.put("k6", Some(r#"{"z":1}"#));
    producer.flush();
    let mut ttl_producer = TestProducer::new(&ttl_topic);
    ttl_producer.put("t0", Some(r#"{"on":true}"#));
    ttl_producer.flush();
    // A foreign string where a record will put a hash, and one where none will.
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("h:k6")
        .arg("foreign")
        .query(&mut conn)
        .unwrap();
    let mut agent = Agent::start(&config_path);
    let expected: BTreeMap<Vec<u8>, serde_json::Value> = [
        ("h:k0", state),
        ("h:k1", r#"{"a":3}"#),
        ("h:k3", r#"{"x":1}"#),
        ("h:k6", r#"{"z":1}"#),
    ]
    .into_iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), serde_json::from_str(v).unwrap()))
    .collect();
    let converged = |redis: &Redis| {
        wait_until(CONVERGE, "the hash keyspace to equal the oracle", || {
            actual_json(redis, "h:", StoreFormat::Hash) == expected
                && redis.dump("ht:").len() == 1
                && redis.status_counter("records") + redis.status_counter("skipped_undecodable")
                    >= 12
        });
    };
    converged(&redis);
    assert_eq!(
        redis.status_counter("skipped_undecodable"),
        2,
        "42 and [1,2]"
    );
    let hget = |redis: &Redis, key: &str, field: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query(&mut redis.conn())
            .unwrap()
    };
    assert_eq!(hget(&redis, "h:k0", "temp_c").as_deref(), Some("21.5"));
    assert_eq!(hget(&redis, "h:k0", "status").as_deref(), Some("online"));
    assert_eq!(hget(&redis, "h:k0", "fw").as_deref(), Some("\"1.0\""));
    assert_eq!(hget(&redis, "h:k0", "flag").as_deref(), Some("\"true\""));
    assert_eq!(hget(&redis, "h:k0", "empty").as_deref(), Some(""));
    assert_eq!(
        hget(&redis, "h:k0", "big").as_deref(),
        Some("9223372036854775807")
    );
    assert_eq!(
        hget(&redis, "h:k0", "nested").as_deref(),
        Some(r#"{"a":[1,{"b":null}]}"#)
    );
    assert_eq!(
        hget(&redis, "h:k1", "b"),
        None,
        "a field the record lacks is gone"
    );
    let pttl: i64 = redis::cmd("PTTL").arg("ht:t0").query(&mut conn).unwrap();
    assert!(pttl > 3_000_000 && pttl <= 3_600_000, "PTTL {pttl}");
    // Three readers, one text.
    let keys = ["h:k0", "h:k1", "h:k3", "h:k6", "ht:t0"];
    let python = python_reader(&redis.url(), "edgecache", &["h:=hash", "ht:=hash"], &keys);
    for (key, python) in keys.iter().zip(python) {
        let (code, expected) = cli_get(&config_path, key, false);
        assert_eq!(code, 0, "edgecache get {key}");
        let (got, stderr) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", key]);
        assert_eq!(got, expected, "{key}: {stderr}");
        assert_eq!(python, Ok(expected.clone()), "python reader, {key}");
        let (code, meta) = cli_get(&config_path, key, true);
        assert_eq!(code, 0);
        let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get_meta", "1", key]);
        assert_eq!(got, meta, "{key} --meta");
    }
    let (_, k0) = cli_get(&config_path, "h:k0", false);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&k0).unwrap(),
        serde_json::from_str::<serde_json::Value>(state).unwrap()
    );
    // Deleted and missing keys; a string where a hash belongs.
    for key in ["h:k2", "h:k4", "h:k5"] {
        let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", key]);
        assert_eq!(got, "EDGECACHE_NOT_FOUND key not found", "{key}");
        assert_eq!(cli_get(&config_path, key, false).0, 1, "{key}");
    }
    let _: () = redis::cmd("SET")
        .arg("h:foreign")
        .arg("x")
        .query(&mut conn)
        .unwrap();
    let (got, _) = redis_cli(&redis, &["FCALL_RO", "edgecache_get", "1", "h:foreign"]);
    assert_eq!(
        got,
        "EDGECACHE_CORRUPT the value is not valid hash data: the key holds another Redis type"
    );
    assert_eq!(cli_get(&config_path, "h:foreign", false).0, 4);
    let _: () = redis::cmd("DEL").arg("h:foreign").query(&mut conn).unwrap();
    // Live updates replace the hash whole.
    producer.put("k1", Some(r#"{"c":"x"}"#));
    producer.flush();
    wait_until(CONVERGE, "the live update", || {
        hget(&redis, "h:k1", "c").as_deref() == Some("x") && hget(&redis, "h:k1", "a").is_none()
    });
    let mut expected = expected;
    expected.insert(b"h:k1".to_vec(), serde_json::json!({"c": "x"}));
    // Redis lost everything: every hash comes back.
    redis.restart();
    wait_until(CONVERGE, "the rehydrate after a lost Redis", || {
        actual_json(&redis, "h:", StoreFormat::Hash) == expected && redis.dump("ht:").len() == 1
    });
    assert!(agent.is_running());
}
