//! Debian's arm64 programs with exactly the shared libraries they load, taken from
//! Debian's arm64 packages and cached outside the work tree, ready to put into the rig or
//! a guest: the peer VMM of `cargo xtask compare` (`qemu-system-aarch64` from
//! `qemu-system-arm`), the guest's I/O tools (`fio`, `iperf3`; see [`crate::io_guest`]) and
//! `curl`, the API client of the rig's scenarios ([`curl`]).
//! In the rig a program runs through its own dynamic loader, e.g.
//! `/qemu/lib/ld-linux-aarch64.so.1 --library-path /qemu/lib /qemu/qemu-system-aarch64 …`
//! (the rig has no libc).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::guest::{apt_cache, arm64_candidates, candidate_versions, fresh, mark, walk};
use crate::{paths, sh};

/// Programs from Debian's arm64 packages, fetched with the libraries they load.
pub struct Bundle {
    /// Its directory in the cache, under `peers/`.
    pub name: &'static str,
    /// The packages holding the programs (their dependencies come along).
    pub packages: &'static [&'static str],
    /// The programs: paths inside the unpacked packages.
    pub programs: &'static [&'static str],
}

/// A bundle in the cache.
pub struct Fetched {
    /// The programs, in [`Bundle::programs`]' order.
    pub programs: Vec<PathBuf>,
    /// Every library they load, the dynamic loader (`ld-linux-aarch64.so.1`) included,
    /// sorted by name.
    pub libs: Vec<PathBuf>,
    /// `package=version` of each of [`Bundle::packages`], space-separated.
    pub versions: String,
}

/// The peer VMM.
pub const QEMU: Bundle =
    Bundle { name: "qemu", packages: &["qemu-system-arm"], programs: &["usr/bin/qemu-system-aarch64"] };
/// The HTTP client the rig's scenarios drive hvrun's API socket with (`curl
/// --unix-socket`): a client not written here.
pub const CURL: Bundle = Bundle { name: "curl", packages: &["curl"], programs: &["usr/bin/curl"] };
/// Every bundle the project fetches (`cargo xtask setup` proves apt knows their packages).
pub const BUNDLES: [&Bundle; 3] = [&QEMU, &crate::io_guest::TOOLS, &CURL];

/// The shared libraries the arm64 ELF file `file` names (`DT_NEEDED`).
pub fn needed_libs(file: &Path) -> Result<Vec<String>, String> {
    needed(file).map(|d| d.needed)
}

/// Where QEMU lives in the rig.
pub const QEMU_DIR: &str = "qemu";
/// The command that runs QEMU in the rig.
pub const QEMU_IN_RIG: &str = "/qemu/lib/ld-linux-aarch64.so.1 --library-path /qemu/lib /qemu/qemu-system-aarch64";

/// QEMU and its libraries: `(path in the rig, file on the host)`, built into the cache
/// unless up to date. Also returns QEMU's version.
pub fn qemu() -> Result<(Vec<(String, PathBuf)>, String), String> {
    let fetched = fetch(&QEMU)?;
    let version = fetched.versions.split_once('=').map_or(fetched.versions.clone(), |(_, v)| v.to_string());
    Ok((in_rig(&fetched, QEMU_DIR), version))
}

/// A fetched bundle's files under `dir` in the rig: `(path in the rig, file on the host)`,
/// the programs in `dir`, the libraries and the loader in `dir/lib`.
fn in_rig(fetched: &Fetched, dir: &str) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> =
        fetched.programs.iter().map(|p| (format!("{dir}/{}", file_name(p)), p.clone())).collect();
    files.extend(fetched.libs.iter().map(|lib| (format!("{dir}/lib/{}", file_name(lib)), lib.clone())));
    files
}

