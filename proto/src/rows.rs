//! `shardseek.v1.Rows`, written by hand instead of generated, so that rows can be encoded
//! straight into the outgoing gRPC frame.
//!
//! On the wire it is exactly the message of `rows.proto` (the generated code of every other
//! message refers to this type through prost's `extern_path`, and the tests check byte for byte
//! that both encodings agree). What differs is the Rust side: besides the received form (`data`
//! and `scales` as `Bytes`, slices of the received buffer: no copy), a `Rows` may hold a
//! [`RowSource`] — rows still in f32 — which is encoded only when the message is written, and
//! then directly into the frame buffer that goes to the socket. A dispatch's rows are thus
//! written once on the way out (no intermediate payload buffer and no copy of it into the frame)
//! and read in place on the way in.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::mem::MaybeUninit;
use std::sync::Arc;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

const TAG_DTYPE: u32 = 1;
const TAG_COUNT: u32 = 2;
const TAG_WIDTH: u32 = 3;
const TAG_DATA: u32 = 4;
const TAG_SCALES: u32 = 5;

/// Rows that are encoded when the message is written (see the module docs). The codec lives
/// with the router (this crate holds only contracts), so it plugs in through this trait.
pub trait RowSource: Send + Sync + fmt::Debug {
    /// The wire dtype (`RowDtype` value).
    fn dtype(&self) -> i32;
    fn count(&self) -> u32;
    fn width(&self) -> u32;
    /// Bytes of the `data` field.
    fn data_len(&self) -> usize;
    /// Bytes of the `scales` field (0 when the dtype has none).
    fn scales_len(&self) -> usize;
    /// Writes every row: exactly `data_len()` bytes into `data` and `scales_len()` into
    /// `scales`, initialising all of them.
    fn encode_into(&self, data: &mut [MaybeUninit<u8>], scales: &mut [MaybeUninit<u8>]);
}

/// A dense `[count, width]` matrix of activations (see `rows.proto`).
#[derive(Clone, Default)]
pub struct Rows {
    /// `RowDtype` value.
    pub dtype: i32,
    pub count: u32,
    pub width: u32,
    /// Received (or pre-encoded) payload; ignored while `source` is set.
    pub data: Bytes,
    /// fp8 only: the per-block scales; ignored while `source` is set.
    pub scales: Bytes,
    /// Rows to encode when the message is written; replaces the five fields above.
    pub source: Option<Arc<dyn RowSource>>,
}

impl Rows {
    /// Rows encoded from `source` when written.
    pub fn from_source(source: Arc<dyn RowSource>) -> Self {
        Rows {
            source: Some(source),
            ..Rows::default()
        }
    }

    fn header(&self) -> (i32, u32, u32) {
        match &self.source {
            Some(s) => (s.dtype(), s.count(), s.width()),
            None => (self.dtype, self.count, self.width),
        }
    }

    fn lens(&self) -> (usize, usize) {
        match &self.source {
            Some(s) => (s.data_len(), s.scales_len()),
            None => (self.data.len(), self.scales.len()),
        }
    }

    /// The received form: a source is encoded into `data`/`scales` (tests, and transports that
    /// need the bytes themselves).
    pub fn materialize(&self) -> Rows {
        let Some(source) = &self.source else {
            return self.clone();
        };
        let (d, s) = (source.data_len(), source.scales_len());
        let mut data = Vec::with_capacity(d);
        let mut scales = Vec::with_capacity(s);
        source.encode_into(
            &mut data.spare_capacity_mut()[..d],
            &mut scales.spare_capacity_mut()[..s],
        );
        // SAFETY: `encode_into` initialised exactly `d` and `s` bytes (its contract).
        unsafe {
            data.set_len(d);
            scales.set_len(s);
        }
        Rows {
            dtype: source.dtype(),
            count: source.count(),
            width: source.width(),
            data: Bytes::from(data),
            scales: Bytes::from(scales),
            source: None,
        }
    }
}

