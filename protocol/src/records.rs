//! The plant records: readings in, windows, scores, alerts and dead letters out.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Unix time in milliseconds (event time or wall-clock time, as named).
pub type UnixMs = i64;

/// Identifies one time series: a device (PLC, sensor node) and one of its sensors.
///
/// A key is one shared allocation ([`SeriesName`] behind an `Arc`): sources
/// intern a series once, so a reading, its window and its alert carry the
/// same key, and cloning one is a single reference count. The fields read
/// through it (`key.device`, `key.sensor`). On the wire and on disk it is
/// the two plain strings, `{"device": …, "sensor": …}`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey(Arc<SeriesName>);

/// The names of a series; see [`SeriesKey`]. Each name is itself shared
/// (`Arc<str>`), so the series of one device share its name.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesName {
    pub device: Arc<str>,
    pub sensor: Arc<str>,
}

impl SeriesKey {
    pub fn new(device: impl Into<Arc<str>>, sensor: impl Into<Arc<str>>) -> Self {
        Self(Arc::new(SeriesName {
            device: device.into(),
            sensor: sensor.into(),
        }))
    }

    /// Where the names live: equal for clones of one key, so a table can
    /// recognise a key it has seen without reading its names.
    #[inline]
    pub fn as_ptr(&self) -> *const SeriesName {
        Arc::as_ptr(&self.0)
    }

    /// Whether `self` and `other` are clones of one key (same allocation).
    #[inline]
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for SeriesKey {
    type Target = SeriesName;

    #[inline]
    fn deref(&self) -> &SeriesName {
        &self.0
    }
}

impl fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeriesKey")
            .field("device", &self.0.device)
            .field("sensor", &self.0.sensor)
            .finish()
    }
}

impl Serialize for SeriesKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SeriesKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        SeriesName::deserialize(deserializer).map(|name| Self(Arc::new(name)))
    }
}

impl fmt::Display for SeriesKey {
    /// `device/sensor`, the form used as the Kafka key and in the dashboard.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.device, self.sensor)
    }
}

/// The unit of a record that names none.
fn no_unit() -> Arc<str> {
    Arc::from("")
}

/// Where a reading (or a dead letter) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Mqtt,
    Modbus,
    Other,
    /// An OPC UA server (subscription or read).
    #[serde(rename = "opcua")]
    OpcUa,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Modbus => "modbus",
            Source::Other => "other",
            Source::OpcUa => "opcua",
        }
    }
}

/// Quality of a reading as reported by the device or judged at ingest
/// (OPC-style good/uncertain/bad).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quality {
    #[default]
    Good,
    Uncertain,
    Bad,
}

/// One measured value of one series at one event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub series: SeriesKey,
    /// Event time: from the payload, or stamped at ingest when the payload has none.
    pub time_ms: UnixMs,
    pub value: f64,
    /// Engineering unit, e.g. `degC`, `bar`; empty when unknown.
    #[serde(default = "no_unit")]
    pub unit: Arc<str>,
    pub source: Source,
    #[serde(default)]
    pub quality: Quality,
}

/// A closed event-time window of one series: `[start_ms, end_ms)`, aligned to
/// multiples of the width from the Unix epoch, so every gateway agrees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub agent: Arc<str>,
    pub series: SeriesKey,
    pub start_ms: UnixMs,
    pub end_ms: UnixMs,
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Population standard deviation of the readings in the window.
    pub stddev: f64,
    pub first_event_ms: UnixMs,
    pub last_event_ms: UnixMs,
    #[serde(default = "no_unit")]
    pub unit: Arc<str>,
    /// The anomaly score of this window's mean against the series baseline;
    /// `None` while the baseline is warming up.
    #[serde(default)]
    pub score: Option<AnomalyScore>,
}

/// How far a window mean (or a single reading) lies from the series baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnomalyScore {
    /// z = (x − μ) / max(σ, floor).
    pub z: f64,
    /// Baseline mean μ over the last N window means.
    pub baseline_mean: f64,
    /// Baseline standard deviation σ over the last N window means (before the floor).
    pub baseline_stddev: f64,
    /// Two-sided p-value of |z| under a standard normal.
    pub p_value: f64,
    pub severity: Severity,
}

/// Severity of a score: |z| below the warning threshold is `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Normal,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Normal => "normal",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    /// A closed window's mean crossed a threshold.
    Window,
    /// A single reading crossed a threshold before its window closed.
    Spike,
}

