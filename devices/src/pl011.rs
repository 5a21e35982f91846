//! An Arm PrimeCell PL011 UART (ARM DDI 0183).
//!
//! Transmitted bytes go to an [`Output`], whose own thread writes them to the host: the
//! transmit FIFO is always empty, and a vCPU never waits for the host's terminal (when
//! the host stops taking output, it is dropped, counted and reported).
//! Received bytes are queued in a FIFO of the architected depth (32 entries with
//! `LCR_H.FEN`, 1 without) by whoever feeds host input in ([`Pl011::enqueue_input`]
//! accepts only what fits, so the feeder holds the rest and never blocks the guest).
//! Input is held until the guest is listening: receiver enabled and a receive interrupt
//! unmasked. Linux's driver drains the FIFO just before it unmasks them, which would
//! otherwise eat whatever the host typed (or piped) during boot.
//! Interrupts follow QEMU's model, which Linux's `amba-pl011` driver is known to work
//! with: TX is raised by every write to DR and cleared through ICR; RX and receive
//! timeout follow the FIFO level. The device drives its [`IrqLine`] with `MIS != 0`.
//!
//! Linux reads this device as `ttyAMA0` and as `earlycon=pl011`; the AMBA bus probes it
//! through the PrimeCell ID registers at the end of its 4 KiB window.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::{read_le, write_le, MmioDeviceMut};
use crate::irq::IrqLine;
use crate::output::Output;

const DR: u64 = 0x000;
const RSR_ECR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
const ID_BASE: u64 = 0xfe0;

/// PeriphID0..3 then PCellID0..3, as QEMU's PL011 reports them (r1p5).
const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

const LCR_H_FEN: u32 = 1 << 4;
/// CR.UARTEN and CR.RXE.
const CR_UARTEN_RXE: u32 = 1 | (1 << 9);

/// Receive interrupt.
pub const INT_RX: u32 = 1 << 4;
/// Transmit interrupt.
pub const INT_TX: u32 = 1 << 5;
/// Receive-timeout interrupt.
pub const INT_RT: u32 = 1 << 6;
/// All eleven interrupt bits (modem, RX, TX, RT, error).
const INT_ALL: u32 = 0x7ff;

/// Depth of the receive FIFO when FIFOs are enabled.
pub const FIFO_DEPTH: usize = 32;

/// How much transmitted output waits for the host before bytes are dropped.
pub const OUTPUT_BUFFER: usize = 64 * 1024;

/// A PL011 UART.
pub struct Pl011 {
    out: Output,
    irq: Arc<dyn IrqLine>,
    irq_level: bool,
    rx: VecDeque<u8>,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    /// Latched raw interrupt bits (TX, modem, errors); RX and RT are derived from the FIFO.
    latched: u32,
    dmacr: u32,
    /// What the UART has carried so far, for metrics.
    stats: UartStats,
}

/// What a UART has carried so far (counters for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UartStats {
    /// Bytes the guest transmitted.
    pub tx_bytes: u64,
    /// Of those, bytes dropped because the host did not take them.
    pub tx_dropped: u64,
    /// Bytes of host input the guest read.
    pub rx_bytes: u64,
}

impl std::fmt::Debug for Pl011 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl011").field("rx", &self.rx.len()).field("ris", &self.ris()).finish_non_exhaustive()
    }
}

impl Pl011 {
    /// A UART writing guest output to `out` and raising `irq`.
    pub fn new(out: Output, irq: Arc<dyn IrqLine>) -> Self {
        Pl011 {
            out,
            irq,
            irq_level: false,
            rx: VecDeque::with_capacity(FIFO_DEPTH),
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: 0x300,
            ifls: 0x12,
            imsc: 0,
            latched: 0,
            dmacr: 0,
            stats: UartStats::default(),
        }
    }

    /// What the UART has carried so far.
    pub fn stats(&self) -> UartStats {
        self.stats
    }

