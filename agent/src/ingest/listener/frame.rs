//! MQTT framing for the ingest listener: the fixed header, the publish fast
//! path, and the few packets the gateway writes.
//!
//! A `PUBLISH` is read in place from the connection's buffer (the topic and
//! payload are borrowed, nothing is allocated); the rare packets (`CONNECT`,
//! `SUBSCRIBE`) go through rumqttc's codec. Everything the gateway sends is a
//! few bytes built here. MQTT 3.1, 3.1.1 and 5 share the fixed header and
//! differ, for what the listener reads, only in the properties block of
//! MQTT 5.

use bytes::{BufMut, BytesMut};

/// The MQTT protocol level of a connection, from its `CONNECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 3.1 (level 3) and 3.1.1 (level 4).
    V4,
    /// 5 (level 5).
    V5,
}

/// Control packet types (the high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const PINGREQ: u8 = 12;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// A complete fixed header at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub byte1: u8,
    /// Bytes of the fixed header (1 + the remaining-length bytes).
    pub header_len: usize,
    /// The remaining length: bytes after the fixed header.
    pub body_len: usize,
}

impl Header {
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    pub fn frame_len(&self) -> usize {
        self.header_len + self.body_len
    }
}

/// Why a buffer does not start with a usable packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Parses the fixed header at the start of `buf`: `Ok(None)` when more bytes
/// are needed to know its length.
pub fn header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut body_len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        body_len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                header_len: 2 + i,
                body_len,
            }));
        }
    }
    Err(FrameError::BadLength)
}

/// A `PUBLISH` read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub dup: bool,
    pub pkid: u16,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// Reads a `PUBLISH` body (`body` is the packet after its fixed header).
pub fn publish(byte1: u8, body: &[u8], version: Version) -> Result<Publish<'_>, FrameError> {
    let qos = (byte1 >> 1) & 0b11;
    if qos == 3 {
        return Err(FrameError::Malformed("publish: QoS 3"));
    }
    let (topic, mut rest) = string(body).ok_or(FrameError::Malformed("publish topic"))?;
    let mut pkid = 0;
    if qos > 0 {
        let [hi, lo, tail @ ..] = rest else {
            return Err(FrameError::Malformed("publish packet id"));
        };
        pkid = u16::from_be_bytes([*hi, *lo]);
        if pkid == 0 {
            return Err(FrameError::Malformed("publish packet id 0"));
        }
        rest = tail;
    }
    if version == Version::V5 {
        let (len, used) = varint(rest).ok_or(FrameError::Malformed("publish properties"))?;
        rest = rest
            .get(used + len..)
            .ok_or(FrameError::Malformed("publish properties"))?;
    }
    let topic = std::str::from_utf8(topic).map_err(|_| FrameError::Malformed("topic (UTF-8)"))?;
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(FrameError::Malformed(
            "topic (empty, wildcard or topic alias)",
        ));
    }
    Ok(Publish {
        qos,
        dup: byte1 & 0b1000 != 0,
        pkid,
        topic,
        payload: rest,
    })
}

/// The packet id at the start of a body (`PUBREL`, `SUBSCRIBE`, `UNSUBSCRIBE`).
pub fn packet_id(body: &[u8]) -> Result<u16, FrameError> {
    match body {
        [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(FrameError::Malformed("packet id")),
    }
}

/// How many topic filters a `SUBSCRIBE` or `UNSUBSCRIBE` body lists.
pub fn filter_count(body: &[u8], version: Version, subscribe: bool) -> Result<usize, FrameError> {
    let mut rest = body.get(2..).ok_or(FrameError::Malformed("packet id"))?;
    if version == Version::V5 {
        let (len, used) = varint(rest).ok_or(FrameError::Malformed("properties"))?;
        rest = rest
            .get(used + len..)
            .ok_or(FrameError::Malformed("properties"))?;
    }
    let mut n = 0;
    while !rest.is_empty() {
        let (_, tail) = string(rest).ok_or(FrameError::Malformed("topic filter"))?;
        rest = if subscribe {
            tail.get(1..)
                .ok_or(FrameError::Malformed("subscription options"))?
        } else {
            tail
        };
        n += 1;
    }
    if n == 0 {
        return Err(FrameError::Malformed("no topic filter"));
    }
    Ok(n)
}

/// A length-prefixed string: its bytes and what follows.
fn string(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let [hi, lo, rest @ ..] = buf else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A variable byte integer: its value and its length in bytes.
fn varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in buf.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut b = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if value == 0 {
            break;
        }
    }
}

