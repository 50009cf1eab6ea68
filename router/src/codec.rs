//! Row codec: f32 activation rows ↔ the `bytes` payload of a [`Rows`] message.
//!
//! Three wire dtypes (DESIGN.md §4): f32 (exact), bf16 (round to nearest even; the default) and
//! fp8 e4m3fn with one f32 scale per 128 values of a row. The fp8 codec is implemented here rather
//! than borrowed from `shardseek-kernels` because the dependency arrows (DESIGN.md §1) keep the
//! router free of the numeric crate; it is small and tested over every one of its 256 codes.
//!
//! The per-value loops live in [`kernels`], compiled for AVX-512, AVX2 and the portable baseline
//! and chosen at run time. Rows an attention pod sends are [`PendingRows`]: f32 rows that are
//! encoded when their gRPC message is written, straight into the frame buffer (one write per
//! value, no payload buffer in between), each row at most once per dispatch
//! ([`SharedEncoding`]). A shard's partial sums go through a [`RowEncoder`] as the compute
//! produces them. Received rows are [`EncodedRows`], decoded straight out of the received
//! `Bytes` into their destination rows (no intermediate copy, no zero-fill).

use std::cell::UnsafeCell;
use std::fmt;
use std::mem::MaybeUninit;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use shardseek_proto::rows::{RowSource, Rows};
use shardseek_proto::v1::RowDtype;

use crate::{Error, Result};

pub mod kernels;
use kernels::Level;

/// Values per fp8 scale block along a row: the same 128 as the checkpoints' weight blocks.
pub const FP8_BLOCK: usize = 128;
/// Largest finite e4m3fn value; a block's scale maps its largest magnitude onto it.
pub const FP8_MAX: f32 = 448.0;

/// The dtype rows travel in (`--dispatch-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WireDtype {
    /// Exact: the cluster agrees with the single process to rounding of the summation order.
    F32,
    /// Half the bytes of f32, relative error ≤ 2⁻⁹ per value. The default, from
    /// `shardseek bench dispatch` (V3 shapes, 4 shards, a quiet 2-core machine, CPU per round
    /// trip): bf16 takes 50–53% less than f32 at 64–256 tokens (256: 10.9 ms vs 21.9 ms); fp8
    /// dispatch (bf16 combine) takes 14–19% less than bf16 (256: 8.8 ms) for 16× the error
    /// bound on the expert inputs.
    #[default]
    Bf16,
    /// A quarter of the bytes, relative error ≤ 2⁻⁴ of each value plus 2⁻¹⁰ of its block's
    /// maximum. Only the rows sent to the shards travel in fp8: the partial sums come back in
    /// bf16 ([`WireDtype::combine_dtype`]).
    Fp8E4m3,
}

impl WireDtype {
    /// The dtype the shards' partial sums come back in when rows are sent in `self`.
    ///
    /// fp8 dispatch combines in bf16, the layout DeepSeek's DeepEP uses: a partial sum is added
    /// straight into the residual stream, where fp8's three mantissa bits would cost more
    /// accuracy than the expert inputs lose, and encoding it is a block maximum plus a
    /// conversion per value where bf16 is one rounding (measured at 2.5× bf16's encode time
    /// per value on cached rows, more on rows from memory).
    pub fn combine_dtype(self) -> WireDtype {
        match self {
            WireDtype::Fp8E4m3 => WireDtype::Bf16,
            other => other,
        }
    }

    /// Payload bytes of one row of `width` values (data plus scales).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::F32 => width * 4,
            WireDtype::Bf16 => width * 2,
            WireDtype::Fp8E4m3 => width + width.div_ceil(FP8_BLOCK) * 4,
        }
    }

    /// The proto enum value.
    pub fn to_proto(self) -> RowDtype {
        match self {
            WireDtype::F32 => RowDtype::F32,
            WireDtype::Bf16 => RowDtype::Bf16,
            WireDtype::Fp8E4m3 => RowDtype::Fp8E4m3,
        }
    }

    /// From the proto enum's wire value; `UNSPECIFIED` and unknown values are refused.
    pub fn from_proto(value: i32) -> Result<Self> {
        match RowDtype::try_from(value) {
            Ok(RowDtype::F32) => Ok(WireDtype::F32),
            Ok(RowDtype::Bf16) => Ok(WireDtype::Bf16),
            Ok(RowDtype::Fp8E4m3) => Ok(WireDtype::Fp8E4m3),
            _ => Err(Error::Codec(format!("unknown row dtype {value}"))),
        }
    }
}

impl fmt::Display for WireDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
            WireDtype::Fp8E4m3 => "fp8",
        })
    }
}

impl FromStr for WireDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDtype::F32),
            "bf16" => Ok(WireDtype::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(WireDtype::Fp8E4m3),
            other => Err(Error::Codec(format!(
                "unknown dispatch dtype `{other}` (expected f32, bf16 or fp8)"
            ))),
        }
    }
}

