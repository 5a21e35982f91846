//! Controlling a running machine from any thread: stopping it (the first outcome wins,
//! every vCPU is kicked), pausing and resuming its vCPUs, and the events it reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hypervisor::state::VcpuState;
use hypervisor::{GuestClock, Kicker};

use crate::{Error, Event, ExitReason};

/// A pause that did not take: some vCPUs stayed in the guest (or in a device) past the
/// deadline. The machine runs on as before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} of {vcpus} vCPUs did not stop within {} ms; the VM keeps running", vcpus - parked, waited.as_millis())]
pub struct PauseError {
    /// How many vCPUs had parked.
    pub parked: usize,
    /// How many there are.
    pub vcpus: usize,
    /// How long the pause waited.
    pub waited: Duration,
}

/// Pause bookkeeping: whether a pause is asked for, how many vCPUs are parked, and the
/// parked vCPUs' saved states (a snapshot's).
#[derive(Debug, Default)]
struct Pause {
    requested: bool,
    parked: usize,
    /// Raised by [`Control::save_vcpus`]: each parked vCPU saves its state once per round.
    save_round: u64,
    /// This round's states, by vCPU index.
    saved: Vec<(u32, Result<VcpuState, String>)>,
}

/// How a parked vCPU saves its state, on its own thread.
pub type SaveVcpu<'a> = &'a mut dyn FnMut() -> hypervisor::Result<VcpuState>;

/// Shared by the vCPU threads and whoever else may stop or pause the machine (the
/// console's escape key, an embedder).
#[derive(Default)]
pub struct Control {
    stopping: AtomicBool,
    /// Mirrors `pause.requested`, so the vCPU loop checks a pause without a lock.
    pausing: AtomicBool,
    outcome: Mutex<Option<Result<ExitReason, Error>>>,
    /// When the first outcome came (for the stop timeline).
    stopped_at: OnceLock<Instant>,
    kickers: Mutex<Vec<Arc<dyn Kicker>>>,
    pause: Mutex<Pause>,
    pause_changed: Condvar,
    events: Mutex<Option<Sender<Event>>>,
    /// When the guest was asked to shut itself down ([`Control::ask_guest_to_stop`]).
    asked_to_stop: Mutex<Option<Instant>>,
    /// The guest's clock, stopped while the VM is paused, where the hypervisor allows.
    clock: Mutex<Option<Arc<dyn GuestClock>>>,
    /// Each vCPU's last exits when its loop ended (where the backend keeps them).
    exits: Mutex<Vec<(u32, Vec<String>)>>,
    /// The guest's power button, where the machine has one (KVM, Hypervisor.framework):
    /// pressing it says whether a driver listens.
    power_button: Mutex<Option<PowerButton>>,
    /// The machine's balloon, if it has one.
    balloon: OnceLock<devices::virtio::balloon::BalloonHandle>,
    /// The machine's vsock device, if it has one.
    vsock: OnceLock<devices::virtio::vsock::VsockHandle>,
    /// The configuration's disks, for [`Control::replace_disk`], while the machine runs
    /// (KVM and Hypervisor.framework).
    disks: Mutex<Option<Vec<DiskSlot>>>,
    /// What a snapshot saves, while the machine runs (KVM and Hypervisor.framework).
    snapshot: Mutex<Option<Arc<crate::snapshot::machine::Parts>>>,
    /// One snapshot at a time.
    snapshotting: Mutex<()>,
    /// The vCPUs' counters (the devices' are read from `snapshot`'s parts).
    metrics: crate::metrics::Registry,
}

/// Presses a guest's power button; returns whether a driver listens.
pub type PowerButton = Box<dyn Fn() -> bool + Send + Sync>;