/// `CONNACK`. `code` is the 3.1.1 return code (0 accepted); for MQTT 5 it is
/// mapped to its reason code, and an accepted connection learns the
/// listener's limits: `receive_maximum` unacknowledged QoS 1/2 publishes and
/// packets of at most `max_packet` bytes.
pub fn connack(
    out: &mut BytesMut,
    version: Version,
    code: u8,
    receive_maximum: u16,
    max_packet: u32,
) {
    match version {
        Version::V4 => out.put_slice(&[0x20, 0x02, 0x00, code]),
        Version::V5 => {
            let reason = match code {
                0 => 0x00,
                1 => 0x84, // unsupported protocol version
                2 => 0x85, // client identifier not valid
                3 => 0x88, // server unavailable
                4 => 0x86, // bad user name or password
                _ => 0x87, // not authorized
            };
            // Properties: receive maximum (0x21), maximum packet size (0x27).
            out.put_slice(&[0x20, 11, 0x00, reason, 8, 0x21]);
            out.put_u16(receive_maximum.max(1));
            out.put_u8(0x27);
            out.put_u32(max_packet);
        }
    }
}

/// `PUBACK`, `PUBREC` or `PUBCOMP` with success (the same 4 bytes in 3.1.1 and 5).
pub fn ack(out: &mut BytesMut, kind: u8, pkid: u16) {
    let flags = if kind == kind::PUBREL { 0x02 } else { 0x00 };
    out.put_slice(&[(kind << 4) | flags, 0x02]);
    out.put_u16(pkid);
}

/// `SUBACK` refusing each of `filters` subscriptions: the ingest listener
/// takes publishes only.
pub fn suback_refused(out: &mut BytesMut, version: Version, pkid: u16, filters: usize) {
    out.put_u8(0x90);
    match version {
        Version::V4 => {
            put_varint(out, 2 + filters);
            out.put_u16(pkid);
            out.put_bytes(0x80, filters);
        }
        Version::V5 => {
            put_varint(out, 3 + filters);
            out.put_u16(pkid);
            out.put_u8(0);
            out.put_bytes(0x87, filters); // not authorized
        }
    }
}

/// `UNSUBACK` for `filters` filters (none of which was subscribed).
pub fn unsuback(out: &mut BytesMut, version: Version, pkid: u16, filters: usize) {
    out.put_u8(0xB0);
    match version {
        Version::V4 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            put_varint(out, 3 + filters);
            out.put_u16(pkid);
            out.put_u8(0);
            out.put_bytes(0x11, filters); // no subscription existed
        }
    }
}

pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// A server `DISCONNECT` (MQTT 5 only; a 3.1.1 server just closes).
pub fn disconnect(out: &mut BytesMut, version: Version, reason: u8) {
    if version == Version::V5 {
        out.put_slice(&[0xE0, 0x01, reason]);
    }
}

/// MQTT 5 disconnect reasons the listener uses.
pub mod reason {
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4;