/// A `[count, width]` block of rows in a wire dtype, as received (or materialised).
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedRows {
    pub dtype: WireDtype,
    pub count: usize,
    pub width: usize,
    pub data: Bytes,
    /// fp8 only: `count * ceil(width / 128)` little-endian f32 scales.
    pub scales: Bytes,
}

impl WireDtype {
    /// Data bytes of one row (without fp8's scales).
    pub fn data_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::F32 => width * 4,
            WireDtype::Bf16 => width * 2,
            WireDtype::Fp8E4m3 => width,
        }
    }

    /// Scale bytes of one row (fp8 only).
    pub fn scale_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::Fp8E4m3 => width.div_ceil(FP8_BLOCK) * 4,
            _ => 0,
        }
    }
}

/// Encodes rows (each `width` values) one after the other into `data` and `scales`, which
/// hold exactly their encoded bytes; every byte is written.
fn encode_rows_into<'a>(
    rows: impl Iterator<Item = &'a [f32]>,
    width: usize,
    dtype: WireDtype,
    data: &mut [MaybeUninit<u8>],
    scales: &mut [MaybeUninit<u8>],
) {
    let level = Level::detect();
    let (db, sb) = (dtype.data_bytes(width).max(1), dtype.scale_bytes(width));
    let mut scales = scales.chunks_exact_mut(sb.max(1));
    for (row, dst) in rows.zip(data.chunks_exact_mut(db)) {
        let sc = if sb == 0 {
            &mut [][..]
        } else {
            match scales.next() {
                Some(sc) => sc,
                None => return,
            }
        };
        encode_row(row, dtype, level, dst, sc);
    }
}

/// Encodes one row into its data bytes and (fp8) its scale bytes.
fn encode_row(
    row: &[f32],
    dtype: WireDtype,
    level: Level,
    data: &mut [MaybeUninit<u8>],
    scales: &mut [MaybeUninit<u8>],
) {
    match dtype {
        WireDtype::F32 => kernels::encode_f32(level, row, data),
        WireDtype::Bf16 => kernels::encode_bf16(level, row, data),
        WireDtype::Fp8E4m3 => kernels::encode_fp8_row(level, row, data, scales),
    }
}

impl EncodedRows {
    /// Encodes `rows` (`count * width` values, row-major) in `dtype`.
    pub fn encode(rows: &[f32], width: usize, dtype: WireDtype) -> Result<Self> {
        if width == 0 || !rows.len().is_multiple_of(width) {
            return Err(Error::Codec(format!(
                "{} values do not make rows of width {width}",
                rows.len()
            )));
        }
        let count = rows.len() / width;
        let (data_len, scales_len) = (
            count * dtype.data_bytes(width),
            count * dtype.scale_bytes(width),
        );
        let mut scales = Vec::with_capacity(scales_len);
        // SAFETY: `encode_rows_into` writes every byte of both slices (count full rows of
        // `width` values fill them exactly), so both vectors are initialised to their length.
        let data = unsafe {
            kernels::encode_to_vec(data_len, |d| {
                encode_rows_into(
                    rows.chunks_exact(width),
                    width,
                    dtype,
                    d,
                    &mut scales.spare_capacity_mut()[..scales_len],
                );
            })
        };
        // SAFETY: as above.
        unsafe { scales.set_len(scales_len) };
        Ok(EncodedRows {
            dtype,
            count,
            width,
            data: Bytes::from(data),
            scales: Bytes::from(scales),
        })
    }

    /// Checks that the payload sizes match `count`, `width` and `dtype` (data from the network).
    pub fn validate(&self) -> Result<()> {
        let values = self.count.checked_mul(self.width);
        let data = values.and_then(|_| self.count.checked_mul(self.dtype.data_bytes(self.width)));
        let scales = self.count.checked_mul(self.dtype.scale_bytes(self.width));
        match (data, scales) {
            (Some(d), Some(s)) if self.data.len() == d && self.scales.len() == s => Ok(()),
            _ => Err(Error::Codec(format!(
                "{} rows of width {} in {}: expected {} data and {} scale bytes, got {} and {}",
                self.count,
                self.width,
                self.dtype,
                data.map_or_else(|| "too many".into(), |d| d.to_string()),
                scales.map_or_else(|| "too many".into(), |s| s.to_string()),
                self.data.len(),
                self.scales.len()
            ))),
        }
    }

    /// Decodes every row into a new `count * width` vector.
    pub fn decode(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.decode_append(&mut out)?;
        Ok(out)
    }

    /// Appends every row, decoded, to `out`: one write per value, read in place from the
    /// received payload.
    pub fn decode_append(&self, out: &mut Vec<f32>) -> Result<()> {
        self.validate()?;
        let n = self.count * self.width;
        out.reserve(n);
        let spare = &mut out.spare_capacity_mut()[..n];
        for (i, row) in spare.chunks_exact_mut(self.width.max(1)).enumerate() {
            self.load_row(i, row);
        }
        // SAFETY: the loop wrote all `count` rows of `width` values (`load_row` writes every
        // value of the row it is given), i.e. the `n` values after the old length.
        unsafe { out.set_len(out.len() + n) };
        Ok(())
    }