/// One of the configuration's disks, as [`Control::replace_disk`] finds it.
#[derive(Debug)]
pub struct DiskSlot {
    /// Its place in the configuration's disks.
    pub index: usize,
    /// Its id: the configuration's, or the serial the machine gave it (`hvrun-diskN`).
    pub id: String,
    /// Whether the drive was configured read-only (a new image is opened alike).
    pub read_only: bool,
    /// The device's handle.
    pub handle: devices::virtio::block::BlockHandle,
    /// The image the device has now (for the same file given again).
    pub image: devices::virtio::block::disk::FileDisk,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("stopping", &self.stopping()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    /// A machine that is running.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether the machine is stopping; vCPU loops check this before every run.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Registers a vCPU's kicker, so a stop reaches it.
    pub fn add_kicker(&self, kicker: Arc<dyn Kicker>) {
        lock(&self.kickers).push(kicker);
        // A stop requested before this vCPU registered has not kicked it; the vCPU
        // loop checks `stopping` before it first runs, so nothing is lost.
    }

    /// Stops the machine with `outcome`, unless another outcome came first, and kicks
    /// every vCPU out of the guest (a paused one included).
    pub fn stop(&self, outcome: Result<ExitReason, Error>) {
        {
            let mut slot = lock(&self.outcome);
            if slot.is_none() {
                *slot = Some(outcome);
                let _ = self.stopped_at.set(Instant::now());
            } else if let Err(e) = outcome {
                log::debug!("also while stopping: {e}");
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        {
            let _pause = lock(&self.pause);
            self.pause_changed.notify_all();
        }
        self.kick_all();
    }

    fn kick_all(&self) {
        for kicker in lock(&self.kickers).iter() {
            kicker.kick();
        }
    }

    /// Gives the machine's balloon to [`crate::VmHandle::set_balloon_target`] (once).
    pub fn set_balloon(&self, balloon: devices::virtio::balloon::BalloonHandle) {
        let _ = self.balloon.set(balloon);
    }

    /// The machine's balloon, if it has one.
    pub fn balloon(&self) -> Option<&devices::virtio::balloon::BalloonHandle> {
        self.balloon.get()
    }

    /// Gives the machine's vsock device to [`crate::VmHandle::vsock`] (once).
    pub fn set_vsock(&self, vsock: devices::virtio::vsock::VsockHandle) {
        let _ = self.vsock.set(vsock);
    }

    /// The machine's vsock device, if it has one.
    pub fn vsock(&self) -> Option<&devices::virtio::vsock::VsockHandle> {
        self.vsock.get()
    }

    /// Gives [`Control::replace_disk`] the configuration's disks, or takes them back
    /// (`None`) as the machine stops, so a handle kept afterwards holds no image open.
    pub fn set_disks(&self, disks: Option<Vec<DiskSlot>>) {
        *lock(&self.disks) = disks;
    }

    /// Gives the disk `id` the image at `path` (Firecracker's `PATCH /drives`): opened
    /// as at boot (locked, read-only as the drive was configured), swapped in once the
    /// requests in hand on the old image are done (see
    /// [`devices::virtio::block::BlockHandle::replace`]), and recorded in the
    /// configuration a snapshot saves, so a snapshot taken afterwards names it. Not
    /// during a snapshot.
    pub fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), Error> {
        let refused = |why: String| Error::DiskUpdate { id: id.into(), why };
        let _one = lock(&self.snapshotting);
        let mut disks = lock(&self.disks);
        let Some(disks) = disks.as_mut() else {
            return Err(refused("the VM is not running on KVM or Hypervisor.framework (or has stopped)".into()));
        };
        let Some(slot) = disks.iter_mut().find(|slot| slot.id == id) else {
            let ids: Vec<_> = disks.iter().map(|slot| slot.id.as_str()).collect();
            let known = if ids.is_empty() { "it has none".to_string() } else { ids.join(", ") };
            return Err(refused(format!("the VM has no disk with this id (its disks: {known})")));
        };
        let image = crate::boot_files::open_replacement(&slot.image, path, slot.read_only)
            .map_err(|e| refused(format!("cannot open {}: {e}", path.display())))?;
        slot.handle.replace(Box::new(image.clone())).map_err(|e| refused(e.to_string()))?;
        slot.image = image;
        let index = slot.index;
        let mut parts = lock(&self.snapshot);
        if let Some(old) = parts.as_deref() {
            *parts = Some(Arc::new(with_disk_path(old, index, path)));
        }
        drop(parts);
        log::info!("disk {id}: now {} ({} bytes)", path.display(), slot.handle.capacity().unwrap_or(0));
        Ok(())
    }

    /// The vCPUs' counters.
    pub fn metrics(&self) -> &crate::metrics::Registry {
        &self.metrics
    }

    /// Every counter of the machine, as totals ([`crate::metrics::collect`]).
    pub fn collect_metrics(&self) -> serde_json::Value {
        let parts = lock(&self.snapshot).clone();
        let stats = match parts.as_deref() {
            Some(parts) => crate::metrics::PartStats {
                transports: parts.transports.iter().map(|t| lock(t).stats()).collect(),
                uart: Some(lock(&parts.uart).stats()),
            },
            None => crate::metrics::PartStats::default(),
        };
        crate::metrics::collect(&self.metrics, &stats)
    }

    /// Gives [`Control::snapshot`] the machine's parts, or takes them back (`None`) as
    /// the machine stops, so a handle kept afterwards holds no guest memory.
    pub fn set_snapshot_parts(&self, parts: Option<crate::snapshot::machine::Parts>) {
        *lock(&self.snapshot) = parts.map(Arc::new);
    }

    /// Saves the machine into `files`: pauses it (if it runs), has every vCPU save its
    /// state, saves the rest, and leaves it paused; a failed snapshot leaves it running
    /// if it was.
    pub fn snapshot(&self, files: &crate::snapshot::machine::SnapshotFiles, timeout: Duration) -> Result<(), Error> {
        use crate::snapshot::SnapshotError;
        let _one = lock(&self.snapshotting);
        let parts = lock(&self.snapshot).clone().ok_or_else(|| {
            SnapshotError::Unsupported("it is not running on KVM or Hypervisor.framework (or has stopped)".into())
        })?;
        let was_paused = self.paused();
        self.pause(timeout).map_err(|e| SnapshotError::Unsupported(e.to_string()))?;
        let started = Instant::now();
        let saved = self
            .wait_parked(parts.config.cpus as usize, timeout)
            .and_then(|()| self.save_vcpus(timeout))
            .map_err(SnapshotError::Unsupported)
            .and_then(|vcpus| parts.save(files, vcpus));
        match saved {
            Ok(()) => {
                log::info!("snapshot written to {} in {} ms", files.state.display(), started.elapsed().as_millis());
                Ok(())
            }
            Err(e) => {
                // A failed snapshot leaves the VM as it found it.
                if !was_paused {
                    self.resume_now();
                }
                Err(e.into())
            }
        }
    }

    /// Gives the machine's power button (`devices::virtio::input`) to
    /// [`Control::ask_guest_to_stop`].
    pub fn set_power_button(&self, button: PowerButton) {
        *lock(&self.power_button) = Some(button);
    }

    /// Asks the guest to shut down by itself: presses the machine's power button, or, on
    /// Virtualization.framework, has the watcher call `requestStop` (the first ask counts
    /// there). Returns whether something in the guest can hear it (a driver for the
    /// button; the framework's machine always).
    pub fn ask_guest_to_stop(&self) -> bool {
        let mut asked = lock(&self.asked_to_stop);
        if asked.is_none() {
            *asked = Some(Instant::now());
        }
        drop(asked);
        let heard = match lock(&self.power_button).as_ref() {
            Some(press) => press(),
            None => true,
        };
        self.kick_all();
        heard
    }

    /// When the guest was first asked to shut down, if it was.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))] // Virtualization.framework's watchers
    pub fn asked_to_stop(&self) -> Option<Instant> {
        *lock(&self.asked_to_stop)
    }

    /// Stops `clock` while the VM is paused from now on (at once if it is paused now:
    /// [`Control::pause_before_start`]).
    pub fn set_clock(&self, clock: Arc<dyn GuestClock>) {
        let pause = lock(&self.pause);
        if pause.requested {
            clock.stop();
        }
        *lock(&self.clock) = Some(clock);
        drop(pause);
    }

    /// Keeps vCPU `index`'s last exits, as its loop ends.
    pub fn record_exits(&self, index: u32, exits: Vec<String>) {
        if !exits.is_empty() {
            lock(&self.exits).push((index, exits));
        }
    }

    /// Each vCPU's last exits, as recorded when its loop ended.
    pub fn recent_exits(&self) -> Vec<(u32, Vec<String>)> {
        let mut exits = lock(&self.exits).clone();
        exits.sort_by_key(|(index, _)| *index);
        exits
    }

    /// Sends events to `sink` from now on.
    pub fn set_events(&self, sink: Sender<Event>) {
        *lock(&self.events) = Some(sink);
    }

    /// Reports `event` to whoever listens (nobody is fine).
    pub fn emit(&self, event: Event) {
        if let Some(sink) = lock(&self.events).as_ref() {
            let _ = sink.send(event);
        }
    }

    /// Takes every vCPU out of the guest and keeps it out until [`Control::resume`].
    /// Returns once every vCPU that has started is parked, or the machine is stopping.
    /// Devices keep running: I/O in flight completes, and its interrupts wait.
    ///
    /// A vCPU that does not come out within `timeout` (stuck in a device, say) fails the
    /// pause: the others are let go again, and the error says how many had parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        {
            let mut pause = lock(&self.pause);
            if pause.requested {
                return Ok(());
            }
            pause.requested = true;
            self.pausing.store(true, Ordering::SeqCst);
        }
        self.kick_all();
        let vcpus = lock(&self.kickers).len();
        let pause = lock(&self.pause);
        let (mut pause, waited) = self
            .pause_changed
            .wait_timeout_while(pause, timeout, |p| p.parked < vcpus && !self.stopping())
            .unwrap_or_else(|e| e.into_inner());
        if waited.timed_out() {
            let parked = pause.parked;
            pause.requested = false;
            self.pausing.store(false, Ordering::SeqCst);
            self.pause_changed.notify_all();
            return Err(PauseError { parked, vcpus, waited: timeout });
        }
        // Every vCPU is out of the guest: its time stands still until the resume.
        if let Some(clock) = lock(&self.clock).as_ref() {
            clock.stop();
        }
        drop(pause);
        self.emit(Event::Paused);
        Ok(())
    }

