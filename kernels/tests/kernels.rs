//! Public behaviour of shardseek-kernels: every fast path against its plain reference on
//! random inputs (several seeds, odd shapes), within the bounds stated per test.

mod kernels {
    mod bf16_act;
    pub mod common;
    mod cuda;
    mod fp8;
    mod gemm;
    mod mla;
    mod moe;
    mod ops;
}
