//! Fuzz target: arbitrary bytes as one AMQP frame (after its size field) through the receiving
//! end's quick transfer reader. Whatever it accepts, fe2o3-amqp's decoder must read the same
//! way (same delivery-id, settled, more, aborted, and payload); it may step aside for anything.

#![no_main]

use fe2o3_amqp::frames::amqp::FrameBody;
use iot_sub::transport::frames::{decode_amqp, quick_transfer, TransferHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let Some((head, at)) = quick_transfer(frame) else {
        return;
    };
    match decode_amqp(bytes::BytesMut::from(frame)).map(|f| f.body) {
        Ok(FrameBody::Transfer {
            performative,
            payload,
        }) => {
            assert_eq!(head, TransferHead::from(&performative));
            assert_eq!(&payload[..], &frame[at..]);
        }
        other => panic!("quick read {head:?}, fe2o3 read {other:?}"),
    }
});
