//! The CUDA backend: the same operations as the CPU kernels, as CUDA C sources under
//! `kernels/cuda/` compiled by NVRTC at run time for the device's architecture (through
//! cudarc, which loads libcuda and libnvrtc dynamically).
//!
//! NVRTC at start rather than PTX embedded at build time: the kernels are then compiled for the
//! exact device found (`sm_90a` on Hopper, with its FP8 `mma`), the build needs no CUDA toolkit,
//! and the sources CI compiles (`.ci/nvrtc-check.sh`) are the ones that run. It costs about a
//! second at start.
//!
//! Without the `cuda` feature, or on a machine without a driver or device, [`CudaBackend::new`]
//! returns [`Error::CudaUnavailable`]. With it, two layers:
//! - device operations on device buffers ([`DeviceMatrix`] for weights uploaded once, cudarc
//!   `CudaSlice`s for activations, [`DeviceCache`] for a paged latent cache): what the worker's
//!   CUDA backend and `bench kernels --device cuda` use;
//! - host-slice conveniences (`matmul`, `mla_decode`, …) that stage through them, for tests
//!   that compare every kernel with the CPU one.

#[cfg(not(feature = "cuda"))]
use crate::error::{Error, Result};

/// Helpers prepended to every source (NVRTC has no system headers).
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// Every CUDA source, by module name. `.ci/nvrtc-check.sh` compiles the same files.
pub const SOURCES: &[(&str, &str)] = &[
    ("activation", include_str!("../cuda/activation.cu")),
    ("gate", include_str!("../cuda/gate.cu")),
    ("gemm", include_str!("../cuda/gemm.cu")),
    ("mla", include_str!("../cuda/mla.cu")),
    ("moe", include_str!("../cuda/moe.cu")),
    ("norm", include_str!("../cuda/norm.cu")),
    ("rope", include_str!("../cuda/rope.cu")),
    ("softmax", include_str!("../cuda/softmax.cu")),
];

/// The full text NVRTC compiles for one source.
pub fn full_source(src: &str, name: &str) -> String {
    format!("{COMMON}\n#line 1 \"{name}.cu\"\n{src}")
}

/// A CUDA device with every kernel module loaded.
pub struct CudaBackend {
    #[cfg(feature = "cuda")]
    inner: imp::Inner,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

#[cfg(not(feature = "cuda"))]
impl CudaBackend {
    /// Always fails: this build has no CUDA support.
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::CudaUnavailable(
            "this binary was built without the `cuda` feature (cargo build --features cuda)".into(),
        ))
    }
    pub fn device_name(&self) -> String {
        match self.never {}
    }
}

#[cfg(feature = "cuda")]
pub use imp::{DeviceCache, DeviceMatrix, Epilogue, GemmAlgo, device_memory};

#[cfg(feature = "cuda")]
mod imp;

#[cfg(feature = "cuda")]
pub mod bench;