    fn encoded_v4(p: &v4::Publish) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b
    }

    #[test]
    fn a_publish_written_by_rumqttc_reads_in_place() {
        for qos in [
            rumqttc::QoS::AtMostOnce,
            rumqttc::QoS::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce,
        ] {
            let mut p = v4::Publish::new("sensors/d1/s1", qos, br#"{"value":1}"#.to_vec());
            p.pkid = if qos == rumqttc::QoS::AtMostOnce {
                0
            } else {
                77
            };
            let buf = encoded_v4(&p);
            let h = header(&buf).unwrap().unwrap();
            assert_eq!(h.kind(), kind::PUBLISH);
            assert_eq!(h.frame_len(), buf.len());
            let got = publish(h.byte1, &buf[h.header_len..], Version::V4).unwrap();
            assert_eq!(got.topic, "sensors/d1/s1");
            assert_eq!(got.payload, br#"{"value":1}"#);
            assert_eq!(got.qos, qos as u8);
            assert_eq!(got.pkid, p.pkid);
        }
    }

    #[test]
    fn a_v5_publish_skips_its_properties() {
        use rumqttc::v5::mqttbytes::v5 as m5;
        let mut p = m5::Publish::new(
            "a/b",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            b"12".to_vec(),
            None,
        );
        p.pkid = 9;
        p.properties = Some(m5::PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        });
        let mut buf = BytesMut::new();
        m5::Packet::Publish(p).write(&mut buf, None).unwrap();
        let h = header(&buf).unwrap().unwrap();
        let got = publish(h.byte1, &buf[h.header_len..], Version::V5).unwrap();
        assert_eq!((got.topic, got.payload, got.pkid), ("a/b", &b"12"[..], 9));
    }

    #[test]
    fn partial_headers_wait_and_long_lengths_are_refused() {
        assert_eq!(header(&[0x30]).unwrap(), None);
        assert_eq!(header(&[0x30, 0x80]).unwrap(), None);
        let h = header(&[0x30, 0x80, 0x01]).unwrap().unwrap();
        assert_eq!((h.header_len, h.body_len), (3, 128));
        assert_eq!(
            header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(FrameError::BadLength)
        );
    }

    #[test]
    fn wildcard_topics_and_bad_ids_are_malformed() {
        let body = |topic: &[u8], tail: &[u8]| {
            let mut b = (topic.len() as u16).to_be_bytes().to_vec();
            b.extend_from_slice(topic);
            b.extend_from_slice(tail);
            b
        };
        assert!(publish(0x30, &body(b"a/+", b"1"), Version::V4).is_err());
        assert!(publish(0x32, &body(b"a/b", &[0, 0]), Version::V4).is_err());
        assert!(publish(0x36, &body(b"a/b", &[0, 1]), Version::V4).is_err());
        assert!(publish(0x30, &body(&[0xFF], b""), Version::V4).is_err());
        assert!(publish(0x30, &[0, 9, b'a'], Version::V4).is_err());
    }

    #[test]
    fn subacks_refuse_every_filter_and_read_back_with_rumqttc() {
        let mut s = v4::Subscribe::new("a/#", rumqttc::QoS::AtLeastOnce);
        s.add("b/+".into(), rumqttc::QoS::AtMostOnce);
        s.pkid = 5;
        let mut buf = BytesMut::new();
        s.write(&mut buf).unwrap();
        let h = header(&buf).unwrap().unwrap();
        let n = filter_count(&buf[h.header_len..], Version::V4, true).unwrap();
        assert_eq!(n, 2);
        let mut out = BytesMut::new();
        suback_refused(&mut out, Version::V4, 5, n);
        match v4::Packet::read(&mut out, 1024).unwrap() {
            v4::Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, 5);
                assert_eq!(ack.return_codes.len(), 2);
                assert!(ack
                    .return_codes
                    .iter()
                    .all(|c| *c == v4::SubscribeReasonCode::Failure));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn acks_and_a_v5_connack_read_back_with_rumqttc() {
        let mut out = BytesMut::new();
        ack(&mut out, kind::PUBACK, 300);
        assert_eq!(
            v4::Packet::read(&mut out, 1024).unwrap(),
            v4::Packet::PubAck(v4::PubAck::new(300))
        );
        use rumqttc::v5::mqttbytes::v5 as m5;
        let mut out = BytesMut::new();
        connack(&mut out, Version::V5, 0, 1000, 1 << 20);
        match m5::Packet::read(&mut out, None).unwrap() {
            m5::Packet::ConnAck(c) => {
                let p = c.properties.unwrap();
                assert_eq!(p.receive_max, Some(1000));
                assert_eq!(p.max_packet_size, Some(1 << 20));
            }
            other => panic!("{other:?}"),
        }
    }
}
