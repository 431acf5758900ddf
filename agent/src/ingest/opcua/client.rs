//! The OPC UA client tasks (cargo feature `opcua`): see the module docs.

use super::{
    Identity, Mode, NodeConfig, NonNumeric, OpcUaConfig, OpcUaCounters, OpcUaStats, SecurityMode,
    ServerConfig,
};
use crate::ingest::mqtt::Backoff;
use crate::ingest::{now_ms, Delivery, IngestEvent, IngestTx};
use millrace_protocol::{DeadLetter, DeadLetterReason, Quality, Reading, SeriesKey, Source};
use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session};
use opcua::crypto::CertificateStore;
use opcua::types::{
    AttributeId, BrowsePath, DataChangeFilter, DataChangeTrigger, DataValue, DeadbandType,
    EndpointDescription, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, NumericRange, ObjectId, QualifiedName,
    ReadValueId, RelativePath, TimestampsToReturn, Variant,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Every configured OPC UA server, one task each.
#[derive(Debug)]
pub struct OpcUaSource {
    servers: Vec<(ServerConfig, Arc<OpcUaStats>)>,
    data_dir: PathBuf,
}

impl OpcUaSource {
    pub fn new(cfg: OpcUaConfig, data_dir: &Path) -> Self {
        Self {
            servers: cfg
                .servers
                .into_iter()
                .map(|s| (s, Arc::new(OpcUaStats::default())))
                .collect(),
            data_dir: data_dir.to_owned(),
        }
    }

    pub fn stats(&self) -> OpcUaCounters {
        self.servers
            .iter()
            .map(|(s, stats)| (s.name.clone(), Arc::clone(stats)))
            .collect()
    }

    /// Runs until `shutdown`.
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for (server, stats) in self.servers {
            let pki = server
                .pki_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("opcua").join(&server.name));
            tasks.spawn(run_server(server, pki, stats, tx.clone(), shutdown.clone()));
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                error!(error = %e, "opcua server task failed");
            }
        }
    }
}

/// What one node's values become.
#[derive(Debug, Clone)]
struct NodeMeta {
    series: SeriesKey,
    unit: Arc<str>,
    origin: Arc<str>,
}

