//! MQTT payload decoders and the topic → series mapping.
//!
//! What it is: plain, synchronous functions that turn one MQTT message
//! (topic + payload bytes) into [`Reading`]s and [`DeadLetter`]s, driven by
//! the `[[mqtt.subscriptions]]` / `[[broker.subscriptions]]` rules. Both the
//! external-broker client ([`super::mqtt`]) and the embedded broker
//! ([`super::broker`]) use the same [`Decoder`], and it is testable without a
//! socket.
//!
//! What it is not: no I/O, no counters and no judgement of values. NaN and
//! ±Inf from `number` payloads pass through as readings; the window engine
//! dead-letters them with its own reasons.
//!
//! # Formats
//!
//! | `format`     | payload                                              | readings |
//! |--------------|------------------------------------------------------|----------|
//! | `json`       | `{"ts": 1700000000000, "value": 80.1, "unit": "degC"}` | one |
//! | `json-multi` | `{"ts": ..., "humidity": 45.2, "ambient": 22.1}`      | one per numeric field, sensor = field name |
//! | `json-batch` | `[{"series": "boiler-3/temp", "ts": ..., "value": ...}, ...]` | one per element |
//! | `number`     | `80.1` (text; `NaN`, `inf`, `-inf` accepted)          | one, stamped at ingest |
//!
//! Field names are configurable (`value-field`, `time-field`, `unit-field`,
//! `series-field`, `device-field`, `sensor-field`). JSON booleans count as
//! numbers (`true` = 1, `false` = 0), as a coil would. A `null` time or unit
//! counts as absent. Event times are numbers in `time-unit` (`ms`, or `s` with
//! fractions allowed); a payload without the time field is stamped at ingest.
//!
//! In `json-multi`, fields named in `ignore-fields` (and the time, unit,
//! series, device and sensor fields) are skipped; every other non-numeric
//! field becomes a `wrong-type` dead letter while the numeric fields of the
//! same message still become readings, so a firmware change that turns a
//! number into a string is visible instead of silently lost.
//!
//! # Series
//!
//! `device` and `sensor` are templates over the topic's `/`-separated
//! segments: `{0}` is the first segment, and in `json-multi` `{field}` is the
//! field name. Per reading, a `series-field` holding `"device/sensor"` wins,
//! then `device-field` / `sensor-field`, then the templates. A template that
//! names a segment the topic does not have is `unmapped`.
//!
//! # Dead letters
//!
//! Malformed JSON or text → `malformed`; valid JSON of the wrong shape, a
//! missing or mistyped field → `wrong-type`; no subscription matches the topic
//! or a template cannot be filled → `unmapped`; a payload over `max-payload`
//! or with more value fields (`json-multi`) or elements (`json-batch`) than
//! `max-fields` → `oversize`; a topic longer than `max-topic-bytes`, or a
//! device, sensor or unit name longer than `max-name-bytes` or holding a
//! control character → `invalid-name`.
//!
//! # Bounded work per message
//!
//! A message makes **at most one dead letter**, whatever is wrong with it,
//! and that dead letter keeps at most the first `dead-letter-bytes` of the
//! payload (the detail gives the full size). When some fields of a
//! `json-multi` object or some elements of a `json-batch` are bad, the good
//! ones still become readings and the one dead letter names the first bad
//! one and how many there were. So a 256 KiB `{"a":"", …}` costs one parse
//! and one 1 KiB dead letter, not 35,000 copies of itself. The limits are the
//! `[broker.limits]` / `[mqtt.limits]` table ([`DecodeLimits`]).
//!
//! Decoding parses each payload once, straight from the bytes, borrowing
//! field names and strings where the JSON has no escapes and skipping nested
//! values without building them.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use millrace_protocol::{
    DeadLetter, DeadLetterReason, Quality, Reading, SeriesKey, Source, UnixMs,
};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Delivery, IngestEvent};

/// How many bytes of a bad payload its dead letter keeps, by default.
pub const DEAD_LETTER_INPUT_CAP: usize = 1024;

/// `[broker.limits]` / `[mqtt.limits]`: what one message may cost.
///
/// ```toml
/// [broker.limits]
/// max-fields = 1000        # json-multi value fields / json-batch elements
/// max-name-bytes = 128     # device, sensor and unit names
/// max-topic-bytes = 256
/// dead-letter-bytes = 1024 # payload prefix kept in a dead letter
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DecodeLimits {
    /// Value fields of a `json-multi` object, or elements of a `json-batch`
    /// array, one message may carry; more → one `oversize` dead letter.
    pub max_fields: usize,
    /// Longest device, sensor or unit name, in bytes.
    pub max_name_bytes: usize,
    /// Longest topic, in bytes.
    pub max_topic_bytes: usize,
    /// How much of a bad payload its dead letter keeps.
    pub dead_letter_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_fields: 1_000,
            max_name_bytes: 128,
            max_topic_bytes: 256,
            dead_letter_bytes: DEAD_LETTER_INPUT_CAP,
        }
    }
}

impl DecodeLimits {
    /// Checks every key; `prefix` names the table in errors (`broker.limits`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, value, min, max) in [
            ("max-fields", self.max_fields, 1, 1_000_000),
            ("max-name-bytes", self.max_name_bytes, 1, 65_535),
            ("max-topic-bytes", self.max_topic_bytes, 1, 65_535),
            (
                "dead-letter-bytes",
                self.dead_letter_bytes,
                0,
                16 * 1024 * 1024,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::new(
                    format!("{prefix}.{key}"),
                    format!("must be between {min} and {max}, got {value}"),
                ));
            }
        }
        Ok(())
    }
}

/// A configuration value that failed validation, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config key `{key}`: {reason}")]
pub struct ConfigError {
    /// Dotted key path, e.g. `mqtt.subscriptions[1].device`.
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

pub mod sparkplug;

/// The payload layout of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadFormat {
    /// One JSON object, one reading.
    #[default]
    Json,
    /// One JSON object, one reading per numeric field.
    JsonMulti,
    /// A JSON array of objects, one reading per element.
    JsonBatch,
    /// A bare number as text.
    Number,
    /// Sparkplug B protobuf on `spBv1.0/...` topics (see [`sparkplug`]).
    SparkplugB,
}

/// The unit of numeric event times in payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// Unix milliseconds.
    #[default]
    Ms,
    /// Unix seconds, fractions allowed.
    S,
}

/// One `[[mqtt.subscriptions]]` / `[[broker.subscriptions]]` entry, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SubscriptionConfig {
    /// MQTT topic filter (`+` and `#` wildcards; `$share/group/...` allowed).
    pub filter: String,
    /// Requested QoS: 0 or 1.
    #[serde(default = "defaults::qos")]
    pub qos: u8,
    #[serde(default)]
    pub format: PayloadFormat,
    /// Device template; default `{1}`.
    #[serde(default)]
    pub device: Option<String>,
    /// Sensor template; default `{2}`, or `{field}` for `json-multi`.
    #[serde(default)]
    pub sensor: Option<String>,
    /// Field holding the value (`json`, `json-batch`).
    #[serde(default = "defaults::value_field")]
    pub value_field: String,
    /// Field holding the event time; empty = always stamp at ingest.
    #[serde(default = "defaults::time_field")]
    pub time_field: String,
    #[serde(default)]
    pub time_unit: TimeUnit,
    /// Field holding the unit; empty = none.
    #[serde(default = "defaults::unit_field")]
    pub unit_field: String,
    /// Fixed unit when the payload has none.
    #[serde(default)]
    pub unit: String,
    /// Field holding `"device/sensor"`; default `series` for `json-batch`, none otherwise.
    #[serde(default)]
    pub series_field: Option<String>,
    /// Field holding the device name, overriding the device template.
    #[serde(default)]
    pub device_field: Option<String>,
    /// Field holding the sensor name, overriding the sensor template.
    #[serde(default)]
    pub sensor_field: Option<String>,
    /// `json-multi`: non-numeric fields to skip without a dead letter.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
    /// `sparkplug-b`: the agent may publish Rebirth requests (`NCMD`) to edge
    /// nodes whose sequence has a gap or that send data without a birth
    /// (default false: counted and logged only).
    #[serde(default)]
    pub commands: bool,
    /// `sparkplug-b`: what becomes of string, dataset, template and other
    /// non-numeric metrics: `skip` (default; counted) or `dead-letter`
    /// (counted, and named in the message's dead letter).
    #[serde(default)]
    pub non_numeric: NonNumeric,
}

