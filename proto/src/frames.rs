//! gRPC message framing (the 5-byte prefix of the gRPC-over-HTTP/2 protocol) with zero-copy
//! reads, for the `Expert.Dispatch` stream.
//!
//! tonic's `Streaming` copies every received HTTP/2 DATA frame into a buffer of its own before
//! decoding; for a dispatch that is one extra pass over every row on both ends. The dispatch
//! paths read the HTTP/2 body themselves instead and cut messages out of the received frames
//! with [`MessageSplitter`]: a message that lies inside one DATA frame (the case once the peers
//! allow frames as large as a message, see the transport's settings) is a slice of that frame —
//! no copy — and prost's decoding of `bytes` fields slices it again, so rows are read in place
//! where the kernel wrote them. Only a message split over several frames is gathered (copied)
//! once. Outgoing messages are encoded by [`encode_frame`] into one buffer holding the prefix
//! and the message, so deferred rows are written straight into it (see [`crate::rows`]).
//!
//! The bytes on the wire are exactly gRPC's: uncompressed messages behind a
//! `[compressed: u8][length: u32 big-endian]` prefix.

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::Status;

/// Bytes of the prefix before each message.
pub const PREFIX_BYTES: usize = 5;

/// The frame of `message`: prefix and message in one buffer reserved for both, so that a
/// message holding deferred rows encodes them in place. Fails (`RESOURCE_EXHAUSTED`) when the
/// message is larger than `max` bytes.
pub fn encode_frame<M: Message>(message: &M, max: usize) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    if len > max || u32::try_from(len).is_err() {
        return Err(Status::resource_exhausted(format!(
            "a {len}-byte message is over the {max}-byte limit"
        )));
    }
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding a {len}-byte message: {e}")))?;
    Ok(buf.freeze())
}

/// A `DispatchReply` frame laid out before its rows exist: the bytes before the rows' data
/// (`head`: gRPC prefix, request id, the `rows` field's header and the row matrix's fields up
/// to the data's header) and between data and scales (`middle`: the scales' field header).
/// A shard writes `head`, then each row's bytes as the compute produces it, then `middle` and
/// the scales, into one buffer: the frame goes to the socket as written, where a finished
/// reply would be copied into its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyFrameLayout {
    pub head: Vec<u8>,
    pub middle: Vec<u8>,
    /// Bytes of the whole frame.
    pub total: usize,
}

/// The layout of the frame of `DispatchReply { request_id, rows: Some(rows), error: "" }` for
/// rows with this header and payload sizes, byte for byte what [`encode_frame`] writes for that
/// message. Fails (`RESOURCE_EXHAUSTED`) when the message is larger than `max` bytes.
pub fn reply_frame_layout(
    request_id: u64,
    rows: (i32, u32, u32),
    data_len: usize,
    scales_len: usize,
    max: usize,
) -> Result<ReplyFrameLayout, Status> {
    use prost::encoding::{self, WireType};
    let (dtype, count, width) = rows;
    let bytes_header = |tag: u32, len: usize, buf: &mut Vec<u8>| {
        if len > 0 {
            encoding::encode_key(tag, WireType::LengthDelimited, buf);
            encoding::encode_varint(len as u64, buf);
        }
    };
    // The row matrix's fields before its data (as `Rows::encode_raw` writes them).
    let mut fields = Vec::with_capacity(32);
    if dtype != 0 {
        encoding::int32::encode(1, &dtype, &mut fields);
    }
    if count != 0 {
        encoding::uint32::encode(2, &count, &mut fields);
    }
    if width != 0 {
        encoding::uint32::encode(3, &width, &mut fields);
    }
    bytes_header(4, data_len, &mut fields);
    let mut middle = Vec::with_capacity(16);
    bytes_header(5, scales_len, &mut middle);
    let rows_len = fields.len() + data_len + middle.len() + scales_len;
    // DispatchReply: request_id = 1 (omitted when 0), rows = 2 (always, being set), error = 3
    // (empty: omitted).
    let mut reply = Vec::with_capacity(24);
    if request_id != 0 {
        encoding::uint64::encode(1, &request_id, &mut reply);
    }
    encoding::encode_key(2, WireType::LengthDelimited, &mut reply);
    encoding::encode_varint(rows_len as u64, &mut reply);
    let len = reply.len() + rows_len;
    if len > max || u32::try_from(len).is_err() {
        return Err(Status::resource_exhausted(format!(
            "a {len}-byte message is over the {max}-byte limit"
        )));
    }
    let mut head = Vec::with_capacity(PREFIX_BYTES + reply.len() + fields.len());
    head.push(0);
    head.extend_from_slice(&(len as u32).to_be_bytes());
    head.extend_from_slice(&reply);
    head.extend_from_slice(&fields);
    Ok(ReplyFrameLayout {
        total: PREFIX_BYTES + len,
        head,
        middle,
    })
}

