//! Bytes read from a Redis key by `edgecache get`: the postcard stored
//! format (`EC 01` header), the JSON and the raw store formats.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| edgecache_fuzz::check_stored(bytes));
