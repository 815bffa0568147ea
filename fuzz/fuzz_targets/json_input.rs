//! A Kafka record value on a topic with `input = "json"`, through decode,
//! every store format, and back as `edgecache get` reads it.
#![no_main]

use edgecache::codec::InputFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| edgecache_fuzz::check_input(InputFormat::Json, payload));
