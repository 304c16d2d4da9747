//! The clock moved to the runtime (every service uses the same one); this
//! re-export keeps `tocsin_incidents::clock` paths working.
pub use tocsin_runtime::clock::*;
