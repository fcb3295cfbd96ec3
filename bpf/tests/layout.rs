//! Every `#[repr(C)]` mirror in `bpf::maps` has the size and field offsets of its C struct,
//! as the committed object's BTF records them (read with `bpftool btf dump -j`).

use std::process::Command;

use bpf::maps::*;
use serde_json::Value;

type Fields = &'static [(&'static str, usize, usize)];

fn btf() -> Vec<Value> {
    let object = concat!(env!("CARGO_MANIFEST_DIR"), "/c/mesh.bpf.o");
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file", object, "-j"])
        .output()
        .expect("bpftool is needed for the layout test (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    dump["types"].as_array().unwrap().clone()
}

#[test]
fn every_mirror_matches_its_c_struct() {
    let types = btf();
    let mirrors: [(&str, usize, Fields); 12] = [
        (Lb4Key::C_NAME, Lb4Key::SIZE, Lb4Key::FIELDS),
        (Lb4Slot::C_NAME, Lb4Slot::SIZE, Lb4Slot::FIELDS),
        (SockLb4::C_NAME, SockLb4::SIZE, SockLb4::FIELDS),
        (Ipcache4Key::C_NAME, Ipcache4Key::SIZE, Ipcache4Key::FIELDS),
        (
            IpcacheValue::C_NAME,
            IpcacheValue::SIZE,
            IpcacheValue::FIELDS,
        ),
        (PolicyKey::C_NAME, PolicyKey::SIZE, PolicyKey::FIELDS),
        (PolicyValue::C_NAME, PolicyValue::SIZE, PolicyValue::FIELDS),
        (
            EnforcementKey::C_NAME,
            EnforcementKey::SIZE,
            EnforcementKey::FIELDS,
        ),
        (Ct4Key::C_NAME, Ct4Key::SIZE, Ct4Key::FIELDS),
        (CtValue::C_NAME, CtValue::SIZE, CtValue::FIELDS),
        (
            MetricsValue::C_NAME,
            MetricsValue::SIZE,
            MetricsValue::FIELDS,
        ),
        (
            DropEventRaw::C_NAME,
            DropEventRaw::SIZE,
            DropEventRaw::FIELDS,
        ),
    ];
    for (name, size, fields) in mirrors {
        let c = types
            .iter()
            .find(|t| t["kind"] == "STRUCT" && t["name"] == name)
            .unwrap_or_else(|| panic!("struct {name} is not in the object's BTF"));
        assert_eq!(c["size"].as_u64(), Some(size as u64), "size of {name}");
        let members = c["members"].as_array().unwrap();
        assert_eq!(members.len(), fields.len(), "fields of {name}");
        for (member, (field, offset, _)) in members.iter().zip(fields) {
            assert_eq!(member["name"], *field, "field order of {name}");
            assert_eq!(
                member["bits_offset"].as_u64(),
                Some(*offset as u64 * 8),
                "offset of {name}.{field}"
            );
        }
    }
}
