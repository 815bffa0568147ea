//! The `<ns>:offsets` hash as read back from Redis at start.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| edgecache_fuzz::check_offsets(bytes));
