//! The arm64 KVM rig: QEMU emulates an arm64 machine with EL2, Debian's arm64 kernel
//! boots in it with KVM, and an init script runs the scenarios with the cross-built
//! `hvrun`, printing markers on the console that [`crate::report`] reads.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cpio::Archive;
use crate::report::{self, Line, Outcome};
use crate::scenario::{OuterGic, Scenario};

/// Errors setting up or running the rig.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// A file the rig needs is missing or unreadable.
    #[error("{what} {path}: {source} (run `cargo xtask guest` and `cargo xtask cross`)")]
    Input {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// Writing the rig's work files failed.
    #[error("writing {path}: {source}")]
    Output {
        /// The path being written.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("starting {program}: {source} (run `cargo xtask setup`)")]
    Qemu {
        /// The QEMU binary.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Where the rig's inputs are and how to run it.
#[derive(Debug, Clone)]
pub struct Rig {
    /// The QEMU system emulator.
    pub qemu: String,
    /// The outer machine's kernel (Debian's arm64 `vmlinuz`, an uncompressed Image).
    pub kernel: PathBuf,
    /// A static arm64 busybox for the outer init.
    pub busybox: PathBuf,
    /// The cross-built static `hvrun`.
    pub hvrun: PathBuf,
    /// Other cross-built programs the scenarios use, put in `/bin` (e.g. `net-forwarder`).
    pub tools: Vec<PathBuf>,
    /// The names of [`Rig::tools`] that guests need too: each is also packed alone as
    /// `/guest/NAME.cpio` (`bin/NAME`, executable; see [`guest_tool_archive`]), for a
    /// scenario to append to a guest's initramfs, since the Linux kernel unpacks
    /// concatenated newc archives (`cat /guest/initramfs.cpio /guest/NAME.cpio`). The guest
    /// initramfs itself is built before the tools are cross-built.
    pub guest_tools: Vec<String>,
    /// Other files, each at the path given inside the rig (e.g. a peer VMM and its
    /// libraries under `qemu/`, for `cargo xtask compare`), executable.
    pub files: Vec<(String, PathBuf)>,
    /// The directory holding guest artifacts.
    pub guest_dir: PathBuf,
    /// Where the initramfs and console log are written.
    pub work_dir: PathBuf,
    /// Echo the console while it runs.
    pub verbose: bool,
}

/// Seconds the outer machine gets to boot and shut down, on top of the scenarios' own.
const BOOT_ALLOWANCE_SECS: u64 = 180;

/// The rig's `/init`: mount what Linux needs, then run each scenario script with a
/// timeout between markers.
pub fn init_script(scenarios: &[Scenario]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mkdir -p /proc /sys /dev /tmp\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         echo \"E2E-RIG-UP kvm=$([ -c /dev/kvm ] && echo yes || echo no) uptime=$(cut -d' ' -f1 /proc/uptime)\"\n",
    );
    for (slot, sc) in scenarios.iter().enumerate() {
        let _ = write!(
            s,
            "export E2E_SLOT_MB={slot_mb}\n\
             echo 'E2E-BEGIN {name}'\n\
             start=$(cut -d' ' -f1 /proc/uptime)\n\
             timeout {t} sh /e2e/{name}.sh </dev/null\n\
             rc=$?\n\
             echo \"E2E-END {name} rc=$rc start=$start end=$(cut -d' ' -f1 /proc/uptime)\"\n",
            name = sc.name,
            t = sc.timeout_secs,
            slot_mb = slot as u64 * crate::exchange::SLOT_MB,
        );
    }
    s.push_str("echo E2E-DONE\nsync\npoweroff -f\n");
    s
}

/// A newc archive holding only `bin/NAME` (the directory, then `program`, executable): what
/// a guest initramfs gains when the archive is appended to it.
pub fn guest_tool_archive(name: &str, program: &[u8]) -> Vec<u8> {
    let mut a = Archive::new();
    a.dir("bin").file(&format!("bin/{name}"), 0o755, program);
    let mut out = Vec::new();
    a.finish(&mut out).expect("writing to memory");
    out
}

/// One of [`crate::scenarios::RIG_ARCHIVES`], checked to be a newc archive, padded to a
/// multiple of 4 bytes: the kernel unpacks an archive that follows another only from a
/// 4-byte boundary.
fn rig_archive(name: &str, dir: &Path, mut data: Vec<u8>) -> Result<Vec<u8>, RigError> {
    if !data.starts_with(b"070701") {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidData, "not a newc (070701) archive");
        return Err(RigError::Input { what: "rig archive", path: dir.join(name), source });
    }
    data.resize(data.len().next_multiple_of(4), 0);
    Ok(data)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, RigError> {
    std::fs::read(path).map_err(|source| RigError::Input { what, path: path.to_path_buf(), source })
}

/// The rig's machine: everything on QEMU's command line but the kernel, the initramfs,
/// its command line and the exchange disk. `cargo xtask setup` starts exactly this to
/// prove that the installed QEMU can run it.
pub fn machine_args(gic: OuterGic) -> Vec<String> {
    let mut args = vec![
        "-M".to_string(),
        format!("virt,virtualization=on,gic-version={}", gic.version()),
        "-cpu".to_string(),
        std::env::var("HVRUN_RIG_CPU").unwrap_or_else(|_| "max,pauth-impdef=on".into()),
    ];
    args.extend(["-smp", "2", "-m", "2048", "-nographic", "-no-reboot"].map(String::from));
    // No default NIC: the rig needs none, and its option ROM (efi-virtio.rom) comes from
    // a package that a `--no-install-recommends` setup leaves out.
    args.extend(["-nic", "none"].map(String::from));
    args.extend(std::env::var("HVRUN_RIG_QEMU_ARGS").unwrap_or_default().split_whitespace().map(String::from));
    args
}

impl Rig {
    /// Writes the outer initramfs for `scenarios` and returns its path.
    pub fn build_initramfs(&self, scenarios: &[Scenario]) -> Result<PathBuf, RigError> {
        self.initramfs_with(scenarios, &init_script(scenarios))
    }

    /// Boots the rig on this terminal with `scenario`'s script as the only thing its init
    /// runs, on the console with a controlling terminal: an interactive session (QEMU's
    /// Ctrl-A X ends it). Returns QEMU's exit status.
    pub fn interactive(&self, scenario: &Scenario) -> Result<std::process::ExitStatus, RigError> {
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             export PATH=/bin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n\
             mount -t tmpfs tmpfs /tmp\n\
             setsid cttyhack sh /e2e/{}.sh\n\
             poweroff -f\n",
            scenario.name
        );
        let initramfs = self.initramfs_with(std::slice::from_ref(scenario), &init)?;
        Command::new(&self.qemu)
            .args(machine_args(scenario.outer_gic))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyAMA0 quiet panic=-1"])
            .status()
            .map_err(|source| RigError::Qemu { program: self.qemu.clone(), source })
    }

    fn initramfs_with(&self, scenarios: &[Scenario], init: &str) -> Result<PathBuf, RigError> {
        let mut a = Archive::new();
        for dir in ["bin", "dev", "proc", "sys", "tmp", "e2e", "guest"] {
            a.dir(dir);
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        a.char_dev("dev/console", 5, 1);
        a.file("bin/busybox", 0o755, &read("busybox", &self.busybox)?);
        a.symlink("bin/sh", "busybox");
        a.file("init", 0o755, init.as_bytes());
        a.file("bin/hvrun", 0o755, &read("hvrun binary", &self.hvrun)?);
        for tool in &self.tools {
            let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let program = read("tool", tool)?;
            if self.guest_tools.contains(&name) {
                a.file(&format!("guest/{name}.cpio"), 0o644, &guest_tool_archive(&name, &program));
            }
            a.file(&format!("bin/{name}"), 0o755, &program);
        }
        for name in &self.guest_tools {
            if !self.tools.iter().any(|t| t.file_name().is_some_and(|n| n.to_string_lossy() == name.as_str())) {
                let path = PathBuf::from(name);
                let source =
                    std::io::Error::new(std::io::ErrorKind::NotFound, "a guest tool that is not among the tools");
                return Err(RigError::Input { what: "guest tool", path, source });
            }
        }
        let mut dirs: Vec<&Path> = self.files.iter().flat_map(|(at, _)| Path::new(at).ancestors().skip(1)).collect();
        dirs.retain(|d| !d.as_os_str().is_empty());
        dirs.sort_unstable();
        dirs.dedup();
        for dir in dirs {
            a.dir(&dir.to_string_lossy());
        }
        for (at, file) in &self.files {
            a.file(at, 0o755, &read("file", file)?);
        }
        let mut artifacts: Vec<&str> = scenarios.iter().flat_map(|s| s.artifacts.iter().copied()).collect();
        artifacts.sort_unstable();
        artifacts.dedup();
        // Archives of programs the rig runs follow its own archive, and the kernel unpacks
        // them into the root.
        let mut appended = Vec::new();
        for name in artifacts {
            let data = read("guest artifact", &self.guest_dir.join(name))?;
            if crate::scenarios::RIG_ARCHIVES.contains(&name) {
                appended.push(rig_archive(name, &self.guest_dir, data)?);
            } else {
                a.file(&format!("guest/{name}"), 0o644, &data);
            }
        }
        for sc in scenarios {
            a.file(&format!("e2e/{}.sh", sc.name), 0o755, format!("{}\n", sc.script).as_bytes());
        }
        let path = self.work_dir.join("initramfs.cpio");
        let out = |source| RigError::Output { path: path.clone(), source };
        std::fs::create_dir_all(&self.work_dir).map_err(out)?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(out)?);
        a.finish(&mut file).map_err(out)?;
        for archive in &appended {
            file.write_all(archive).map_err(out)?;
        }
        file.flush().map_err(out)?;
        Ok(path)
    }

    /// Boots the rig with `scenarios` and checks each one: one boot per kind of rig
    /// ([`OuterGic`]) the scenarios need, outcomes in the order given. Each boot's
    /// console log is kept in the work directory ([`OuterGic::console_log`]).
    pub fn run(&self, scenarios: &[Scenario]) -> Result<Vec<Outcome>, RigError> {
        let mut outcomes = Vec::new();
        for gic in [OuterGic::V2, OuterGic::V3] {
            let group: Vec<Scenario> = scenarios.iter().filter(|s| s.outer_gic == gic).cloned().collect();
            if !group.is_empty() {
                outcomes.extend(self.run_group(&group, gic)?);
            }
        }
        outcomes.sort_by_key(|o| scenarios.iter().position(|s| s.name == o.name));
        Ok(outcomes)
    }

    fn run_group(&self, scenarios: &[Scenario], gic: OuterGic) -> Result<Vec<Outcome>, RigError> {
        let initramfs = self.build_initramfs(scenarios)?;
        let exchange = self.prepare_exchange(scenarios)?;
        let budget =
            Duration::from_secs(BOOT_ALLOWANCE_SECS + scenarios.iter().map(|s| u64::from(s.timeout_secs)).sum::<u64>());
        let lines = self.boot(&initramfs, exchange.as_deref(), gic, budget)?;
        let mut outcomes: Vec<Outcome> = scenarios.iter().map(|s| report::check(s, &lines)).collect();
        if let Some(disk) = &exchange {
            for (slot, (sc, outcome)) in scenarios.iter().zip(&mut outcomes).enumerate() {
                if let Some(x) = sc.exchange {
                    self.host_check(disk, slot as u64, sc.name, x, outcome);
                }
            }
        }
        Ok(outcomes)
    }

    /// Writes the scenarios' exchange inputs into a fresh exchange disk; `None` when no
    /// scenario uses one.
    fn prepare_exchange(&self, scenarios: &[Scenario]) -> Result<Option<PathBuf>, RigError> {
        let inputs: Vec<(u64, PathBuf)> = (0u64..)
            .zip(scenarios)
            .filter_map(|(slot, sc)| sc.exchange.map(|x| (slot, self.guest_dir.join(x.input))))
            .collect();
        if inputs.is_empty() {
            return Ok(None);
        }
        let disk = self.work_dir.join("exchange.img");
        let refs: Vec<(u64, &Path)> = inputs.iter().map(|(slot, p)| (*slot, p.as_path())).collect();
        crate::exchange::prepare(&disk, scenarios.len() as u64, &refs)
            .map_err(|source| RigError::Output { path: disk.clone(), source })?;
        Ok(Some(disk))
    }

    /// Runs a scenario's host check on its slot; its lines join the output, its failure
    /// the failures.
    fn host_check(&self, disk: &Path, slot: u64, name: &str, x: crate::exchange::Exchange, outcome: &mut Outcome) {
        let image = self.work_dir.join(format!("{name}.img"));
        let len = x
            .output_len
            .unwrap_or_else(|| std::fs::metadata(self.guest_dir.join(x.input)).map(|m| m.len()).unwrap_or(0));
        let checked = crate::exchange::extract(disk, slot, len, &image)
            .map_err(|e| format!("reading slot {slot} of {}: {e}", disk.display()))
            .and_then(|()| (x.check)(&image, &outcome.output));
        match checked {
            Ok(lines) => outcome.output.extend(lines.into_iter().map(|l| format!("host check: {l}"))),
            Err(e) => outcome.failures.push(format!("host check: {e}")),
        }
    }

    fn boot(
        &self,
        initramfs: &Path,
        exchange: Option<&Path>,
        gic: OuterGic,
        budget: Duration,
    ) -> Result<Vec<Line>, RigError> {
        let log_path = self.work_dir.join(gic.console_log());
        let out = |source| RigError::Output { path: log_path.clone(), source };
        let mut log = std::fs::File::create(&log_path).map_err(out)?;
        let mut qemu = Command::new(&self.qemu);
        if let Some(disk) = exchange {
            let mut drive = std::ffi::OsString::from("file=");
            drive.push(disk);
            drive.push(",if=none,format=raw,id=exchange");
            qemu.arg("-drive").arg(drive).args(["-device", "virtio-blk-device,drive=exchange"]);
        }
        let mut child = qemu
            .args(machine_args(gic))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyAMA0 quiet panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RigError::Qemu { program: self.qemu.clone(), source })?;

        let started = Instant::now();
        let (tx, rx) = mpsc::channel::<Line>();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let readers = [stdout.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), stderr.map(|s| Box::new(s) as _)]
            .into_iter()
            .flatten()
            .map(|stream| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for text in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                        let text = String::from_utf8_lossy(&text).trim_end_matches('\r').to_string();
                        if tx.send(Line { at: started.elapsed(), text }).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect::<Vec<_>>();
        drop(tx);

        let mut lines = Vec::new();
        let deadline = started + budget;
        loop {
            let now = Instant::now();
            if now >= deadline {
                eprintln!("rig: no end after {} s, killing QEMU", budget.as_secs());
                let _ = child.kill();
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(line) => {
                    if self.verbose {
                        println!("{}", line.text);
                    }
                    writeln!(log, "[{:8.3}] {}", line.at.as_secs_f64(), line.text).map_err(out)?;
                    lines.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.wait();
        for reader in readers {
            let _ = reader.join();
        }
        lines.extend(rx.try_iter());
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::ALL;

    #[test]
    fn init_runs_every_scenario_between_markers() {
        let script = init_script(ALL);
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        for sc in ALL {
            let begin = script.find(&format!("echo 'E2E-BEGIN {}'", sc.name)).unwrap();
            let run = script.find(&format!("timeout {} sh /e2e/{}.sh", sc.timeout_secs, sc.name)).unwrap();
            let end = script.find(&format!("E2E-END {} rc=$rc", sc.name)).unwrap();
            assert!(begin < run && run < end);
        }
        assert!(script.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn a_rig_archive_is_padded_and_must_be_newc() {
        let dir = Path::new("/cache");
        let padded = rig_archive("curl.cpio", dir, b"070701abc".to_vec()).unwrap();
        assert_eq!(padded, b"070701abc\0\0\0");
        assert_eq!(rig_archive("curl.cpio", dir, b"07070112".to_vec()).unwrap().len(), 8);
        let err = rig_archive("curl.cpio", dir, b"\x1f\x8b gzip".to_vec()).unwrap_err();
        assert!(err.to_string().contains("/cache/curl.cpio"), "{err}");
    }

    /// A guest tool's archive is whole newc entries, 4-byte aligned like every archive
    /// the writer makes, so it can follow another one (the kernel skips the padding
    /// between archives, and only that).
    #[test]
    fn a_guest_tools_archive_can_be_appended() {
        let program = b"\x7fELF and the rest";
        let archive = guest_tool_archive("vsock-peer", program);
        assert_eq!(archive.len() % 4, 0);
        assert!(archive.starts_with(b"070701"));
        let at = archive.windows(15).position(|w| w == b"bin/vsock-peer\0").unwrap();
        let header = std::str::from_utf8(&archive[at - 110..at]).unwrap();
        // c_mode: a regular file, rwxr-xr-x; c_filesize: the program's.
        assert_eq!(&header[6 + 8..6 + 2 * 8], "000081ed");
        assert_eq!(u32::from_str_radix(&header[6 + 6 * 8..6 + 7 * 8], 16).unwrap() as usize, program.len());
        assert!(archive.windows(program.len()).any(|w| w == program));
        assert!(archive.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