    /// Pauses a machine whose vCPUs have not started: each parks before its first entry,
    /// until [`Control::resume`]. The clock given later stops at once
    /// ([`Control::set_clock`]).
    pub fn pause_before_start(&self) {
        let mut pause = lock(&self.pause);
        pause.requested = true;
        self.pausing.store(true, Ordering::SeqCst);
        if let Some(clock) = lock(&self.clock).as_ref() {
            clock.stop();
        }
        drop(pause);
        self.emit(Event::Paused);
    }

    /// Lets paused vCPUs run again; during a snapshot, once it is written (the snapshot
    /// holds the pause until then, whoever else asks).
    pub fn resume(&self) {
        let _no_snapshot = lock(&self.snapshotting);
        self.resume_now();
    }

    fn resume_now(&self) {
        let mut pause = lock(&self.pause);
        if !pause.requested {
            return;
        }
        // Before any vCPU runs again, so each sees the counter's new offset.
        if let Some(clock) = lock(&self.clock).as_ref() {
            clock.start();
        }
        pause.requested = false;
        self.pausing.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
        drop(pause);
        self.emit(Event::Resumed);
    }

    /// Whether a pause is in effect (or being asked for).
    pub fn paused(&self) -> bool {
        self.pausing.load(Ordering::SeqCst)
    }

