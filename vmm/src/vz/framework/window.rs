//! `hvrun macos run --gui`: the VM's display in a window. AppKit wants the main thread,
//! and `VZVirtualMachineView` a machine on the main queue, so this runs the machine there
//! and pumps the app's events itself, checking the machine between events.

use std::sync::Arc;

use objc2::rc::Retained;
use objc2::{AnyThread, MainThreadMarker, MainThreadOnly};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSEventMask, NSWindow, NSWindowStyleMask,
};
use objc2_foundation::{NSDate, NSDefaultRunLoopMode, NSPoint, NSRect, NSSize, NSString};
use objc2_virtualization::{
    VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineState, VZVirtualMachineView,
};

use super::{on_complete, take, Completion, GRACE};
use crate::control::Control;
use crate::{Error, ExitReason};

/// Runs the machine for `config` on the main thread with its display in a window, until
/// the guest stops, the window closes, or `control` stops it.
pub fn run(config: &VZVirtualMachineConfiguration, title: &str, control: &Control) -> Result<ExitReason, Error> {
    let mtm = MainThreadMarker::new()
        .ok_or_else(|| Error::Vz("--gui: the window must be opened from the main thread".into()))?;
    // SAFETY: on the main thread, whose queue the machine then belongs to; the
    // configuration was validated.
    let vm = unsafe { VZVirtualMachine::initWithConfiguration(VZVirtualMachine::alloc(), config) };
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
    // SAFETY: on the main thread, the machine's queue.
    unsafe { vm.startWithCompletionHandler(&on_complete(&started)) };
    let mut pressed = false;
    loop {
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
        if let Some(Err(why)) = take(&started) {
            return Err(Error::Vz(format!("starting the machine: {why}")));
        }
        // SAFETY: on the machine's queue (the main thread).
        let state = unsafe { vm.state() };
        if state == VZVirtualMachineState::Stopped {
            return Ok(ExitReason::PowerOff);
        }
        if state == VZVirtualMachineState::Error {
            return Err(Error::Vz("the machine stopped with an error".into()));
        }
        if !window.isVisible() && !pressed {
            // The window was closed: the power button, as for Ctrl-C.
            control.ask_guest_to_stop();
        }
        if let Some(asked) = control.asked_to_stop() {
            if !pressed {
                pressed = true;
                // SAFETY: on the machine's queue (the main thread).
                if let Err(e) = unsafe { vm.requestStopWithError() } {
                    log::warn!("vz: asking the guest to stop: {}", e.localizedDescription());
                }
            } else if asked.elapsed() >= GRACE {
                control.stop(Ok(ExitReason::Stopped));
            }
        }
        if control.stopping() {
            // SAFETY: on the machine's queue (the main thread).
            unsafe { vm.stopWithCompletionHandler(&on_complete(&Arc::default())) };
            return control.take_outcome().unwrap_or(Ok(ExitReason::Stopped));
        }
    }
}