/// Connects, subscribes (or polls) and reconnects until `shutdown`.
async fn run_server(
    server: ServerConfig,
    pki: PathBuf,
    stats: Arc<OpcUaStats>,
    tx: IngestTx,
    shutdown: CancellationToken,
) {
    // Values pass through a bounded queue: the client's callbacks cannot wait.
    let (values_tx, mut values_rx) = mpsc::channel::<IngestEvent>(server.queue_capacity);
    let forward = {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = values_rx.recv() => match e { Some(e) => e, None => return },
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    };
    let connect = async {
        let mut backoff = Backoff::new(server.reconnect_backoff_min, server.reconnect_backoff_max);
        loop {
            match session(&server, &pki, &stats, &values_tx, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    stats.connected.store(false, Ordering::Relaxed);
                    stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.next_delay();
                    warn!(server = %server.name, endpoint = %server.endpoint, error = %e, retry_in_ms = wait.as_millis() as u64, "opcua connection failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    };
    tokio::join!(forward, connect);
    info!(server = %server.name, "opcua source stopped");
}

/// One client and its session: returns `Ok` on shutdown, `Err` when the
/// session could not be set up or ended for good.
async fn session(
    server: &ServerConfig,
    pki: &Path,
    stats: &Arc<OpcUaStats>,
    values: &mpsc::Sender<IngestEvent>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut client = ClientBuilder::new()
        .application_name("Millrace agent")
        .application_uri("urn:millrace:agent")
        .product_uri("urn:millrace")
        .pki_dir(pki)
        .create_sample_keypair(true)
        .trust_server_certs(server.trust_on_first_use)
        .session_retry_limit(-1)
        .session_retry_initial(server.reconnect_backoff_min)
        .session_retry_max(server.reconnect_backoff_max)
        .request_timeout(server.request_timeout)
        .session_name(format!("millrace {}", server.name))
        .client()
        .map_err(|errors| format!("client config: {}", errors.join("; ")))?;
    if let Some(cert) = &server.server_certificate {
        trust_server_certificate(pki, cert)?;
    }
    let mode = match server.security_mode {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    };
    let endpoint: EndpointDescription =
        (server.endpoint.as_str(), server.security_policy.uri(), mode).into();
    let identity = identity(server)?;
    let (session, event_loop) = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        r = client.connect_to_matching_endpoint(endpoint, identity) => r.map_err(|e| e.to_string())?,
    };
    let name = server.name.clone();
    let loop_stats = Arc::clone(stats);
    let loop_session = Arc::clone(&session);
    let mut events = tokio::spawn(async move {
        use futures::StreamExt;
        use opcua::client::SessionPollResult as P;
        let stream = event_loop.enter();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(P::Reconnected(mode)) => {
                    loop_stats.connected.store(true, Ordering::Relaxed);
                    loop_stats.sessions.fetch_add(1, Ordering::Relaxed);
                    info!(server = %name, ?mode, "opcua session up");
                    // The session recreates (or transfers) the subscription
                    // while connecting, before its publish loop exists; the
                    // loop then starts idle until triggered.
                    loop_session.trigger_publish_now();
                }
                Ok(P::ConnectionLost(status)) => {
                    loop_stats.connected.store(false, Ordering::Relaxed);
                    warn!(server = %name, %status, "opcua connection lost; reconnecting");
                }
                Ok(P::ReconnectFailed(status)) => {
                    loop_stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(server = %name, %status, "opcua reconnect failed; retrying");
                }
                Ok(_) => {}
                Err(status) => return format!("session ended: {status}"),
            }
        }
        "session ended".to_string()
    });
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        ended = &mut events => Err(ended.unwrap_or_else(|e| e.to_string())),
        r = serve(server, &session, stats, values, shutdown) => r,
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    events.abort();
    stats.connected.store(false, Ordering::Relaxed);
    result
}

/// Subscribes (or polls) once the session is up; returns only on error.
async fn serve(
    server: &ServerConfig,
    session: &Arc<Session>,
    stats: &Arc<OpcUaStats>,
    values: &mpsc::Sender<IngestEvent>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    session.wait_for_connection().await;
    let nodes = resolve_nodes(server, session, stats).await?;
    if nodes.is_empty() {
        return Err("none of the configured nodes exists on the server".into());
    }
    info!(server = %server.name, nodes = nodes.len(), mode = ?server.mode, "opcua source reading");
    let convert = Converter {
        by_node: nodes
            .iter()
            .map(|(id, meta, _)| (id.clone(), meta.clone()))
            .collect(),
        non_numeric: server.non_numeric,
        stats: Arc::clone(stats),
        values: values.clone(),
        server: server.name.clone(),
    };
    match server.mode {
        Mode::Subscribe => {
            let convert = std::sync::Mutex::new(convert);
            let callback =
                DataChangeCallback::new(move |value: DataValue, item: &MonitoredItem| {
                    if let Ok(mut c) = convert.lock() {
                        c.stats.values.fetch_add(1, Ordering::Relaxed);
                        c.value(&item.item_to_monitor().node_id, value);
                    }
                });
            let interval = server.publishing_interval;
            // Keep-alive every 10 publishing intervals; lifetime 3 keep-alives.
            let id = session
                .create_subscription(interval, 30, 10, 0, 0, true, callback)
                .await
                .map_err(|e| format!("create subscription: {e}"))?;
            let requests: Vec<MonitoredItemCreateRequest> = nodes
                .iter()
                .enumerate()
                .map(|(i, (id, _, node))| monitored_item(server, node, id.clone(), i as u32 + 1))
                .collect();
            let created = session
                .create_monitored_items(id, TimestampsToReturn::Both, requests)
                .await
                .map_err(|e| format!("create monitored items: {e}"))?;
            for (item, (node_id, _, _)) in created.iter().zip(&nodes) {
                if !item.result.status_code.is_good() {
                    stats.node_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(server = %server.name, node = %node_id, status = %item.result.status_code, "opcua server refused a monitored item");
                }
            }
            // The session keeps the subscription alive and recreates it
            // after a reconnect; nothing more to do here.
            shutdown.cancelled().await;
            Ok(())
        }
        Mode::Poll => {
            let mut convert = convert;
            let reads: Vec<ReadValueId> = nodes
                .iter()
                .map(|(id, _, _)| ReadValueId::from(id.clone()))
                .collect();
            let mut last: HashMap<NodeId, i64> = HashMap::new();
            let mut tick = tokio::time::interval(server.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                match session.read(&reads, TimestampsToReturn::Both, 0.0).await {
                    Ok(results) => {
                        for (read, value) in reads.iter().zip(results) {
                            stats.values.fetch_add(1, Ordering::Relaxed);
                            // Reported once per source timestamp.
                            let stamp = value.source_timestamp.map(|t| t.ticks());
                            if let Some(stamp) = stamp {
                                if last.insert(read.node_id.clone(), stamp) == Some(stamp) {
                                    continue;
                                }
                            }
                            convert.value(&read.node_id, value);
                        }
                    }
                    Err(e) => {
                        warn!(server = %server.name, error = %e, "opcua read failed; the session reconnects");
                    }
                }
            }
        }
    }
}

/// The NodeId of every configured node (browse paths translated), with its
/// series; nodes the server does not know are counted and logged.
async fn resolve_nodes<'a>(
    server: &'a ServerConfig,
    session: &Session,
    stats: &OpcUaStats,
) -> Result<Vec<(NodeId, NodeMeta, &'a NodeConfig)>, String> {
    let mut out = Vec::with_capacity(server.nodes.len());
    for node in &server.nodes {
        let id = match (&node.node_id, &node.browse_path) {
            (Some(id), _) => NodeId::from_str(id).map_err(|_| format!("bad NodeId {id:?}"))?,
            (None, Some(path)) => {
                let relative = RelativePath::from_str(path, &|_, _| None)
                    .map_err(|e| format!("browse path {path:?}: {e:?}"))?;
                let browse = BrowsePath {
                    starting_node: ObjectId::ObjectsFolder.into(),
                    relative_path: relative,
                };
                let results = session
                    .translate_browse_paths_to_node_ids(&[browse])
                    .await
                    .map_err(|e| format!("translate browse path {path:?}: {e}"))?;
                let target = results.first().and_then(|r| {
                    r.status_code
                        .is_good()
                        .then(|| {
                            r.targets
                                .as_ref()?
                                .first()
                                .map(|t| t.target_id.node_id.clone())
                        })
                        .flatten()
                });
                match target {
                    Some(id) => id,
                    None => {
                        stats.node_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(server = %server.name, browse_path = %path, "opcua browse path not found on the server; node skipped");
                        continue;
                    }
                }
            }
            (None, None) => continue,
        };
        let device = node.device.clone().unwrap_or_else(|| server.name.clone());
        let meta = NodeMeta {
            series: SeriesKey::new(device, node.sensor_name()),
            unit: Arc::from(node.unit.as_deref().unwrap_or("")),
            origin: Arc::from(format!("{}/{}", server.name, id)),
        };
        out.push((id, meta, node));
    }
    Ok(out)
}

