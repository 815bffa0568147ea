//! Issue 14: edgecache side by side with what users would run instead on
//! the same topic: the kcat | awk | redis-cli --pipe pipeline
//! (benches/kcat-pipeline.sh) and a batched Python consumer
//! (benches/python_peer.py). Each run gets a fresh redis-server, with the
//! append-only file on (`everysec`) and off; the contenders alternate, so a
//! busy moment of the shared machine hits all of them alike.

use super::{
    check_keys, data_keys, median, progress, write_config, Preload, Redis, RehydrateRun, META_KEYS,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The key prefix every contender writes, so one oracle checks them all.
const PREFIX: &str = "device:";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Who {
    EdgecachePostcard,
    EdgecacheJson,
    /// The agent of EDGECACHE_BENCH_BASELINE_BIN, when set: before/after of
    /// an agent change in the same run.
    BaselinePostcard,
    BaselineJson,
    Kcat,
    Python,
}

impl Who {
    const ALL: [Who; 6] = [
        Who::EdgecachePostcard,
        Who::EdgecacheJson,
        Who::BaselinePostcard,
        Who::BaselineJson,
        Who::Kcat,
        Who::Python,
    ];

    fn is_agent(self) -> bool {
        !matches!(self, Who::Kcat | Who::Python)
    }

    fn is_baseline(self) -> bool {
        matches!(self, Who::BaselinePostcard | Who::BaselineJson)
    }

    fn label(self) -> &'static str {
        match self {
            Who::EdgecachePostcard => "edgecache, store postcard",
            Who::EdgecacheJson => "edgecache, store json",
            Who::BaselinePostcard => "baseline edgecache, store postcard",
            Who::BaselineJson => "baseline edgecache, store json",
            Who::Kcat => "kcat | awk (RESP) | redis-cli --pipe",
            Who::Python => "Python: confluent-kafka + redis-py, pipeline every 1,000",
        }
    }
}

pub struct PeerRun {
    pub who: Who,
    pub aof: bool,
    /// Start until the final state is in Redis (edgecache: `live`; the
    /// peers: the process exited after its last reply).
    pub wall: f64,
    /// The contender's own CPU (user + system; for the pipeline all three
    /// processes).
    pub cpu: f64,
    /// Peak RSS: edgecache's VmHWM; for the pipeline the largest of its
    /// processes (GNU time's %M).
    pub rss_kib: u64,
    pub used_memory: u64,
    /// Redis's own CPU over the run (INFO cpu, user + sys delta).
    pub redis_cpu: f64,
}

pub struct Bins {
    pub agent: PathBuf,
    /// EDGECACHE_BENCH_BASELINE_BIN: another agent binary run next to
    /// `agent` (e.g. main's), so a change is measured before/after in one run.
    pub baseline: Option<PathBuf>,
    pub python: PathBuf,
}

/// The tools the peers need, checked before anything runs: a missing one is
/// an error, not a skipped row. Returns the venv's python.
pub fn check_tools() -> PathBuf {
    assert!(
        Path::new("/usr/bin/time").exists(),
        "/usr/bin/time is missing: `bash tests/services.sh deps` installs it (Debian's time)"
    );
    let kcat = Command::new("kcat").arg("-V").output();
    assert!(
        matches!(&kcat, Ok(o) if o.status.success()),
        "kcat is missing: `bash tests/services.sh deps` installs it (Debian's kcat)"
    );
    python_venv()
}

/// A venv under $HOME/.cache/edgecache with confluent-kafka and redis from
/// PyPI, made on first use; never the system's site-packages.
fn python_venv() -> PathBuf {
    let home = std::env::var("HOME").expect("HOME");
    let venv = Path::new(&home).join(".cache/edgecache/bench-venv");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import confluent_kafka, redis"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready() {
        return python;
    }
    progress(&format!(
        "making the Python venv {} (confluent-kafka, redis)",
        venv.display()
    ));
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect(
            "python3 is missing: the Python peer needs it (apt-get install python3 python3-venv)",
        );
    assert!(
        status.success(),
        "python3 -m venv {} failed",
        venv.display()
    );
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "confluent-kafka", "redis"])
        .status()
        .expect("run pip");
    assert!(status.success(), "pip install confluent-kafka redis failed");
    assert!(ready(), "the venv cannot import confluent_kafka and redis");
    python
}

