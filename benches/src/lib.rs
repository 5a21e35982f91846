//! Criterion benchmarks of hvrun's device models, driven without a hypervisor.
//!
//! The benchmarks live in `benches/`; this library is empty.