/// Builds [`hvrun_e2e::scenarios::CURL_ARCHIVE`] in the guest cache unless it is up to
/// date: Debian's arm64 `curl` and the libraries it loads as `curl/curl` and `curl/lib/`,
/// a newc archive the rig unpacks into its root for a scenario that lists it (run there
/// as [`hvrun_e2e::scenarios::CURL_IN_RIG`]). Returns the package's version.
pub fn curl() -> Result<String, String> {
    use hvrun_e2e::scenarios::{CURL_ARCHIVE, CURL_DIR};
    let fetched = fetch(&CURL)?;
    let files = in_rig(&fetched, CURL_DIR);
    let names: Vec<&str> = files.iter().map(|(at, _)| at.as_str()).collect();
    let key = format!("{} ({})", fetched.versions, names.join(" "));
    let output = crate::paths::guest_dir().join(CURL_ARCHIVE);
    if crate::guest::fresh(&output, &key) {
        println!("peers: {CURL_ARCHIVE} is up to date ({})", fetched.versions);
        return Ok(fetched.versions);
    }
    let mut a = hvrun_e2e::cpio::Archive::new();
    a.dir(CURL_DIR).dir(&format!("{CURL_DIR}/lib"));
    for (at, file) in &files {
        a.file(at, 0o755, &std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?);
    }
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut file = std::fs::File::create(&output).map_err(|e| format!("{}: {e}", output.display()))?;
    a.finish(&mut file).map_err(|e| format!("{}: {e}", output.display()))?;
    mark(&output, &key)?;
    let size = std::fs::metadata(&output).map(|m| m.len() >> 10).unwrap_or(0);
    println!("peers: built {} ({size} KiB: {}, {} libraries)", output.display(), fetched.versions, fetched.libs.len());
    Ok(fetched.versions)
}