    /// Called by a vCPU loop before it enters the guest: while a pause is in effect, the
    /// vCPU waits here (and counts as parked) until it is resumed or stopped, and saves
    /// its state with `save` whenever [`Control::save_vcpus`] asks. Without a pause it is
    /// one atomic load: this runs on every exit.
    pub fn park_if_paused(&self, index: u32, save: SaveVcpu<'_>) {
        if !self.paused() {
            return;
        }
        let mut pause = lock(&self.pause);
        if !pause.requested || self.stopping() {
            return;
        }
        pause.parked += 1;
        self.pause_changed.notify_all();
        let mut round = pause.save_round;
        loop {
            pause = self
                .pause_changed
                .wait_while(pause, |p| p.requested && !self.stopping() && p.save_round == round)
                .unwrap_or_else(|e| e.into_inner());
            if !pause.requested || self.stopping() {
                break;
            }
            round = pause.save_round;
            let state = save().map_err(|e| e.to_string());
            pause.saved.push((index, state));
            self.pause_changed.notify_all();
        }
        pause.parked -= 1;
    }

    /// Waits until `vcpus` vCPUs are parked, at most `timeout`: a machine paused before
    /// it started (or paused while still starting) has vCPUs that have not reached their
    /// first entry yet, and a snapshot needs them all.
    fn wait_parked(&self, vcpus: usize, timeout: Duration) -> Result<(), String> {
        let pause = lock(&self.pause);
        let (pause, _) = self
            .pause_changed
            .wait_timeout_while(pause, timeout, |p| p.requested && p.parked < vcpus && !self.stopping())
            .unwrap_or_else(|e| e.into_inner());
        if pause.requested && pause.parked >= vcpus {
            Ok(())
        } else {
            Err(format!("{} of its {vcpus} vCPUs are parked (it is still starting, or stopping)", pause.parked))
        }
    }