    /// Decodes row `i` into `out` (`width` values). Call [`validate`](Self::validate) first.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        self.row_op(i, out, false);
    }

    /// Adds row `i` into `out` (`width` values): the combine step, read in place from the
    /// received payload. Call [`validate`](Self::validate) first.
    pub fn add_row_into(&self, i: usize, out: &mut [f32]) {
        self.row_op(i, out, true);
    }

    /// Adds values `first..first + out.len()` of row `i` into `out`: the combine of one tile
    /// of a row (see the dispatcher). `first` is a multiple of 128 (the fp8 block) unless the
    /// range ends the row. Call [`validate`](Self::validate) first.
    pub fn add_cols_into(&self, i: usize, first: usize, out: &mut [f32]) {
        let (w, n) = (self.width, out.len());
        debug_assert!(first + n <= w);
        let level = Level::detect();
        let at = i * w + first;
        match self.dtype {
            WireDtype::F32 => {
                kernels::apply_f32(level, &self.data[at * 4..(at + n) * 4], out, true)
            }
            WireDtype::Bf16 => {
                kernels::apply_bf16(level, &self.data[at * 2..(at + n) * 2], out, true);
            }
            WireDtype::Fp8E4m3 => {
                debug_assert!(first.is_multiple_of(FP8_BLOCK));
                let blocks = w.div_ceil(FP8_BLOCK);
                let scales =
                    &self.scales[(i * blocks + first / FP8_BLOCK) * 4..(i + 1) * blocks * 4];
                for ((dst, q), s) in out
                    .chunks_mut(FP8_BLOCK)
                    .zip(self.data[at..at + n].chunks(FP8_BLOCK))
                    .zip(scales.chunks_exact(4))
                {
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    kernels::apply_fp8(level, q, scale, dst, true);
                }
            }
        }
    }

    fn row_op(&self, i: usize, out: &mut [f32], add: bool) {
        if !add {
            // SAFETY: `load_row` stores only initialised f32 values.
            self.load_row(i, unsafe { kernels::as_uninit(out) });
            return;
        }
        let w = self.width;
        let level = Level::detect();
        match self.dtype {
            WireDtype::F32 => {
                kernels::apply_f32(level, &self.data[i * w * 4..(i + 1) * w * 4], out, add);
            }
            WireDtype::Bf16 => {
                kernels::apply_bf16(level, &self.data[i * w * 2..(i + 1) * w * 2], out, add);
            }
            WireDtype::Fp8E4m3 => {
                let blocks = w.div_ceil(FP8_BLOCK);
                let src = &self.data[i * w..(i + 1) * w];
                let scales = &self.scales[i * blocks * 4..(i + 1) * blocks * 4];
                for ((dst, q), s) in out
                    .chunks_mut(FP8_BLOCK)
                    .zip(src.chunks(FP8_BLOCK))
                    .zip(scales.chunks_exact(4))
                {
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    kernels::apply_fp8(level, q, scale, dst, add);
                }
            }
        }
    }

    /// Writes row `i` into `out` (`width` values, all written).
    fn load_row(&self, i: usize, out: &mut [MaybeUninit<f32>]) {
        let w = self.width;
        let level = Level::detect();
        match self.dtype {
            WireDtype::F32 => kernels::load_f32(level, &self.data[i * w * 4..(i + 1) * w * 4], out),
            WireDtype::Bf16 => {
                kernels::load_bf16(level, &self.data[i * w * 2..(i + 1) * w * 2], out);
            }
            WireDtype::Fp8E4m3 => {
                let blocks = w.div_ceil(FP8_BLOCK);
                let src = &self.data[i * w..(i + 1) * w];
                let scales = &self.scales[i * blocks * 4..(i + 1) * blocks * 4];
                for ((dst, q), s) in out
                    .chunks_mut(FP8_BLOCK)
                    .zip(src.chunks(FP8_BLOCK))
                    .zip(scales.chunks_exact(4))
                {
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    kernels::load_fp8(level, q, scale, dst);
                }
            }
        }
    }

    /// Payload bytes (data and scales).
    pub fn payload_bytes(&self) -> usize {
        self.data.len() + self.scales.len()
    }

    /// The proto message.
    pub fn into_proto(self) -> Rows {
        Rows {
            dtype: self.dtype.to_proto() as i32,
            count: self.count as u32,
            width: self.width as u32,
            data: self.data,
            scales: self.scales,
            source: None,
        }
    }

    /// From the proto message, validated.
    pub fn from_proto(rows: Rows) -> Result<Self> {
        let rows = if rows.source.is_some() {
            rows.materialize()
        } else {
            rows
        };
        let out = EncodedRows {
            dtype: WireDtype::from_proto(rows.dtype)?,
            count: rows.count as usize,
            width: rows.width as usize,
            data: rows.data,
            scales: rows.scales,
        };
        out.validate()?;
        Ok(out)
    }
}