    fn fifo_capacity(&self) -> usize {
        if self.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// The FIFO level at which RX is raised, from IFLS.RXIFLSEL (1/8 .. 7/8 full).
    fn rx_trigger(&self) -> usize {
        if self.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        match (self.ifls >> 3) & 7 {
            0 => 4,
            1 => 8,
            2 => 16,
            3 => 24,
            _ => 28,
        }
    }

    fn ris(&self) -> u32 {
        let mut ris = self.latched;
        if self.rx.len() >= self.rx_trigger() {
            ris |= INT_RX;
        }
        if !self.rx.is_empty() {
            ris |= INT_RT;
        }
        ris
    }

    fn update_irq(&mut self) {
        let level = self.ris() & self.imsc != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Whether the guest is ready for input: UART and receiver enabled, and a receive
    /// interrupt unmasked.
    fn listening(&self) -> bool {
        self.cr & CR_UARTEN_RXE == CR_UARTEN_RXE && self.imsc & (INT_RX | INT_RT) != 0
    }

    /// Queues host input for the guest. Returns how many bytes of `input` fit in the
    /// receive FIFO (none while the guest is not listening); the caller keeps the rest
    /// and offers them again later.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if !self.listening() {
            return 0;
        }
        let room = self.fifo_capacity().saturating_sub(self.rx.len());
        let n = room.min(input.len());
        self.rx.extend(&input[..n]);
        if n > 0 {
            self.update_irq();
        }
        n
    }

    fn transmit(&mut self, byte: u8) {
        self.stats.tx_bytes += 1;
        if self.out.write(&[byte]) == 0 {
            self.stats.tx_dropped += 1;
        }
        self.latched |= INT_TX;
    }

    /// Waits until the output written so far has reached the host, at most `timeout`.
    pub fn flush_output(&self, timeout: std::time::Duration) -> bool {
        self.out.flush(timeout)
    }

    fn read_reg(&mut self, reg: u64) -> u32 {
        match reg {
            DR => {
                self.stats.rx_bytes += u64::from(!self.rx.is_empty());
                let byte = self.rx.pop_front().unwrap_or(0);
                self.update_irq();
                u32::from(byte)
            }
            RSR_ECR => 0,
            FR => {
                let mut fr = FR_TXFE;
                if self.rx.is_empty() {
                    fr |= FR_RXFE;
                }
                if self.rx.len() >= self.fifo_capacity() {
                    fr |= FR_RXFF;
                }
                fr & !FR_TXFF
            }
            ILPR => self.ilpr,
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.ris(),
            MIS => self.ris() & self.imsc,
            DMACR => self.dmacr,
            id if (ID_BASE..ID_BASE + 0x20).contains(&id) => u32::from(ID_BYTES[((id - ID_BASE) / 4) as usize]),
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, value: u32) {
        match reg {
            DR => self.transmit(value as u8),
            RSR_ECR => {}
            ILPR => self.ilpr = value & 0xff,
            IBRD => self.ibrd = value & 0xffff,
            FBRD => self.fbrd = value & 0x3f,
            LCR_H => {
                self.lcr_h = value & 0xff;
                // Shrinking the FIFO to one entry keeps only what a one-entry FIFO holds.
                let capacity = self.fifo_capacity();
                self.rx.truncate(capacity);
            }
            CR => self.cr = value & 0xff87,
            IFLS => self.ifls = value & 0x3f,
            IMSC => self.imsc = value & INT_ALL,
            ICR => self.latched &= !value,
            DMACR => self.dmacr = value & 7,
            _ => devices_warn!("pl011: write of {value:#x} to read-only or unknown offset {reg:#x} ignored"),
        }
        self.update_irq();
    }
}

/// Rate-limited warning for guest-triggered oddities in this module.
macro_rules! devices_warn {
    ($($arg:tt)+) => { $crate::warn_ratelimited!($($arg)+) };
}
use devices_warn;

/// A PL011's state for snapshots: its registers and the receive FIFO (the transmit side
/// is always empty).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPl011 {
    /// Bytes received and not yet read by the guest, oldest first.
    pub rx: Vec<u8>,
    /// ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, DMACR, as the guest wrote them.
    pub regs: [u32; 8],
    /// The latched raw interrupt bits (TX, modem, errors).
    pub latched: u32,
}

impl Pl011 {
    /// The UART's state.
    pub fn save(&self) -> SavedPl011 {
        SavedPl011 {
            rx: self.rx.iter().copied().collect(),
            regs: [self.ilpr, self.ibrd, self.fbrd, self.lcr_h, self.cr, self.ifls, self.imsc, self.dmacr],
            latched: self.latched,
        }
    }

