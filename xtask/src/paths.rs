//! Where things are: the workspace, the artifact cache, build outputs.

use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}

/// The cache outside the work tree: `$HVRUN_CACHE`, else `$XDG_CACHE_HOME/hvrun`, else
/// `~/.cache/hvrun`.
pub fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("HVRUN_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("hvrun");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("hvrun")
}

/// Guest artifacts: kernels, busybox, test programs, disk images.
pub fn guest_dir() -> PathBuf {
    cache().join("guest")
}

/// The cross-built static arm64 `hvrun`.
pub fn cross_hvrun() -> PathBuf {
    cross_bin("hvrun")
}

/// A program cross-built for the rig by [`crate::cross::build_hvrun`].
pub fn cross_bin(name: &str) -> PathBuf {
    root().join("target/cross/aarch64-unknown-linux-gnu/release").join(name)
}