/// The rows of one shared matrix, each encoded at most once across the messages that send it.
///
/// A token goes to every shard that holds one of its experts (3–4 of 4 shards at V3's top-8),
/// so encoding each shard's message from f32 would encode each row that many times. With this,
/// the first message to write a row encodes it into its own frame and keeps a copy of the bytes
/// it just wrote; later messages copy them — reading a quarter (bf16: half) of the f32 bytes
/// and no conversion. A row another message is encoding at that moment is encoded again rather
/// than waited for, so no frame waits on another.
pub struct SharedEncoding {
    dtype: WireDtype,
    width: usize,
    data: Box<[UnsafeCell<MaybeUninit<u8>>]>,
    scales: Box<[UnsafeCell<MaybeUninit<u8>>]>,
    /// Per row: [`EMPTY`], [`WRITING`] (one message is storing its copy) or [`READY`].
    state: Box<[AtomicU8]>,
}

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

// SAFETY: a row's bytes are written only by the one thread that moved its state from EMPTY to
// WRITING, and read only after a load (Acquire) saw READY, which that thread stored (Release)
// after its last write; rows never overlap.
unsafe impl Sync for SharedEncoding {}

impl SharedEncoding {
    /// An empty encoding of `rows` rows of `width` values in `dtype`.
    pub fn new(rows: usize, width: usize, dtype: WireDtype) -> Self {
        let uninit = |n: usize| -> Box<[UnsafeCell<MaybeUninit<u8>>]> {
            (0..n)
                .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
                .collect()
        };
        SharedEncoding {
            dtype,
            width,
            data: uninit(rows * dtype.data_bytes(width)),
            scales: uninit(rows * dtype.scale_bytes(width)),
            state: (0..rows).map(|_| AtomicU8::new(EMPTY)).collect(),
        }
    }

    /// Writes row `r` (`values`) into `data`/`scales` (one row's bytes each): a copy of the kept
    /// bytes when the row is ready, else encoded, and then kept if no other message keeps it.
    fn write_row(
        &self,
        r: usize,
        values: &[f32],
        level: Level,
        data: &mut [MaybeUninit<u8>],
        scales: &mut [MaybeUninit<u8>],
    ) {
        let (db, sb) = (data.len(), scales.len());
        let row = |all: &[UnsafeCell<MaybeUninit<u8>>], n: usize| -> *mut MaybeUninit<u8> {
            // UnsafeCell<T> has T's layout; row r's n bytes lie inside `all` (rows × n).
            UnsafeCell::raw_get(all[r * n..(r + 1) * n].as_ptr())
        };
        if self.state[r].load(Ordering::Acquire) == READY {
            // SAFETY: READY was stored after the row's last write, and nothing writes it again:
            // shared reads of initialised bytes.
            unsafe {
                data.copy_from_slice(std::slice::from_raw_parts(row(&self.data, db), db));
                scales.copy_from_slice(std::slice::from_raw_parts(row(&self.scales, sb), sb));
            }
            return;
        }
        encode_row(values, self.dtype, level, data, scales);
        if self.state[r]
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: this thread moved the row to WRITING, so it is the row's only writer and
            // no reader looks at it before READY.
            unsafe {
                std::slice::from_raw_parts_mut(row(&self.data, db), db).copy_from_slice(data);
                std::slice::from_raw_parts_mut(row(&self.scales, sb), sb).copy_from_slice(scales);
            }
            self.state[r].store(READY, Ordering::Release);
        }
    }
}

/// Rows encoded one at a time as they are produced: a shard's reply, written while each row of
/// partial sums is still in the cache of the core that summed it, instead of from an f32
/// matrix of every row read back later.
///
/// The rows may be written inside a frame laid out around them ([`RowEncoder::framed`]):
/// `head ‖ data ‖ middle ‖ scales` in one buffer, so the message goes out as written.
#[derive(Debug)]
pub struct RowEncoder {
    dtype: WireDtype,
    width: usize,
    count: usize,
    pushed: usize,
    /// `head ‖ data ‖ middle ‖ scales`; initialised up to the rows pushed so far (the scales
    /// of pushed rows are written into the spare capacity beyond).
    buf: Vec<u8>,
    middle: Vec<u8>,
    data_at: usize,
    scales_at: usize,
    level: Level,
}

impl RowEncoder {
    /// An encoder for exactly `count` rows of `width` values in `dtype`.
    pub fn new(count: usize, width: usize, dtype: WireDtype) -> Self {
        Self::framed(count, width, dtype, &[], Vec::new())
    }

