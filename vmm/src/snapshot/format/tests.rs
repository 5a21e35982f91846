use serde::{Deserialize, Serialize};

use std::path::Path;

use super::*;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Regs {
    pc: u64,
    x: Vec<u64>,
    name: String,
}

fn regs() -> Regs {
    Regs { pc: 0x4008_0000, x: (0..31).collect(), name: "vcpu0".into() }
}

/// A small state file of three sections (one empty).
fn sample() -> Vec<u8> {
    let mut w = Writer::new();
    w.add("requirements", &(1u32, "kvm")).unwrap();
    w.add("vcpu0", &regs()).unwrap();
    w.add("empty", &()).unwrap();
    w.to_bytes()
}

#[test]
fn sections_round_trip_by_name() {
    let file = StateFile::parse(&sample()).unwrap();
    assert_eq!(file.names().collect::<Vec<_>>(), ["requirements", "vcpu0", "empty"]);
    assert_eq!(file.get::<Regs>("vcpu0").unwrap(), regs());
    assert_eq!(file.get::<(u32, String)>("requirements").unwrap(), (1, "kvm".into()));
    file.get::<()>("empty").unwrap();
    assert!(matches!(file.get::<Regs>("vcpu1"), Err(FormatError::Missing(_))));
    let e = file.get::<Regs>("requirements").unwrap_err();
    assert!(matches!(e, FormatError::Decode { .. }), "a section read as the wrong type: {e}");
}

#[test]
fn every_changed_byte_is_refused() {
    let bytes = sample();
    for at in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[at] ^= flip;
            assert!(StateFile::parse(&bad).is_err(), "byte {at} ^ {flip:#x} was accepted");
        }
    }
}

#[test]
fn every_truncation_is_refused_section_boundaries_included() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(StateFile::parse(&bytes[..len]).is_err(), "cut at {len} was accepted");
    }
    // Bytes added after the trailer are refused too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"x");
    assert!(StateFile::parse(&longer).is_err());
}

#[test]
fn another_format_version_is_refused_with_both_versions_named() {
    let mut bytes = sample();
    bytes[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&7u32.to_le_bytes());
    let e = StateFile::parse(&bytes).unwrap_err();
    assert!(matches!(e, FormatError::Version { found: 7 }));
    assert_eq!(e.to_string(), format!("snapshot format version 7, this hvrun reads version {VERSION} only"));
    assert!(matches!(StateFile::parse(b"GIF89a........"), Err(FormatError::NotASnapshot)));
}

#[test]
fn names_are_unique_and_short() {
    let mut w = Writer::new();
    w.add("a", &1u8).unwrap();
    assert!(w.add("a", &2u8).is_err());
    assert!(w.add(&"n".repeat(256), &1u8).is_err());
    w.add(&"n".repeat(255), &1u8).unwrap();
    assert_eq!(StateFile::parse(&w.to_bytes()).unwrap().get::<u8>(&"n".repeat(255)).unwrap(), 1);
}

#[test]
fn a_file_is_written_whole_and_read_back() {
    let dir = std::env::temp_dir().join(format!("hvrun-test-{}-snapshot", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state");
    let mut w = Writer::new();
    w.add("vcpu0", &regs()).unwrap();
    w.write(&path).unwrap();
    assert!(!dir.join("state.partial").exists());
    assert_eq!(StateFile::read(&path).unwrap().get::<Regs>("vcpu0").unwrap(), regs());
    // A file past the size limit is refused before it is read.
    let big = std::fs::File::create(dir.join("big")).unwrap();
    big.set_len(MAX_STATE + 1).unwrap();
    assert!(matches!(StateFile::read(&dir.join("big")), Err(FormatError::TooBig(_))));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_files_are_refused_cheaply() {
    // A section count past the limit, with a valid checksum (an attacker can compute one).
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(MAX_SECTIONS + 1).to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(b"HVRUNEND");
    bytes.extend_from_slice(&crc.to_le_bytes());
    let e = StateFile::parse(&bytes).unwrap_err().to_string();
    assert!(e.contains("4097 sections"), "{e}");
    // Not a regular file: refused, not read forever.
    let e = StateFile::read(Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let mut w = Writer::new();
    for i in 0..MAX_SECTIONS {
        w.add(&i.to_string(), &()).unwrap();
    }
    assert!(w.add("one more", &()).is_err());
}