/// `non-numeric`: what a Sparkplug B subscription does with metrics that
/// are not numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NonNumeric {
    /// Counted (`millrace_sparkplug_skipped_metrics_total`) and skipped.
    #[default]
    Skip,
    /// Counted and named in the message's one dead letter.
    DeadLetter,
}

/// The defaults of the subscription keys, in one place.
pub mod defaults {
    pub fn qos() -> u8 {
        1
    }
    pub fn value_field() -> String {
        "value".into()
    }
    pub fn time_field() -> String {
        "ts".into()
    }
    pub fn unit_field() -> String {
        "unit".into()
    }
    pub const DEVICE_TEMPLATE: &str = "{1}";
    pub const SENSOR_TEMPLATE: &str = "{2}";
    pub const MULTI_SENSOR_TEMPLATE: &str = "{field}";
    /// Sparkplug B: device metrics go to `<node>.<device>`, node metrics to `<node>`.
    pub const SPARKPLUG_DEVICE_TEMPLATE: &str = "{3}.{4}";
    pub const SPARKPLUG_NODE_TEMPLATE: &str = "{3}";
    pub const BATCH_SERIES_FIELD: &str = "series";
}

impl SubscriptionConfig {
    /// A subscription with every optional key at its default.
    pub fn new(filter: impl Into<String>, format: PayloadFormat) -> Self {
        Self {
            filter: filter.into(),
            qos: defaults::qos(),
            format,
            device: None,
            sensor: None,
            value_field: defaults::value_field(),
            time_field: defaults::time_field(),
            time_unit: TimeUnit::default(),
            unit_field: defaults::unit_field(),
            unit: "".into(),
            series_field: None,
            device_field: None,
            sensor_field: None,
            ignore_fields: Vec::new(),
            commands: false,
            non_numeric: NonNumeric::Skip,
        }
    }
}

/// Checks an MQTT topic filter: non-empty, `#` only as the last level, `+`
/// and `#` only as whole levels.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    let body = strip_share(filter).ok_or("`$share/` needs a group and a filter")?;
    if body.is_empty() {
        return Err("empty topic filter".into());
    }
    let levels: Vec<&str> = body.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level and the last one".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level".into());
        }
    }
    Ok(())
}

/// Whether every topic matching filter `f` also matches filter `g`.
pub fn filter_covers(g: &str, f: &str) -> bool {
    if g.starts_with("$share/") || f.starts_with("$share/") {
        return g == f;
    }
    // A wildcard in the first level never matches a `$` topic (`$SYS/…`).
    if f.starts_with('$') && (g.starts_with('+') || g.starts_with('#')) {
        return false;
    }
    let mut gl = g.split('/');
    let mut fl = f.split('/');
    loop {
        match (gl.next(), fl.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The filters to subscribe to: duplicates and filters covered by another
/// configured filter are dropped (the broker would deliver such a message
/// once per matching subscription), keeping the highest QoS asked for.
/// Routing still picks the first matching subscription rule per topic.
pub fn subscription_filters(subscriptions: &[SubscriptionConfig]) -> Vec<(String, u8)> {
    let mut kept: Vec<(String, u8)> = Vec::new();
    for (i, sub) in subscriptions.iter().enumerate() {
        let covered_by = subscriptions.iter().enumerate().find(|(j, other)| {
            *j != i
                && filter_covers(&other.filter, &sub.filter)
                // Of two identical filters, keep the first.
                && (other.filter != sub.filter || *j < i)
        });
        if covered_by.is_none() {
            let qos = subscriptions
                .iter()
                .filter(|o| filter_covers(&sub.filter, &o.filter))
                .map(|o| o.qos)
                .max()
                .unwrap_or(sub.qos);
            kept.push((sub.filter.clone(), qos));
        }
    }
    kept
}

/// The filter without a `$share/<group>/` prefix; `None` if the prefix is incomplete.
fn strip_share(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        None => Some(filter),
        Some(rest) => rest
            .split_once('/')
            .map(|(_, f)| f)
            .filter(|f| !f.is_empty()),
    }
}

/// Whether `topic` matches the MQTT filter (`+` one level, `#` the rest,
/// including none; wildcards never match a leading `$` level).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let filter = strip_share(filter).unwrap_or(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A compiled `device` / `sensor` template.
#[derive(Debug, Clone, PartialEq)]
struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Segment(usize),
    Field,
}

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed `{{` in template {text:?}"))?;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "field" => Part::Field,
                n => Part::Segment(n.parse().map_err(|_| {
                    format!(
                        "`{{{n}}}` in template {text:?} is neither a segment index nor `{{field}}`"
                    )
                })?),
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("stray `}}` in template {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("empty template".into());
        }
        Ok(Self { parts })
    }

    fn uses_field(&self) -> bool {
        self.parts.contains(&Part::Field)
    }

    /// Renders the template into `out`; `Err` names what could not be filled.
    fn render_into(
        &self,
        out: &mut String,
        segments: &[&str],
        field: Option<&str>,
    ) -> Result<(), String> {
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Segment(i) => match segments.get(*i) {
                    Some(s) if !s.is_empty() => out.push_str(s),
                    _ => return Err(format!("topic has no segment {{{i}}}")),
                },
                Part::Field => out.push_str(field.ok_or("no field name for `{field}`")?),
            }
        }
        Ok(())
    }

    /// The highest topic level the template refers to.
    fn max_segment(&self) -> Option<usize> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Segment(i) => Some(*i),
                _ => None,
            })
            .max()
    }
}

/// One compiled subscription rule.
#[derive(Debug, Clone)]
struct Route {
    filter: String,
    format: PayloadFormat,
    device: Template,
    /// Sparkplug B node messages: the default device template of node
    /// metrics (`None` when the configured `device` serves both).
    node_device: Option<Template>,
    /// Sparkplug B: Rebirth requests may be published.
    commands: bool,
    /// Sparkplug B: non-numeric metrics go to the dead letter.
    dead_letter_non_numeric: bool,
    sensor: Template,
    value_field: String,
    time_field: String,
    time_unit: TimeUnit,
    unit_field: String,
    unit: String,
    series_field: Option<String>,
    device_field: Option<String>,
    sensor_field: Option<String>,
    ignore_fields: Vec<String>,
}

impl Route {
    fn compile(sub: &SubscriptionConfig, key: &str) -> Result<Self, ConfigError> {
        validate_filter(&sub.filter).map_err(|r| ConfigError::new(format!("{key}.filter"), r))?;
        if sub.qos > 1 {
            return Err(ConfigError::new(
                format!("{key}.qos"),
                format!("QoS {} is not supported; use 0 or 1", sub.qos),
            ));
        }
        if sub.value_field.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.value-field"),
                "must not be empty",
            ));
        }
        let sparkplug = sub.format == PayloadFormat::SparkplugB;
        let multi = sub.format == PayloadFormat::JsonMulti || sparkplug;
        let device_default = if sparkplug {
            defaults::SPARKPLUG_DEVICE_TEMPLATE
        } else {
            defaults::DEVICE_TEMPLATE
        };
        let device_text = sub.device.as_deref().unwrap_or(device_default);
        if sub.commands && !sparkplug {
            return Err(ConfigError::new(
                format!("{key}.commands"),
                "only used with format = \"sparkplug-b\"",
            ));
        }
        if sub.non_numeric != NonNumeric::Skip && !sparkplug {
            return Err(ConfigError::new(
                format!("{key}.non-numeric"),
                "only used with format = \"sparkplug-b\"",
            ));
        }
        let node_device = (sparkplug && sub.device.is_none()).then(|| Template {
            parts: vec![Part::Segment(3)],
        });
        let sensor_default = if multi {
            defaults::MULTI_SENSOR_TEMPLATE
        } else {
            defaults::SENSOR_TEMPLATE
        };
        let sensor_text = sub.sensor.as_deref().unwrap_or(sensor_default);
        let device = Template::parse(device_text)
            .map_err(|r| ConfigError::new(format!("{key}.device"), r))?;
        let sensor = Template::parse(sensor_text)
            .map_err(|r| ConfigError::new(format!("{key}.sensor"), r))?;
        for (template, name) in [(&device, "device"), (&sensor, "sensor")] {
            if template.max_segment().is_some_and(|i| i >= MAX_SEGMENTS) {
                return Err(ConfigError::new(
                    format!("{key}.{name}"),
                    format!("topic levels go up to {{{}}}", MAX_SEGMENTS - 1),
                ));
            }
        }
        if device.uses_field() {
            return Err(ConfigError::new(
                format!("{key}.device"),
                "`{field}` is only allowed in the sensor template",
            ));
        }
        if sensor.uses_field() != multi {
            let reason = if multi {
                "a json-multi or sparkplug-b sensor template must contain `{field}`"
            } else {
                "`{field}` is only allowed with format = \"json-multi\" or \"sparkplug-b\""
            };
            return Err(ConfigError::new(format!("{key}.sensor"), reason));
        }
        if !sub.ignore_fields.is_empty() && !multi {
            return Err(ConfigError::new(
                format!("{key}.ignore-fields"),
                "only used with format = \"json-multi\"",
            ));
        }
        let series_field = match (&sub.series_field, sub.format) {
            (Some(f), _) if f.is_empty() => None,
            (Some(f), _) => Some(f.clone()),
            (None, PayloadFormat::JsonBatch) => Some(defaults::BATCH_SERIES_FIELD.to_owned()),
            (None, _) => None,
        };
        let non_empty = |f: &Option<String>| f.clone().filter(|f| !f.is_empty());
        Ok(Self {
            filter: sub.filter.clone(),
            format: sub.format,
            device,
            node_device,
            commands: sub.commands,
            dead_letter_non_numeric: sub.non_numeric == NonNumeric::DeadLetter,
            sensor,
            value_field: sub.value_field.clone(),
            time_field: sub.time_field.clone(),
            time_unit: sub.time_unit,
            unit_field: sub.unit_field.clone(),
            unit: sub.unit.clone(),
            series_field,
            device_field: non_empty(&sub.device_field),
            sensor_field: non_empty(&sub.sensor_field),
            ignore_fields: sub.ignore_fields.clone(),
        })
    }

    /// Whether the topic alone names the series (no payload field does).
    fn topic_only(&self) -> bool {
        self.series_field.is_none()
            && self.device_field.is_none()
            && self.sensor_field.is_none()
            && !self.sensor.uses_field()
    }

    /// Whether `name` is a field the route reads for something other than a value.
    fn is_meta_field(&self, name: &str) -> bool {
        (!self.time_field.is_empty() && name == self.time_field)
            || (!self.unit_field.is_empty() && name == self.unit_field)
            || self.series_field.as_deref() == Some(name)
            || self.device_field.as_deref() == Some(name)
            || self.sensor_field.as_deref() == Some(name)
            || self.ignore_fields.iter().any(|f| f == name)
    }
}

