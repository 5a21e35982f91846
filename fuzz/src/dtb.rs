//! A reader of flattened device trees (devicetree specification 0.4, chapter 5),
//! independent of the `vm-fdt` writer hvrun uses, to check what it wrote.

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;

fn be32(blob: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(blob.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn string_at(block: &[u8], at: usize) -> Option<&[u8]> {
    let rest = block.get(at..)?;
    Some(&rest[..rest.iter().position(|&b| b == 0)?])
}

/// The value of property `name` of the node at `path` (e.g. `/chosen`), or `None`
/// when the blob is malformed or has no such property.
pub fn property<'a>(blob: &'a [u8], path: &str, name: &str) -> Option<&'a [u8]> {
    if be32(blob, 0)? != MAGIC || be32(blob, 4)? as usize != blob.len() {
        return None;
    }
    let (off_struct, off_strings) = (be32(blob, 8)? as usize, be32(blob, 12)? as usize);
    let (size_strings, size_struct) = (be32(blob, 32)? as usize, be32(blob, 36)? as usize);
    let structure = blob.get(off_struct..off_struct.checked_add(size_struct)?)?;
    let strings = blob.get(off_strings..off_strings.checked_add(size_strings)?)?;
    let wanted: Vec<&[u8]> = path.split('/').filter(|p| !p.is_empty()).map(str::as_bytes).collect();
    let mut stack: Vec<&[u8]> = Vec::new();
    let mut found = None;
    let mut at = 0usize;
    loop {
        match be32(structure, at)? {
            BEGIN_NODE => {
                let name = string_at(structure, at + 4)?;
                stack.push(name);
                at += 4 + (name.len() + 1).next_multiple_of(4);
            }
            END_NODE => {
                stack.pop()?;
                at += 4;
            }
            PROP => {
                let len = be32(structure, at + 4)? as usize;
                let nameoff = be32(structure, at + 8)? as usize;
                let value = structure.get(at + 12..at + 12 + len)?;
                let here = stack.len() == wanted.len() + 1 && stack[1..] == wanted[..];
                if here && string_at(strings, nameoff)? == name.as_bytes() {
                    found = Some(value);
                }
                at += 12 + len.next_multiple_of(4);
            }
            NOP => at += 4,
            END => return if stack.is_empty() { found } else { None },
            _ => return None,
        }
    }
}