/// Cuts gRPC messages out of received DATA frames (see the module docs).
#[derive(Debug)]
pub struct MessageSplitter {
    /// Received bytes not yet returned, front first (at most a few frames).
    frames: std::collections::VecDeque<Bytes>,
    /// A message split over frames, gathered; `want` is its full length with the prefix.
    gather: BytesMut,
    want: usize,
    /// Largest message accepted.
    max: usize,
}

impl MessageSplitter {
    /// A splitter refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        MessageSplitter {
            frames: std::collections::VecDeque::new(),
            gather: BytesMut::new(),
            want: 0,
            max,
        }
    }

    /// Hands over a received DATA frame.
    pub fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.frames.push_back(frame);
        }
    }

    /// True when no partial message is held (a body may end here).
    pub fn is_empty(&self) -> bool {
        self.want == 0 && self.frames.is_empty()
    }

    fn buffered(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }

    /// The next complete message, `None` until more frames arrive. A compressed message (none
    /// was negotiated) or one over the limit is an error: the stream cannot go on.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.want == 0 {
            // At a message boundary: read the prefix (it may itself be split).
            if self.buffered() < PREFIX_BYTES {
                return Ok(None);
            }
            let mut prefix = [0u8; PREFIX_BYTES];
            self.copy_front(&mut prefix);
            if prefix[0] != 0 {
                return Err(Status::unimplemented(
                    "a compressed message (no compression was negotiated)",
                ));
            }
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > self.max {
                return Err(Status::resource_exhausted(format!(
                    "a {len}-byte message is over the {}-byte limit",
                    self.max
                )));
            }
            let whole = PREFIX_BYTES + len;
            if let Some(front) = self.frames.front_mut()
                && front.len() >= whole
            {
                // The common case: the whole message inside one frame — a slice, no copy.
                let message = front.slice(PREFIX_BYTES..whole);
                front.advance(whole);
                if front.is_empty() {
                    self.frames.pop_front();
                }
                return Ok(Some(message));
            }
            self.want = whole;
            self.gather = BytesMut::with_capacity(whole);
        }
        // Gathering a message split over frames.
        while self.gather.len() < self.want {
            let Some(front) = self.frames.front_mut() else {
                return Ok(None);
            };
            let take = (self.want - self.gather.len()).min(front.len());
            self.gather.put_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.frames.pop_front();
            }
        }
        self.want = 0;
        let mut whole = std::mem::take(&mut self.gather).freeze();
        whole.advance(PREFIX_BYTES);
        Ok(Some(whole))
    }

    /// Copies the first `out.len()` buffered bytes (the caller checked they are there) without
    /// consuming them.
    fn copy_front(&self, out: &mut [u8]) {
        let mut at = 0;
        for f in &self.frames {
            let take = (out.len() - at).min(f.len());
            out[at..at + take].copy_from_slice(&f[..take]);
            at += take;
            if at == out.len() {
                break;
            }
        }
    }
}

