//! How a device raises its interrupt.

/// One interrupt line from a device to the interrupt controller.
///
/// Level-triggered: the device drives the line high while it wants service and low
/// when the guest has acknowledged it.
pub trait IrqLine: Send + Sync {
    /// Drives the line to `level`.
    fn set_level(&self, level: bool);
}

/// A line connected to nothing, for machines and tests without an interrupt controller.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _level: bool) {}
}
