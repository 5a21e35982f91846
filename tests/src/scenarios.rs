//! The scenarios themselves: data, one entry each. Later work adds entries here, not
//! code in the harness.

use crate::scenario::Scenario;

/// Every scenario, in the order the rig runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "hello",
        about: "a raw guest program prints through the PL011 and powers off with PSCI",
        artifacts: &["hello.bin"],
        script: "/bin/hvrun --kernel /guest/hello.bin --memory 64M",
        exit_code: 0,
        markers: &["hello from the hvrun guest"],
        forbidden: &["hvrun: error", "panicked"],
        timeout_secs: 60,
    },
    Scenario {
        name: "unmapped",
        about: "guest accesses nobody claims read as zero, are logged with a rate limit, and the VMM keeps running",
        artifacts: &["unmapped.bin"],
        script: "/bin/hvrun --kernel /guest/unmapped.bin --memory 64M 2>/tmp/unmapped.log; rc=$?\n\
                 cat /tmp/unmapped.log\n\
                 n=$(grep -c 'no device at' /tmp/unmapped.log)\n\
                 [ \"$n\" -ge 2 ] && [ \"$n\" -le 40 ] && echo \"rate limit held: $n warnings for 3000 accesses\"\n\
                 exit $rc",
        exit_code: 0,
        markers: &[
            "unmapped accesses read as zero",
            "no device at 0xc000000 for a 8-byte access: write ignored",
            "no device at 0xc000000 for a 8-byte access: read returns 0",
            "rate limit held",
        ],
        forbidden: &["FAIL", "hvrun: error", "panicked"],
        timeout_secs: 60,
    },
    Scenario {
        name: "missing-kernel",
        about: "a kernel path that does not exist gets one clear error line and a non-zero exit",
        artifacts: &[],
        script: "/bin/hvrun --kernel /guest/missing-file 2>&1; echo \"exit=$?\"",
        exit_code: 0,
        markers: &["hvrun: error: cannot read kernel /guest/missing-file: No such file or directory", "exit=1"],
        forbidden: &["panicked"],
        timeout_secs: 30,
    },
];

/// The scenarios named in `names`, or all of them when `names` is empty. Unknown names
/// are an error that lists the known ones.
pub fn select(names: &[String]) -> Result<Vec<Scenario>, String> {
    if names.is_empty() {
        return Ok(ALL.to_vec());
    }
    names
        .iter()
        .map(|name| {
            ALL.iter().find(|s| s.name == name).cloned().ok_or_else(|| {
                let known: Vec<_> = ALL.iter().map(|s| s.name).collect();
                format!("no scenario named `{name}`; known: {}", known.join(", "))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shell_safe() {
        let mut names: Vec<_> = ALL.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for s in ALL {
            assert!(s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{}", s.name);
            assert!(!s.markers.is_empty(), "{} checks nothing", s.name);
        }
    }

    #[test]
    fn selection() {
        assert_eq!(select(&[]).unwrap().len(), ALL.len());
        assert_eq!(select(&["hello".into()]).unwrap()[0].name, "hello");
        let err = select(&["nope".into()]).unwrap_err();
        assert!(err.contains("no scenario named `nope`") && err.contains("hello"), "{err}");
    }
}
