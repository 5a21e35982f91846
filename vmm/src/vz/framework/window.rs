//! `hvrun macos run --gui`: the VM's display in a window. AppKit wants the main thread,
//! and `VZVirtualMachineView` a machine on the main queue, so this runs the machine there
//! and pumps the app's events itself, stepping the same [`Watch`] as the headless watcher
//! between events. Closing the window (not minimising it: a window-will-close delegate
//! tells the two apart) asks the guest to shut down, as Ctrl-C does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::{NSObject, NSObjectProtocol, ProtocolObject};
use objc2::{define_class, msg_send, AnyThread, DefinedClass, MainThreadMarker, MainThreadOnly};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSEventMask, NSWindow, NSWindowDelegate,
    NSWindowStyleMask,
};
use objc2_foundation::{NSDate, NSDefaultRunLoopMode, NSNotification, NSPoint, NSRect, NSSize, NSString};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineView};

use super::delegate::{describe, Delegate, Heard};
use super::{asked, on_complete, outcome, take, Completion};
use crate::control::Control;
use crate::vz::watch::{Action, Seen, State, Watch};
use crate::{Error, ExitReason};

/// The window delegate's state: whether the window is closing.
pub struct Closing {
    closed: Arc<AtomicBool>,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and this class does not
    // implement Drop.
    #[unsafe(super(NSObject))]
    #[thread_kind = MainThreadOnly]
    #[name = "HvrunWindowDelegate"]
    #[ivars = Closing]
    struct WindowDelegate;

    // SAFETY: NSObjectProtocol has no requirements beyond NSObject's.
    unsafe impl NSObjectProtocol for WindowDelegate {}

    // SAFETY: the method matches the protocol's signature.
    unsafe impl NSWindowDelegate for WindowDelegate {
        #[unsafe(method(windowWillClose:))]
        fn window_will_close(&self, _notification: &NSNotification) {
            self.ivars().closed.store(true, Ordering::SeqCst);
        }
    }
);

impl WindowDelegate {
    fn new(mtm: MainThreadMarker, closed: Arc<AtomicBool>) -> Retained<Self> {
        let this = Self::alloc(mtm).set_ivars(Closing { closed });
        // SAFETY: NSObject's designated initialiser, on a freshly allocated object.
        unsafe { msg_send![super(this), init] }
    }
}

/// Runs the machine for `config` on the main thread with its display in a window, until
/// the guest stops, the window closes, or `control` stops it.
pub fn run(config: &VZVirtualMachineConfiguration, title: &str, control: &Control) -> Result<ExitReason, Error> {
    let mtm = MainThreadMarker::new()
        .ok_or_else(|| Error::Vz("--gui: the window must be opened from the main thread".into()))?;
    // SAFETY: on the main thread, whose queue the machine then belongs to; the
    // configuration was validated.
    let vm = unsafe { VZVirtualMachine::initWithConfiguration(VZVirtualMachine::alloc(), config) };
    let heard = Heard::default();
    let delegate = Delegate::new(Arc::clone(&heard));
    // SAFETY: on the machine's queue (the main thread); `delegate` outlives the machine's
    // use of it (both live until this function returns).
    unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
    let app = NSApplication::sharedApplication(mtm);
    app.setActivationPolicy(NSApplicationActivationPolicy::Regular);
    let frame = NSRect::new(NSPoint::new(0.0, 0.0), NSSize::new(1440.0, 900.0));
    let style = NSWindowStyleMask::Titled
        | NSWindowStyleMask::Closable
        | NSWindowStyleMask::Miniaturizable
        | NSWindowStyleMask::Resizable;
    // SAFETY: AppKit calls on the main thread with valid objects.
    let window: Retained<NSWindow> = unsafe {
        NSWindow::initWithContentRect_styleMask_backing_defer(
            NSWindow::alloc(mtm),
            frame,
            style,
            NSBackingStoreType::Buffered,
            false,
        )
    };
    // SAFETY: we keep the window alive ourselves; AppKit must not release it on close.
    unsafe { window.setReleasedWhenClosed(false) };
    let closed = Arc::new(AtomicBool::new(false));
    let window_delegate = WindowDelegate::new(mtm, Arc::clone(&closed));
    window.setDelegate(Some(ProtocolObject::from_ref(&*window_delegate)));
    // SAFETY: a view for the machine, made and configured on the main thread.
    let view = unsafe {
        let view = VZVirtualMachineView::new(mtm);
        view.setVirtualMachine(Some(&vm));
        view.setCapturesSystemKeys(true);
        view
    };
    window.setContentView(Some(&view));
    window.setTitle(&NSString::from_str(title));
    window.center();
    window.makeKeyAndOrderFront(None);
    app.finishLaunching();
    #[allow(deprecated)]
    app.activateIgnoringOtherApps(true);

    let started = Completion::default();
    let stopped = Completion::default();
    // SAFETY: on the main thread, the machine's queue.
    unsafe { vm.startWithCompletionHandler(&on_complete(&started)) };
    let mut watch = Watch::new(Instant::now());
    let mut asked_by_window = false;
    let result = loop {
        // One autorelease pool per turn: AppKit's events and the framework's objects
        // made here are released every turn, not at the end of the run.
        let action = autoreleasepool(|_| {
            // Wait up to 100 ms for an event; the main queue (the machine's) runs meanwhile.
            let until = NSDate::dateWithTimeIntervalSinceNow(0.1);
            // SAFETY: the run-loop mode is a valid static string.
            let event = app.nextEventMatchingMask_untilDate_inMode_dequeue(
                NSEventMask::Any,
                Some(&until),
                unsafe { NSDefaultRunLoopMode },
                true,
            );
            if let Some(event) = event {
                app.sendEvent(&event);
            }
            app.updateWindows();
            if closed.load(Ordering::SeqCst) && !asked_by_window {
                // The window closed: the power button, as for Ctrl-C.
                asked_by_window = true;
                control.ask_guest_to_stop();
            }
            let seen = Seen {
                // SAFETY: on the machine's queue (the main thread).
                state: Some(State::from_raw(unsafe { vm.state() }.0)),
                started: take(&started),
                stopped: take(&stopped),
                ended: heard.lock().unwrap_or_else(|e| e.into_inner()).take(),
            };
            watch.step(seen, asked(control), Instant::now())
        });
        match action {
            Action::Wait => {}
            // SAFETY: on the machine's queue (the main thread).
            Action::Press => unsafe { vm.requestStopWithError() }
                .unwrap_or_else(|e| log::warn!("vz: asking the guest to stop: {}", describe(&e))),
            Action::GraceOver => control.stop(Ok(ExitReason::Stopped)),
            // SAFETY: on the machine's queue (the main thread).
            Action::Stop => unsafe { vm.stopWithCompletionHandler(&on_complete(&stopped)) },
            // SAFETY: on the machine's queue (the main thread).
            Action::Pause(true) => unsafe { vm.pauseWithCompletionHandler(&on_complete(&Completion::default())) },
            // SAFETY: on the machine's queue (the main thread).
            Action::Pause(false) => unsafe { vm.resumeWithCompletionHandler(&on_complete(&Completion::default())) },
            Action::Finish(finish) => break outcome(finish, control),
        }
    };
    window.setDelegate(None);
    result
}