/// Why one reading could not be made: the dead-letter reason and a detail.
type Rejection = (DeadLetterReason, String);

/// Decodes MQTT messages into [`IngestEvent`]s according to a list of
/// subscription rules (first matching filter wins).
///
/// Device, sensor and unit names are interned, and so are series keys: a
/// name or series the decoder has seen before is shared (`Arc`), not
/// copied, so decoding a reading of a known series allocates nothing for
/// its names and every reading of it carries the same key. Each source (each ingest
/// connection) owns its decoder; a clone starts with the same rules.
#[derive(Debug, Clone)]
pub struct Decoder {
    routes: Vec<Route>,
    max_payload_bytes: usize,
    limits: DecodeLimits,
    names: Names,
    /// What Sparkplug B edge nodes said in their BIRTHs.
    sparkplug: sparkplug::SparkplugState,
    /// Topics seen: their route, and the series they name.
    topics: hashbrown::HashMap<Box<str>, (usize, SeriesKey), foldhash::fast::RandomState>,
}

/// Names, and series, kept at most by one decoder (each ingest connection
/// has its own); past that the set starts again (a plant with more distinct
/// names only pays an allocation per name again). Bounds a connection's
/// names and series to about 2 MiB.
const NAMES_CAP: usize = 16_384;
/// Topics remembered at most by one decoder, likewise.
const TOPICS_CAP: usize = 16_384;

/// The interned names and series of a decoder.
#[derive(Debug, Clone)]
struct Names {
    set: hashbrown::HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// Series keys by the addresses of their two interned names: a series
    /// seen before is the same key (one allocation shared by every reading
    /// of it). Each key holds its names, so an address here cannot be
    /// reused by another name while its entry exists.
    series: hashbrown::HashMap<(usize, usize), SeriesKey, foldhash::fast::RandomState>,
    /// Each route's fixed `unit`, interned when first used (most payloads
    /// name no unit: no lookup per reading then).
    route_units: Vec<Option<Arc<str>>>,
    /// Where a name made from a template is rendered before its lookup.
    scratch: String,
    max_bytes: usize,
}

impl Names {
    fn new(max_bytes: usize) -> Self {
        Self {
            set: hashbrown::HashSet::default(),
            series: hashbrown::HashMap::default(),
            route_units: Vec::new(),
            scratch: String::new(),
            max_bytes,
        }
    }

