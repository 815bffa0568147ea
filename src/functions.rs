//! The Redis Functions library that lets any client read the mirror in one
//! call (`FCALL_RO edgecache_get 1 device:sensor-1`), in any store format,
//! as exactly the JSON `edgecache get` prints. The Lua is in
//! `functions.lua`; this module puts the agent's configuration in front of
//! it. The sink loads it whenever it adopts or creates its marker.

use crate::codec::{StoreFormat, FORMAT_VERSION};
use crate::config::TopicSettings;

/// The library's name, versioned with the stored format it reads: a
/// format 3 agent replaces a format 2 library by name.
pub const LIBRARY_NAME: &str = "edgecache_f2";
const _: () = assert!(FORMAT_VERSION == 2, "rename LIBRARY_NAME with the format");

const BODY: &str = include_str!("functions.lua");

/// The library source for an agent with this namespace and these topics:
/// each topic's key prefix and store format are embedded, so a call needs
/// no configuration read. A configuration change reaches Redis when the
/// agent restarts (it reloads the library every time it connects, and when
/// it finds it gone).
pub fn library(namespace: &str, topics: &[TopicSettings]) -> String {
    let mut out = format!("#!lua name={LIBRARY_NAME}\n");
    out.push_str(&format!(
        "local NAMESPACE = {}\nlocal PREFIXES = {{\n",
        lua_string(namespace.as_bytes())
    ));
    for topic in topics {
        let store = match topic.store {
            StoreFormat::Postcard => "postcard",
            StoreFormat::Json => "json",
            StoreFormat::Raw => "raw",
            StoreFormat::Hash => "hash",
        };
        out.push_str(&format!(
            "  {{{}, '{store}'}},\n",
            lua_string(&topic.key_prefix)
        ));
    }
    out.push_str("}\n");
    out.push_str(BODY);
    out
}

/// A Lua string literal of any bytes: letters and digits as they are, every
/// other byte as a decimal escape, so nothing in a prefix can end the
/// literal or change its meaning.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:03}"));
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_escaped_and_the_body_follows_the_header() {
        let topic = |prefix: &[u8], store| TopicSettings {
            name: "t".into(),
            key_prefix: prefix.to_vec(),
            input: crate::codec::InputFormat::Json,
            store,
            only_prefix: None,
            only_matching: None,
            partitions: None,
            ttl_ms: None,
        };
        let code = library(
            "ns",
            &[
                topic(b"dev:\"]]\n\xff", StoreFormat::Postcard),
                topic(b"j:", StoreFormat::Json),
            ],
        );
        assert!(code.starts_with("#!lua name=edgecache_f2\nlocal NAMESPACE = \"ns\"\n"));
        assert!(code.contains(
            "  {\"dev\\058\\034\\093\\093\\010\\255\", 'postcard'},\n  {\"j\\058\", 'json'},\n}\n"
        ));
        assert!(code.ends_with(BODY));
    }
}
