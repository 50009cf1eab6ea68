//! The tonic codec of every shardseek service (wired in by `build.rs`): prost messages, with
//! the frame buffer reserved for the whole message before it is encoded.
//!
//! tonic-prost encodes into a buffer that grows as fields are written; for a dispatch of a few
//! megabytes of rows that means a reallocation — a full copy of the rows — as soon as a field
//! follows the payload (the assignments after a request's rows, the scales after fp8 data).
//! Reserving `encoded_len()` first makes the buffer one contiguous allocation into which a
//! deferred [`Rows`](crate::rows::Rows) is encoded in place. Decoding is prost's: `bytes`
//! fields become slices of the received buffer, and a malformed frame is an `INVALID_ARGUMENT`
//! status, never a panic.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Codec of `T` out and `U` in (the generated clients and servers name it).
#[derive(Debug, Clone)]
pub struct WireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        WireCodec(PhantomData)
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(PhantomData)
    }
}

/// Encodes a message after reserving its whole length (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct WireEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = item.encoded_len();
        buf.reserve(len);
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a {len}-byte message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes a message; a malformed one is `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct WireDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "malformed {} frame: {e}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message")
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
