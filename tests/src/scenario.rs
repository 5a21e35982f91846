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
}