    /// As [`RowEncoder::new`], with `head` before the data and `middle` between data and
    /// scales (a message's bytes around its rows).
    pub fn framed(
        count: usize,
        width: usize,
        dtype: WireDtype,
        head: &[u8],
        middle: Vec<u8>,
    ) -> Self {
        let data_at = head.len();
        let scales_at = data_at + count * dtype.data_bytes(width) + middle.len();
        let mut buf = Vec::with_capacity(scales_at + count * dtype.scale_bytes(width));
        buf.extend_from_slice(head);
        RowEncoder {
            dtype,
            width,
            count,
            pushed: 0,
            buf,
            middle,
            data_at,
            scales_at,
            level: Level::detect(),
        }
    }

    /// Rows still to come.
    pub fn remaining(&self) -> usize {
        self.count - self.pushed
    }

    /// Encodes the next row.
    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.width {
            return Err(Error::Codec(format!(
                "a row of {} values for rows of width {}",
                row.len(),
                self.width
            )));
        }
        if self.pushed == self.count {
            return Err(Error::Codec(format!(
                "row {} of an encoder for {} rows",
                self.pushed + 1,
                self.count
            )));
        }
        let (db, sb) = (
            self.dtype.data_bytes(self.width),
            self.dtype.scale_bytes(self.width),
        );
        let len = self.buf.len();
        // Capacity for every row was reserved in `framed`; this row's data starts at `len` and
        // its scales at `scales_at + pushed·sb`, past the data of every row.
        let (data, rest) = self.buf.spare_capacity_mut().split_at_mut(db);
        let at = self.scales_at + self.pushed * sb - len - db;
        encode_row(row, self.dtype, self.level, data, &mut rest[at..at + sb]);
        // SAFETY: `encode_row` wrote every one of the row's `db` data bytes (the codec kernels'
        // contract), right after the initialised ones; its scales lie beyond `len` and are
        // covered by the final `set_len` in `finish`, once every row has written them.
        unsafe { self.buf.set_len(len + db) };
        self.pushed += 1;
        Ok(())
    }

    /// The encoded rows (slices of the buffer) and the whole buffer (`head ‖ data ‖ middle ‖
    /// scales`); every row must have been pushed.
    pub fn finish(mut self) -> Result<(EncodedRows, Bytes)> {
        if self.pushed != self.count {
            return Err(Error::Codec(format!(
                "{} of {} rows encoded",
                self.pushed, self.count
            )));
        }
        let data_end = self.buf.len();
        let total = self.scales_at + self.count * self.dtype.scale_bytes(self.width);
        for (d, &b) in self.buf.spare_capacity_mut().iter_mut().zip(&self.middle) {
            d.write(b);
        }
        // SAFETY: bytes below `data_end` are initialised; `middle` was just written after them,
        // and every row wrote its scales in `scales_at..total` (all `count` rows were pushed).
        unsafe { self.buf.set_len(total) };
        let all = Bytes::from(self.buf);
        let rows = EncodedRows {
            dtype: self.dtype,
            count: self.count,
            width: self.width,
            data: all.slice(self.data_at..data_end),
            scales: all.slice(self.scales_at..total),
        };
        Ok((rows, all))
    }
}

/// Rows still in f32, encoded in `dtype` only when their message is written — straight into the
/// outgoing gRPC frame (see `shardseek_proto::rows`). The matrix is shared, so every shard's
/// message of a dispatch refers to the same buffer without copying it.
#[derive(Clone)]
pub struct PendingRows {
    dtype: WireDtype,
    width: usize,
    values: Arc<Vec<f32>>,
    /// The rows sent, in this order (a shard's tokens).
    rows: Vec<usize>,
    /// The matrix's rows encoded once across every message that sends them (a dispatch's
    /// shards), when the sender shares one.
    shared: Option<Arc<SharedEncoding>>,
}

impl fmt::Debug for PendingRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRows")
            .field("dtype", &self.dtype)
            .field("count", &self.count())
            .field("width", &self.width)
            .finish()
    }
}