/// Decodes a message cut out by [`MessageSplitter`]; a malformed one is `INVALID_ARGUMENT`
/// naming the message type. `bytes` fields become slices of `message` (no copy).
pub fn decode_message<M: Message + Default>(message: Bytes) -> Result<M, Status> {
    M::decode(message).map_err(|e| {
        Status::invalid_argument(format!(
            "malformed {} frame: {e}",
            std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("message")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Rows;

    fn rows(n: usize) -> Rows {
        Rows {
            dtype: 2,
            count: 1,
            width: (n / 2) as u32,
            data: Bytes::from((0..n).map(|i| (i * 31) as u8).collect::<Vec<u8>>()),
            scales: Bytes::new(),
            source: None,
        }
    }

    #[test]
    fn frames_are_grpc_prefix_and_message() {
        let m = rows(300);
        let f = encode_frame(&m, 1 << 20).expect("fits");
        let body = m.encode_to_vec();
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            body.len()
        );
        assert_eq!(&f[PREFIX_BYTES..], &body[..]);
        assert_eq!(
            encode_frame(&m, 10).expect_err("over").code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn a_laid_out_reply_frame_is_the_encoded_reply() {
        use crate::v1::DispatchReply;
        for (request_id, dtype, count, width, data, scales) in [
            (7u64, 2i32, 3u32, 5u32, 30usize, 0usize),
            (0, 3, 2, 300, 600, 24),
            (u64::MAX, 1, 1, 70_000, 280_000, 0),
            (12, 2, 0, 16, 0, 0),
        ] {
            let rows = Rows {
                dtype,
                count,
                width,
                data: Bytes::from((0..data).map(|i| (i * 7) as u8).collect::<Vec<u8>>()),
                scales: Bytes::from((0..scales).map(|i| (i * 3) as u8).collect::<Vec<u8>>()),
                source: None,
            };
            let want = encode_frame(
                &DispatchReply {
                    request_id,
                    rows: Some(rows.clone()),
                    error: String::new(),
                },
                1 << 30,
            )
            .expect("fits");
            let layout =
                reply_frame_layout(request_id, (dtype, count, width), data, scales, 1 << 30)
                    .expect("fits");
            let mut got = layout.head.clone();
            got.extend_from_slice(&rows.data);
            got.extend_from_slice(&layout.middle);
            got.extend_from_slice(&rows.scales);
            assert_eq!(got.len(), layout.total);
            assert_eq!(&got[..], &want[..], "request {request_id}, {count}x{width}");
            let small = want.len() - PREFIX_BYTES - 1;
            assert_eq!(
                reply_frame_layout(request_id, (dtype, count, width), data, scales, small)
                    .expect_err("over")
                    .code(),
                tonic::Code::ResourceExhausted
            );
        }
    }

    #[test]
    fn messages_come_out_whole_however_the_frames_are_cut() {
        let messages: Vec<Rows> = [0usize, 2, 300, 5000, 17]
            .iter()
            .map(|&n| rows(n))
            .collect();
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend_from_slice(&encode_frame(m, 1 << 20).expect("fits"));
        }
        // Every cut size from one byte (prefixes split too) to the whole stream at once.
        for cut in [1, 2, 3, 4, 5, 6, 7, 100, 4999, 6000, stream.len()] {
            let mut s = MessageSplitter::new(1 << 20);
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                s.push(Bytes::copy_from_slice(piece));
                while let Some(m) = s.next_message().expect("valid") {
                    got.push(decode_message::<Rows>(m).expect("decodes"));
                }
            }
            assert!(s.is_empty(), "cut {cut}");
            assert_eq!(got, messages, "cut {cut}");
        }
    }

    #[test]
    fn a_message_inside_one_frame_is_not_copied() {
        let f = encode_frame(&rows(4096), 1 << 20).expect("fits");
        let mut s = MessageSplitter::new(1 << 20);
        s.push(f.clone());
        let m = s.next_message().expect("valid").expect("whole");
        assert_eq!(
            m.as_ptr(),
            f[PREFIX_BYTES..].as_ptr(),
            "a slice of the frame"
        );
        let decoded: Rows = decode_message(m).expect("decodes");
        let inside = f.as_ptr_range();
        assert!(
            inside.contains(&decoded.data.as_ptr()),
            "rows read in place"
        );
    }

    #[test]
    fn compressed_oversized_and_malformed_messages_are_refused() {
        let mut s = MessageSplitter::new(16);
        s.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(
            s.next_message().expect_err("compressed").code(),
            tonic::Code::Unimplemented
        );
        let mut s = MessageSplitter::new(16);
        s.push(Bytes::from_static(&[0, 0, 0, 0, 17]));
        assert_eq!(
            s.next_message().expect_err("over").code(),
            tonic::Code::ResourceExhausted
        );
        let mut s = MessageSplitter::new(16);
        s.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0x22, 0x05]));
        let m = s.next_message().expect("framed").expect("whole");
        let err = decode_message::<Rows>(m).expect_err("truncated field");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("Rows"), "{}", err.message());
        // A partial message is held, not returned.
        let mut s = MessageSplitter::new(16);
        s.push(Bytes::from_static(&[0, 0, 0, 0, 3, 8]));
        assert!(s.next_message().expect("valid").is_none());
        assert!(!s.is_empty());
    }
}