/// A score that crossed the warning or critical threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub agent: Arc<str>,
    pub series: SeriesKey,
    pub kind: AlertKind,
    /// Event time of the spike reading, or the window start for a window alert.
    pub time_ms: UnixMs,
    /// The window this alert belongs to: `[window_start_ms, window_start_ms + width)`.
    pub window_start_ms: UnixMs,
    /// The value scored: the reading (spike) or the window mean.
    pub value: f64,
    pub score: AnomalyScore,
    #[serde(default = "no_unit")]
    pub unit: Arc<str>,
}

/// Why an input did not become a reading or a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterReason {
    /// Behind the watermark: its window was already emitted.
    Late,
    /// The value was NaN.
    NotANumber,
    /// The value was +Inf or −Inf.
    Infinite,
    /// Not decodable (bad JSON, bad encoding, wrong structure).
    Malformed,
    /// Decodable, but a field had the wrong type or was missing.
    WrongType,
    /// Larger than the configured cap.
    Oversize,
    /// A new series arrived while the live-series cap was reached.
    SeriesCap,
    /// The device answered with a Modbus exception.
    DeviceException,
    /// No topic mapping rule matched.
    Unmapped,
    /// The event time is further ahead of or behind the gateway's clock than
    /// the configured skew allows.
    ClockSkew,
    /// A device, sensor or unit name, or a topic, breaks the length or
    /// character limits.
    InvalidName,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 11] = [
        DeadLetterReason::Late,
        DeadLetterReason::NotANumber,
        DeadLetterReason::Infinite,
        DeadLetterReason::Malformed,
        DeadLetterReason::WrongType,
        DeadLetterReason::Oversize,
        DeadLetterReason::SeriesCap,
        DeadLetterReason::DeviceException,
        DeadLetterReason::Unmapped,
        DeadLetterReason::ClockSkew,
        DeadLetterReason::InvalidName,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Late => "late",
            DeadLetterReason::NotANumber => "not-a-number",
            DeadLetterReason::Infinite => "infinite",
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::WrongType => "wrong-type",
            DeadLetterReason::Oversize => "oversize",
            DeadLetterReason::SeriesCap => "series-cap",
            DeadLetterReason::DeviceException => "device-exception",
            DeadLetterReason::Unmapped => "unmapped",
            DeadLetterReason::ClockSkew => "clock-skew",
            DeadLetterReason::InvalidName => "invalid-name",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An input that was not accepted, kept with the reason so nothing is lost silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source: Source,
    /// Where it came from: the MQTT topic, `device/sensor`, or a Modbus device name.
    pub origin: String,
    /// The original input bytes (truncated to a cap for oversize inputs).
    #[serde(with = "lossless_bytes")]
    pub input: Vec<u8>,
    pub reason: DeadLetterReason,
    /// Human-readable detail: the parser's message, the exception code...
    pub detail: String,
    /// Wall-clock time it was dead-lettered.
    pub time_ms: UnixMs,
}

impl DeadLetter {
    pub fn new(
        source: Source,
        origin: impl Into<String>,
        input: Vec<u8>,
        reason: DeadLetterReason,
        detail: impl Into<String>,
        time_ms: UnixMs,
    ) -> Self {
        Self {
            source,
            origin: origin.into(),
            input,
            reason,
            detail: detail.into(),
            time_ms,
        }
    }

    /// A dead letter for a reading that was decoded but not accepted
    /// (late, NaN, ±Inf, over the series cap). The input is the reading as JSON.
    pub fn for_reading(reading: &Reading, reason: DeadLetterReason, now_ms: UnixMs) -> Self {
        // Non-finite floats are not JSON; keep them readable in the detail instead.
        let detail = format!("value={} time_ms={}", reading.value, reading.time_ms);
        let mut shown = reading.clone();
        if !shown.value.is_finite() {
            shown.value = 0.0;
        }
        let input = serde_json::to_vec(&shown).unwrap_or_default();
        Self::new(
            reading.source,
            reading.series.to_string(),
            input,
            reason,
            detail,
            now_ms,
        )
    }
}

/// Serialises bytes as a string when they are valid UTF-8 (readable in any
/// Kafka tool), otherwise as an array of numbers. Binary encodings (postcard)
/// always see plain bytes.
mod lossless_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr<'a> {
        Text(std::borrow::Cow<'a, str>),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return s.serialize_bytes(v);
        }
        match std::str::from_utf8(v) {
            Ok(t) => Repr::Text(t.into()).serialize(s),
            Err(_) => Repr::Bytes(v.to_vec()).serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if !d.is_human_readable() {
            return serde_bytes_vec(d);
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Text(t) => t.into_owned().into_bytes(),
            Repr::Bytes(b) => b,
        })
    }

    fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