impl PendingRows {
    /// Rows `rows` (in that order) of `values` (`[n, width]`, row-major).
    pub fn gather(
        values: Arc<Vec<f32>>,
        width: usize,
        rows: Vec<usize>,
        dtype: WireDtype,
    ) -> Result<Self> {
        let n = Self::rows_in(&values, width)?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::Codec(format!("row {bad} of a matrix of {n} rows")));
        }
        Ok(PendingRows {
            dtype,
            width,
            values,
            rows,
            shared: None,
        })
    }

    /// Encodes through `shared` (made for this matrix, width and dtype): rows another message
    /// already encoded are copied from it.
    pub fn sharing(mut self, shared: Arc<SharedEncoding>) -> Result<Self> {
        let rows = self.values.len() / self.width;
        if shared.dtype != self.dtype || shared.width != self.width || shared.state.len() != rows {
            return Err(Error::Codec(format!(
                "a shared encoding of {} rows of {} in {} for {rows} rows of {} in {}",
                shared.state.len(),
                shared.width,
                shared.dtype,
                self.width,
                self.dtype
            )));
        }
        self.shared = Some(shared);
        Ok(self)
    }

    fn rows_in(values: &[f32], width: usize) -> Result<usize> {
        if width == 0 || !values.len().is_multiple_of(width) {
            return Err(Error::Codec(format!(
                "{} values do not make rows of width {width}",
                values.len()
            )));
        }
        Ok(values.len() / width)
    }

    pub fn dtype(&self) -> WireDtype {
        self.dtype
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn count(&self) -> usize {
        self.rows.len()
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.width..(r + 1) * self.width]
    }

    fn write(&self, data: &mut [MaybeUninit<u8>], scales: &mut [MaybeUninit<u8>]) {
        let Some(shared) = &self.shared else {
            let rows = self.rows.iter().map(|&r| self.row(r));
            encode_rows_into(rows, self.width, self.dtype, data, scales);
            return;
        };
        let level = Level::detect();
        let (db, sb) = (
            self.dtype.data_bytes(self.width),
            self.dtype.scale_bytes(self.width),
        );
        for (k, &r) in self.rows.iter().enumerate() {
            shared.write_row(
                r,
                self.row(r),
                level,
                &mut data[k * db..(k + 1) * db],
                &mut scales[k * sb..(k + 1) * sb],
            );
        }
    }

    /// Encodes the rows now (transports that move bytes themselves, tests).
    pub fn encode(&self) -> EncodedRows {
        let m = self.clone().into_proto().materialize();
        EncodedRows {
            dtype: self.dtype,
            count: self.count(),
            width: self.width,
            data: m.data,
            scales: m.scales,
        }
    }

    /// The proto message, encoded when written.
    pub fn into_proto(self) -> Rows {
        Rows::from_source(Arc::new(self))
    }
}

impl RowSource for PendingRows {
    fn dtype(&self) -> i32 {
        self.dtype.to_proto() as i32
    }
    fn count(&self) -> u32 {
        PendingRows::count(self) as u32
    }
    fn width(&self) -> u32 {
        self.width as u32
    }
    fn data_len(&self) -> usize {
        PendingRows::count(self) * self.dtype.data_bytes(self.width)
    }
    fn scales_len(&self) -> usize {
        PendingRows::count(self) * self.dtype.scale_bytes(self.width)
    }
    fn encode_into(&self, data: &mut [MaybeUninit<u8>], scales: &mut [MaybeUninit<u8>]) {
        self.write(data, scales);
    }
}

/// f32 → bf16 bits, round to nearest even; NaN stays NaN.
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 → e4m3fn code, round to nearest even, saturating to ±448 (e4m3fn has no infinity);
/// NaN becomes the NaN code 0x7F. The kernels crate's branch-free encoder (loops over rows
/// vectorize), the same one the FP8 weight quantiser uses.
pub use shardseek_kernels::fp8::f32_to_e4m3_fast as f32_to_e4m3;

/// e4m3fn code → f32 (exact).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[usize::from(code)]
}

const fn e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0x0F) as i32;
    let m = (code & 0x07) as f32;
    if e == 15 && code & 0x07 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 / 64.0
    } else {
        let mut p = 1.0f32;
        let mut k = e - 7;
        while k > 0 {
            p *= 2.0;
            k -= 1;
        }
        while k < 0 {
            p /= 2.0;
            k += 1;
        }
        (1.0 + m / 8.0) * p
    };
    sign * mag
}

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode(i as u8);
        i += 1;
    }
    t
}