    /// The interned name, checked when first seen: at most `max-name-bytes`
    /// and no control characters (a name ends up in logs, Kafka keys and
    /// the dashboard).
    fn get(&mut self, name: &str) -> Result<Arc<str>, Rejection> {
        if let Some(known) = self.set.get(name) {
            return Ok(Arc::clone(known));
        }
        if name.len() > self.max_bytes {
            let shown: String = name.chars().take(40).collect();
            return Err((
                DeadLetterReason::InvalidName,
                format!(
                    "name {shown:?}… of {} bytes exceeds max-name-bytes of {}",
                    name.len(),
                    self.max_bytes
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err((
                DeadLetterReason::InvalidName,
                format!("name {name:?} holds a control character"),
            ));
        }
        if self.set.len() >= NAMES_CAP {
            self.set.clear();
        }
        let new: Arc<str> = Arc::from(name);
        self.set.insert(Arc::clone(&new));
        Ok(new)
    }

    /// The fixed unit of route `index` (`unit`), interned once.
    fn route_unit(&mut self, index: usize, unit: &str) -> Result<Arc<str>, Rejection> {
        if let Some(Some(known)) = self.route_units.get(index) {
            return Ok(Arc::clone(known));
        }
        let interned = self.get(unit)?;
        if self.route_units.len() <= index {
            self.route_units.resize(index + 1, None);
        }
        self.route_units[index] = Some(Arc::clone(&interned));
        Ok(interned)
    }

    /// The series of two names from [`Names::get`] or [`Names::render`],
    /// interned like them (bounded alike).
    fn series(&mut self, device: Arc<str>, sensor: Arc<str>) -> SeriesKey {
        let addrs = (
            Arc::as_ptr(&device).cast::<u8>() as usize,
            Arc::as_ptr(&sensor).cast::<u8>() as usize,
        );
        if let Some(known) = self.series.get(&addrs) {
            return known.clone();
        }
        if self.series.len() >= NAMES_CAP {
            self.series.clear();
        }
        let key = SeriesKey::new(device, sensor);
        self.series.insert(addrs, key.clone());
        key
    }

    /// Renders `template` and interns the result.
    fn render(
        &mut self,
        template: &Template,
        segments: &[&str],
        field: Option<&str>,
    ) -> Result<Arc<str>, Rejection> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let name = match template.render_into(&mut scratch, segments, field) {
            Ok(()) => self.get(&scratch),
            Err(detail) => Err((DeadLetterReason::Unmapped, detail)),
        };
        self.scratch = scratch;
        name
    }
}

/// Topic levels a template can refer to (`{0}` to `{63}`).
const MAX_SEGMENTS: usize = 64;

impl Decoder {
    /// Compiles the rules; `key_prefix` names them in errors (e.g. `mqtt.subscriptions`).
    pub fn new(
        subscriptions: &[SubscriptionConfig],
        max_payload_bytes: usize,
        key_prefix: &str,
    ) -> Result<Self, ConfigError> {
        let routes = subscriptions
            .iter()
            .enumerate()
            .map(|(i, s)| Route::compile(s, &format!("{key_prefix}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = DecodeLimits::default();
        Ok(Self {
            routes,
            max_payload_bytes,
            limits,
            names: Names::new(limits.max_name_bytes),
            sparkplug: sparkplug::SparkplugState::default(),
            topics: hashbrown::HashMap::default(),
        })
    }

    /// Messages the decoder wants published (Sparkplug B Rebirth requests),
    /// oldest first. A source that can publish sends them; one that cannot
    /// drops them (they were counted when made).
    pub fn take_commands(&mut self) -> Vec<sparkplug::Command> {
        self.sparkplug.take_commands()
    }

    /// The same rules under `limits` (see [`DecodeLimits`]).
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self.names = Names::new(limits.max_name_bytes);
        self.topics.clear();
        self
    }

    /// The configured payload cap in bytes.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Decodes one message, appending its readings and dead letters to `out`.
    /// `now_ms` stamps readings without an event time and every dead letter.
    /// `delivery` is how the message came (its QoS and DUP flag); every
    /// reading made from it carries it.
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: UnixMs,
        delivery: Delivery,
        out: &mut Vec<IngestEvent>,
    ) {
        let limits = self.limits;
        let dead = |reason, detail: String| {
            IngestEvent::DeadLetter(dead_letter(topic, payload, &limits, reason, detail, now_ms))
        };
        if payload.len() > self.max_payload_bytes {
            out.push(dead(
                DeadLetterReason::Oversize,
                format!(
                    "payload of {} bytes exceeds max-payload of {} bytes",
                    payload.len(),
                    self.max_payload_bytes
                ),
            ));
            return;
        }
        if topic.len() > limits.max_topic_bytes {
            out.push(dead(
                DeadLetterReason::InvalidName,
                format!(
                    "topic of {} bytes exceeds max-topic-bytes of {}",
                    topic.len(),
                    limits.max_topic_bytes
                ),
            ));
            return;
        }
        let Self {
            routes,
            names,
            topics,
            sparkplug,
            ..
        } = self;
        // A topic seen before: its route, and its series when the topic alone
        // names it.
        let known = topics.get(topic).cloned();
        let (route_index, known_series) = match known {
            Some((i, series)) => (i, Some(series)),
            None => match routes.iter().position(|r| topic_matches(&r.filter, topic)) {
                Some(i) => (i, None),
                None => {
                    out.push(dead(
                        DeadLetterReason::Unmapped,
                        "no subscription filter matches the topic".into(),
                    ));
                    return;
                }
            },
        };
        let route = &routes[route_index];
        let mut levels = [""; MAX_SEGMENTS];
        let mut n = 0;
        if known_series.is_none() {
            for level in topic.split('/').take(MAX_SEGMENTS) {
                levels[n] = level;
                n += 1;
            }
        }
        if route.format == PayloadFormat::SparkplugB {
            let msg = sparkplug::Message {
                route,
                segments: &levels[..n],
                payload,
                now_ms,
                delivery,
                max_metrics: limits.max_fields,
            };
            if let Err((reason, detail)) = sparkplug.decode(&msg, names, out) {
                out.push(dead(reason, detail));
            }
            return;
        }
        let mut ctx = Ctx {
            route,
            route_index,
            segments: &levels[..n],
            now_ms,
            topic_series: known_series,
        };
        if ctx.topic_series.is_none() && route.topic_only() {
            if let Ok(series) = ctx.series(names, None, None) {
                if topics.len() >= TOPICS_CAP {
                    topics.clear();
                }
                topics.insert(topic.into(), (route_index, series.clone()));
                ctx.topic_series = Some(series);
            }
        }
        let ctx = ctx;
        let reading = |series, time_ms, value, unit: Arc<str>| {
            IngestEvent::Reading(
                Reading {
                    series,
                    time_ms,
                    value,
                    unit,
                    source: Source::Mqtt,
                    quality: Quality::Good,
                },
                delivery,
            )
        };

        if route.format == PayloadFormat::Number {
            let made = parse_number(payload).and_then(|v| {
                let series = ctx.series(names, None, None)?;
                Ok((series, v, names.route_unit(route_index, &route.unit)?))
            });
            match made {
                Ok((series, value, unit)) => out.push(reading(series, now_ms, value, unit)),
                Err((reason, detail)) => out.push(dead(reason, detail)),
            }
            return;
        }

        let top = match serde_json::from_slice::<Top<'_>>(payload) {
            Ok(top) => top,
            Err(e) => {
                out.push(dead(
                    DeadLetterReason::Malformed,
                    format!("invalid JSON: {e}"),
                ));
                return;
            }
        };
        match (route.format, top) {
            (PayloadFormat::Json, Top::Object(obj)) => match ctx.single(names, &obj) {
                Ok((series, time, value, unit)) => out.push(reading(series, time, value, unit)),
                Err((reason, detail)) => out.push(dead(reason, detail)),
            },
            (PayloadFormat::JsonMulti, Top::Object(obj)) => {
                let fields = obj.0.iter().filter(|(name, _)| !route.is_meta_field(name));
                let total = fields.clone().count();
                if total > limits.max_fields {
                    out.push(dead(
                        DeadLetterReason::Oversize,
                        format!(
                            "{total} value fields exceed max-fields of {}",
                            limits.max_fields
                        ),
                    ));
                    return;
                }
                if total == 0 {
                    out.push(dead(
                        DeadLetterReason::WrongType,
                        "object has no value fields".into(),
                    ));
                    return;
                }
                let time = match ctx.event_time(&obj) {
                    Ok(t) => t,
                    Err((reason, detail)) => {
                        out.push(dead(reason, detail));
                        return;
                    }
                };
                let mut bad = BadParts::default();
                for (name, value) in fields {
                    let made = value
                        .as_number()
                        .ok_or_else(|| {
                            (
                                DeadLetterReason::WrongType,
                                format!("field `{name}` is {}, not a number", value.kind()),
                            )
                        })
                        .and_then(|v| {
                            let series = ctx.series(names, Some(&obj), Some(name))?;
                            Ok((series, v, names.route_unit(route_index, &route.unit)?))
                        });
                    match made {
                        Ok((series, v, unit)) => out.push(reading(series, time, v, unit)),
                        Err(rejection) => bad.add(rejection),
                    }
                }
                if let Some((reason, detail)) = bad.summary(total, "fields") {
                    out.push(dead(reason, detail));
                }
            }
            (PayloadFormat::JsonBatch, Top::Array(elements)) => {
                if elements.len() > limits.max_fields {
                    out.push(dead(
                        DeadLetterReason::Oversize,
                        format!(
                            "{} elements exceed max-fields of {}",
                            elements.len(),
                            limits.max_fields
                        ),
                    ));
                    return;
                }
                let mut bad = BadParts::default();
                for (i, element) in elements.iter().enumerate() {
                    let made = match element {
                        Element::Object(obj) => ctx.single(names, obj),
                        Element::Other(kind) => Err((
                            DeadLetterReason::WrongType,
                            format!("is {kind}, not an object"),
                        )),
                    };
                    match made {
                        Ok((series, time, value, unit)) => {
                            out.push(reading(series, time, value, unit))
                        }
                        Err((reason, detail)) => {
                            bad.add((reason, format!("element {i}: {detail}")))
                        }
                    }
                }
                if let Some((reason, detail)) = bad.summary(elements.len(), "elements") {
                    out.push(dead(reason, detail));
                }
            }
            (format, top) => {
                let expected = if format == PayloadFormat::JsonBatch {
                    "an array"
                } else {
                    "an object"
                };
                out.push(dead(
                    DeadLetterReason::WrongType,
                    format!("payload is {}, expected {expected}", top.kind()),
                ));
            }
        }
    }
}

/// The one dead letter of a message: the payload cut to `dead-letter-bytes`
/// (the detail then says how large it was), the topic cut to
/// `max-topic-bytes`.
fn dead_letter(
    topic: &str,
    payload: &[u8],
    limits: &DecodeLimits,
    reason: DeadLetterReason,
    mut detail: String,
    now_ms: UnixMs,
) -> DeadLetter {
    let kept = payload.len().min(limits.dead_letter_bytes);
    if kept < payload.len() {
        use std::fmt::Write as _;
        let _ = write!(
            detail,
            " (payload of {} bytes, first {kept} kept)",
            payload.len()
        );
    }
    let mut origin_len = topic.len().min(limits.max_topic_bytes);
    while !topic.is_char_boundary(origin_len) {
        origin_len -= 1;
    }
    DeadLetter::new(
        Source::Mqtt,
        &topic[..origin_len],
        payload[..kept].to_vec(),
        reason,
        detail,
        now_ms,
    )
}

/// The bad fields or elements of one message, summed up in its one dead letter.
#[derive(Default)]
struct BadParts {
    first: Option<Rejection>,
    count: usize,
}

impl BadParts {
    fn add(&mut self, rejection: Rejection) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(rejection);
        }
    }

    /// The reason of the first bad part; the detail names it and, when there
    /// were more, how many of `total` `what` were not read.
    fn summary(self, total: usize, what: &str) -> Option<Rejection> {
        let (reason, detail) = self.first?;
        Some(if self.count == 1 {
            (reason, detail)
        } else {
            (
                reason,
                format!(
                    "{} of {total} {what} not read; the first: {detail}",
                    self.count
                ),
            )
        })
    }
}

