//! The host side of the guest's serial console: standard input into the UART, and the
//! terminal around it.
//!
//! When standard input is a terminal it goes into raw mode for the run, so keys (Ctrl-C
//! included) reach the guest; Ctrl-A X quits hvrun and Ctrl-A Ctrl-A sends a Ctrl-A. The
//! terminal is restored on every way out: a normal return, a panic (a hook), and a
//! fatal signal (a handler that restores it, then dies of the signal). When standard
//! input is not a terminal, it is passed through byte for byte until end of file.
//! Input never blocks the guest: bytes wait here until the UART's FIFO has room.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use devices::bus::lock;
use devices::pl011::Pl011;

use crate::control::Control;
use crate::ExitReason;

/// Ctrl-A: the escape prefix.
const ESCAPE: u8 = 0x01;

/// The terminal and the state to restore it to, for the panic hook and the signal handler.
static SAVED: OnceLock<(libc::c_int, libc::termios)> = OnceLock::new();

fn restore_saved() {
    if let Some((fd, saved)) = SAVED.get() {
        // SAFETY: tcsetattr on the terminal with a termios obtained from tcgetattr; it
        // is async-signal-safe, so this may run in a signal handler.
        unsafe { libc::tcsetattr(*fd, libc::TCSANOW, saved) };
    }
}

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    restore_saved();
    // SAFETY: restoring the default action and re-raising are async-signal-safe; the
    // process then ends the way the signal means it to.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Raw mode on standard input for as long as this lives.
#[derive(Debug)]
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts standard input in raw mode if it is a terminal; `None` if it is not.
    pub fn enter() -> std::io::Result<Option<Self>> {
        Self::enter_fd(libc::STDIN_FILENO)
    }

    /// Puts terminal `fd` in raw mode; `None` if it is not a terminal. One terminal per
    /// process: the first one entered is the one restored.
    fn enter_fd(fd: libc::c_int) -> std::io::Result<Option<Self>> {
        // SAFETY: isatty has no preconditions.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a terminal and `saved` is a valid termios to write.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = SAVED.set((fd, saved));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
        for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
            // SAFETY: installing a handler that only calls async-signal-safe functions.
            unsafe { libc::signal(signal, on_fatal_signal as *const () as libc::sighandler_t) };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios we own; tcsetattr applies it to `fd`.
        let rc = unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(RawTerminal(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved();
    }
}

/// Copies the guest's console output from `from` to `to` until either ends, flushing
/// after every write: a prompt or an echoed key shows at once, even through a
/// line-buffered `Stdout` or an embedder's `BufWriter` (`io::copy` never flushes).
#[cfg_attr(not(target_os = "macos"), allow(dead_code))] // Virtualization.framework's console
pub fn pump(mut from: impl Read, mut to: impl Write) -> std::io::Result<u64> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// What the escape state machine makes of one input byte.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// Pass these bytes to the guest.
    Send(Vec<u8>),
    /// The user asked to quit.
    Quit,
}

/// Tracks Ctrl-A sequences.
#[derive(Debug, Default)]
struct Escapes {
    pending: bool,
}

impl Escapes {
    fn feed(&mut self, byte: u8) -> Key {
        match (self.pending, byte) {
            (false, ESCAPE) => {
                self.pending = true;
                Key::Send(vec![])
            }
            (false, b) => Key::Send(vec![b]),
            (true, b'x' | b'X') => Key::Quit,
            (true, ESCAPE) => {
                self.pending = false;
                Key::Send(vec![ESCAPE])
            }
            (true, b) => {
                self.pending = false;
                Key::Send(vec![ESCAPE, b])
            }
        }
    }
}

/// The guest console that standard input feeds.
pub enum InputTarget {
    /// The serial port: bytes wait here until its FIFO has room.
    Uart(Arc<Mutex<Pl011>>),
    /// The virtio console's input pipe (blocking): the pipe holds what the guest has not
    /// read yet, and a full pipe stalls this thread, never the guest.
    Pipe(std::fs::File),
}

impl InputTarget {
    /// Offers `bytes` to the console until all are taken or the machine stops; false
    /// when the console can take no more input ever.
    fn deliver(&mut self, control: &Control, mut bytes: &[u8]) -> bool {
        match self {
            InputTarget::Uart(uart) => {
                while !bytes.is_empty() && !control.stopping() {
                    let taken = lock(uart).enqueue_input(bytes);
                    bytes = &bytes[taken..];
                    if !bytes.is_empty() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                true
            }
            InputTarget::Pipe(pipe) => match std::io::Write::write_all(pipe, bytes) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("console: the guest console's input is gone, input stops: {e}");
                    false
                }
            },
        }
    }
}