/// Length of a length-delimited field of `len` bytes with tag `tag`; 0 for an empty one
/// (proto3 omits empty `bytes`, as prost does).
fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
    }
}

fn put_bytes_header(tag: u32, len: usize, buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(len as u64, buf);
}

impl Message for Rows {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        let (dtype, count, width) = self.header();
        if dtype != 0 {
            encoding::int32::encode(TAG_DTYPE, &dtype, buf);
        }
        if count != 0 {
            encoding::uint32::encode(TAG_COUNT, &count, buf);
        }
        if width != 0 {
            encoding::uint32::encode(TAG_WIDTH, &width, buf);
        }
        let Some(source) = &self.source else {
            if !self.data.is_empty() {
                encoding::bytes::encode(TAG_DATA, &self.data, buf);
            }
            if !self.scales.is_empty() {
                encoding::bytes::encode(TAG_SCALES, &self.scales, buf);
            }
            return;
        };
        let (d, s) = (source.data_len(), source.scales_len());
        if d > 0 {
            put_bytes_header(TAG_DATA, d, buf);
        }
        // The scales' field header sits between the two payloads.
        let mut scales_header = Vec::with_capacity(16);
        if s > 0 {
            put_bytes_header(TAG_SCALES, s, &mut scales_header);
        }
        let total = d + scales_header.len() + s;
        let chunk = buf.chunk_mut();
        if chunk.len() >= total {
            // The frame buffer (the codec reserved the message's length) has room for all of it:
            // encode in place.
            // SAFETY: `as_uninit_slice_mut` hands out the buffer's spare capacity, which we only
            // write; `advance_mut` then covers exactly the `total` bytes written below.
            let dst = unsafe { chunk.as_uninit_slice_mut() };
            let (data, rest) = dst[..total].split_at_mut(d);
            let (header, scales) = rest.split_at_mut(scales_header.len());
            for (h, &b) in header.iter_mut().zip(&scales_header) {
                h.write(b);
            }
            source.encode_into(data, scales);
            // SAFETY: all `total` bytes were initialised: `data` and `scales` by `encode_into`
            // (its contract), the header by the loop above.
            unsafe { buf.advance_mut(total) };
        } else {
            // A buffer that is not one contiguous reservation (never the gRPC codec's): encode
            // aside, then copy.
            let full = self.materialize();
            buf.put_slice(&full.data);
            buf.put_slice(&scales_header);
            buf.put_slice(&full.scales);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if let Some(source) = self.source.take() {
            // Decoding into a source-backed value: start from its received form.
            *self = Rows {
                source: Some(source),
                ..Rows::default()
            }
            .materialize();
        }
        match tag {
            TAG_DTYPE => encoding::int32::merge(wire_type, &mut self.dtype, buf, ctx),
            TAG_COUNT => encoding::uint32::merge(wire_type, &mut self.count, buf, ctx),
            TAG_WIDTH => encoding::uint32::merge(wire_type, &mut self.width, buf, ctx),
            TAG_DATA => encoding::bytes::merge(wire_type, &mut self.data, buf, ctx),
            TAG_SCALES => encoding::bytes::merge(wire_type, &mut self.scales, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let (dtype, count, width) = self.header();
        let (d, s) = self.lens();
        let mut n = 0;
        if dtype != 0 {
            n += encoding::int32::encoded_len(TAG_DTYPE, &dtype);
        }
        if count != 0 {
            n += encoding::uint32::encoded_len(TAG_COUNT, &count);
        }
        if width != 0 {
            n += encoding::uint32::encoded_len(TAG_WIDTH, &width);
        }
        n + bytes_field_len(TAG_DATA, d) + bytes_field_len(TAG_SCALES, s)
    }

    fn clear(&mut self) {
        *self = Rows::default();
    }
}

impl fmt::Debug for Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dtype, count, width) = self.header();
        let (d, s) = self.lens();
        f.debug_struct("Rows")
            .field("dtype", &dtype)
            .field("count", &count)
            .field("width", &width)
            .field("data_bytes", &d)
            .field("scales_bytes", &s)
            .field("deferred", &self.source.is_some())
            .finish()
    }
}

