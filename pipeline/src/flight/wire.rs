//! `DoGet` responses written straight from Arrow buffers. A `FlightData` message built
//! the usual way copies a batch twice on the server (IPC encoding into one body vector,
//! then protobuf encoding into the gRPC buffer); here the IPC body is kept as the
//! batch's own buffers (`StreamEncoder`) and the protobuf fields are written around
//! them, so each batch is copied once, into the gRPC buffer. The bytes on the wire are
//! an ordinary `FlightData` message: any Flight client reads them.

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_flight::FlightData;
use arrow_ipc::writer::{IpcDataGenerator, IpcWriteOptions, StreamEncoder};
use arrow_schema::Schema;
use bytes::{BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// One `FlightData` message: IPC header, app metadata, and the body in pieces.
pub(crate) struct Outgoing {
    header: Bytes,
    app_metadata: Bytes,
    body: Vec<Buffer>,
    body_len: usize,
}

impl Outgoing {
    /// The schema message (no body).
    pub(crate) fn schema(schema: &Schema) -> Outgoing {
        let data = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut arrow_ipc::writer::DictionaryTracker::new(false),
            &IpcWriteOptions::default(),
        );
        Outgoing {
            header: data.ipc_message.into(),
            app_metadata: Bytes::new(),
            body: vec![],
            body_len: 0,
        }
    }

    /// Bytes of the message on the wire (without the gRPC frame header).
    pub(crate) fn len(&self) -> usize {
        field_len(2, self.header.len())
            + field_len(3, self.app_metadata.len())
            + field_len(1000, self.body_len)
    }

    /// The same message as arrow-flight's type (the body joined: one more copy).
    pub(crate) fn into_flight_data(self) -> FlightData {
        let mut body = Vec::with_capacity(self.body_len);
        for b in &self.body {
            body.extend_from_slice(b.as_slice());
        }
        FlightData {
            flight_descriptor: None,
            data_header: self.header,
            app_metadata: self.app_metadata,
            data_body: body.into(),
        }
    }
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(dst: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// A length-delimited protobuf field (wire type 2); empty ones are left out, as
/// protobuf does for default values.
fn field_len(tag: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    varint_len(tag << 3 | 2) + varint_len(len as u64) + len
}

fn put_field_header(dst: &mut impl BufMut, tag: u64, len: usize) {
    put_varint(dst, tag << 3 | 2);
    put_varint(dst, len as u64);
}

/// Splits the IPC stream encoding of record batches into Flight messages.
pub(crate) struct BatchEncoder {
    inner: StreamEncoder,
    /// The schema message `StreamEncoder` emits first (sent separately) is dropped.
    schema_dropped: bool,
}

impl BatchEncoder {
    pub(crate) fn new(schema: &Schema) -> Result<BatchEncoder, Status> {
        Ok(BatchEncoder {
            inner: StreamEncoder::try_new(schema)
                .map_err(|e| Status::internal(format!("cannot encode this schema: {e}")))?,
            schema_dropped: false,
        })
    }

    /// The messages of one batch (dictionaries, if any, then the batch), the batch's
    /// buffers shared, not copied.
    pub(crate) fn encode(
        &mut self,
        batch: &RecordBatch,
        app_metadata: Bytes,
    ) -> Result<Vec<Outgoing>, Status> {
        let bad = |m: String| Status::internal(format!("cannot encode a batch: {m}"));
        let pieces = self.inner.encode(batch).map_err(|e| bad(e.to_string()))?;
        let mut cur = Pieces {
            pieces: pieces.into(),
        };
        let mut out = Vec::new();
        while cur.remaining() > 0 {
            let prefix = cur.take(8).map_err(bad)?;
            let prefix: Vec<u8> = prefix.iter().flat_map(|b| b.as_slice().to_vec()).collect();
            if prefix[..4] != [0xff; 4] {
                return Err(bad("no IPC continuation marker".into()));
            }
            let meta_len = i32::from_le_bytes(prefix[4..8].try_into().unwrap()) as usize;
            let header: Vec<u8> = cur
                .take(meta_len)
                .map_err(bad)?
                .iter()
                .flat_map(|b| b.as_slice().to_vec())
                .collect();
            let message = arrow_ipc::root_as_message(&header).map_err(|e| bad(e.to_string()))?;
            let body_len = message.bodyLength() as usize;
            let is_schema = message.header_type() == arrow_ipc::MessageHeader::Schema;
            let body = cur.take(body_len).map_err(bad)?;
            if is_schema && !self.schema_dropped {
                self.schema_dropped = true;
                continue;
            }
            let is_batch = message.header_type() == arrow_ipc::MessageHeader::RecordBatch;
            out.push(Outgoing {
                header: header.into(),
                app_metadata: if is_batch {
                    app_metadata.clone()
                } else {
                    Bytes::new()
                },
                body,
                body_len,
            });
        }
        Ok(out)
    }
}

/// A queue of buffers taken from the front by byte counts.
struct Pieces {
    pieces: std::collections::VecDeque<Buffer>,
}

impl Pieces {
    fn remaining(&self) -> usize {
        self.pieces.iter().map(|b| b.len()).sum()
    }

    fn take(&mut self, mut n: usize) -> Result<Vec<Buffer>, String> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.pieces.pop_front() else {
                return Err(format!("the IPC stream is {n} bytes short"));
            };
            if front.len() <= n {
                n -= front.len();
                out.push(front);
            } else {
                out.push(front.slice_with_length(0, n));
                self.pieces.push_front(front.slice(n));
                n = 0;
            }
        }
        Ok(out)
    }
}

