//! The expert-shard role: a gRPC `Expert` server over any [`ExpertCompute`] (DESIGN.md §2 step 5).
//!
//! The server moves rows and checks contracts; the computing is the trait's business, so the
//! model's grouped-GEMM experts plug in without the server knowing about weights (STYLE.md rule
//! 10). Per request it checks the placement version and that every expert asked for is held
//! ([`ShardPlacement`]: a new table is prepared and committed through the `Placement` service
//! the same server answers, see [`placement`]);
//! per stream it checks the caller's model fingerprint and shard count, and refuses a mismatch
//! with a message saying what differs. Requests of the same layer from several attention pods
//! that arrive within [`ExpertServerConfig::batch_window`] are computed as one batch.

pub mod bench;
pub mod placement;
mod server;

pub use placement::{ShardControl, ShardPlacement};
pub use server::{ExpertServer, ExpertServerConfig, RunningExpertServer};
use shardseek_router::{EncodedRows, RowEncoder, WireDtype};
use tonic::codegen::Bytes;

/// Keeps freed memory in the process instead of returning it to the kernel (glibc malloc).
///
/// A shard and a dispatch client allocate and free multi-megabyte row buffers at every layer;
/// with glibc's defaults each comes fresh from `mmap` and costs a page fault and a zero-fill per
/// 4 KiB on first touch — measured as the largest CPU cost of a dispatch round trip. Raising the
/// mmap and trim thresholds makes those buffers reuse the heap. Call once at process start.
pub fn tune_allocator() {
    // Buffers up to 256 MiB come from the heap; the heap is trimmed only above 1 GiB free.
    const MMAP_THRESHOLD: libc::c_int = 256 << 20;
    const TRIM_THRESHOLD: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes malloc tuning parameters; failure is reported by return 0.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// A batch's rows as they arrived, still in their wire dtype: the encoded blocks of one or more
/// requests, one after the other.
///
/// The shard does not decode a batch before computing it. A compute decodes each row where it
/// needs it — the grouped experts decode every (token, expert) pair's row straight into that
/// expert's input block, which they had to fill anyway — so the whole batch never exists in
/// f32 (four times the bf16 bytes, written once and read once for nothing).
pub struct BatchRows<'a> {
    parts: Vec<&'a EncodedRows>,
    /// `ends[i]`: rows in `parts[..=i]`.
    ends: Vec<usize>,
    width: usize,
}

impl<'a> BatchRows<'a> {
    /// The rows of `parts`, in order; every part must be well formed and `width` wide.
    pub fn new(
        parts: impl IntoIterator<Item = &'a EncodedRows>,
        width: usize,
    ) -> shardseek_router::Result<Self> {
        let mut rows = BatchRows {
            parts: Vec::new(),
            ends: Vec::new(),
            width,
        };
        let mut total = 0;
        for p in parts {
            p.validate()?;
            if p.width != width {
                return Err(shardseek_router::Error::Input(format!(
                    "rows of width {} in a batch of width {width}",
                    p.width
                )));
            }
            total += p.count;
            rows.parts.push(p);
            rows.ends.push(total);
        }
        Ok(rows)
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Decodes row `i` into `out` (`width` values, all written), read in place from the
    /// received bytes.
    ///
    /// # Panics
    /// If `i >= self.len()` or `out.len() != self.width()`.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        assert!(
            i < self.len() && out.len() == self.width,
            "row {i} out of range"
        );
        let part = self.ends.partition_point(|&end| end <= i);
        let first = if part == 0 { 0 } else { self.ends[part - 1] };
        self.parts[part].row_into(i - first, out);
    }

    /// Every row decoded, `[len, width]` (for computes that want the whole block).
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len() * self.width];
        for (i, row) in out.chunks_exact_mut(self.width.max(1)).enumerate() {
            self.row_into(i, row);
        }
        out
    }
}

/// Where a compute writes its partial sums: one f32 row per token, in token order, each encoded
/// at once into its reply's wire dtype (the requests of a batch may ask for different ones).
///
/// A row is encoded while it is still in the cache of the core that summed it, straight into
/// the gRPC frame of its reply, laid out before the compute starts: the batch's partial sums
/// never exist as one f32 matrix written out and read back, and the reply is not copied into
/// a frame afterwards.
pub struct ReplyRows {
    width: usize,
    parts: Vec<RowEncoder>,
    /// Whether each part's buffer is its reply's whole frame.
    framed: Vec<bool>,
    /// The part the next row goes to.
    at: usize,
}

/// One reply of a batch: where its rows go.
#[derive(Clone, Copy, Debug)]
pub struct ReplyTo {
    pub request_id: u64,
    pub count: usize,
    pub dtype: WireDtype,
}