fn parse_number(payload: &[u8]) -> Result<f64, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| {
            (
                DeadLetterReason::Malformed,
                "payload is not UTF-8 text".to_owned(),
            )
        })?
        .trim();
    text.parse::<f64>().map_err(|_| {
        let shown: String = text.chars().take(40).collect();
        (
            DeadLetterReason::Malformed,
            format!("{shown:?} is not a number"),
        )
    })
}

/// What a decode step needs to know about the message.
struct Ctx<'r, 's> {
    route: &'r Route,
    /// Which route (of the decoder's) `route` is.
    route_index: usize,
    segments: &'s [&'s str],
    now_ms: UnixMs,
    /// The series, when the route names it from the topic alone and the
    /// topic was seen before (then `segments` is not filled).
    topic_series: Option<SeriesKey>,
}

impl Ctx<'_, '_> {
    /// A `json` object (or a `json-batch` element): series, time, value, unit.
    fn single(
        &self,
        names: &mut Names,
        obj: &FlatObject<'_>,
    ) -> Result<(SeriesKey, UnixMs, f64, Arc<str>), Rejection> {
        let field = &self.route.value_field;
        let value = match obj.get(field) {
            None => {
                return Err((
                    DeadLetterReason::WrongType,
                    format!("missing field `{field}`"),
                ))
            }
            Some(v) => v.as_number().ok_or_else(|| {
                (
                    DeadLetterReason::WrongType,
                    format!("field `{field}` is {}, not a number", v.kind()),
                )
            })?,
        };
        let time = self.event_time(obj)?;
        let unit = match self.unit(obj)? {
            Some(named) => names.get(named)?,
            None => names.route_unit(self.route_index, &self.route.unit)?,
        };
        let series = self.series(names, Some(obj), None)?;
        Ok((series, time, value, unit))
    }

    fn event_time(&self, obj: &FlatObject<'_>) -> Result<UnixMs, Rejection> {
        let field = &self.route.time_field;
        if field.is_empty() {
            return Ok(self.now_ms);
        }
        match obj.get(field) {
            None | Some(Scalar::Null) => Ok(self.now_ms),
            Some(Scalar::Number(t)) => {
                let ms = match self.route.time_unit {
                    TimeUnit::Ms => *t,
                    TimeUnit::S => t * 1000.0,
                };
                // ±8.64e15 ms is the ECMAScript date range (about ±273,000 years).
                if ms.is_finite() && ms.abs() <= 8.64e15 {
                    Ok(ms.round() as UnixMs)
                } else {
                    Err((
                        DeadLetterReason::WrongType,
                        format!("field `{field}` = {t} is not a valid time"),
                    ))
                }
            }
            Some(other) => Err((
                DeadLetterReason::WrongType,
                format!("field `{field}` is {}, not a number", other.kind()),
            )),
        }
    }

    /// The unit the payload names, or `None` for the route's fixed `unit`.
    fn unit<'o>(&self, obj: &'o FlatObject<'_>) -> Result<Option<&'o str>, Rejection> {
        let field = &self.route.unit_field;
        if field.is_empty() {
            return Ok(None);
        }
        match obj.get(field) {
            None | Some(Scalar::Null) => Ok(None),
            Some(Scalar::Str(s)) => Ok(Some(s)),
            Some(other) => Err((
                DeadLetterReason::WrongType,
                format!("field `{field}` is {}, not a string", other.kind()),
            )),
        }
    }

    /// Resolves the series: `series-field`, then `device-field` / `sensor-field`,
    /// then the topic templates.
    fn series<'o>(
        &self,
        names: &mut Names,
        obj: Option<&'o FlatObject<'_>>,
        field: Option<&str>,
    ) -> Result<SeriesKey, Rejection> {
        if let (Some(series), None) = (&self.topic_series, field) {
            return Ok(series.clone());
        }
        let route = self.route;
        let lookup = |name: &Option<String>| -> Result<Option<&'o str>, Rejection> {
            let (Some(name), Some(obj)) = (name, obj) else {
                return Ok(None);
            };
            match obj.get(name) {
                None | Some(Scalar::Null) => Ok(None),
                Some(Scalar::Str(s)) if !s.is_empty() => Ok(Some(&**s)),
                Some(other) => Err((
                    DeadLetterReason::WrongType,
                    format!("field `{name}` is {}, not a non-empty string", other.kind()),
                )),
            }
        };
        if let Some(series) = lookup(&route.series_field)? {
            return match series.split_once('/') {
                Some((d, s)) if !d.is_empty() && !s.is_empty() => {
                    let (device, sensor) = (names.get(d)?, names.get(s)?);
                    Ok(names.series(device, sensor))
                }
                _ => Err((
                    DeadLetterReason::WrongType,
                    format!("series {series:?} is not of the form \"device/sensor\""),
                )),
            };
        }
        let device = match lookup(&route.device_field)? {
            Some(d) => names.get(d)?,
            None => names.render(&route.device, self.segments, field)?,
        };
        let sensor = match lookup(&route.sensor_field)? {
            Some(s) if field.is_none() => names.get(s)?,
            _ => names.render(&route.sensor, self.segments, field)?,
        };
        Ok(names.series(device, sensor))
    }
}

// ---------------------------------------------------------------------------
// One-pass JSON scanning: a top-level object keeps its scalar fields, an
// array keeps its object elements; nested values are skipped, not built.

/// A JSON value as far as a decoder cares.
#[derive(Debug, Clone, PartialEq)]
enum Scalar<'a> {
    Number(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    Null,
    Array,
    Object,
}

impl Scalar<'_> {
    fn as_number(&self) -> Option<f64> {
        match self {
            Scalar::Number(v) => Some(*v),
            Scalar::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Scalar::Number(_) => "a number",
            Scalar::Bool(_) => "a boolean",
            Scalar::Str(_) => "a string",
            Scalar::Null => "null",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// A field name, borrowed from the payload when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The fields of one JSON object in payload order (the first of duplicate
/// names wins on lookup).
#[derive(Debug, Default)]
struct FlatObject<'a>(Vec<(Cow<'a, str>, Scalar<'a>)>);

impl<'a> FlatObject<'a> {
    fn get(&self, name: &str) -> Option<&Scalar<'a>> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn read<'de: 'a, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let v = map.next_value::<Scalar<'de>>()?;
            fields.push((k, v));
        }
        Ok(FlatObject(fields))
    }
}

