//! Numeric kernels of shardseek (DESIGN.md §5).
//!
//! Every operation has a plain reference implementation (`reference` submodules, used by tests)
//! and a fast CPU path chosen at run time. Activations are f32, multiplied exactly, or, with
//! [`gemm::Activations::Bf16`] on CPUs with AVX512-BF16, rounded to bf16 for the GEMMs' bf16
//! dot-product instructions; weights stay in their stored dtype (FP8 e4m3 with 128×128 block
//! scales, BF16, F16, F32) and are dequantised inside the kernels, never copied whole into f32.
//!
//! | module | operation |
//! |---|---|
//! | [`gemm`] | y = x·Wᵀ (FP8 block-scaled, BF16, F16, F32 weights; x f32, or rounded to bf16); decode (streaming, dot tiles, bf16 tiles) and prefill (packed 6×32 f32 microkernel, or packed bf16 pair tiles) strategies; SiLU·mul and scaled-accumulate epilogues |
//! | [`moe`] | grouped expert FFN (gate/up → SiLU·mul → down) over (expert, row range) groups |
//! | [`mla`] | MLA decode and chunked prefill over a paged latent cache (absorbed form) |
//! | [`norm`], [`rope`], [`gate`], [`softmax`], [`sampling`] | RMSNorm, interleaved RoPE + YaRN, noaux_tc router, softmax, sampling |
//! | [`fp8`] | e4m3 ↔ f32/bf16 conversions |
//! | [`cpu`] | run-time ISA dispatch (AVX-512 F/BW/VL for the FP8 decode GEMV, AVX2+FMA+F16C, or portable) and the shared inner loops |
//! | [`cuda`] | the same ops in CUDA C (`kernels/cuda/*.cu`), NVRTC at run time, feature `cuda` |
//! | [`bench`] | `shardseek bench kernels`: ceilings and every kernel against them |
//! | [`pool`] | the one thread pool, sized by the cgroup CPU limit |

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod fp8;
pub mod gate;
pub mod gemm;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod rope;
pub mod sampling;
pub mod scratch;
pub mod softmax;
pub mod weight;
mod wide;

pub use error::{Error, Result};
pub use weight::{Weight, WeightData};

/// cudarc, for crates that need the driver or NCCL directly (the GPU dispatch transport).
#[cfg(feature = "cuda")]
pub use cudarc;