    /// Takes `saved` as the UART's state and drives the interrupt line to match. A FIFO
    /// deeper than the device's, or interrupt bits it does not have, are refused and
    /// nothing changes.
    pub fn restore(&mut self, saved: &SavedPl011) -> Result<(), String> {
        let [ilpr, ibrd, fbrd, lcr_h, cr, ifls, imsc, dmacr] = saved.regs;
        let fifo = if lcr_h & LCR_H_FEN != 0 { FIFO_DEPTH } else { 1 };
        if saved.rx.len() > fifo {
            return Err(format!("{} bytes in a receive FIFO of {fifo}", saved.rx.len()));
        }
        if (saved.latched | imsc) & !INT_ALL != 0 {
            return Err(format!("interrupt bits {:#x} / mask {imsc:#x} outside {INT_ALL:#x}", saved.latched));
        }
        self.rx = saved.rx.iter().copied().collect();
        (self.ilpr, self.ibrd, self.fbrd, self.lcr_h, self.cr, self.ifls, self.imsc, self.dmacr) =
            (ilpr, ibrd, fbrd, lcr_h, cr, ifls, imsc, dmacr);
        self.latched = saved.latched;
        // The line's level as this device last drove it is unknown to the new one: set it.
        self.irq_level = self.ris() & self.imsc != 0;
        self.irq.set_level(self.irq_level);
        Ok(())
    }
}

impl MmioDeviceMut for Pl011 {
    fn read(&mut self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        // Registers are 32 bits wide; byte and halfword reads see the matching lanes.
        let shift = (offset & 3) * 8;
        let value = if data.len() as u64 + (offset & 3) <= 4 { self.read_reg(offset & !3) >> shift } else { 0 };
        write_le(data, u64::from(value));
    }