/// Equal when they encode to the same message.
impl PartialEq for Rows {
    fn eq(&self, other: &Self) -> bool {
        if let (Some(a), Some(b)) = (&self.source, &other.source)
            && Arc::ptr_eq(a, b)
        {
            return true;
        }
        let (a, b) = (self.materialize(), other.materialize());
        (a.dtype, a.count, a.width, &a.data, &a.scales)
            == (b.dtype, b.count, b.width, &b.data, &b.scales)
    }
}

impl Eq for Rows {}

impl Hash for Rows {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let m = self.materialize();
        (m.dtype, m.count, m.width, &m.data, &m.scales).hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that writes a recognisable pattern.
    #[derive(Debug)]
    struct Pattern {
        data: usize,
        scales: usize,
    }

    impl RowSource for Pattern {
        fn dtype(&self) -> i32 {
            3
        }
        fn count(&self) -> u32 {
            2
        }
        fn width(&self) -> u32 {
            (self.data / 2) as u32
        }
        fn data_len(&self) -> usize {
            self.data
        }
        fn scales_len(&self) -> usize {
            self.scales
        }
        fn encode_into(&self, data: &mut [MaybeUninit<u8>], scales: &mut [MaybeUninit<u8>]) {
            for (i, d) in data.iter_mut().enumerate() {
                d.write((i * 7) as u8);
            }
            for (i, s) in scales.iter_mut().enumerate() {
                s.write((i * 13 + 1) as u8);
            }
        }
    }

    /// The generated message of `rows.proto` for comparison, as prost derives it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(int32, tag = "1")]
        dtype: i32,
        #[prost(uint32, tag = "2")]
        count: u32,
        #[prost(uint32, tag = "3")]
        width: u32,
        #[prost(bytes = "bytes", tag = "4")]
        data: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        scales: Bytes,
    }

    #[test]
    fn deferred_rows_encode_exactly_as_the_generated_message() {
        // Sizes around the one-byte varint boundary, with and without scales, and empty.
        for (d, s) in [
            (0, 0),
            (2, 0),
            (126, 4),
            (128, 0),
            (300, 12),
            (70_000, 2_188),
        ] {
            let source = Arc::new(Pattern { data: d, scales: s });
            let deferred = Rows::from_source(source.clone());
            let m = deferred.materialize();
            let generated = Generated {
                dtype: m.dtype,
                count: m.count,
                width: m.width,
                data: m.data.clone(),
                scales: m.scales.clone(),
            };
            let want = generated.encode_to_vec();
            // In place (one reserved buffer, as the gRPC codec gives) and aside (a buffer that
            // grows in small steps).
            let mut reserved = prost::bytes::BytesMut::with_capacity(deferred.encoded_len());
            deferred.encode(&mut reserved).expect("room");
            assert_eq!(&reserved[..], &want[..], "in place, {d}+{s}");
            let mut small = Vec::new();
            deferred.encode_raw(&mut small);
            assert_eq!(small, want, "aside, {d}+{s}");
            assert_eq!(deferred.encoded_len(), want.len());
            let back = Rows::decode(Bytes::from(want)).expect("decodes");
            assert_eq!(back, deferred);
            assert_eq!(back.data, m.data);
            assert_eq!(back.scales, m.scales);
        }
    }

    #[test]
    fn truncated_rows_are_a_decode_error() {
        let m = Rows::from_source(Arc::new(Pattern {
            data: 300,
            scales: 12,
        }));
        let bytes = m.encode_to_vec();
        for cut in [1, 5, 100, bytes.len() - 1] {
            assert!(Rows::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