fn monitored_item(
    server: &ServerConfig,
    node: &NodeConfig,
    id: NodeId,
    handle: u32,
) -> MonitoredItemCreateRequest {
    let deadband = match (node.deadband_absolute, node.deadband_percent) {
        (Some(v), _) => Some((DeadbandType::Absolute, v)),
        (None, Some(v)) => Some((DeadbandType::Percent, v)),
        (None, None) => None,
    };
    let filter = deadband.map_or_else(ExtensionObject::null, |(kind, value)| {
        ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            deadband_type: kind as u32,
            deadband_value: value,
        })
    });
    MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId {
            node_id: id,
            attribute_id: AttributeId::Value as u32,
            index_range: NumericRange::None,
            data_encoding: QualifiedName::null(),
        },
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: handle,
            sampling_interval: node
                .sampling_interval
                .unwrap_or(server.sampling_interval)
                .as_secs_f64()
                * 1000.0,
            filter,
            queue_size: node.queue_size.unwrap_or(server.queue_size),
            discard_oldest: true,
        },
    }
}

fn identity(server: &ServerConfig) -> Result<IdentityToken, String> {
    Ok(match server.identity {
        Identity::Anonymous => IdentityToken::Anonymous,
        Identity::UserName => IdentityToken::new_user_name(
            server.user.clone().unwrap_or_default(),
            server.password.clone().unwrap_or_default(),
        ),
        Identity::Certificate => {
            let (Some(cert), Some(key)) = (&server.user_certificate, &server.user_private_key)
            else {
                return Err(
                    "identity = \"certificate\" needs user-certificate and user-private-key".into(),
                );
            };
            let cert = CertificateStore::read_cert(cert)
                .map_err(|e| format!("user-certificate {}: {e}", cert.display()))?;
            let key = CertificateStore::read_pkey(key)
                .map_err(|e| format!("user-private-key {}: {e}", key.display()))?;
            IdentityToken::X509(Box::new(cert), Box::new(key))
        }
    })
}