/// One element of a `json-batch` array.
#[derive(Debug)]
enum Element<'a> {
    Object(FlatObject<'a>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Element<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                FlatObject::read(map).map(Element::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                ScalarVisitor
                    .visit_seq(seq)
                    .map(|s| Element::Other(s.kind()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Element::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Element::Other("a string"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Element::Other("null"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The top level of a JSON payload.
#[derive(Debug)]
enum Top<'a> {
    Object(FlatObject<'a>),
    Array(Vec<Element<'a>>),
    Scalar(Scalar<'a>),
}

impl Top<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Top::Object(_) => "an object",
            Top::Array(_) => "an array",
            Top::Scalar(s) => s.kind(),
        }
    }
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                FlatObject::read(map).map(Top::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut elements = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(4096));
                while let Some(e) = seq.next_element::<Element<'de>>()? {
                    elements.push(e);
                }
                Ok(Top::Array(elements))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Number(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Number(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Number(v)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Str(Cow::Borrowed(""))))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Top::Scalar(Scalar::Null))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: UnixMs = 1_700_000_999_000;

    fn decoder(subs: Vec<SubscriptionConfig>) -> Decoder {
        Decoder::new(&subs, 256 * 1024, "mqtt.subscriptions").unwrap()
    }

    fn run(d: &Decoder, topic: &str, payload: &[u8]) -> Vec<IngestEvent> {
        let mut d = d.clone();
        let mut out = Vec::new();
        d.decode(topic, payload, NOW, Delivery::Once, &mut out);
        out
    }

    fn reading(e: &IngestEvent) -> &Reading {
        match e {
            IngestEvent::Reading(r, _) => r,
            other => panic!("expected a reading, got {other:?}"),
        }
    }

    fn dead(e: &IngestEvent) -> &DeadLetter {
        match e {
            IngestEvent::DeadLetter(dl) => dl,
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    fn plant_json() -> Decoder {
        decoder(vec![SubscriptionConfig::new(
            "plant/+/+",
            PayloadFormat::Json,
        )])
    }

    #[test]
    fn json_reading_with_time_unit_and_topic_series() {
        let d = plant_json();
        let out = run(
            &d,
            "plant/boiler-3/temp",
            br#"{"ts": 1700000000123, "value": 181.25, "unit": "degC"}"#,
        );
        assert_eq!(out.len(), 1);
        let r = reading(&out[0]);
        assert_eq!(r.series, SeriesKey::new("boiler-3", "temp"));
        assert_eq!(r.time_ms, 1_700_000_000_123);
        assert_eq!(r.value, 181.25);
        assert_eq!(&*r.unit, "degC");
        assert_eq!(r.source, Source::Mqtt);
    }

    #[test]
    fn json_without_time_is_stamped_and_fixed_unit_applies() {
        let mut sub = SubscriptionConfig::new("plant/+/+", PayloadFormat::Json);
        sub.unit = "t/h".into();
        let d = decoder(vec![sub]);
        let r = run(&d, "plant/boiler-3/steam-flow", br#"{"value": 12}"#);
        let r = reading(&r[0]);
        assert_eq!(r.time_ms, NOW);
        assert_eq!(&*r.unit, "t/h");
        assert_eq!(r.value, 12.0);
    }

    #[test]
    fn configurable_fields_seconds_and_escaped_names() {
        let mut sub = SubscriptionConfig::new("site/#", PayloadFormat::Json);
        sub.value_field = "v".into();
        sub.time_field = "t".into();
        sub.time_unit = TimeUnit::S;
        sub.unit_field = "u".into();
        sub.device = Some("{1}-{2}".into());
        sub.sensor = Some("x.{3}".into());
        let d = decoder(vec![sub]);
        let out = run(
            &d,
            "site/a/b/c",
            br#"{"t": 1700000000.5, "\u0076": -3.5e-2, "u": "b\u0061r", "nested": {"v": "x"}}"#,
        );
        let r = reading(&out[0]);
        assert_eq!(r.series, SeriesKey::new("a-b", "x.c"));
        assert_eq!(r.time_ms, 1_700_000_000_500);
        assert_eq!(r.value, -0.035);
        assert_eq!(&*r.unit, "bar");
    }

    #[test]
    fn json_booleans_are_zero_and_one() {
        let d = plant_json();
        assert_eq!(
            reading(&run(&d, "plant/press-1/running", br#"{"value": true}"#)[0]).value,
            1.0
        );
        assert_eq!(
            reading(&run(&d, "plant/press-1/running", br#"{"value": false}"#)[0]).value,
            0.0
        );
    }

    #[test]
    fn json_wrong_types_and_missing_fields() {
        let d = plant_json();
        let cases: [(&[u8], &str); 7] = [
            (br#"{"value": "12.5"}"#, "field `value` is a string"),
            (br#"{"ts": 1}"#, "missing field `value`"),
            (br#"{"value": null}"#, "field `value` is null"),
            (
                br#"{"value": 1, "ts": "yesterday"}"#,
                "field `ts` is a string",
            ),
            (br#"{"value": 1, "unit": 5}"#, "field `unit` is a number"),
            (br#"{"value": 1, "ts": 1e300}"#, "not a valid time"),
            (br#"[1, 2]"#, "payload is an array, expected an object"),
        ];
        for (payload, detail) in cases {
            let out = run(&d, "plant/boiler-3/temp", payload);
            assert_eq!(out.len(), 1);
            let dl = dead(&out[0]);
            assert_eq!(dl.reason, DeadLetterReason::WrongType, "{dl:?}");
            assert!(
                dl.detail.contains(detail),
                "{} does not contain {detail}",
                dl.detail
            );
            assert_eq!(dl.input, payload);
            assert_eq!(dl.origin, "plant/boiler-3/temp");
            assert_eq!(dl.time_ms, NOW);
        }
    }

    #[test]
    fn malformed_json_and_text() {
        let d = plant_json();
        for payload in [
            &b"{\"value\": 1"[..],
            b"",
            b"\xff\xfe",
            b"{value: 1}",
            b"{\"value\": 1} trailing",
        ] {
            let out = run(&d, "plant/boiler-3/temp", payload);
            assert_eq!(
                dead(&out[0]).reason,
                DeadLetterReason::Malformed,
                "{payload:?}"
            );
        }
    }

    #[test]
    fn unmapped_topics_and_templates() {
        let d = plant_json();
        let out = run(&d, "factory/x/y", br#"{"value": 1}"#);
        assert_eq!(dead(&out[0]).reason, DeadLetterReason::Unmapped);
        let d = decoder(vec![SubscriptionConfig::new(
            "plant/#",
            PayloadFormat::Json,
        )]);
        let out = run(&d, "plant/only-device", br#"{"value": 1}"#);
        let dl = dead(&out[0]);
        assert_eq!(dl.reason, DeadLetterReason::Unmapped);
        assert!(dl.detail.contains("{2}"), "{}", dl.detail);
    }

    fn limited(format: PayloadFormat, limits: DecodeLimits) -> Decoder {
        Decoder::new(
            &[SubscriptionConfig::new("plant/+/+", format)],
            256 * 1024,
            "k",
        )
        .unwrap()
        .with_limits(limits)
    }

    #[test]
    fn a_poison_json_multi_message_makes_one_capped_dead_letter() {
        let d = limited(PayloadFormat::JsonMulti, DecodeLimits::default());
        // 20,000 string fields in 256 KiB: over max-fields, one dead letter.
        let mut payload = String::from("{");
        for i in 0..20_000 {
            payload.push_str(&format!("\"{i}\":\"\","));
        }
        payload.push_str("\"v\":1}");
        assert!(payload.len() < 256 * 1024);
        let out = run(&d, "plant/a/b", payload.as_bytes());
        assert_eq!(out.len(), 1, "one dead letter for the whole message");
        let dl = dead(&out[0]);
        assert_eq!(dl.reason, DeadLetterReason::Oversize);
        assert_eq!(dl.input.len(), DEAD_LETTER_INPUT_CAP);
        assert!(
            dl.detail
                .contains("20001 value fields exceed max-fields of 1000"),
            "{}",
            dl.detail
        );
        assert!(
            dl.detail
                .contains(&format!("payload of {} bytes", payload.len())),
            "{}",
            dl.detail
        );

        // Under the field cap, many bad fields: the numbers still count, one
        // dead letter says how many were not.
        let mut payload = String::from("{\"ok\":1.5");
        for i in 0..900 {
            payload.push_str(&format!(",\"s{i}\":\"x\""));
        }
        payload.push('}');
        let out = run(&d, "plant/a/b", payload.as_bytes());
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(reading(&out[0]).value, 1.5);
        let dl = dead(&out[1]);
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        assert!(
            dl.detail
                .starts_with("900 of 901 fields not read; the first: field `s0`"),
            "{}",
            dl.detail
        );
        assert_eq!(dl.input.len(), DEAD_LETTER_INPUT_CAP);
    }

    #[test]
    fn a_json_batch_over_max_fields_is_one_oversize_dead_letter() {
        let limits = DecodeLimits {
            max_fields: 2,
            ..DecodeLimits::default()
        };
        let d = limited(PayloadFormat::JsonBatch, limits);
        let two = br#"[{"value": 1}, {"value": 2}]"#;
        assert_eq!(run(&d, "plant/a/b", two).len(), 2);
        let three = br#"[{"value": 1}, {"value": 2}, {"value": 3}]"#;
        let out = run(&d, "plant/a/b", three);
        assert_eq!(out.len(), 1);
        assert_eq!(dead(&out[0]).reason, DeadLetterReason::Oversize);
        assert!(dead(&out[0])
            .detail
            .contains("3 elements exceed max-fields of 2"));
    }

    #[test]
    fn long_or_control_character_names_and_long_topics_are_invalid_names() {
        let limits = DecodeLimits {
            max_name_bytes: 8,
            max_topic_bytes: 40,
            dead_letter_bytes: 4,
            ..DecodeLimits::default()
        };
        let mut sub = SubscriptionConfig::new("plant/+/+", PayloadFormat::Json);
        sub.unit_field = "unit".into();
        let d = Decoder::new(&[sub], 1024, "k").unwrap().with_limits(limits);
        assert!(matches!(
            run(&d, "plant/12345678/s", br#"{"value": 1}"#)[0],
            IngestEvent::Reading(..)
        ));
        let out = run(&d, "plant/123456789/s", br#"{"value": 1}"#);
        let dl = dead(&out[0]);
        assert_eq!(dl.reason, DeadLetterReason::InvalidName);
        assert!(
            dl.detail.contains("exceeds max-name-bytes of 8"),
            "{}",
            dl.detail
        );
        assert_eq!(dl.input, b"{\"va");
        let out = run(&d, "plant/a/s", br#"{"value": 1, "unit": "deg\u0000C"}"#);
        assert_eq!(dead(&out[0]).reason, DeadLetterReason::InvalidName);
        assert!(dead(&out[0]).detail.contains("control character"));
        let topic = format!("plant/{}/s", "x".repeat(40));
        let out = run(&d, &topic, br#"{"value": 1}"#);
        let dl = dead(&out[0]);
        assert_eq!(dl.reason, DeadLetterReason::InvalidName);
        assert_eq!(dl.origin.len(), 40, "the origin is cut to max-topic-bytes");
        assert!(
            dl.detail.contains("exceeds max-topic-bytes of 40"),
            "{}",
            dl.detail
        );
    }

    #[test]
    fn decode_limits_are_checked() {
        let bad = DecodeLimits {
            max_fields: 0,
            ..DecodeLimits::default()
        };
        assert_eq!(
            bad.validate("broker.limits").unwrap_err().key,
            "broker.limits.max-fields"
        );
        DecodeLimits::default().validate("broker.limits").unwrap();
    }

    #[test]
    fn oversize_keeps_the_first_kib() {
        let d = Decoder::new(
            &[SubscriptionConfig::new("plant/+/+", PayloadFormat::Json)],
            2000,
            "k",
        )
        .unwrap();
        let payload = vec![b'x'; 2001];
        let out = run(&d, "plant/a/b", &payload);
        let dl = dead(&out[0]);
        assert_eq!(dl.reason, DeadLetterReason::Oversize);
        assert_eq!(dl.input.len(), DEAD_LETTER_INPUT_CAP);
        assert!(dl.detail.contains("2001"), "{}", dl.detail);
        // Exactly at the cap is fine (and here malformed).
        let out = run(&d, "plant/a/b", &payload[..2000]);
        assert_eq!(dead(&out[0]).reason, DeadLetterReason::Malformed);
    }

    #[test]
    fn number_payloads_including_nan_and_inf() {
        let mut sub = SubscriptionConfig::new("plant/+/+", PayloadFormat::Number);
        sub.unit = "bar".into();
        let d = decoder(vec![sub]);
        let r = run(&d, "plant/pump-2/suction", b" -0.30\n");
        let r = reading(&r[0]);
        assert_eq!((r.value, r.time_ms, &*r.unit), (-0.3, NOW, "bar"));
        assert!(reading(&run(&d, "plant/a/b", b"NaN")[0]).value.is_nan());
        assert_eq!(
            reading(&run(&d, "plant/a/b", b"inf")[0]).value,
            f64::INFINITY
        );
        assert_eq!(
            reading(&run(&d, "plant/a/b", b"-Infinity")[0]).value,
            f64::NEG_INFINITY
        );
        for bad in [&b"twelve"[..], b"", b"1,5", b"\xff"] {
            assert_eq!(
                dead(&run(&d, "plant/a/b", bad)[0]).reason,
                DeadLetterReason::Malformed
            );
        }
    }

    #[test]
    fn json_multi_one_reading_per_numeric_field() {
        let mut sub = SubscriptionConfig::new("plant/+/state", PayloadFormat::JsonMulti);
        sub.ignore_fields = vec!["fw".into()];
        let d = decoder(vec![sub]);
        let out = run(
            &d,
            "plant/env-1/state",
            br#"{"ts": 1700000000000, "humidity": 45.5, "ambient": 22.1, "fw": "1.2.3", "status": "ok"}"#,
        );
        assert_eq!(out.len(), 3, "{out:?}");
        let h = reading(&out[0]);
        assert_eq!(h.series, SeriesKey::new("env-1", "humidity"));
        assert_eq!((h.time_ms, h.value), (1_700_000_000_000, 45.5));
        assert_eq!(reading(&out[1]).series, SeriesKey::new("env-1", "ambient"));
        let dl = dead(&out[2]);
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        assert!(dl.detail.contains("`status`"), "{}", dl.detail);
    }

    #[test]
    fn json_multi_edge_cases() {
        let d = decoder(vec![SubscriptionConfig::new(
            "plant/+/state",
            PayloadFormat::JsonMulti,
        )]);
        let dl = dead(&run(&d, "plant/env-1/state", br#"{"ts": 1}"#)[0]).clone();
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        let dl = dead(&run(&d, "plant/env-1/state", br#"{"ts": "x", "a": 1}"#)[0]).clone();
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        let dl = dead(&run(&d, "plant/env-1/state", b"17")[0]).clone();
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        let mut sub = SubscriptionConfig::new("p/+", PayloadFormat::JsonMulti);
        sub.sensor = Some("env.{field}".into());
        let d = decoder(vec![sub]);
        assert_eq!(
            reading(&run(&d, "p/dev", br#"{"rh": 1}"#)[0]).series,
            SeriesKey::new("dev", "env.rh")
        );
    }

    #[test]
    fn json_batch_with_series_field_and_bad_elements() {
        let d = decoder(vec![SubscriptionConfig::new(
            "load/#",
            PayloadFormat::JsonBatch,
        )]);
        let payload = br#"[
            {"series": "dev-1/s-1", "ts": 1700000000000, "value": 1.5},
            {"series": "dev-2/s-9", "ts": 1700000000001, "value": 2},
            {"series": "no-slash", "ts": 1, "value": 3},
            {"series": "dev-1/s-1", "value": "x"},
            42,
            {"value": 7}
        ]"#;
        let out = run(&d, "load/gen", payload);
        // The good elements are readings; the four bad ones (a series without
        // a slash, a string value, a number, no series field and no second
        // topic segment) make one dead letter naming the first.
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(reading(&out[0]).series, SeriesKey::new("dev-1", "s-1"));
        assert_eq!(reading(&out[1]).time_ms, 1_700_000_000_001);
        let dl = dead(&out[2]);
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        assert!(
            dl.detail
                .starts_with("4 of 6 elements not read; the first: element 2: series \"no-slash\""),
            "{}",
            dl.detail
        );
        assert_eq!(dl.input, payload.to_vec());
        // One bad element: its detail alone.
        let out = run(&d, "load/gen", br#"[{"series": "a/b", "value": 1}, 42]"#);
        assert_eq!(
            dead(&out[1]).detail,
            "element 1: is a number, not an object"
        );
        let dl = dead(&run(&d, "load/gen", br#"{"value": 1}"#)[0]).clone();
        assert_eq!(dl.reason, DeadLetterReason::WrongType);
        assert!(run(&d, "load/gen", b"[]").is_empty());
    }

    #[test]
    fn device_and_sensor_fields_override_templates() {
        let mut sub = SubscriptionConfig::new("gw/+", PayloadFormat::JsonBatch);
        sub.device_field = Some("dev".into());
        sub.sensor_field = Some("sen".into());
        let d = decoder(vec![sub]);
        let out = run(
            &d,
            "gw/x",
            br#"[{"dev": "press-1", "sen": "temperature", "value": 80}]"#,
        );
        assert_eq!(
            reading(&out[0]).series,
            SeriesKey::new("press-1", "temperature")
        );
    }

    #[test]
    fn first_matching_subscription_wins() {
        let mut number = SubscriptionConfig::new("plant/press-1/+", PayloadFormat::Number);
        number.unit = "degC".into();
        let d = decoder(vec![
            number,
            SubscriptionConfig::new("plant/#", PayloadFormat::Json),
        ]);
        assert_eq!(
            &*reading(&run(&d, "plant/press-1/temperature", b"80")[0]).unit,
            "degC"
        );
        assert_eq!(
            reading(&run(&d, "plant/boiler-3/temp", br#"{"value": 1}"#)[0]).value,
            1.0
        );
    }

    #[test]
    fn topic_filter_matching() {
        assert!(topic_matches("plant/+/+", "plant/a/b"));
        assert!(!topic_matches("plant/+/+", "plant/a"));
        assert!(!topic_matches("plant/+/+", "plant/a/b/c"));
        assert!(topic_matches("plant/#", "plant"));
        assert!(topic_matches("plant/#", "plant/a/b/c"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$SYS/broker"));
        assert!(!topic_matches("+/broker", "$SYS/broker"));
        assert!(topic_matches("$SYS/#", "$SYS/broker"));
        assert!(topic_matches("$share/g/plant/+", "plant/a"));
        assert!(topic_matches("a//b", "a//b"));
        assert!(!topic_matches("a/b", "a/c"));
    }

    #[test]
    fn covered_and_duplicate_filters_are_subscribed_once() {
        assert!(filter_covers("plant/+/+", "plant/+/state"));
        assert!(filter_covers("plant/#", "plant/+/+"));
        assert!(filter_covers("#", "a"));
        assert!(!filter_covers("plant/+/state", "plant/+/+"));
        assert!(!filter_covers("plant/+", "plant/#"));
        assert!(!filter_covers("a/+/c", "a/b"));
        // A first-level wildcard cannot deliver `$SYS/…`: both are subscribed.
        assert!(!filter_covers("#", "$SYS/broker/load"));
        assert!(!filter_covers("+/broker/load", "$SYS/broker/load"));
        assert!(filter_covers("$SYS/#", "$SYS/broker/load"));
        let sys = vec![
            SubscriptionConfig::new("+/broker/+", PayloadFormat::Number),
            SubscriptionConfig::new("$SYS/broker/load", PayloadFormat::Number),
        ];
        assert_eq!(subscription_filters(&sys).len(), 2);
        let mut multi = SubscriptionConfig::new("plant/+/state", PayloadFormat::JsonMulti);
        multi.qos = 1;
        let mut json = SubscriptionConfig::new("plant/+/+", PayloadFormat::Json);
        json.qos = 0;
        let subs = vec![
            multi,
            json,
            SubscriptionConfig::new("load/#", PayloadFormat::JsonBatch),
            SubscriptionConfig::new("load/#", PayloadFormat::Json),
        ];
        assert_eq!(
            subscription_filters(&subs),
            vec![("plant/+/+".to_owned(), 1), ("load/#".to_owned(), 1)]
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases: Vec<(SubscriptionConfig, &str)> = vec![
            (
                SubscriptionConfig::new("", PayloadFormat::Json),
                "s[0].filter",
            ),
            (
                SubscriptionConfig::new("a/b#", PayloadFormat::Json),
                "s[0].filter",
            ),
            (
                SubscriptionConfig::new("a/+x", PayloadFormat::Json),
                "s[0].filter",
            ),
            (
                SubscriptionConfig::new("$share/g", PayloadFormat::Json),
                "s[0].filter",
            ),
            (
                SubscriptionConfig {
                    device: Some("{1".into()),
                    ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
                },
                "s[0].device",
            ),
            (
                SubscriptionConfig {
                    sensor: Some("{field}".into()),
                    ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
                },
                "s[0].sensor",
            ),
            (
                SubscriptionConfig {
                    sensor: Some("{2}".into()),
                    ..SubscriptionConfig::new("a/#", PayloadFormat::JsonMulti)
                },
                "s[0].sensor",
            ),
            (
                SubscriptionConfig {
                    ignore_fields: vec!["x".into()],
                    ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
                },
                "s[0].ignore-fields",
            ),
            (
                SubscriptionConfig {
                    qos: 2,
                    ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
                },
                "s[0].qos",
            ),
            (
                SubscriptionConfig {
                    value_field: String::new(),
                    ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
                },
                "s[0].value-field",
            ),
        ];
        for (sub, key) in cases {
            let err = Decoder::new(&[sub], 1024, "s").unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }

    #[test]
    fn toml_subscription_with_defaults() {
        let sub: SubscriptionConfig =
            toml::from_str("filter = \"plant/+/+\"\nformat = \"json-batch\"\n").unwrap();
        assert_eq!(
            sub,
            SubscriptionConfig::new("plant/+/+", PayloadFormat::JsonBatch)
        );
        assert!(
            toml::from_str::<SubscriptionConfig>("filter = \"a\"\nformat = \"xml\"\n").is_err()
        );
        assert!(
            toml::from_str::<SubscriptionConfig>("filter = \"a\"\ntime-unit = \"us\"\n").is_err()
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let d = decoder(vec![
            SubscriptionConfig::new("j/#", PayloadFormat::Json),
            SubscriptionConfig::new("m/+", PayloadFormat::JsonMulti),
            SubscriptionConfig::new("b/#", PayloadFormat::JsonBatch),
            SubscriptionConfig::new("n/#", PayloadFormat::Number),
        ]);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let alphabet = b"{}[]\":,0123456789.eE-+tfnul\\ abvs\xff";
        for i in 0..20_000 {
            let len = (i % 40) as usize;
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            for topic in ["j/a/b", "m/a", "b/a/b", "n/a/b", "x"] {
                let out = run(&d, topic, &payload);
                if topic != "b/a/b" {
                    assert!(!out.is_empty());
                }
            }
        }
    }

    /// A known series' names are shared, not copied, from one message to the
    /// next (and the topic levels need no allocation either).
    #[test]
    fn names_of_a_known_series_are_interned() {
        let mut d = plant_json();
        let mut out = Vec::new();
        for payload in [
            &br#"{"value": 1, "unit": "degC"}"#[..],
            br#"{"value": 2, "unit": "degC"}"#,
        ] {
            d.decode(
                "plant/boiler-3/temp",
                payload,
                NOW,
                Delivery::Once,
                &mut out,
            );
        }
        let (a, b) = (reading(&out[0]), reading(&out[1]));
        assert_eq!(a.series, SeriesKey::new("boiler-3", "temp"));
        assert!(a.series.ptr_eq(&b.series), "one key for the series");
        assert!(Arc::ptr_eq(&a.unit, &b.unit));
    }

    /// Series named by payload fields (one topic for all, or `series`) are
    /// interned too: every reading of a series carries the same key, and
    /// the series of one device share its name.
    #[test]
    fn series_named_in_the_payload_are_interned() {
        let mut by_fields = SubscriptionConfig::new("fields/#", PayloadFormat::Json);
        by_fields.device_field = Some("device".into());
        by_fields.sensor_field = Some("sensor".into());
        let mut by_series = SubscriptionConfig::new("series/#", PayloadFormat::Json);
        by_series.series_field = Some("series".into());
        let mut d = decoder(vec![by_fields, by_series]);
        let mut out = Vec::new();
        for (topic, payload) in [
            (
                "fields/x",
                &br#"{"device": "press-1", "sensor": "t", "value": 1}"#[..],
            ),
            (
                "fields/y",
                br#"{"device": "press-1", "sensor": "p", "value": 2}"#,
            ),
            (
                "fields/z",
                br#"{"device": "press-1", "sensor": "t", "value": 3}"#,
            ),
            ("series/a", br#"{"series": "press-2/t", "value": 4}"#),
            ("series/b", br#"{"series": "press-2/t", "value": 5}"#),
        ] {
            d.decode(topic, payload, NOW, Delivery::Once, &mut out);
        }
        let keys: Vec<&SeriesKey> = out.iter().map(|e| &reading(e).series).collect();
        assert_eq!(*keys[0], SeriesKey::new("press-1", "t"));
        assert_eq!(*keys[1], SeriesKey::new("press-1", "p"));
        assert_eq!(*keys[3], SeriesKey::new("press-2", "t"));
        assert!(keys[0].ptr_eq(keys[2]));
        assert!(keys[3].ptr_eq(keys[4]));
        assert!(!keys[0].ptr_eq(keys[1]));
        assert!(Arc::ptr_eq(&keys[0].device, &keys[1].device));
        // No unit in the payloads: the route's fixed unit, one shared name.
        let units: Vec<&Arc<str>> = out.iter().map(|e| &reading(e).unit).collect();
        assert_eq!(&**units[0], "");
        assert!(units[1..3].iter().all(|u| Arc::ptr_eq(u, units[0])));
    }

    /// A route's fixed unit is checked like any name, on every reading
    /// while it is refused (never cached as valid).
    #[test]
    fn a_fixed_unit_breaking_the_name_rules_dead_letters_each_reading() {
        let mut sub = SubscriptionConfig::new("plant/+/+", PayloadFormat::Json);
        sub.unit = "deg\u{7}C".into();
        let mut d = decoder(vec![sub]);
        let mut out = Vec::new();
        for _ in 0..2 {
            d.decode(
                "plant/p/t",
                br#"{"value": 1}"#,
                NOW,
                Delivery::Once,
                &mut out,
            );
        }
        assert_eq!(out.len(), 2);
        for e in &out {
            assert_eq!(dead(e).reason, DeadLetterReason::InvalidName);
        }
    }

    #[test]
    fn a_template_past_the_last_topic_level_index_is_refused() {
        let mut sub = SubscriptionConfig::new("a/#", PayloadFormat::Json);
        sub.device = Some("{64}".into());
        let err = Decoder::new(&[sub], 1024, "broker.subscriptions").unwrap_err();
        assert_eq!(err.key, "broker.subscriptions[0].device");
    }
}
