//! AMQP 1.0 framing for our receiving end: protocol headers, splitting the byte stream into
//! frames, and encoding and decoding frame bodies with fe2o3-amqp's types and codec.

use bytes::{Buf, BufMut, BytesMut};
use fe2o3_amqp::frames::amqp::{Frame, FrameDecoder};
use fe2o3_amqp::frames::sasl;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

/// The SASL protocol header.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The AMQP protocol header.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// The TLS protocol header (a server that wants the AMQP-level TLS upgrade).
pub const TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";
/// Every frame is at least its 8-byte header.
const FRAME_HEADER: usize = 8;
/// Frames before the Open is agreed may be this large (the spec's minimum max-frame-size).
pub const MIN_MAX_FRAME_SIZE: usize = 512;

/// A frame that cannot be taken apart.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The size field is below the header size or above what we accept.
    #[error("frame of {size} bytes (allowed: 8 to {max})")]
    Size {
        /// The size field.
        size: usize,
        /// Our max-frame-size.
        max: usize,
    },
    /// The body does not decode.
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Splits the next whole frame off `buf` (without its 4-byte size field), if it is all there.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(FRAME_HEADER..=max).contains(&size) {
        return Err(FrameError::Size { size, max });
    }
    if buf.len() < size {
        // Room for the rest, so the next read completes it.
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(size);
    frame.advance(4);
    Ok(Some(frame))
}

/// Splits the 8-byte protocol header off `buf`, if it is there.
pub fn split_header(buf: &mut BytesMut) -> Option<[u8; 8]> {
    if buf.len() < 8 {
        return None;
    }
    let mut header = [0u8; 8];
    buf.copy_to_slice(&mut header);
    Some(header)
}

/// What a Transfer performative says that the receiving end needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHead {
    /// Set on the first frame of a delivery.
    pub delivery_id: Option<u32>,
    /// The sender settled it already.
    pub settled: Option<bool>,
    /// More frames of this delivery follow.
    pub more: bool,
    /// The sender abandoned the delivery.
    pub aborted: bool,
}

impl From<&fe2o3_amqp::types::performatives::Transfer> for TransferHead {
    fn from(t: &fe2o3_amqp::types::performatives::Transfer) -> Self {
        TransferHead {
            delivery_id: t.delivery_id,
            settled: t.settled,
            more: t.more,
            aborted: t.aborted,
        }
    }
}

/// Reads a Transfer frame (after its size field) the quick way, for the common encodings of
/// the fields the receiving end needs: returns them and where the payload starts. Anything
/// else (another performative, a delivery state, an unusual encoding) is `None`, and the frame
/// goes to fe2o3's decoder instead, which is the reference: the tests hold the two equal.
pub fn quick_transfer(frame: &[u8]) -> Option<(TransferHead, usize)> {
    // doff 2, AMQP frame type, any channel; then the described list 0x00 0x53 0x14.
    if frame.len() < 8 || frame[0] != 2 || frame[1] != 0 || frame[4..7] != [0x00, 0x53, 0x14] {
        return None;
    }
    let mut r = Fields { b: frame, p: 7 };
    let (count, end) = match r.byte()? {
        0x45 => (0, r.p),
        0xc0 => {
            let size = usize::from(r.byte()?);
            let end = r.p + size;
            (u32::from(r.byte()?), end)
        }
        0xd0 => {
            let size = r.u32()? as usize;
            let end = r.p.checked_add(size)?;
            (r.u32()?, end)
        }
        _ => return None,
    };
    // The handle is mandatory: an empty list is not a transfer.
    if end > frame.len() || count == 0 {
        return None;
    }
    let mut head = TransferHead {
        delivery_id: None,
        settled: None,
        more: false,
        aborted: false,
    };
    for field in 0..count {
        match field {
            0 => {
                r.uint()??; // handle (mandatory): the one link
            }
            1 => head.delivery_id = r.uint()?,
            2 => r.skip_binary()?,
            3 => {
                r.uint()?; // message-format
            }
            4 => head.settled = r.boolean()?,
            5 => head.more = r.boolean()?.unwrap_or(false),
            6 => r.settle_mode()?,
            // state: only on resumed deliveries; fe2o3 decodes it.
            7 => r.null()?,
            8 => {
                r.boolean()?; // resume
            }
            9 => head.aborted = r.boolean()?.unwrap_or(false),
            10 => {
                r.boolean()?; // batchable
            }
            _ => return None,
        }
    }
    (r.p == end).then_some((head, end))
}