/// Writes [`Outgoing`] messages; reads the `DoGet` ticket as protobuf.
#[derive(Default)]
pub(crate) struct DoGetCodec;

pub(crate) struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        item.write(dst);
        Ok(())
    }
}

impl Outgoing {
    /// The protobuf encoding of the `FlightData` message.
    fn write(&self, dst: &mut impl BufMut) {
        let item = self;
        if !item.header.is_empty() {
            put_field_header(dst, 2, item.header.len());
            dst.put_slice(&item.header);
        }
        if !item.app_metadata.is_empty() {
            put_field_header(dst, 3, item.app_metadata.len());
            dst.put_slice(&item.app_metadata);
        }
        if item.body_len > 0 {
            put_field_header(dst, 1000, item.body_len);
            for b in &item.body {
                dst.put_slice(b.as_slice());
            }
        }
    }
}

pub(crate) struct TicketDecoder;

impl Decoder for TicketDecoder {
    type Item = arrow_flight::Ticket;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        <arrow_flight::Ticket as prost::Message>::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("not a Flight ticket: {e}")))
    }
}

impl Codec for DoGetCodec {
    type Encode = Outgoing;
    type Decode = arrow_flight::Ticket;
    type Encoder = OutgoingEncoder;
    type Decoder = TicketDecoder;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }
    fn decoder(&mut self) -> TicketDecoder {
        TicketDecoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What we write decodes, through arrow-flight's own decoder, to the batches.
    #[test]
    fn written_messages_are_flight_data() {
        let mut src =
            crate::synthetic::Synthetic::open("activations?batches=3&rows=5&d=7&hooks=2", 0)
                .unwrap();
        use crate::stream::BatchSource;
        let schema = src.schema();
        let mut enc = BatchEncoder::new(&schema).unwrap();
        let mut wire: Vec<FlightData> = vec![];
        let mut want = vec![];
        let mut msgs = vec![Outgoing::schema(&schema)];
        while let Some(b) = src.next_batch().unwrap() {
            msgs.extend(
                enc.encode(&b, Bytes::from_static(b"{\"position\":1}"))
                    .unwrap(),
            );
            want.push(b);
        }
        for m in msgs {
            // through our encoder and prost's decoder
            let mut buf = bytes::BytesMut::new();
            m.write(&mut buf);
            assert_eq!(buf.len(), m.len());
            wire.push(<FlightData as prost::Message>::decode(buf.freeze()).unwrap());
        }
        assert!(wire[1..]
            .iter()
            .all(|f| f.app_metadata.as_ref() == b"{\"position\":1}"));
        let got: Vec<RecordBatch> = crate::flight::runtime()
            .block_on(async {
                use futures::TryStreamExt;
                arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
                    futures::stream::iter(wire.into_iter().map(Ok)),
                )
                .try_collect()
                .await
            })
            .unwrap();
        assert_eq!(got, want);
    }
}