/// Puts the configured server certificate into the PKI's trust list.
fn trust_server_certificate(pki: &Path, cert: &Path) -> Result<(), String> {
    let x509 = CertificateStore::read_cert(cert)
        .map_err(|e| format!("server-certificate {}: {e}", cert.display()))?;
    let store = CertificateStore::new(pki);
    store
        .ensure_pki_path()
        .map_err(|e| format!("pki-dir {}: {e}", pki.display()))?;
    let trusted = store
        .trusted_certs_dir()
        .join(CertificateStore::cert_file_name(&x509));
    let der = x509
        .to_der()
        .map_err(|e| format!("server-certificate: {e}"))?;
    std::fs::write(&trusted, der).map_err(|e| format!("{}: {e}", trusted.display()))
}

/// Turns values into readings (or counted skips and dead letters).
struct Converter {
    by_node: HashMap<NodeId, NodeMeta>,
    non_numeric: NonNumeric,
    stats: Arc<OpcUaStats>,
    values: mpsc::Sender<IngestEvent>,
    server: String,
}

impl Converter {
    fn value(&mut self, node: &NodeId, value: DataValue) {
        let Some(meta) = self.by_node.get(node) else {
            return;
        };
        let now = now_ms();
        let event = match to_reading(meta, &value, now) {
            Converted::Reading(r) => {
                self.stats.readings.fetch_add(1, Ordering::Relaxed);
                IngestEvent::Reading(r, Delivery::Once)
            }
            Converted::NoValue => {
                // A Bad status comes without a value (the server must null
                // it): the failure is reported as the device's error.
                self.stats.bad_without_value.fetch_add(1, Ordering::Relaxed);
                let status = value.status.unwrap_or_default();
                if status.is_good() {
                    return;
                }
                self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                let source_ms = value
                    .source_timestamp
                    .as_ref()
                    .or(value.server_timestamp.as_ref())
                    .map(unix_ms);
                IngestEvent::DeadLetter(DeadLetter::new(
                    Source::OpcUa,
                    meta.origin.to_string(),
                    format!("{status}").into_bytes(),
                    DeadLetterReason::DeviceException,
                    format!(
                        "{} reported status {status} without a value (source time {})",
                        meta.series,
                        source_ms.map_or_else(|| "unknown".to_string(), |t| t.to_string())
                    ),
                    now,
                ))
            }
            Converted::NotNumeric(kind) => {
                self.stats.non_numeric.fetch_add(1, Ordering::Relaxed);
                if self.non_numeric == NonNumeric::Skip {
                    return;
                }
                self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                let shown = format!("{:?}", value.value);
                IngestEvent::DeadLetter(DeadLetter::new(
                    Source::OpcUa,
                    meta.origin.to_string(),
                    shown.into_bytes(),
                    DeadLetterReason::WrongType,
                    format!("value of type {kind} is not a number"),
                    now,
                ))
            }
        };
        if let Err(e) = self.values.try_send(event) {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                error!(server = %self.server, dropped = n, reason = %e, "opcua values dropped: the ingest queue is full (queue-capacity)");
            }
        }
    }
}