/// Every e4m3fn code's value, so decoding is one load.
static E4M3_TABLE: [f32; 256] = e4m3_table();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e4m3_code_round_trips() {
        for code in 0u8..=255 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                assert!(code & 0x7F == 0x7F, "only 0x7F/0xFF are NaN, got {code:#x}");
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0.0 encodes as 0x80, same as its own code.
            assert_eq!(back, code, "code {code:#04x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
    }

    /// Brute force: the code whose value is nearest, ties to the even code, saturating at 448.
    fn nearest_code(v: f32) -> u8 {
        let sign = if v.is_sign_negative() { 0x80 } else { 0 };
        let a = v.abs().min(FP8_MAX);
        let mut best = 0u8;
        for code in 0u8..=0x7E {
            let d = (e4m3_to_f32(code) - a).abs();
            let bd = (e4m3_to_f32(best) - a).abs();
            if d < bd || (d == bd && code % 2 == 0 && best % 2 == 1) {
                best = code;
            }
        }
        sign | best
    }

    #[test]
    fn encode_is_nearest_with_ties_to_even() {
        // Every code's value, the midpoints between neighbours, and points just either side.
        let mut probes = Vec::new();
        for code in 0u8..0x7E {
            let lo = e4m3_to_f32(code);
            let hi = e4m3_to_f32(code + 1);
            let mid = (lo + hi) / 2.0;
            probes.extend([
                lo,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ]);
        }
        probes.extend([448.0, 449.0, 464.0, 1e6, f32::INFINITY, 1e-30, 0.0]);
        for &p in &probes {
            for v in [p, -p] {
                assert_eq!(f32_to_e4m3(v), nearest_code(v), "value {v:e}");
            }
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
        for i in 0..10_000u32 {
            let v = (i as f32 - 5000.0) * 0.37;
            let back = bf16_bits_to_f32(f32_to_bf16_bits(v));
            assert!((back - v).abs() <= v.abs() / 256.0, "{v} -> {back}");
            let h = half::bf16::from_f32(v).to_f32();
            assert_eq!(back, h, "agrees with the half crate");
        }
    }

    fn rows(n: usize, width: usize) -> Vec<f32> {
        (0..n * width)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.013 * (1.0 + (i % 5) as f32))
            .collect()
    }

    #[test]
    fn rows_round_trip_in_every_dtype_within_bounds() {
        let width = 300; // not a multiple of 128: a short last fp8 block
        let x = rows(5, width);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let enc = EncodedRows::encode(&x, width, dtype).expect("encode");
            assert_eq!(enc.payload_bytes(), 5 * dtype.row_bytes(width));
            let mut appended = vec![7.0f32];
            enc.decode_append(&mut appended).expect("append");
            assert_eq!(appended[1..], enc.decode().expect("decode")[..], "{dtype}");
            let proto = enc.clone().into_proto();
            let back = EncodedRows::from_proto(proto)
                .expect("valid")
                .decode()
                .expect("decode");
            for (r, (xr, br)) in x.chunks(width).zip(back.chunks(width)).enumerate() {
                for (b, (xb, bb)) in xr.chunks(FP8_BLOCK).zip(br.chunks(FP8_BLOCK)).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (&v, &d) in xb.iter().zip(bb) {
                        let bound = match dtype {
                            WireDtype::F32 => 0.0,
                            WireDtype::Bf16 => v.abs() / 256.0,
                            WireDtype::Fp8E4m3 => v.abs() / 16.0 + amax / 1024.0,
                        };
                        assert!(
                            (v - d).abs() <= bound,
                            "{dtype} row {r} block {b}: {v} -> {d}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pending_rows_encode_in_place_exactly_as_the_eager_codec() {
        use prost::Message as _;
        let width = 300;
        let values = Arc::new(rows(7, width));
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let picks = vec![5, 0, 3, 3, 6];
            let gathered: Vec<f32> = picks
                .iter()
                .flat_map(|&r| values[r * width..(r + 1) * width].iter().copied())
                .collect();
            let eager = EncodedRows::encode(&gathered, width, dtype).expect("encode");
            let pending =
                PendingRows::gather(Arc::clone(&values), width, picks, dtype).expect("gather");
            assert_eq!(pending.encode(), eager, "{dtype} gather");
            // The deferred message (encoded into the reserved frame buffer) is byte for byte
            // the eager one, and decodes to the same rows.
            let deferred = pending.into_proto();
            let mut frame = bytes::BytesMut::with_capacity(deferred.encoded_len());
            deferred.encode(&mut frame).expect("room");
            assert_eq!(&frame[..], &eager.clone().into_proto().encode_to_vec()[..]);
            let back = EncodedRows::from_proto(Rows::decode(frame.freeze()).expect("decode"))
                .expect("valid");
            assert_eq!(back, eager);
        }
        assert!(PendingRows::gather(Arc::clone(&values), width, vec![7], WireDtype::F32).is_err());
        assert!(PendingRows::gather(values, 299, vec![0], WireDtype::F32).is_err());
    }

    #[test]
    fn a_shared_encoding_gives_every_message_the_eager_codecs_bytes() {
        // Overlapping gathers (as a dispatch's shards) through one shared encoding, from
        // several threads at once and then again once every row is kept: each message is byte
        // for byte its eager encoding, whether its rows were encoded or copied.
        let width = 300;
        let values = Arc::new(rows(9, width));
        let picks: Vec<Vec<usize>> = vec![
            vec![0, 1, 2, 3],
            vec![2, 3, 4, 8],
            vec![8, 0, 5],
            vec![6, 7, 1, 4, 2],
        ];
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let shared = Arc::new(SharedEncoding::new(9, width, dtype));
            let eager = |p: &[usize]| {
                let g: Vec<f32> = p
                    .iter()
                    .flat_map(|&r| values[r * width..(r + 1) * width].iter().copied())
                    .collect();
                EncodedRows::encode(&g, width, dtype).expect("encode")
            };
            for round in 0..2 {
                std::thread::scope(|scope| {
                    for p in &picks {
                        let (values, shared) = (Arc::clone(&values), Arc::clone(&shared));
                        let want = eager(p);
                        scope.spawn(move || {
                            let got = PendingRows::gather(values, width, p.clone(), dtype)
                                .and_then(|r| r.sharing(shared))
                                .expect("gather")
                                .encode();
                            assert_eq!(got, want, "{dtype}, round {round}, rows {p:?}");
                        });
                    }
                });
            }
            assert!(
                shared
                    .state
                    .iter()
                    .all(|s| s.load(Ordering::Relaxed) == READY),
                "every row sent was kept"
            );
        }
        let f32_shared = Arc::new(SharedEncoding::new(9, width, WireDtype::F32));
        let wrong = [
            PendingRows::gather(Arc::clone(&values), width, vec![0], WireDtype::Bf16),
            PendingRows::gather(Arc::new(rows(8, width)), width, vec![0], WireDtype::F32),
        ];
        for p in wrong {
            assert!(p.and_then(|p| p.sharing(Arc::clone(&f32_shared))).is_err());
        }
    }

    #[test]
    fn rows_encoded_one_at_a_time_equal_the_eager_codec() {
        let width = 300;
        let values = rows(5, width);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let mut enc = RowEncoder::new(5, width, dtype);
            for (i, row) in values.chunks_exact(width).enumerate() {
                assert_eq!(enc.remaining(), 5 - i);
                enc.push(row).expect("push");
            }
            assert!(
                enc.push(&values[..width]).is_err(),
                "a sixth row is refused"
            );
            let want = EncodedRows::encode(&values, width, dtype).expect("encode");
            assert_eq!(enc.finish().expect("all rows").0, want, "{dtype}");
            // Inside a frame: head ‖ data ‖ middle ‖ scales, the rows slices of it.
            let mut framed = RowEncoder::framed(5, width, dtype, b"head", b"mid".to_vec());
            for row in values.chunks_exact(width) {
                framed.push(row).expect("push");
            }
            let (rows, all) = framed.finish().expect("all rows");
            assert_eq!(rows, want, "{dtype} framed");
            let mut frame = b"head".to_vec();
            frame.extend_from_slice(&want.data);
            frame.extend_from_slice(b"mid");
            frame.extend_from_slice(&want.scales);
            assert_eq!(&all[..], &frame[..], "{dtype} frame");
            let mut short = RowEncoder::new(2, width, dtype);
            assert!(
                short.push(&values[..width - 1]).is_err(),
                "a short row is refused"
            );
            short.push(&values[..width]).expect("push");
            assert!(short.finish().is_err(), "a missing row is an error");
        }
    }

    #[test]
    fn decode_append_writes_every_value_after_the_existing_ones() {
        let width = 130;
        let x = rows(3, width);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let enc = EncodedRows::encode(&x, width, dtype).expect("encode");
            let mut one = Vec::new();
            for i in 0..3 {
                let mut row = vec![f32::NAN; width];
                enc.row_into(i, &mut row);
                one.extend(row);
            }
            let mut out = vec![9.0f32; 2];
            enc.decode_append(&mut out).expect("append");
            assert_eq!(out[..2], [9.0, 9.0]);
            assert_eq!(out[2..], one[..], "{dtype}");
        }
    }

    #[test]
    fn adding_a_row_tile_by_tile_equals_adding_it_whole() {
        let width = 300; // a short last fp8 block
        let x = rows(3, width);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let enc = EncodedRows::encode(&x, width, dtype).expect("encode");
            let start: Vec<f32> = (0..width).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut whole = start.clone();
            enc.add_row_into(2, &mut whole);
            let mut tiled = start.clone();
            for first in (0..width).step_by(FP8_BLOCK) {
                let end = (first + FP8_BLOCK).min(width);
                enc.add_cols_into(2, first, &mut tiled[first..end]);
            }
            assert_eq!(
                tiled.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dtype}"
            );
        }
    }

    #[test]
    fn add_row_into_accumulates() {
        let x = rows(2, 8);
        let enc = EncodedRows::encode(&x, 8, WireDtype::F32).expect("encode");
        let mut acc = vec![1.0f32; 8];
        enc.add_row_into(1, &mut acc);
        for (a, v) in acc.iter().zip(&x[8..]) {
            assert_eq!(*a, 1.0 + v);
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let mut p = EncodedRows::encode(&rows(2, 8), 8, WireDtype::Bf16)
            .expect("encode")
            .into_proto();
        p.count = 3;
        assert!(EncodedRows::from_proto(p.clone()).is_err());
        // A payload one byte short, and sizes whose product overflows, are refused too.
        p.count = 2;
        p.data = p.data.slice(1..);
        assert!(EncodedRows::from_proto(p.clone()).is_err());
        p.count = u32::MAX;
        p.width = u32::MAX;
        assert!(EncodedRows::from_proto(p).is_err());
        assert!(EncodedRows::encode(&[1.0; 7], 8, WireDtype::F32).is_err());
        assert!("fp16".parse::<WireDtype>().is_err());
        assert_eq!("BF16".parse::<WireDtype>().expect("bf16"), WireDtype::Bf16);
    }
}
