//! The machine's delegate: how the framework says the guest stopped the machine, or that
//! it stopped on an error (with the `NSError` the state alone does not carry). The calls
//! arrive on the machine's queue; the watcher takes what they left.

use std::sync::{Arc, Mutex};

use objc2::rc::Retained;
use objc2::runtime::{NSObject, NSObjectProtocol};
use objc2::{define_class, msg_send, AnyThread, DefinedClass};
use objc2_foundation::NSError;
use objc2_virtualization::{VZNetworkDevice, VZVirtualMachine, VZVirtualMachineDelegate};

use crate::vz::watch::Ended;

/// What the delegate heard, for the watcher.
pub type Heard = Arc<Mutex<Option<Ended>>>;

/// The delegate's state.
pub struct Ivars {
    heard: Heard,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and this class does not
    // implement Drop.
    #[unsafe(super(NSObject))]
    #[name = "HvrunVirtualMachineDelegate"]
    #[ivars = Ivars]
    /// The machine's delegate: leaves what it hears for the watcher.
    pub struct Delegate;

    // SAFETY: NSObjectProtocol has no requirements beyond NSObject's.
    unsafe impl NSObjectProtocol for Delegate {}

    // SAFETY: the methods match the protocol's signatures.
    unsafe impl VZVirtualMachineDelegate for Delegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _machine: &VZVirtualMachine) {
            self.hear(Ended::ByGuest);
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _machine: &VZVirtualMachine, error: &NSError) {
            self.hear(Ended::OnError(describe(error)));
        }

        #[unsafe(method(virtualMachine:networkDevice:attachmentWasDisconnectedWithError:))]
        fn network_disconnected(&self, _machine: &VZVirtualMachine, _device: &VZNetworkDevice, error: &NSError) {
            log::warn!("vz: a network interface lost its attachment: {}", describe(error));
        }
    }
);

impl Delegate {
    /// A delegate that leaves what it hears in `heard`.
    pub fn new(heard: Heard) -> Retained<Self> {
        let this = Self::alloc().set_ivars(Ivars { heard });
        // SAFETY: NSObject's designated initialiser, on a freshly allocated object.
        unsafe { msg_send![super(this), init] }
    }

    fn hear(&self, ended: Ended) {
        self.ivars().heard.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(ended);
    }
}

/// An `NSError`'s description, with its underlying reason where the framework gives one.
pub fn describe(error: &NSError) -> String {
    let text = error.localizedDescription().to_string();
    match error.localizedFailureReason() {
        Some(reason) if !text.contains(&reason.to_string()) => format!("{text} ({reason})"),
        _ => text,
    }
}