fn redis_cpu(redis: &Redis) -> f64 {
    let mut conn = redis.conn();
    ["used_cpu_sys", "used_cpu_user"]
        .iter()
        .map(|f| {
            redis
                .info_field(&mut conn, "cpu", f)
                .and_then(|v| v.parse::<f64>().ok())
                .expect("INFO cpu")
        })
        .sum()
}

/// Runs `program args` to its end under GNU time and returns (wall s, CPU
/// s, peak RSS KiB): the CPU of the process and every descendant it waited
/// for, and the largest peak RSS among them. Not wait4 from here: a child
/// spawned by this process reports at least this process's own peak RSS
/// (exec records the old address space's high-water mark; the bench holds
/// the oracle), and `time` is small.
fn run_measured(program: &Path, args: &[&str]) -> (f64, f64, u64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%U %S %M", "-o"])
        .arg(report.path())
        .arg(program)
        .args(args)
        .status()
        .expect("/usr/bin/time is missing (Debian's time, tests/services.sh deps)");
    let wall = start.elapsed().as_secs_f64();
    assert!(
        status.success(),
        "peer {program:?} {args:?} failed ({status})"
    );
    let text = std::fs::read_to_string(report.path()).unwrap();
    let v: Vec<f64> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(|x| x.parse().expect("time -f '%U %S %M'"))
        .collect();
    assert_eq!(v.len(), 3, "time's report: {text}");
    (wall, v[0] + v[1], v[2] as u64)
}