impl ReplyRows {
    /// Replies of `parts`, one after the other, rows `width` wide, each laid out in its frame
    /// (a reply over `max_message` bytes gets no frame: sending it reports the limit).
    pub fn new(width: usize, parts: impl IntoIterator<Item = ReplyTo>, max_message: usize) -> Self {
        let (mut encoders, mut framed) = (Vec::new(), Vec::new());
        for p in parts {
            let layout = shardseek_proto::frames::reply_frame_layout(
                p.request_id,
                (p.dtype.to_proto() as i32, p.count as u32, width as u32),
                p.count * p.dtype.data_bytes(width),
                p.count * p.dtype.scale_bytes(width),
                max_message,
            );
            framed.push(layout.is_ok());
            encoders.push(match layout {
                Ok(l) => RowEncoder::framed(p.count, width, p.dtype, &l.head, l.middle),
                Err(_) => RowEncoder::new(p.count, width, p.dtype),
            });
        }
        ReplyRows {
            width,
            parts: encoders,
            framed,
            at: 0,
        }
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Encodes the next token's row (`width` values).
    pub fn push(&mut self, row: &[f32]) -> Result<(), ComputeError> {
        while self.parts.get(self.at).is_some_and(|p| p.remaining() == 0) {
            self.at += 1;
        }
        match self.parts.get_mut(self.at) {
            Some(part) => Ok(part.push(row)?),
            None => Err("more rows than the batch has".into()),
        }
    }

    /// Encodes each `width`-value row of `rows`, in order.
    pub fn push_all(&mut self, rows: &[f32]) -> Result<(), ComputeError> {
        if !rows.len().is_multiple_of(self.width.max(1)) {
            return Err(format!("{} values are not rows of {}", rows.len(), self.width).into());
        }
        rows.chunks_exact(self.width.max(1))
            .try_for_each(|row| self.push(row))
    }

    /// Every reply's rows, in order, with its whole frame when it has one; every row of every
    /// reply must have been pushed.
    pub fn finish(self) -> Result<Vec<(EncodedRows, Option<Bytes>)>, ComputeError> {
        let rows: usize = self.parts.iter().map(|p| p.remaining()).sum();
        if rows > 0 {
            return Err(format!("the compute left {rows} rows of the batch unwritten").into());
        }
        self.parts
            .into_iter()
            .zip(self.framed)
            .map(|(p, framed)| {
                let (rows, all) = p.finish()?;
                Ok((rows, framed.then_some(all)))
            })
            .collect()
    }
}

/// One token's (expert id, weight) list on this shard.
pub type RowExperts = Vec<(usize, f32)>;

/// Error a compute backend reports; the server sends its text back to the caller.
pub type ComputeError = Box<dyn std::error::Error + Send + Sync>;

/// The routed experts a shard holds.
pub trait ExpertCompute: Send + Sync + 'static {
    /// Row width (the model's hidden size).
    fn hidden(&self) -> usize;

    /// Expert ids this shard holds now, ascending.
    fn experts(&self) -> Vec<usize>;

    /// Holds exactly `experts` from now on (a new placement): gained experts are mapped, lost
    /// ones dropped; a batch already computing keeps the set it started with. A compute that
    /// cannot change its experts refuses.
    fn set_experts(&self, experts: &[usize]) -> Result<(), ComputeError> {
        let _ = experts;
        Err("this shard's experts are fixed; it cannot take a new placement".into())
    }

    /// For every row of `rows` (`assignments.len()` rows of `hidden`), Σ weight · expert(row)
    /// over the row's (expert, weight) list: one row per token, the shard's partial combine,
    /// pushed into `out` in token order.
    fn compute(
        &self,
        layer: usize,
        rows: &BatchRows<'_>,
        assignments: &[RowExperts],
        out: &mut ReplyRows,
    ) -> Result<(), ComputeError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, width: usize) -> Vec<f32> {
        (0..n * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn batch_rows_read_every_part_in_order() {
        let width = 130;
        let (a, b) = (values(3, width), values(2, width));
        let pa = EncodedRows::encode(&a, width, WireDtype::Bf16).expect("encode");
        let pb = EncodedRows::encode(&b, width, WireDtype::F32).expect("encode");
        let rows = BatchRows::new([&pa, &pb], width).expect("batch");
        assert_eq!(rows.len(), 5);
        let mut want = pa.decode().expect("decode");
        want.extend(pb.decode().expect("decode"));
        assert_eq!(rows.decode(), want);
        let mut row = vec![0.0; width];
        rows.row_into(3, &mut row);
        assert_eq!(row, b[..width]);
        assert!(
            BatchRows::new([&pa], width + 1).is_err(),
            "a part of another width"
        );
    }

    #[test]
    fn reply_rows_fill_each_request_in_its_dtype() {
        let width = 130;
        let v = values(3, width);
        let to = |request_id, count, dtype| ReplyTo {
            request_id,
            count,
            dtype,
        };
        let parts = [
            to(3, 2, WireDtype::Bf16),
            to(4, 0, WireDtype::F32),
            to(5, 1, WireDtype::Fp8E4m3),
        ];
        let mut out = ReplyRows::new(width, parts, 1 << 20);
        out.push_all(&v[..2 * width]).expect("two rows");
        out.push(&v[2 * width..]).expect("third row");
        assert!(out.push(&v[..width]).is_err(), "a fourth row is refused");
        let got = out.finish().expect("complete");
        let want = [
            EncodedRows::encode(&v[..2 * width], width, WireDtype::Bf16).expect("e"),
            EncodedRows::encode(&[], width, WireDtype::F32).expect("e"),
            EncodedRows::encode(&v[2 * width..], width, WireDtype::Fp8E4m3).expect("e"),
        ];
        for ((rows, frame), (want, part)) in got.into_iter().zip(want.into_iter().zip(parts)) {
            // The frame is byte for byte what sending the finished reply would encode.
            let reply = shardseek_proto::v1::DispatchReply {
                request_id: part.request_id,
                rows: Some(want.clone().into_proto()),
                error: String::new(),
            };
            let encoded = shardseek_proto::frames::encode_frame(&reply, 1 << 20).expect("fits");
            assert_eq!(rows, want);
            assert_eq!(frame.as_deref(), Some(&encoded[..]));
        }
        let big = ReplyRows::new(width, [to(1, 2, WireDtype::F32)], 100);
        assert!(
            big.framed.iter().all(|f| !f),
            "a reply over the limit gets no frame"
        );
        let mut short = ReplyRows::new(width, [to(1, 2, WireDtype::Bf16)], 1 << 20);
        short.push(&v[..width]).expect("one row");
        assert!(short.finish().is_err(), "an unwritten row is an error");
    }
}
