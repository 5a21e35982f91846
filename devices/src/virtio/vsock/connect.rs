//! The host side's `CONNECT <port>\n` line, read as Firecracker reads it
//! (`VsockMuxer::read_local_stream_port`), so a client written for Firecracker or Cloud
//! Hypervisor works unchanged.
//!
//! Firecracker reads at least 10 bytes (`b"connect 0\n".len()`), then one byte at a time
//! until the last byte read is `\n` or 32 bytes are in; the line is those bytes. They
//! must be UTF-8; split at whitespace, the first word must be `connect` in any case, and
//! the second a decimal `u32` (Rust's `u32::from_str`: a leading `+` is accepted); words
//! after it are ignored. Anything else, and a client that closes first, ends the host
//! connection. Bytes after the line are the stream's first data.

/// The longest line: Firecracker's buffer.
pub const MAX_LINE: usize = 32;
/// The fewest bytes read before a `\n` ends the line.
pub const MIN_LINE: usize = 10;

/// Where the line ends in what the client sent so far (its length, the `\n` included),
/// or `None` while more is needed.
pub fn line_end(sent: &[u8]) -> Option<usize> {
    if sent.len() < MIN_LINE {
        return None;
    }
    let window = &sent[..sent.len().min(MAX_LINE)];
    match window[MIN_LINE - 1..].iter().position(|&b| b == b'\n') {
        Some(at) => Some(MIN_LINE + at),
        None if window.len() == MAX_LINE => Some(MAX_LINE),
        None => None,
    }
}

/// The port a whole line (see [`line_end`]) asks for, or `None` if it is malformed.
pub fn parse_line(line: &[u8]) -> Option<u32> {
    let mut words = std::str::from_utf8(line).ok()?.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}