/// Every live key is there with its last value, and nothing else is: a
/// tombstone written as anything but a DEL leaves a key behind. Values are
/// compared byte for byte for the peers (stored as received); edgecache
/// transcodes, its values are checked by its own tests.
fn check_oracle(redis: &Redis, preload: &Preload, who: Who) {
    let mut conn = redis.conn();
    let meta: &[&str] = if who.is_agent() { &META_KEYS } else { &[] };
    let found = data_keys(&mut conn, meta);
    check_keys(found, preload, who.label());
    for chunk in preload.live_keys.chunks(1000) {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(chunk).query(&mut conn).unwrap();
        for (key, value) in chunk.iter().zip(values) {
            let value = value.unwrap_or_else(|| panic!("{}: {key} missing", who.label()));
            if !who.is_agent() {
                assert_eq!(
                    Some(value.as_slice()),
                    preload.last_values.get(key).map(|v| v.as_bytes()),
                    "{}: {key} holds another value than its last record",
                    who.label()
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    who: Who,
    aof: bool,
    bins: &Bins,
    brokers: &str,
    topic: &str,
    highs: &BTreeMap<i32, i64>,
    dir: &Path,
    preload: &Preload,
) -> PeerRun {
    let redis = Redis::start_with(aof);
    let cpu_before = redis_cpu(&redis);
    let bench_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches");
    let port = redis.port.to_string();
    let (wall, cpu, rss_kib) = match who {
        Who::EdgecachePostcard | Who::EdgecacheJson | Who::BaselinePostcard | Who::BaselineJson => {
            let store = if matches!(who, Who::EdgecachePostcard | Who::BaselinePostcard) {
                "postcard"
            } else {
                "json"
            };
            let bin = match (who.is_baseline(), &bins.baseline) {
                (true, Some(b)) => b,
                _ => &bins.agent,
            };
            let config = write_config(dir, brokers, &redis.url(), topic, PREFIX, store);
            let r: RehydrateRun = super::watch_rehydrate(bin, &config, &redis, topic, highs);
            (r.live.as_secs_f64(), r.cpu_s, r.hwm_kib)
        }
        Who::Kcat => run_measured(
            Path::new("bash"),
            &[
                &format!("{bench_dir}/kcat-pipeline.sh"),
                brokers,
                topic,
                &port,
                PREFIX,
            ],
        ),
        Who::Python => run_measured(
            &bins.python,
            &[
                &format!("{bench_dir}/python_peer.py"),
                brokers,
                topic,
                &port,
                PREFIX,
            ],
        ),
    };
    let redis_cpu = redis_cpu(&redis) - cpu_before;
    check_oracle(&redis, preload, who);
    let used_memory = redis.used_memory(&mut redis.conn());
    PeerRun {
        who,
        aof,
        wall,
        cpu,
        rss_kib,
        used_memory,
        redis_cpu,
    }
}

/// `runs` rounds; each round runs every contender once with the AOF on and
/// once with it off, in a fixed alternating order.
pub fn side_by_side(
    runs: usize,
    bins: &Bins,
    brokers: &str,
    topic: &str,
    highs: &BTreeMap<i32, i64>,
    dir: &Path,
    preload: &Preload,
) -> Vec<PeerRun> {
    let records: i64 = highs.values().sum();
    let mut out = Vec::new();
    for round in 0..runs {
        for aof in [true, false] {
            for who in Who::ALL {
                if who.is_baseline() && bins.baseline.is_none() {
                    continue;
                }
                let r = one_run(who, aof, bins, brokers, topic, highs, dir, preload);
                progress(&format!(
                    "side by side {}/{runs}, aof {}: {}: {:.2} s, CPU {:.2} s, RSS {:.1} MiB, Redis CPU {:.2} µs/record",
                    round + 1,
                    if aof { "everysec" } else { "off" },
                    who.label(),
                    r.wall,
                    r.cpu,
                    r.rss_kib as f64 / 1024.0,
                    r.redis_cpu * 1e6 / records as f64
                ));
                out.push(r);
            }
        }
    }
    out
}

fn range(v: &[f64], unit: &str, digits: usize) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 {
        format!("{min:.digits$}{unit}")
    } else {
        format!(
            "**{:.digits$}**{unit} ({min:.digits$}–{max:.digits$})",
            median(v)
        )
    }
}

/// The side-by-side table (medians, ranges in parentheses) and the ratio
/// lines of issue 14's goals.
pub fn print(runs: &[PeerRun], records: u64) -> String {
    let mut out = String::new();
    let n = records as f64;
    writeln!(out, "\n### Side by side (issue 14)\n").unwrap();
    writeln!(
        out,
        "{records} records; each contender into its own fresh redis-server; medians of {} alternating rounds (ranges in parentheses).\n",
        runs.iter().filter(|r| r.who == Who::Kcat && r.aof).count()
    )
    .unwrap();
    writeln!(out, "| contender | AOF | wall time to the final state | its CPU | its CPU per record | peak RSS | Redis used_memory | Redis CPU per record |").unwrap();
    writeln!(out, "|---|---|---|---|---|---|---|---|").unwrap();
    let pick = |who: Who, aof: bool| -> Vec<&PeerRun> {
        runs.iter()
            .filter(|r| r.who == who && r.aof == aof)
            .collect()
    };
    let med = |who: Who, aof: bool, f: &dyn Fn(&PeerRun) -> f64| -> f64 {
        median(&pick(who, aof).iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    for aof in [true, false] {
        for who in Who::ALL {
            let rs = pick(who, aof);
            if rs.is_empty() {
                continue;
            }
            let col = |f: &dyn Fn(&PeerRun) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                who.label().replace('|', "\\|"),
                if aof { "everysec" } else { "off" },
                range(&col(&|r| r.wall), " s", 2),
                range(&col(&|r| r.cpu), " s", 2),
                range(&col(&|r| r.cpu * 1e6 / n), " µs", 2),
                range(&col(&|r| r.rss_kib as f64 / 1024.0), " MiB", 1),
                range(&col(&|r| r.used_memory as f64 / 1048576.0), " MiB", 1),
                range(&col(&|r| r.redis_cpu * 1e6 / n), " µs", 2),
            )
            .unwrap();
        }
    }
    writeln!(
        out,
        "\nRatios (of medians; goals of issue 14 in brackets):\n"
    )
    .unwrap();
    for aof in [true, false] {
        let aof_name = if aof { "AOF everysec" } else { "AOF off" };
        let kcat_wall = med(Who::Kcat, aof, &|r| r.wall);
        let kcat_redis = med(Who::Kcat, aof, &|r| r.redis_cpu);
        for who in Who::ALL.into_iter().filter(|w| w.is_agent()) {
            if pick(who, aof).is_empty() {
                continue;
            }
            let wall = med(who, aof, &|r| r.wall);
            let redis = med(who, aof, &|r| r.redis_cpu);
            writeln!(
                out,
                "- {aof_name}, {}: wall / kcat wall **{:.2}×** [≤ 0.8]; Redis CPU per record / kcat's **{:.2}×** [≤ 1]; wall / Redis's CPU **{:.2}×** [≤ 1.2]",
                who.label(),
                wall / kcat_wall,
                redis / kcat_redis,
                wall / redis,
            )
            .unwrap();
        }
    }
    out
}
