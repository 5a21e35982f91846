//! What a scenario is: guest artifacts, a command line run in the rig, and what its
//! console output must (and must not) show.

/// One end-to-end scenario, run inside the rig's outer Linux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Unique name, used on the command line (`cargo xtask e2e NAME`) and in markers.
    pub name: &'static str,
    /// One line saying what it proves.
    pub about: &'static str,
    /// Guest artifacts (file names in the guest cache) the rig must carry, available
    /// in the rig under `/guest/NAME`.
    pub artifacts: &'static [&'static str],
    /// The shell script run in the rig (`/bin/hvrun` is the cross-built VMM).
    pub script: &'static str,
    /// The exit status the script must end with.
    pub exit_code: i32,
    /// Lines or fragments that must appear in the scenario's console output, in order.
    pub markers: &'static [&'static str],
    /// Fragments that must not appear.
    pub forbidden: &'static [&'static str],
    /// Seconds the script may take in the rig before it is killed.
    pub timeout_secs: u32,
    /// Data passed through the exchange disk and checked on the host afterwards.
    pub exchange: Option<crate::exchange::Exchange>,
    /// The rig's own interrupt controller, which decides what KVM offers: with a GICv3
    /// (`gic-version=3`) KVM has a vGICv3 that hvrun can use; with a GICv2 it has none
    /// hvrun uses, so hvrun emulates its own. The rig boots once per kind.
    pub outer_gic: OuterGic,
}

/// The rig's interrupt controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OuterGic {
    /// A GICv2: hvrun's `--gic auto` picks its emulated GICv2.
    V2,
    /// A GICv3: KVM offers its vGICv3 and `--gic auto` picks it.
    V3,
}

impl OuterGic {
    /// QEMU's `gic-version` value.
    pub fn version(self) -> u8 {
        match self {
            OuterGic::V2 => 2,
            OuterGic::V3 => 3,
        }
    }

    /// The console log of a rig boot of this kind, in the rig's work directory.
    pub fn console_log(self) -> &'static str {
        match self {
            OuterGic::V2 => "console.log",
            OuterGic::V3 => "console-gicv3.log",
        }
    }
}
