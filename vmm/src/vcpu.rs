//! The vCPU loop: run the guest, serve its exits, stop when it asks.
//!
//! Generic over [`hypervisor::Vcpu`], so the same loop serves every backend and is
//! tested here against a scripted fake vCPU.

use devices::bus::MmioBus;
use devices::warn_ratelimited;
use hypervisor::{SystemEvent, Vcpu, VcpuExit};

use crate::{Error, ExitReason};

/// Runs `vcpu` until the guest powers off, resets or crashes, or the backend fails.
///
/// MMIO exits go to `bus`. An access no device claims reads as zero and its write is
/// dropped, with a rate-limited warning: a guest poking at random addresses must not
/// stop the VMM.
pub fn run_loop<V: Vcpu>(index: u32, vcpu: &mut V, bus: &MmioBus) -> Result<ExitReason, Error> {
    loop {
        match vcpu.run()? {
            VcpuExit::MmioRead { addr, data } => {
                if let Err(e) = bus.read(index as usize, addr, data) {
                    data.fill(0);
                    warn_ratelimited!("vcpu{index}: {e}: read returns 0");
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                if let Err(e) = bus.write(index as usize, addr, data) {
                    warn_ratelimited!("vcpu{index}: {e}: write ignored");
                }
            }
            VcpuExit::System(SystemEvent::Shutdown) => return Ok(ExitReason::PowerOff),
            VcpuExit::System(SystemEvent::Reset) => return Ok(ExitReason::Reset),
            VcpuExit::System(SystemEvent::Crash) => return Ok(ExitReason::Crash),
            VcpuExit::Interrupted => {}
            VcpuExit::Unhandled(why) => return Err(Error::UnhandledExit { vcpu: index, why }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::MmioDeviceMut;
    use hypervisor::Reg;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// One scripted exit.
    #[derive(Debug, Clone)]
    enum Step {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        System(SystemEvent),
        Interrupted,
        Unhandled,
    }

    /// A vCPU that replays a script and records what the loop gave back for reads.
    #[derive(Default)]
    struct Scripted {
        steps: VecDeque<Step>,
        buf: [u8; 8],
        reads: Vec<Vec<u8>>,
        pending_read: Option<usize>,
    }

    impl Vcpu for Scripted {
        fn run(&mut self) -> hypervisor::Result<VcpuExit<'_>> {
            // Completing the previous read, as a backend does on re-entry.
            if let Some(len) = self.pending_read.take() {
                self.reads.push(self.buf[..len].to_vec());
            }
            let step = self.steps.pop_front().expect("the loop ran past the end of the script");
            Ok(match step {
                Step::Read(addr, len) => {
                    self.buf = [0xee; 8];
                    self.pending_read = Some(len);
                    VcpuExit::MmioRead { addr, data: &mut self.buf[..len] }
                }
                Step::Write(addr, data) => {
                    self.buf[..data.len()].copy_from_slice(&data);
                    VcpuExit::MmioWrite { addr, data: &self.buf[..data.len()] }
                }
                Step::System(event) => VcpuExit::System(event),
                Step::Interrupted => VcpuExit::Interrupted,
                Step::Unhandled => VcpuExit::Unhandled("KVM_EXIT_FAIL_ENTRY".into()),
            })
        }
        fn set_reg(&mut self, _: Reg, _: u64) -> hypervisor::Result<()> {
            Ok(())
        }
        fn get_reg(&mut self, _: Reg) -> hypervisor::Result<u64> {
            Ok(0)
        }
    }

    #[derive(Default)]
    struct Register {
        value: u8,
    }
    impl MmioDeviceMut for Register {
        fn read(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn write(&mut self, _: usize, _: u64, data: &[u8]) {
            self.value = data[0];
        }
    }

    fn bus() -> MmioBus {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Register::default()))).unwrap();
        bus
    }

    fn run(steps: Vec<Step>) -> (Result<ExitReason, Error>, Vec<Vec<u8>>) {
        let mut vcpu = Scripted { steps: steps.into(), ..Default::default() };
        let result = run_loop(0, &mut vcpu, &bus());
        (result, vcpu.reads)
    }

    #[test]
    fn device_accesses_and_power_off() {
        let (result, reads) = run(vec![
            Step::Write(0x1000, vec![0x42]),
            Step::Read(0x1004, 4),
            Step::Interrupted,
            Step::System(SystemEvent::Shutdown),
        ]);
        assert_eq!(result.unwrap(), ExitReason::PowerOff);
        assert_eq!(reads, vec![vec![0x42; 4]]);
    }

    #[test]
    fn unclaimed_accesses_read_zero_and_keep_running() {
        let (result, reads) = run(vec![
            Step::Write(0xdead_0000, vec![1, 2, 3, 4]),
            Step::Read(0xdead_0000, 8),
            // Straddling the end of a device is not the device's business either.
            Step::Read(0x10fe, 4),
            Step::System(SystemEvent::Reset),
        ]);
        assert_eq!(result.unwrap(), ExitReason::Reset);
        assert_eq!(reads, vec![vec![0; 8], vec![0; 4]]);
    }

    #[test]
    fn crash_and_unhandled_exits_end_the_loop_without_panicking() {
        assert_eq!(run(vec![Step::System(SystemEvent::Crash)]).0.unwrap(), ExitReason::Crash);
        let err = run(vec![Step::Unhandled]).0.unwrap_err();
        assert!(err.to_string().contains("KVM_EXIT_FAIL_ENTRY"), "{err}");
    }
}
