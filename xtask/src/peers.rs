//! Peer VMMs for `cargo xtask compare`: Debian's arm64 QEMU (`qemu-system-aarch64` from
//! `qemu-system-arm`) with exactly the shared libraries it loads, taken from Debian's
//! arm64 packages and cached outside the work tree, ready to put into the rig. In the rig
//! it runs through its own dynamic loader: `/qemu/lib/ld-linux-aarch64.so.1
//! --library-path /qemu/lib /qemu/qemu-system-aarch64 …` (the rig has no libc).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::guest::{apt_cache, candidate_version, fresh, mark, walk};
use crate::{paths, sh};

/// The Debian package with `qemu-system-aarch64`.
const QEMU_PACKAGE: &str = "qemu-system-arm";
/// The binary.
const QEMU_BINARY: &str = "qemu-system-aarch64";
/// Where QEMU lives in the rig.
pub const QEMU_DIR: &str = "qemu";
/// The command that runs QEMU in the rig.
pub const QEMU_IN_RIG: &str = "/qemu/lib/ld-linux-aarch64.so.1 --library-path /qemu/lib /qemu/qemu-system-aarch64";

/// QEMU and its libraries: `(path in the rig, file on the host)`, built into the cache
/// unless up to date. Also returns QEMU's version.
pub fn qemu() -> Result<(Vec<(String, PathBuf)>, String), String> {
    let version = candidate_version(QEMU_PACKAGE)?;
    let dir = paths::cache().join("peers/qemu");
    let binary = dir.join(QEMU_BINARY);
    let key = format!("{QEMU_PACKAGE}={version} with its libraries");
    if fresh(&binary, &key) {
        println!("peers: {QEMU_BINARY} is up to date ({key})");
    } else {
        build(&dir, &key)?;
    }
    let mut files = vec![(format!("{QEMU_DIR}/{QEMU_BINARY}"), binary)];
    let mut libs = Vec::new();
    walk(&dir.join("lib"), &mut libs);
    libs.sort();
    for lib in libs {
        let name = lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push((format!("{QEMU_DIR}/lib/{name}"), lib));
    }
    Ok((files, version))
}

/// The packages `package` needs for arm64, itself included (Depends and Pre-Depends,
/// recursively). apt prints some of them without the `:arm64` (multi-arch libraries it
/// also has natively), so every name is fetched for arm64; the ones without an arm64
/// build (architecture-independent data) are skipped when downloading.
fn closure(package: &str) -> Result<Vec<String>, String> {
    let spec = format!("{package}:arm64");
    let out = apt_cache(&[
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        &spec,
    ])?;
    let names: BTreeSet<String> = out
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.trim().trim_end_matches(":arm64").to_string())
        .filter(|name| !name.is_empty())
        .collect();
    Ok(names.into_iter().collect())
}

/// Those of `packages` that have an arm64 build (one `apt-cache policy` for all).
fn with_arm64_build(packages: &[String]) -> Result<Vec<String>, String> {
    let specs: Vec<String> = packages.iter().map(|p| format!("{p}:arm64")).collect();
    let refs: Vec<&str> = std::iter::once("policy").chain(specs.iter().map(String::as_str)).collect();
    let policy = apt_cache(&refs)?;
    let mut kept = Vec::new();
    let mut current = None;
    for line in policy.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(":arm64:").map(str::to_string);
        } else if let (Some(name), Some(candidate)) = (&current, line.trim().strip_prefix("Candidate: ")) {
            if candidate != "(none)" {
                kept.push(name.clone());
            }
        }
    }
    Ok(kept)
}

/// The shared libraries an arm64 ELF file names (`DT_NEEDED`), and its interpreter.
fn needed(file: &Path) -> Result<(Vec<String>, Option<String>), String> {
    let dynamic = sh::output(sh::cmd("aarch64-linux-gnu-readelf").args(["-d", "-l", "-W"]).arg(file))?;
    let libs = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_string()))
        .collect();
    let interpreter = dynamic
        .lines()
        .find_map(|l| l.split("[Requesting program interpreter: ").nth(1)?.split(']').next())
        .and_then(|p| p.rsplit('/').next())
        .map(str::to_string);
    Ok((libs, interpreter))
}