/// Starts the thread that feeds `source` (standard input, or an embedder's reader) to
/// `target`. With `escapes`, Ctrl-A X stops the machine. The thread ends at end of input
/// (it may stay blocked in a read while the process exits).
pub fn spawn_input(mut source: Box<dyn Read + Send>, mut target: InputTarget, control: Arc<Control>, escapes: bool) {
    let spawned = std::thread::Builder::new().name("console-in".into()).spawn(move || {
        let mut state = Escapes::default();
        let mut buf = [0u8; 1024];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("console: reading the console's input failed, input stops: {e}");
                    return;
                }
            };
            if !escapes {
                if !target.deliver(&control, &buf[..n]) {
                    return;
                }
                continue;
            }
            for &byte in &buf[..n] {
                match state.feed(byte) {
                    Key::Send(bytes) => {
                        if !target.deliver(&control, &bytes) {
                            return;
                        }
                    }
                    Key::Quit => return control.stop(Ok(ExitReason::Stopped)),
                }
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("console: no input thread ({e}); the guest gets no input");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(bytes: &[u8]) -> Vec<Key> {
        let mut e = Escapes::default();
        bytes.iter().map(|&b| e.feed(b)).filter(|k| *k != Key::Send(vec![])).collect()
    }

    #[test]
    fn escape_sequences() {
        assert_eq!(feed(b"ab"), vec![Key::Send(vec![b'a']), Key::Send(vec![b'b'])]);
        assert_eq!(feed(&[ESCAPE, b'x']), vec![Key::Quit]);
        assert_eq!(feed(&[ESCAPE, b'X']), vec![Key::Quit]);
        assert_eq!(feed(&[ESCAPE, ESCAPE, b'x']), vec![Key::Send(vec![ESCAPE]), Key::Send(vec![b'x'])]);
        assert_eq!(feed(&[ESCAPE, b'c']), vec![Key::Send(vec![ESCAPE, b'c'])]);
    }

    fn lflag(fd: libc::c_int) -> libc::tcflag_t {
        // SAFETY: a zeroed termios is a valid buffer; `fd` is an open terminal.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd, &mut t), 0);
            t.c_lflag
        }
    }

    #[test]
    fn raw_mode_on_a_terminal_and_restored_on_drop() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills two fds; null name/termios/winsize are allowed. `null_mut`
        // because macOS declares the termios and winsize pointers `*mut` (Linux: `*const`,
        // which a `*mut` coerces to).
        let rc = unsafe {
            libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut())
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let cooked = lflag(slave);
        assert_ne!(cooked & libc::ICANON, 0, "a new pty is in canonical mode");
        let raw = RawTerminal::enter_fd(slave).unwrap().expect("a pty is a terminal");
        assert_eq!(lflag(slave) & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        drop(raw);
        assert_eq!(lflag(slave), cooked);
        // Not a terminal: nothing to do.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(RawTerminal::enter_fd(std::os::fd::AsRawFd::as_raw_fd(&file)).unwrap().is_none());
        // SAFETY: closing the fds openpty gave us.
        unsafe {
            libc::close(slave);
            libc::close(master);
        }
    }

    #[test]
    fn delivery_waits_for_fifo_room_and_gives_up_when_stopping() {
        let uart = Arc::new(Mutex::new(Pl011::new(
            devices::output::Output::new("serial-out", Box::new(std::io::sink()), devices::pl011::OUTPUT_BUFFER),
            Arc::new(devices::irq::NoIrq),
        )));
        {
            // The guest's driver enables the receiver and unmasks its interrupts.
            use devices::bus::MmioDeviceMut;
            lock(&uart).write(0, 0x30, &0x301u32.to_le_bytes());
            lock(&uart).write(0, 0x38, &0x50u32.to_le_bytes());
        }
        let control = Control::new();
        let reader = {
            let uart = uart.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while got.len() < 3 {
                    let mut b = [0u8; 4];
                    use devices::bus::MmioDeviceMut;
                    lock(&uart).read(0, 0x18, &mut b); // FR
                    if b[0] & 0x10 == 0 {
                        lock(&uart).read(0, 0, &mut b); // DR
                        got.push(b[0]);
                    }
                }
                got
            })
        };
        // The FIFO holds one byte until the guest enables FIFOs: three bytes must wait.
        let mut target = InputTarget::Uart(uart.clone());
        assert!(target.deliver(&control, b"abc"));
        assert_eq!(reader.join().unwrap(), b"abc");
        control.stop(Ok(ExitReason::Stopped));
        assert!(target.deliver(&control, b"never fits: the guest is gone"));
    }

    #[test]
    fn input_for_hvc0_goes_through_its_pipe_until_the_pipe_closes() {
        let (sender, mut receiver) = mio::unix::pipe::new().unwrap();
        sender.set_nonblocking(false).unwrap();
        let mut target = InputTarget::Pipe(std::fs::File::from(std::os::fd::OwnedFd::from(sender)));
        let control = Control::new();
        assert!(target.deliver(&control, b"ls\n"));
        let mut got = [0u8; 3];
        std::io::Read::read_exact(&mut receiver, &mut got).unwrap();
        assert_eq!(&got, b"ls\n");
        drop(receiver);
        assert!(!target.deliver(&control, b"nobody reads"), "a closed console ends the input");
    }

    /// Issue 15, item 6: a prompt without a newline stayed in a line-buffered writer.
    #[test]
    fn console_output_is_flushed_after_every_write() {
        #[derive(Default)]
        struct Seen {
            shown: Arc<Mutex<Vec<u8>>>,
            pending: Vec<u8>,
        }
        impl Write for Seen {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.pending.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                lock(&self.shown).append(&mut self.pending);
                Ok(())
            }
        }
        let (mut guest, from_guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = Seen::default();
        let shown = Arc::clone(&out.shown);
        let pumping = std::thread::spawn(move || pump(from_guest, out));
        guest.write_all(b"login: ").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&shown).as_slice() != b"login: " {
            assert!(std::time::Instant::now() < deadline, "the prompt never showed");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(guest);
        assert_eq!(pumping.join().unwrap().unwrap(), 7);
    }
}
