//! Sparkplug B payloads (Eclipse Sparkplug 3.0, `spBv1.0`): the protobuf
//! messages the agent decodes and the simulator's edge node encodes, written
//! from the specification's `sparkplug_b.proto` with prost's derive (no code
//! generation step). Only what a host and a simple edge node need: metadata,
//! properties and the content of datasets and templates are not modelled
//! (kept as raw bytes, or skipped as unknown fields).

/// The Sparkplug B payload, written from the specification's
/// `sparkplug_b.proto` (only what a host reads; unknown fields are skipped).
pub mod proto {
    /// `org.eclipse.tahu.protobuf.Payload`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Payload {
        #[prost(uint64, optional, tag = "1")]
        pub timestamp: Option<u64>,
        #[prost(message, repeated, tag = "2")]
        pub metrics: Vec<Metric>,
        #[prost(uint64, optional, tag = "3")]
        pub seq: Option<u64>,
        #[prost(string, optional, tag = "4")]
        pub uuid: Option<String>,
        #[prost(bytes = "vec", optional, tag = "5")]
        pub body: Option<Vec<u8>>,
    }

    /// `Payload.Metric`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metric {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(uint64, optional, tag = "2")]
        pub alias: Option<u64>,
        #[prost(uint64, optional, tag = "3")]
        pub timestamp: Option<u64>,
        #[prost(uint32, optional, tag = "4")]
        pub datatype: Option<u32>,
        #[prost(bool, optional, tag = "5")]
        pub is_historical: Option<bool>,
        #[prost(bool, optional, tag = "6")]
        pub is_transient: Option<bool>,
        #[prost(bool, optional, tag = "7")]
        pub is_null: Option<bool>,
        #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19")]
        pub value: Option<Value>,
    }

    /// `Payload.Metric.value`. Datasets, templates and extensions are kept
    /// as their raw bytes: they are not numbers.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(uint32, tag = "10")]
        Int(u32),
        #[prost(uint64, tag = "11")]
        Long(u64),
        #[prost(float, tag = "12")]
        Float(f32),
        #[prost(double, tag = "13")]
        Double(f64),
        #[prost(bool, tag = "14")]
        Boolean(bool),
        #[prost(string, tag = "15")]
        String(String),
        #[prost(bytes = "vec", tag = "16")]
        Bytes(Vec<u8>),
        #[prost(bytes = "vec", tag = "17")]
        Dataset(Vec<u8>),
        #[prost(bytes = "vec", tag = "18")]
        Template(Vec<u8>),
        #[prost(bytes = "vec", tag = "19")]
        Extension(Vec<u8>),
    }
}

/// Sparkplug B datatypes (the numeric ones and Boolean).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
}

/// The `Node Control/Rebirth` metric of an NCMD asking a node to rebirth.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";