/// Resolves `path` inside the unpacked `tree`, following symbolic links there (an
/// absolute link points into the tree, not the host).
fn resolve(tree: &Path, mut path: PathBuf) -> Option<PathBuf> {
    for _ in 0..16 {
        let Ok(target) = std::fs::read_link(&path) else {
            return path.is_file().then_some(path);
        };
        path = match target.strip_prefix("/") {
            Ok(inside) => tree.join(inside),
            Err(_) => path.parent()?.join(target),
        };
    }
    None
}

fn build(dir: &Path, key: &str) -> Result<(), String> {
    let work = paths::cache().join("peers/download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let packages = with_arm64_build(&closure(QEMU_PACKAGE)?)?;
    println!("peers: downloading {} arm64 packages for {QEMU_PACKAGE}", packages.len());
    let specs: Vec<String> = packages.iter().map(|p| format!("{p}:arm64")).collect();
    sh::output(
        sh::cmd("apt-get").current_dir(&work).args(["-q", "-o", "APT::Sandbox::User=root", "download"]).args(&specs),
    )?;
    let tree = work.join("tree");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    for deb in &debs {
        sh::output(sh::cmd("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    }
    let lib_dirs = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib"].map(|d| tree.join(d));
    let find = |name: &str| lib_dirs.iter().find_map(|d| resolve(&tree, d.join(name)));
    let binary = resolve(&tree, tree.join("usr/bin").join(QEMU_BINARY))
        .ok_or_else(|| format!("{QEMU_PACKAGE} has no usr/bin/{QEMU_BINARY}"))?;
    let _ = std::fs::remove_dir_all(dir);
    let lib_out = dir.join("lib");
    std::fs::create_dir_all(&lib_out).map_err(|e| format!("creating {}: {e}", lib_out.display()))?;
    let (mut queue, interpreter) = needed(&binary)?;
    let interpreter = interpreter.ok_or_else(|| format!("{QEMU_BINARY} names no program interpreter"))?;
    queue.push(interpreter);
    let mut done = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        let file = find(&name).ok_or_else(|| format!("{QEMU_BINARY} needs {name}, which no downloaded package has"))?;
        std::fs::copy(&file, lib_out.join(&name)).map_err(|e| format!("copying {}: {e}", file.display()))?;
        queue.extend(needed(&file)?.0);
    }
    std::fs::copy(&binary, dir.join(QEMU_BINARY)).map_err(|e| format!("copying {}: {e}", binary.display()))?;
    mark(&dir.join(QEMU_BINARY), key)?;
    let _ = std::fs::remove_dir_all(&work);
    println!("peers: {QEMU_BINARY} with {} libraries in {}", done.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_unpacked_tree() {
        let tree = std::env::temp_dir().join(format!("hvrun-peers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tree);
        let lib = tree.join("usr/lib/aarch64-linux-gnu");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libz.so.1.2.13"), b"elf").unwrap();
        std::os::unix::fs::symlink("libz.so.1.2.13", lib.join("libz.so.1")).unwrap();
        std::fs::create_dir_all(tree.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/aarch64-linux-gnu/libz.so.1", tree.join("lib/libz.so.1")).unwrap();
        assert_eq!(resolve(&tree, tree.join("lib/libz.so.1")), Some(lib.join("libz.so.1.2.13")));
        assert_eq!(resolve(&tree, lib.join("missing.so")), None);
        std::os::unix::fs::symlink("loop", lib.join("loop")).unwrap();
        assert_eq!(resolve(&tree, lib.join("loop")), None, "a loop ends");
        std::fs::remove_dir_all(tree).unwrap();
    }
}
