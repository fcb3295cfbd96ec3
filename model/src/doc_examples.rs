//! Keeps `docs/values.md` honest: every example there is a value this build writes, byte for
//! byte (pretty-printed), and every reader check passes on it.

use crate::*;

const DOC: &str = include_str!("../../docs/values.md");

/// `(key, json)` for every "Example at `key`:" followed by a json block.
fn examples() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("Example at `") else {
            continue;
        };
        let key = rest.strip_suffix("`:").expect("example line ends with `:");
        let fence = lines.by_ref().find(|l| !l.is_empty()).unwrap();
        assert_eq!(
            fence, "```json",
            "example {key} is followed by a json block"
        );
        let json: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((key, json.join("\n")));
    }
    out
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap()
}

#[test]
fn examples_are_what_we_write_and_accept() {
    let examples = examples();
    assert_eq!(examples.len(), 6, "one example per value type");
    let (key, json) = &examples[0];
    let peer_name = keys::parse_cluster_config_key(key).unwrap();
    let peer = validate_cluster_config(key, json.as_bytes(), &peer_name).unwrap();
    assert_eq!(&pretty(&peer), json);
    let mut kinds = Vec::new();
    for (key, json) in &examples[1..] {
        let kind = parse_state_key(key).unwrap().kind();
        let entry = validate_entry(kind, key, json.as_bytes(), &peer)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let pretty = match &entry {
            Entry::Node(v) => pretty(v),
            Entry::Service(v) => pretty(v),
            Entry::Identity(v) => pretty(v),
            Entry::Ip(v) => pretty(v),
            Entry::ServiceExport(v) => pretty(v),
        };
        assert_eq!(
            &pretty, json,
            "{key}: the example is our own pretty encoding"
        );
        let cache = to_cache_key(&entry.key(), &peer.name).unwrap();
        validate_entry(kind, &cache, json.as_bytes(), &peer).unwrap();
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(kinds, Kind::ALL);
}