/// A cursor over a Transfer's fields.
struct Fields<'a> {
    b: &'a [u8],
    p: usize,
}

impl Fields<'_> {
    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.p)?;
        self.p += 1;
        Some(v)
    }

    fn u32(&mut self) -> Option<u32> {
        let v = u32::from_be_bytes(self.b.get(self.p..self.p + 4)?.try_into().ok()?);
        self.p += 4;
        Some(v)
    }

    fn uint(&mut self) -> Option<Option<u32>> {
        match self.byte()? {
            0x40 => Some(None),
            0x43 => Some(Some(0)),
            0x52 => Some(Some(u32::from(self.byte()?))),
            0x70 => Some(Some(self.u32()?)),
            _ => None,
        }
    }

    fn boolean(&mut self) -> Option<Option<bool>> {
        match self.byte()? {
            0x40 => Some(None),
            0x41 => Some(Some(true)),
            0x42 => Some(Some(false)),
            0x56 => match self.byte()? {
                0 => Some(Some(false)),
                1 => Some(Some(true)),
                _ => None,
            },
            _ => None,
        }
    }

    fn null(&mut self) -> Option<()> {
        (self.byte()? == 0x40).then_some(())
    }

    /// rcv-settle-mode: null, or a ubyte that is first (0) or second (1).
    fn settle_mode(&mut self) -> Option<()> {
        match self.byte()? {
            0x40 => Some(()),
            0x50 => (self.byte()? <= 1).then_some(()),
            _ => None,
        }
    }

    fn skip_binary(&mut self) -> Option<()> {
        let len = match self.byte()? {
            0x40 => return Some(()),
            0xa0 => usize::from(self.byte()?),
            0xb0 => self.u32()? as usize,
            _ => return None,
        };
        self.p = self.p.checked_add(len)?;
        (self.p <= self.b.len()).then_some(())
    }
}