/// A path's last component, as text.
pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `bundle` from the cache, fetched and unpacked first unless up to date (the key: the
/// candidate version of each package).
pub fn fetch(bundle: &Bundle) -> Result<Fetched, String> {
    let versions = bundle
        .packages
        .iter()
        .zip(candidate_versions(bundle.packages)?)
        .map(|(p, v)| format!("{p}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let dir = paths::cache().join("peers").join(bundle.name);
    let programs: Vec<PathBuf> = bundle.programs.iter().map(|p| dir.join(file_name(Path::new(p)))).collect();
    let stamped = programs.first().ok_or_else(|| format!("bundle {} names no program", bundle.name))?;
    let key = format!("{versions} with {} libraries", if bundle.packages.len() == 1 { "its" } else { "their" });
    if fresh(stamped, &key) && programs.iter().all(|p| p.is_file()) {
        println!("peers: {} up to date ({key})", bundle.name);
    } else {
        build(bundle, &dir, &key)?;
    }
    let mut libs = Vec::new();
    walk(&dir.join("lib"), &mut libs);
    libs.sort();
    Ok(Fetched { programs, libs, versions })
}

/// The packages `packages` need for arm64, themselves included (Depends and Pre-Depends,
/// recursively). apt prints some of them without the `:arm64` (multi-arch libraries it
/// also has natively), so every name is fetched for arm64; the ones without an arm64
/// build (architecture-independent data) are skipped when downloading.
fn closure(packages: &[&str]) -> Result<Vec<String>, String> {
    let specs: Vec<String> = packages.iter().map(|p| format!("{p}:arm64")).collect();
    let mut args = vec![
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ];
    args.extend(specs.iter().map(String::as_str));
    let out = apt_cache(&args)?;
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
    let names: Vec<&str> = packages.iter().map(String::as_str).collect();
    let candidates = arm64_candidates(&names)?;
    Ok(packages.iter().filter(|p| candidates.contains_key(p.as_str())).cloned().collect())
}

/// What an arm64 ELF file's dynamic section and program headers say.
#[derive(Debug, Default, PartialEq)]
struct Dynamic {
    /// The shared libraries it names (`DT_NEEDED`).
    needed: Vec<String>,
    /// Its program interpreter's file name.
    interpreter: Option<String>,
    /// The directories of its `DT_RUNPATH` and `DT_RPATH` (e.g. librados's
    /// `/usr/lib/aarch64-linux-gnu/ceph`), as written (`$ORIGIN` unexpanded).
    search: Vec<String>,
}

/// Reads `readelf -d -l -W`'s output.
fn dynamic(readelf: &str) -> Dynamic {
    let bracketed = |l: &str| Some(l.split('[').nth(1)?.split(']').next()?.to_string());
    Dynamic {
        needed: readelf.lines().filter(|l| l.contains("(NEEDED)")).filter_map(bracketed).collect(),
        interpreter: readelf
            .lines()
            .find_map(|l| l.split("[Requesting program interpreter: ").nth(1)?.split(']').next())
            .and_then(|p| p.rsplit('/').next())
            .map(str::to_string),
        search: readelf
            .lines()
            .filter(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
            .filter_map(bracketed)
            .flat_map(|paths| paths.split(':').map(str::to_string).collect::<Vec<_>>())
            .filter(|p| !p.is_empty())
            .collect(),
    }
}

/// [`Dynamic`] of `file`.
fn needed(file: &Path) -> Result<Dynamic, String> {
    Ok(dynamic(&sh::output(sh::cmd("aarch64-linux-gnu-readelf").args(["-d", "-l", "-W"]).arg(file))?))
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

/// Adds the run path directories `search` of `file` (inside the unpacked `tree`) to `dirs`.
fn add_search(tree: &Path, file: &Path, search: &[String], dirs: &mut Vec<PathBuf>) {
    for path in search {
        let dir = match path.strip_prefix("$ORIGIN") {
            Some(rest) => file.parent().unwrap_or(tree).join(rest.trim_start_matches('/')),
            None => tree.join(path.trim_start_matches('/')),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
}

fn build(bundle: &Bundle, dir: &Path, key: &str) -> Result<(), String> {
    let work = paths::cache().join("peers/download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let packages = with_arm64_build(&closure(bundle.packages)?)?;
    println!("peers: downloading {} arm64 packages for {}", packages.len(), bundle.packages.join(" "));
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
    // The loader's default directories, and those the files' run paths add.
    let mut lib_dirs: Vec<PathBuf> =
        ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib"].map(|d| tree.join(d)).to_vec();
    let _ = std::fs::remove_dir_all(dir);
    let lib_out = dir.join("lib");
    std::fs::create_dir_all(&lib_out).map_err(|e| format!("creating {}: {e}", lib_out.display()))?;
    let mut done = BTreeSet::new();
    for program in bundle.programs {
        let binary = resolve(&tree, tree.join(program))
            .ok_or_else(|| format!("{} have no {program}", bundle.packages.join(" ")))?;
        let top = needed(&binary)?;
        add_search(&tree, &binary, &top.search, &mut lib_dirs);
        let mut queue = top.needed;
        queue.push(top.interpreter.ok_or_else(|| format!("{program} names no program interpreter"))?);
        while let Some(name) = queue.pop() {
            if !done.insert(name.clone()) {
                continue;
            }
            let file = lib_dirs
                .iter()
                .find_map(|d| resolve(&tree, d.join(&name)))
                .ok_or_else(|| format!("{program} needs {name}, which no downloaded package has"))?;
            std::fs::copy(&file, lib_out.join(&name)).map_err(|e| format!("copying {}: {e}", file.display()))?;
            let more = needed(&file)?;
            add_search(&tree, &file, &more.search, &mut lib_dirs);
            queue.extend(more.needed);
        }
        let out = dir.join(file_name(Path::new(program)));
        std::fs::copy(&binary, &out).map_err(|e| format!("copying {}: {e}", binary.display()))?;
    }
    if let Some(first) = bundle.programs.first() {
        mark(&dir.join(file_name(Path::new(first))), key)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("peers: {} with {} libraries in {}", bundle.programs.join(" "), done.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_section_is_read() {
        let readelf = "  [Requesting program interpreter: /lib/ld-linux-aarch64.so.1]\n\
             Dynamic section at offset 0x1000 contains 3 entries:\n\
             \x20 0x0000000000000001 (NEEDED)             Shared library: [libceph-common.so.2]\n\
             \x20 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n\
             \x20 0x000000000000001d (RUNPATH)            Library runpath: [/usr/lib/aarch64-linux-gnu/ceph:$ORIGIN/x]\n";
        let d = dynamic(readelf);
        assert_eq!(d.needed, ["libceph-common.so.2", "libc.so.6"]);
        assert_eq!(d.interpreter.as_deref(), Some("ld-linux-aarch64.so.1"));
        assert_eq!(d.search, ["/usr/lib/aarch64-linux-gnu/ceph", "$ORIGIN/x"]);
        let tree = Path::new("/t");
        let mut dirs = vec![tree.join("lib")];
        add_search(tree, &tree.join("usr/lib/librados.so.2"), &d.search, &mut dirs);
        add_search(tree, &tree.join("usr/lib/librados.so.2"), &d.search, &mut dirs);
        assert_eq!(dirs, [tree.join("lib"), tree.join("usr/lib/aarch64-linux-gnu/ceph"), tree.join("usr/lib/x")]);
        assert_eq!(dynamic("static"), Dynamic::default());
    }

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