enum Converted {
    Reading(Reading),
    /// No value: a Bad status (dead-lettered), or an empty Good one (skipped).
    NoValue,
    NotNumeric(&'static str),
}

/// Unix ms of an OPC UA timestamp (100 ns ticks since 1601).
fn unix_ms(t: &opcua::types::DateTime) -> i64 {
    const TICKS_1601_TO_1970_MS: i64 = 11_644_473_600_000;
    t.ticks() / 10_000 - TICKS_1601_TO_1970_MS
}

fn to_reading(meta: &NodeMeta, value: &DataValue, now: i64) -> Converted {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    let (number, exact) = match value.value.as_ref().unwrap_or(&Variant::Empty) {
        Variant::Empty => return Converted::NoValue,
        Variant::Boolean(b) => (if *b { 1.0 } else { 0.0 }, true),
        Variant::SByte(v) => (f64::from(*v), true),
        Variant::Byte(v) => (f64::from(*v), true),
        Variant::Int16(v) => (f64::from(*v), true),
        Variant::UInt16(v) => (f64::from(*v), true),
        Variant::Int32(v) => (f64::from(*v), true),
        Variant::UInt32(v) => (f64::from(*v), true),
        Variant::Int64(v) => (*v as f64, (*v as f64).abs() <= EXACT),
        Variant::UInt64(v) => (*v as f64, (*v as f64) <= EXACT),
        Variant::Float(v) => (f64::from(*v), true),
        Variant::Double(v) => (*v, true),
        Variant::String(_) => return Converted::NotNumeric("String"),
        Variant::DateTime(_) => return Converted::NotNumeric("DateTime"),
        Variant::ByteString(_) => return Converted::NotNumeric("ByteString"),
        Variant::Array(_) => return Converted::NotNumeric("Array"),
        Variant::ExtensionObject(_) => return Converted::NotNumeric("ExtensionObject"),
        _ => return Converted::NotNumeric("non-numeric"),
    };
    let status = value.status.unwrap_or_default();
    let quality = if status.is_bad() {
        Quality::Bad
    } else if status.is_uncertain() || !exact {
        Quality::Uncertain
    } else {
        Quality::Good
    };
    let time_ms = value
        .source_timestamp
        .as_ref()
        .or(value.server_timestamp.as_ref())
        .map_or(now, unix_ms);
    Converted::Reading(Reading {
        series: meta.series.clone(),
        time_ms,
        value: number,
        unit: Arc::clone(&meta.unit),
        source: Source::OpcUa,
        quality,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opcua::types::{DateTime, StatusCode};

    fn meta() -> NodeMeta {
        NodeMeta {
            series: SeriesKey::new("line-1", "temp"),
            unit: Arc::from("degC"),
            origin: Arc::from("line-1/ns=2;s=T"),
        }
    }

    fn reading(c: Converted) -> Reading {
        match c {
            Converted::Reading(r) => r,
            _ => panic!("not a reading"),
        }
    }

    #[test]
    fn source_timestamps_become_event_time_and_status_becomes_quality() {
        let at = DateTime::from(1_796_360_000_123i64 * 10_000 + 116_444_736_000_000_000);
        let mut v = DataValue::new_now(Variant::Double(21.5));
        v.source_timestamp = Some(at);
        let r = reading(to_reading(&meta(), &v, 0));
        assert_eq!(
            (r.time_ms, r.value, r.quality),
            (1_796_360_000_123, 21.5, Quality::Good)
        );
        v.status = Some(StatusCode::BadSensorFailure);
        assert_eq!(reading(to_reading(&meta(), &v, 0)).quality, Quality::Bad);
        v.status = Some(StatusCode::UncertainLastUsableValue);
        assert_eq!(
            reading(to_reading(&meta(), &v, 0)).quality,
            Quality::Uncertain
        );
    }

    #[test]
    fn types_map_to_numbers_or_are_refused() {
        let of = |v: Variant| to_reading(&meta(), &DataValue::new_now(v), 0);
        assert_eq!(reading(of(Variant::Boolean(true))).value, 1.0);
        assert_eq!(reading(of(Variant::Int16(-7))).value, -7.0);
        let big = reading(of(Variant::UInt64((1 << 60) + 1)));
        assert_eq!(big.quality, Quality::Uncertain);
        assert_eq!(reading(of(Variant::UInt64(1 << 52))).quality, Quality::Good);
        assert!(matches!(
            of(Variant::String("auto".into())),
            Converted::NotNumeric("String")
        ));
        assert!(matches!(of(Variant::Empty), Converted::NoValue));
    }
}