/// Decodes an AMQP frame (after its size field).
pub fn decode_amqp(mut frame: BytesMut) -> Result<Frame, FrameError> {
    match (FrameDecoder {}).decode(&mut frame) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(FrameError::Decode("empty".into())),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

/// Decodes a SASL frame (after its size field).
pub fn decode_sasl(mut frame: BytesMut) -> Result<sasl::Frame, FrameError> {
    match (sasl::FrameCodec {}).decode(&mut frame) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(FrameError::Decode("empty".into())),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

/// Appends a SASL frame to `out`.
pub fn put_sasl(out: &mut BytesMut, frame: sasl::Frame) {
    let start = out.len();
    out.put_u32(0);
    (sasl::FrameCodec {})
        .encode(frame, out)
        .expect("SASL frames we build always encode");
    patch_size(out, start);
}

/// Appends an AMQP frame on `channel` carrying `performative` (any of fe2o3's performative
/// types; none of ours carries a payload).
pub fn put_amqp<P: Serialize>(out: &mut BytesMut, channel: u16, performative: &P) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(2); // doff: no extended header
    out.put_u8(0); // frame type: AMQP
    out.put_u16(channel);
    let mut serializer = serde_amqp::ser::Serializer::from(out.writer());
    performative
        .serialize(&mut serializer)
        .expect("performatives we build always encode");
    patch_size(out, start);
}

/// Appends an empty frame (a heartbeat).
pub fn put_empty(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u8(2);
    out.put_u8(0);
    out.put_u16(0);
}

fn patch_size(out: &mut BytesMut, start: usize) {
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::frames::amqp::FrameBody;
    use fe2o3_amqp::types::definitions::Role;
    use fe2o3_amqp::types::messaging::{Accepted, DeliveryState};
    use fe2o3_amqp::types::performatives::Disposition;

    #[test]
    fn a_frame_we_encode_is_decoded_by_fe2o3_whole_and_split_at_every_byte() {
        let disposition = Disposition {
            role: Role::Receiver,
            first: 7,
            last: Some(9),
            settled: true,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        };
        let mut wire = BytesMut::new();
        put_amqp(&mut wire, 0, &disposition);
        put_empty(&mut wire);
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut frames = Vec::new();
            while let Some(f) = split_frame(&mut buf, 512).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = split_frame(&mut buf, 512).unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 2, "cut at {cut}");
            match decode_amqp(frames.remove(0)).unwrap().body {
                FrameBody::Disposition(d) => {
                    assert_eq!((d.first, d.last, d.settled), (7, Some(9), true));
                    assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                decode_amqp(frames.remove(0)).unwrap().body,
                FrameBody::Empty
            ));
        }
    }

    /// Every combination of the fields the quick reader handles, encoded by fe2o3's own
    /// serializer, reads the same as fe2o3's decoder; with a delivery state it steps aside.
    #[test]
    fn the_quick_transfer_reader_agrees_with_fe2o3() {
        use fe2o3_amqp::types::definitions::ReceiverSettleMode;
        use fe2o3_amqp::types::performatives::Transfer;
        use fe2o3_amqp::types::primitives::Binary;
        let mut checked = 0;
        for id in [None, Some(0), Some(7), Some(255), Some(256), Some(u32::MAX)] {
            for tag in [None, Some(vec![]), Some(vec![1u8; 4]), Some(vec![9u8; 300])] {
                for settled in [None, Some(true), Some(false)] {
                    for (more, aborted, resume, batchable) in [
                        (false, false, false, false),
                        (true, false, false, true),
                        (false, true, true, false),
                    ] {
                        for mode in [None, Some(ReceiverSettleMode::Second)] {
                            let t = Transfer {
                                handle: 3u32.into(),
                                delivery_id: id,
                                delivery_tag: tag.clone().map(Binary::from),
                                message_format: id.map(|_| 0),
                                settled,
                                more,
                                rcv_settle_mode: mode.clone(),
                                state: None,
                                resume,
                                aborted,
                                batchable,
                            };
                            let mut frame = vec![2u8, 0, 0, 5];
                            frame.extend(serde_amqp::to_vec(&t).unwrap());
                            let body_at = frame.len();
                            frame.extend_from_slice(b"payload");
                            let (head, at) = quick_transfer(&frame).expect("quick read");
                            assert_eq!(at, body_at);
                            assert_eq!(head, TransferHead::from(&t));
                            match decode_amqp(BytesMut::from(&frame[..])).unwrap().body {
                                FrameBody::Transfer {
                                    performative,
                                    payload,
                                } => {
                                    assert_eq!(TransferHead::from(&performative), head);
                                    assert_eq!(&payload[..], b"payload");
                                }
                                other => panic!("{other:?}"),
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 6 * 4 * 3 * 3 * 2);

        // A delivery state, another performative, a truncated frame: not for the quick reader.
        let t = Transfer {
            handle: 0u32.into(),
            delivery_id: Some(1),
            delivery_tag: None,
            message_format: None,
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: Some(DeliveryState::Accepted(Accepted {})),
            resume: false,
            aborted: false,
            batchable: false,
        };
        let mut frame = vec![2u8, 0, 0, 0];
        frame.extend(serde_amqp::to_vec(&t).unwrap());
        assert!(quick_transfer(&frame).is_none());
        let mut flow = BytesMut::new();
        put_empty(&mut flow);
        assert!(quick_transfer(&flow[4..]).is_none());
        let mut short = vec![2u8, 0, 0, 0];
        short.extend(serde_amqp::to_vec(&Transfer { state: None, ..t }).unwrap());
        short.truncate(short.len() - 1);
        assert!(quick_transfer(&short).is_none());
    }

    #[test]
    fn sizes_outside_the_limits_are_errors_not_waits() {
        let mut small = BytesMut::from(&[0u8, 0, 0, 7, 2, 0, 0, 0][..]);
        assert!(split_frame(&mut small, 512).is_err());
        let mut large = BytesMut::from(&[0u8, 0, 2, 1][..]);
        assert!(split_frame(&mut large, 512).is_err());
        let mut partial = BytesMut::from(&[0u8, 0, 2, 0][..]);
        assert!(split_frame(&mut partial, 512).unwrap().is_none());
    }
}