    fn write(&mut self, _vcpu: usize, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.len() > 4 {
            devices_warn!("pl011: unaligned or oversized write at {offset:#x} ({} bytes) ignored", data.len());
            return;
        }
        self.write_reg(offset, read_le(data) as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Line, Sink};

    fn output(writer: impl std::io::Write + Send + 'static) -> Output {
        Output::new("test-serial", Box::new(writer), OUTPUT_BUFFER)
    }

    fn uart() -> (Pl011, Sink, Arc<Line>) {
        let sink = Sink::default();
        let line = Arc::new(Line::default());
        (Pl011::new(output(sink.clone()), line.clone()), sink, line)
    }

    fn r32(u: &mut Pl011, offset: u64) -> u32 {
        let mut buf = [0; 4];
        u.read(0, offset, &mut buf);
        u32::from_le_bytes(buf)
    }

    fn w32(u: &mut Pl011, offset: u64, value: u32) {
        u.write(0, offset, &value.to_le_bytes());
    }

    #[test]
    fn primecell_ids() {
        let (mut u, _, _) = uart();
        let ids: Vec<u32> = (0..8).map(|i| r32(&mut u, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn transmit_reaches_the_sink_with_byte_and_word_writes() {
        let (mut u, sink, _) = uart();
        u.write(0, DR, b"h");
        w32(&mut u, DR, u32::from(b'i'));
        assert!(u.flush_output(std::time::Duration::from_secs(10)));
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(r32(&mut u, FR) & (FR_TXFE | FR_TXFF | FR_RXFE), FR_TXFE | FR_RXFE);
    }

    #[test]
    fn tx_interrupt_is_masked_latched_and_cleared() {
        let (mut u, _, line) = uart();
        u.write(0, DR, b"x");
        assert_eq!(r32(&mut u, RIS) & INT_TX, INT_TX);
        assert!(!line.high(), "masked by IMSC");
        w32(&mut u, IMSC, INT_TX);
        assert!(line.high());
        assert_eq!(r32(&mut u, MIS), INT_TX);
        w32(&mut u, ICR, INT_TX);
        assert!(!line.high());
        assert_eq!(r32(&mut u, RIS), 0);
    }

    #[test]
    fn input_waits_until_the_guest_listens() {
        let (mut u, _, _) = uart();
        assert_eq!(u.enqueue_input(b"early"), 0, "reset: UART disabled, nothing unmasked");
        w32(&mut u, CR, 0x301);
        assert_eq!(u.enqueue_input(b"early"), 0, "enabled but no receive interrupt unmasked");
        w32(&mut u, IMSC, INT_RT);
        assert_eq!(u.enqueue_input(b"early"), 1);
        w32(&mut u, CR, 0x101);
        assert_eq!(u.enqueue_input(b"arly"), 0, "receiver disabled");
    }

    #[test]
    fn receive_fifo_depth_and_interrupts() {
        let (mut u, _, line) = uart();
        w32(&mut u, CR, 0x301);
        w32(&mut u, IMSC, INT_RX | INT_RT);
        // Without FEN the FIFO holds one byte.
        assert_eq!(u.enqueue_input(b"ab"), 1);
        assert!(line.high());
        assert_eq!(r32(&mut u, DR), u32::from(b'a'));
        assert!(!line.high());
        assert_ne!(r32(&mut u, FR) & FR_RXFE, 0);
        // With FEN it holds 32; below the trigger level only the timeout interrupt shows.
        w32(&mut u, LCR_H, LCR_H_FEN);
        assert_eq!(u.enqueue_input(&[b'z'; 40]), FIFO_DEPTH);
        assert_ne!(r32(&mut u, FR) & FR_RXFF, 0);
        assert_eq!(r32(&mut u, MIS), INT_RX | INT_RT);
        for _ in 0..FIFO_DEPTH - 1 {
            r32(&mut u, DR);
        }
        assert_eq!(r32(&mut u, MIS), INT_RT);
        r32(&mut u, DR);
        assert_eq!(r32(&mut u, MIS), 0);
        assert!(!line.high());
        // Reading an empty FIFO returns 0 and changes nothing.
        assert_eq!(r32(&mut u, DR), 0);
    }

    #[test]
    fn garbage_at_every_offset_does_not_panic() {
        let (mut u, _, _) = uart();
        for offset in 0..0x1000u64 {
            for len in [1usize, 2, 4, 8] {
                u.write(0, offset, &vec![0xff; len]);
                let mut buf = vec![0; len];
                u.read(0, offset, &mut buf);
            }
        }
        // The device still works afterwards.
        w32(&mut u, LCR_H, 0);
        assert_eq!(r32(&mut u, 0xfe0), 0x11);
    }

    #[test]
    fn sub_word_reads_see_their_lanes() {
        let (mut u, _, _) = uart();
        w32(&mut u, IBRD, 0x1234);
        let mut b = [0u8; 1];
        u.read(0, IBRD + 1, &mut b);
        assert_eq!(b, [0x12]);
        let mut h = [0u8; 2];
        u.read(0, IBRD, &mut h);
        assert_eq!(h, [0x34, 0x12]);
    }

    /// Issue 12, hole 6: each byte went to the host writer on the vCPU's thread, under
    /// the device's lock: a terminal that stopped taking output froze the vCPU. Now a
    /// writer that never returns costs at most the buffer, and the guest writes on.
    #[test]
    fn a_host_that_stops_reading_never_blocks_the_guest() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut u = Pl011::new(output(crate::testing::StuckWriter), Arc::new(crate::irq::NoIrq));
            for _ in 0..100_000 {
                u.write(0, DR, b"x");
            }
            let _ = done.send(());
            std::mem::forget(u);
        });
        // Blocking would be for ever; the bound only has to be finite (emulated runs are slow).
        assert!(finished.recv_timeout(std::time::Duration::from_secs(60)).is_ok(), "the guest's writes blocked");
    }

    #[test]
    fn failing_output_is_dropped() {
        struct Broken;
        impl std::io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut u = Pl011::new(output(Broken), Arc::new(crate::irq::NoIrq));
        u.write(0, DR, b"a");
        u.write(0, DR, b"b");
        assert!(u.flush_output(std::time::Duration::from_secs(10)), "a failed writer is skipped, not waited for");
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers_fifo_and_interrupt() {
        let (mut u, _sink, _line) = uart();
        w32(&mut u, LCR_H, LCR_H_FEN);
        w32(&mut u, CR, 0x301);
        w32(&mut u, IMSC, INT_RX | INT_RT);
        assert_eq!(u.enqueue_input(b"abc"), 3);
        let saved = u.save();
        assert_eq!(saved.rx, b"abc");

        let (mut again, _sink, line) = uart();
        again.restore(&saved).unwrap();
        assert!(line.0.load(std::sync::atomic::Ordering::SeqCst), "the receive timeout interrupt is up");
        assert_eq!(r32(&mut again, DR) & 0xff, u32::from(b'a'));
        assert_eq!(r32(&mut again, IMSC), INT_RX | INT_RT);
        assert_eq!(again.save().rx, b"bc");

        let mut deep = saved.clone();
        deep.rx = vec![0; FIFO_DEPTH + 1];
        assert!(again.restore(&deep).unwrap_err().contains("33 bytes in a receive FIFO of 32"));
        let mut bits = saved;
        bits.latched = 1 << 12;
        assert!(again.restore(&bits).is_err());
        assert_eq!(again.save().rx, b"bc", "a refused state changes nothing");
    }
}