    /// Every vCPU's state, saved by each on its own thread while paused (a snapshot's),
    /// in index order. The machine must be paused; `timeout` bounds the wait.
    pub fn save_vcpus(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let vcpus = lock(&self.kickers).len();
        let mut pause = lock(&self.pause);
        if !pause.requested || pause.parked < vcpus {
            return Err("the VM is not paused".into());
        }
        pause.saved.clear();
        pause.save_round += 1;
        self.pause_changed.notify_all();
        let (mut pause, waited) = self
            .pause_changed
            .wait_timeout_while(pause, timeout, |p| p.saved.len() < vcpus && p.requested && !self.stopping())
            .unwrap_or_else(|e| e.into_inner());
        if pause.saved.len() < vcpus {
            let why = if waited.timed_out() { "did not save within the time allowed" } else { "were let go" };
            return Err(format!("{} of {vcpus} vCPUs saved their state; the others {why}", pause.saved.len()));
        }
        let mut saved = std::mem::take(&mut pause.saved);
        saved.sort_by_key(|(index, _)| *index);
        saved
            .into_iter()
            .map(|(index, state)| state.map_err(|e| format!("vCPU {index} cannot save its state: {e}")))
            .collect()
    }

    /// When the machine was first stopped.
    pub fn stopped_at(&self) -> Option<Instant> {
        self.stopped_at.get().copied()
    }

    /// The outcome the machine stopped with (once).
    pub fn take_outcome(&self) -> Option<Result<ExitReason, Error>> {
        lock(&self.outcome).take()
    }
}

/// `parts` with disk `index`'s image at `path`.
fn with_disk_path(
    parts: &crate::snapshot::machine::Parts,
    index: usize,
    path: &std::path::Path,
) -> crate::snapshot::machine::Parts {
    let mut config = parts.config.clone();
    if let Some(disk) = config.disks.get_mut(index) {
        disk.path = path.to_path_buf();
    }
    crate::snapshot::machine::Parts {
        config,
        requirements: parts.requirements.clone(),
        memory: Arc::clone(&parts.memory),
        irqchip: Arc::clone(&parts.irqchip),
        uart: Arc::clone(&parts.uart),
        rtc: Arc::clone(&parts.rtc),
        transports: parts.transports.clone(),
    }
}

#[cfg(test)]
mod disk_tests;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingKicker;
    use hypervisor::state::{Power, RegValue};

    fn no_save() -> hypervisor::Result<VcpuState> {
        Err(hypervisor::Error::Unsupported("no state in this test".into()))
    }

    #[test]
    fn parked_vcpus_save_their_state_on_their_own_threads_when_asked() {
        let control = Control::new();
        for _ in 0..2 {
            control.add_kicker(Arc::new(CountingKicker::default()));
        }
        assert!(control.save_vcpus(Duration::from_secs(1)).unwrap_err().contains("not paused"));
        let saves = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for index in 0..2u32 {
                let (control, saves) = (&control, &saves);
                s.spawn(move || {
                    let me = std::thread::current().id();
                    let mut save = || {
                        assert_eq!(std::thread::current().id(), me);
                        saves.fetch_add(1, Ordering::SeqCst);
                        if index == 1 && saves.load(Ordering::SeqCst) > 2 {
                            return Err(hypervisor::Error::Unsupported("a broken vCPU".into()));
                        }
                        let regs = vec![RegValue { id: u64::from(index), value: vec![index as u8; 8] }];
                        Ok(VcpuState { regs, power: Power::On, serror: None })
                    };
                    while !control.stopping() {
                        control.park_if_paused(index, &mut save);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
            }
            control.pause(Duration::from_secs(5)).unwrap();
            let states = control.save_vcpus(Duration::from_secs(5)).unwrap();
            assert_eq!(states.iter().map(|s| s.regs[0].id).collect::<Vec<_>>(), [0, 1], "in index order");
            assert_eq!(saves.load(Ordering::SeqCst), 2, "each saved once");
            let e = control.save_vcpus(Duration::from_secs(5)).unwrap_err();
            assert!(e.contains("vCPU 1 cannot save its state: ") && e.contains("a broken vCPU"), "{e}");
            control.resume();
            control.stop(Ok(ExitReason::Stopped));
        });
    }

    #[test]
    fn first_outcome_wins_and_everyone_is_kicked() {
        let control = Control::new();
        let kicks = Arc::new(CountingKicker::default());
        control.add_kicker(kicks.clone());
        control.add_kicker(kicks.clone());
        assert!(!control.stopping());
        control.stop(Ok(ExitReason::PowerOff));
        control.stop(Ok(ExitReason::Reset));
        assert!(control.stopping());
        assert_eq!(kicks.count(), 4);
        assert!(matches!(control.take_outcome(), Some(Ok(ExitReason::PowerOff))));
        assert!(control.take_outcome().is_none());
    }

    #[test]
    fn pause_waits_for_every_vcpu_to_park_and_resume_lets_them_go() {
        let control = Control::new();
        let (events, received) = std::sync::mpsc::channel();
        control.set_events(events);
        control.add_kicker(Arc::new(CountingKicker::default()));
        control.add_kicker(Arc::new(CountingKicker::default()));
        let entries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (control, entries) = (&control, &entries);
                // A vCPU loop: park if paused, "run", until stopped.
                s.spawn(move || vcpu_loop(control, entries));
            }
            control.pause(Duration::from_secs(10)).unwrap();
            assert!(control.paused());
            let frozen = entries.load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            // At most one entry each that was already past the check when paused.
            assert!(entries.load(Ordering::SeqCst) <= frozen + 2, "vCPUs ran while paused");
            control.resume();
            // Waited for: on a loaded host the vCPU threads may not run for a while.
            let deadline = Instant::now() + Duration::from_secs(10);
            while entries.load(Ordering::SeqCst) <= frozen + 2 {
                assert!(Instant::now() < deadline, "vCPUs did not resume");
                std::thread::sleep(Duration::from_millis(1));
            }
            control.pause(Duration::from_secs(10)).unwrap();
            // A stop releases parked vCPUs.
            control.stop(Ok(ExitReason::Stopped));
        });
        let got: Vec<Event> = received.try_iter().collect();
        assert_eq!(got, vec![Event::Paused, Event::Resumed, Event::Paused]);
    }

    /// A vCPU loop for the tests: park if paused, "run" (count an entry), until stopped.
    fn vcpu_loop(control: &Control, entries: &std::sync::atomic::AtomicUsize) {
        while !control.stopping() {
            control.park_if_paused(0, &mut no_save);
            entries.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A snapshot of a machine paused before it started waits for its vCPUs to reach
    /// their first entry (review of `start_paused`: it found none parked and failed).
    #[test]
    fn a_snapshot_waits_for_vcpus_still_starting_to_park() {
        let control = Control::new();
        control.pause_before_start();
        control.pause(Duration::from_secs(10)).unwrap();
        assert!(control.wait_parked(1, Duration::from_millis(20)).unwrap_err().contains("0 of its 1"));
        let entries = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let (control, entries) = (&control, &entries);
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                control.add_kicker(Arc::new(CountingKicker::default()));
                vcpu_loop(control, entries);
            });
            control.wait_parked(1, Duration::from_secs(10)).unwrap();
            // The parked vCPU was asked for its state (this test's has none to give).
            let saved = control.save_vcpus(Duration::from_secs(10));
            assert!(saved.as_ref().is_err_and(|e| e.contains("vCPU 0 cannot save its state")), "{saved:?}");
            assert_eq!(entries.load(Ordering::SeqCst), 0);
            control.stop(Ok(ExitReason::Stopped));
        });
    }

    /// A clock that records what it was told.
    #[derive(Default)]
    struct RecordingClock(Mutex<Vec<&'static str>>);

    impl GuestClock for RecordingClock {
        fn stop(&self) {
            lock(&self.0).push("stop");
        }
        fn start(&self) {
            lock(&self.0).push("start");
        }
    }

    /// A machine started paused (a snapshot loaded with `resume_vm: false`): its vCPU
    /// parks before its first entry and its clock, given after the pause, stands still
    /// until the resume.
    #[test]
    fn a_machine_paused_before_it_starts_enters_the_guest_only_once_resumed() {
        let control = Control::new();
        control.pause_before_start();
        let clock = Arc::new(RecordingClock::default());
        control.set_clock(clock.clone());
        assert!(control.paused());
        control.add_kicker(Arc::new(CountingKicker::default()));
        let entries = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let (control, entries) = (&control, &entries);
            s.spawn(move || vcpu_loop(control, entries));
            // The pause is already in effect: asking again waits for nothing new.
            control.pause(Duration::from_secs(10)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(entries.load(Ordering::SeqCst), 0, "a vCPU entered the guest before the resume");
            assert_eq!(*lock(&clock.0), ["stop"]);
            control.resume();
            let deadline = Instant::now() + Duration::from_secs(10);
            while entries.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "the vCPU did not run once resumed");
                std::thread::sleep(Duration::from_millis(1));
            }
            control.stop(Ok(ExitReason::Stopped));
        });
        assert_eq!(*lock(&clock.0), ["stop", "start"]);
    }

    /// Issue 14, fix 6: the guest's counter ran on while the VM was paused. The clock is
    /// stopped once every vCPU has parked and started before any runs again; a pause
    /// that fails, or a resume without a pause, leaves it alone.
    #[test]
    fn a_pause_stops_the_guest_clock_and_a_resume_starts_it() {
        let control = Control::new();
        let clock = Arc::new(RecordingClock::default());
        control.set_clock(clock.clone());
        control.resume();
        control.add_kicker(Arc::new(CountingKicker::default()));
        let entries = std::sync::atomic::AtomicUsize::new(0);
        let early = AtomicBool::new(false);
        std::thread::scope(|s| {
            let (control, clock, entries, early) = (&control, &clock, &entries, &early);
            s.spawn(move || {
                while !control.stopping() {
                    control.park_if_paused(0, &mut no_save);
                    // Entering the guest: its clock must not be stopped.
                    if lock(&clock.0).last() == Some(&"stop") && !control.stopping() {
                        early.store(true, Ordering::SeqCst);
                    }
                    entries.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            for _ in 0..5 {
                control.pause(Duration::from_secs(10)).unwrap();
                let before = entries.load(Ordering::SeqCst);
                control.resume();
                let deadline = Instant::now() + Duration::from_secs(10);
                while entries.load(Ordering::SeqCst) < before + 2 {
                    assert!(Instant::now() < deadline, "the vCPU did not run again");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            control.stop(Ok(ExitReason::Stopped));
        });
        assert!(!early.load(Ordering::SeqCst), "a vCPU ran while the guest's clock was stopped");
        assert_eq!(*lock(&clock.0), ["stop", "start"].repeat(5));
        // A pause that does not take (a vCPU that never parks) does not stop the clock.
        let control = Control::new();
        let clock = Arc::new(RecordingClock::default());
        control.set_clock(clock.clone());
        control.add_kicker(Arc::new(CountingKicker::default()));
        assert!(control.pause(Duration::from_millis(20)).is_err());
        control.resume();
        assert!(lock(&clock.0).is_empty());
    }

    /// Issue 12, hole 6: `pause` waited for ever for a vCPU that never came back from the
    /// guest (one stuck in a device). It gives up at its deadline and lets the others go.
    #[test]
    fn a_vcpu_that_never_parks_fails_the_pause_and_the_rest_run_on() {
        let control = Control::new();
        control.add_kicker(Arc::new(CountingKicker::default()));
        control.add_kicker(Arc::new(CountingKicker::default()));
        let entries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            let (control, entries) = (&control, &entries);
            // One vCPU loop that parks; the other never comes back to park. The pause
            // waits long enough for the first to park however loaded the host is.
            s.spawn(move || vcpu_loop(control, entries));
            let (done, finished) = std::sync::mpsc::channel();
            s.spawn(move || done.send(control.pause(Duration::from_secs(2))));
            let result = finished.recv_timeout(Duration::from_secs(10)).expect("pause returned");
            assert_eq!(result, Err(PauseError { parked: 1, vcpus: 2, waited: Duration::from_secs(2) }));
            assert!(!control.paused(), "the pause is called off");
            let now = entries.load(Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while entries.load(Ordering::SeqCst) <= now {
                assert!(Instant::now() < deadline, "the vCPU that parked runs again");
                std::thread::sleep(Duration::from_millis(1));
            }
            control.stop(Ok(ExitReason::Stopped));
        });
    }
}
