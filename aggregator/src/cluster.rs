//! Several aggregators sharing the fleet, coordinated through Kafka.
//!
//! With `[cluster]` configured, any number of aggregator processes (on one
//! host or many) write the fleet into the same Kafka topics, exactly once,
//! with no local file another node would need. Kafka does the coordinating:
//!
//! - **The control topic** (`millrace.control`, P partitions; create it
//!   with `cleanup.policy=compact`). Agent `a` belongs to control
//!   partition `fnv1a(a) mod P`. Two kinds of record live there, as JSON:
//!   a *claim* (`{"kind":"claim","member":…,"url":…}`, key `claim`) says
//!   which aggregator owns the partition from that offset on; a *state*
//!   (`{"kind":"state","agent":…,"committed":…,"marks":…}`, key = the agent)
//!   is that agent's dedup state — the set of its committed seqs — as of a
//!   batch just written, plus the Kafka writer's frontier at that write (see
//!   [`crate::log::kafka`]). The latest state of each agent is all that
//!   matters, which is what compaction keeps.
//! - **A consumer group** (`millrace-aggregators`) over the control topic
//!   hands each partition to exactly one aggregator. Every aggregator also
//!   reads the whole control topic (a plain assigned reader), so it knows
//!   every partition's owner and every agent's committed seqs.
//!
//! **A batch** from agent `a` (partition `p`):
//! 1. If this aggregator does not own `p`, it answers `307` with the
//!    owner's URL from the latest claim (the agent follows it only to an
//!    aggregator it is configured for), or `503` while `p` has no owner.
//! 2. The owner reads `p` up to its current end (one watermark request),
//!    checks that the latest claim is still its own, and adds `a`'s latest
//!    state to its own (a union: committed seqs only ever grow).
//! 3. New records are written to the data topics (idempotent producer), the
//!    new state to `p`; the batch is answered `200` only when the reader has
//!    read that state back and no other aggregator's claim came before it.
//!    A claim that did (this aggregator lost `p` meanwhile) turns the answer
//!    into `503`: the agent sends the batch again, to the new owner, which
//!    sees the state record and answers it as duplicates.
//!
//! **A partition moving** (a rebalance: an aggregator starts, stops or
//! dies):
//! - the old owner, if alive, stops taking batches for `p` and waits for
//!   those in flight before it lets the rebalance go on (consumer-group
//!   etiquette: nothing is half-done when the partition changes hands);
//! - the new owner appends its claim to `p`, reads `p` up to the claim (every
//!   state before it), then reads the data topics from the newest frontier
//!   `p`'s states recorded to their end. Records of `p`'s agents found there
//!   are ones a crashed owner wrote without saving their state: they are
//!   added, saved as states, and a resend of their batch is a duplicate.
//!   Only then does it take batches for `p`.
//!
//! So a batch resent after a crash, a rebalance or to another aggregator is
//! written once. What this relies on: an owner that lost its group
//! membership without knowing it (a process paused longer than the
//! session timeout) learns it at its next batch (step 2 or 3) — a batch
//! whose data it had already written at that moment is answered `503` and,
//! as the new owner reads the data topics' tail at takeover, is a duplicate
//! when resent, unless the paused process wrote it after that read and then
//! crashed. Kafka transactions would close that last window; the brokers
//! this is tested against do not offer them.
//!
//! What it is not: no state on local disk (the data directory holds nothing
//! another node needs), no home-made consensus (ownership is the consumer
//! group's assignment, ordering is the control partition's).

use crate::config::{ClusterConfig, KafkaConfig, Topics};
use crate::dashboard::Dashboard;
use crate::dedup::AgentDedup;
use crate::log::kafka::{recent_record, KafkaWriter, TracingContext};
use crate::log::CommittedRecord;
use crate::seqset::{SeqSet, SeqSetRepr};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long a batch waits for the control reader to catch up, or for a
/// partition being taken over, before it is answered `503`.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a partition being given away waits for its batches in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Kafka request timeout for metadata and watermarks.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a batch cannot be taken here now.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Another aggregator owns the agent: send it there.
    #[error("agent `{agent}` is served by {url}")]
    Elsewhere { agent: String, url: String },
    /// Nobody (or not yet this aggregator) can take it: retry shortly.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("control topic `{0}` does not exist; create it (several partitions, cleanup.policy=compact) before starting the aggregators")]
    NoControlTopic(String),
    #[error("starting a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A record of the control topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum Control {
    Claim {
        member: String,
        url: String,
    },
    State {
        agent: String,
        member: String,
        committed: SeqSetRepr,
        #[serde(default)]
        marks: BTreeMap<String, u64>,
    },
}

#[derive(Debug, Clone)]
struct Claim {
    offset: u64,
    member: String,
    url: String,
}

/// What the control reader has read.
#[derive(Debug, Default)]
struct View {
    /// Per control partition: the next offset to read.
    position: Vec<u64>,
    /// Per control partition: the latest claim.
    claims: Vec<Option<Claim>>,
    /// Per control partition: per data partition, the newest frontier mark.
    marks: Vec<BTreeMap<String, u64>>,
    /// Per agent: every seq any state record lists.
    committed: HashMap<String, SeqSet>,
    /// Control records that were not ours to read (counted, skipped).
    unreadable: u64,
}

impl View {
    fn apply(&mut self, partition: usize, offset: u64, payload: Option<&[u8]>) {
        self.position[partition] = offset + 1;
        let Some(control) = payload.and_then(|p| serde_json::from_slice::<Control>(p).ok()) else {
            self.unreadable += 1;
            tracing::warn!(partition, offset, "control record not understood; skipped");
            return;
        };
        match control {
            Control::Claim { member, url } => {
                self.claims[partition] = Some(Claim {
                    offset,
                    member,
                    url,
                });
            }
            Control::State {
                agent,
                committed,
                marks,
                ..
            } => {
                self.committed
                    .entry(agent)
                    .or_default()
                    .union(&SeqSet::from_repr(&committed));
                let newest = &mut self.marks[partition];
                for (key, mark) in marks {
                    newest.insert(key, mark);
                }
            }
        }
    }
}

/// Where a control partition stands on this aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// Assigned; the claim and the read back are under way.
    TakingOver,
    /// Assigned and taken over: batches are taken.
    Owned,
}

struct Shared {
    config: ClusterConfig,
    member: String,
    partitions: usize,
    log: Arc<KafkaWriter>,
    producer: FutureProducer<TracingContext>,
    /// For watermark requests (any thread).
    probe: BaseConsumer<TracingContext>,
    view: Mutex<View>,
    /// Bumped by the reader after every record it applies.
    progress: watch::Sender<u64>,
    owned: Mutex<HashMap<usize, Ownership>>,
    /// Per control partition: batches in flight.
    in_flight: Vec<AtomicUsize>,
    takeovers: mpsc::UnboundedSender<Vec<usize>>,
    stop: AtomicBool,
    /// Assignments received from the group.
    rebalances: AtomicU64,
}

/// This aggregator's part in the cluster.
pub struct Cluster {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("member", &self.shared.member)
            .field("partitions", &self.shared.partitions)
            .finish_non_exhaustive()
    }
}

/// The control partition of `agent` among `partitions` (FNV-1a 64: stable
/// across builds and platforms, unlike `std`'s hasher).
pub fn partition_of(agent: &str, partitions: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in agent.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as usize
}

fn client_config(kafka: &KafkaConfig, purpose: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &kafka.properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", format!("{}-{purpose}", kafka.client_id));
    client
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Joins the cluster: reads the control topic's layout, starts the
    /// control reader and the group membership. Blocking; call before
    /// serving (from within the runtime: takeovers run on it).
    pub fn start(
        config: ClusterConfig,
        kafka: &KafkaConfig,
        log: Arc<KafkaWriter>,
    ) -> Result<Arc<Self>, ClusterStartError> {
        let member = format!(
            "{}-{}-{:08x}",
            kafka.client_id,
            std::process::id(),
            rand_u32()
        );
        let probe: BaseConsumer<TracingContext> = client_config(kafka, "control-probe")
            .set("group.id", format!("{}-control-probe", kafka.client_id))
            .set("enable.auto.commit", "false")
            .create_with_context(TracingContext)?;
        let metadata = probe.fetch_metadata(Some(&config.control_topic), KAFKA_TIMEOUT)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == config.control_topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(ClusterStartError::NoControlTopic(config.control_topic));
        }
        let producer: FutureProducer<TracingContext> = client_config(kafka, "control")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                kafka.message_timeout.as_millis().to_string(),
            )
            .create_with_context(TracingContext)?;
        let (takeovers, takeover_rx) = mpsc::unbounded_channel();
        let (progress, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            member: member.clone(),
            partitions,
            log,
            producer,
            probe,
            view: Mutex::new(View {
                position: vec![0; partitions],
                claims: vec![None; partitions],
                marks: vec![BTreeMap::new(); partitions],
                ..View::default()
            }),
            progress,
            owned: Mutex::new(HashMap::new()),
            in_flight: (0..partitions).map(|_| AtomicUsize::new(0)).collect(),
            takeovers,
            stop: AtomicBool::new(false),
            rebalances: AtomicU64::new(0),
            config,
        });
        let reader = start_reader(&shared, kafka)?;
        let membership = start_membership(&shared, kafka)?;
        tokio::spawn(take_over(Arc::clone(&shared), takeover_rx));
        tracing::info!(
            member,
            url = %shared.config.advertise_url,
            control_topic = %shared.config.control_topic,
            partitions,
            group = %shared.config.group,
            "joined the aggregator cluster"
        );
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(vec![reader, membership]),
        }))
    }

    /// Feeds `dashboard` with the windows and alerts other aggregators
    /// write (read from the data topics as they are appended), so that any
    /// aggregator's dashboard shows the whole fleet; its own agents' come
    /// from its ingest. Records of a partition changing hands at that moment
    /// may show twice or not at all in the live view (never in the log).
    pub fn follow_fleet(
        &self,
        kafka: &KafkaConfig,
        topics: &Topics,
        dashboard: Arc<Dashboard>,
    ) -> Result<(), ClusterStartError> {
        let consumer: BaseConsumer<TracingContext> = client_config(kafka, "fleet")
            .set("group.id", format!("{}-fleet", kafka.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create_with_context(TracingContext)?;
        let metadata = consumer.fetch_metadata(None, KAFKA_TIMEOUT)?;
        let mut assignment = TopicPartitionList::new();
        for topic in [&topics.windows, &topics.alerts] {
            if let Some(t) = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic.as_str())
            {
                for p in t.partitions() {
                    assignment.add_partition_offset(topic, p.id(), Offset::End)?;
                }
            }
        }
        consumer.assign(&assignment)?;
        let shared = Arc::clone(&self.shared);
        let topics = topics.clone();
        let thread = std::thread::Builder::new()
            .name("fleet-follower".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::SeqCst) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Some(r) = recent_record(&topics, &message, crate::dashboard::now_ms())
                    else {
                        continue;
                    };
                    let partition = partition_of(&r.agent, shared.partitions);
                    if lock(&shared.owned).contains_key(&partition) {
                        continue; // this aggregator's own: its ingest showed it
                    }
                    dashboard
                        .live()
                        .restore(&r.agent, r.seq, &r.record, r.appended_ms);
                }
            })
            .map_err(ClusterStartError::Thread)?;
        lock(&self.threads).push(thread);
        Ok(())
    }

    /// This aggregator's member id (in its claims).
    pub fn member(&self) -> &str {
        &self.shared.member
    }

    /// Control partitions this aggregator owns and takes batches for.
    pub fn owned_partitions(&self) -> Vec<usize> {
        let mut owned: Vec<usize> = lock(&self.shared.owned)
            .iter()
            .filter(|(_, o)| **o == Ownership::Owned)
            .map(|(p, _)| *p)
            .collect();
        owned.sort_unstable();
        owned
    }

    /// Assignments this aggregator received from the group since it started.
    pub fn rebalances(&self) -> u64 {
        self.shared.rebalances.load(Ordering::Relaxed)
    }

    /// The number of control partitions.
    pub fn partitions(&self) -> usize {
        self.shared.partitions
    }

    /// Admits a batch of `agent`: this aggregator owns its partition, has
    /// read it to its end, and `state` now holds everything the cluster
    /// knows `agent` committed. Keep the lease until the batch is answered.
    pub async fn admit(&self, agent: &str, state: &mut AgentDedup) -> Result<Lease, ClusterError> {
        let shared = &self.shared;
        let partition = partition_of(agent, shared.partitions);
        let lease =
            Lease::take(shared, partition).ok_or_else(|| self.not_here(agent, partition))?;
        let end = self.control_end(partition).await?;
        self.read_to(partition, end).await?;
        let view = lock(&shared.view);
        if view.claims[partition]
            .as_ref()
            .is_none_or(|c| c.member != shared.member)
        {
            drop(view);
            return Err(self.not_here(agent, partition));
        }
        if let Some(known) = view.committed.get(agent) {
            state.merge(known);
        }
        Ok(lease)
    }

    /// Saves `state` (the batch's records are in the log) as `agent`'s
    /// latest state, and checks that this aggregator still owned the
    /// partition when it did.
    pub async fn save(
        &self,
        state: &AgentDedup,
        marks: BTreeMap<String, u64>,
    ) -> Result<(), ClusterError> {
        let shared = &self.shared;
        let partition = partition_of(state.agent(), shared.partitions);
        let record = Control::State {
            agent: state.agent().to_owned(),
            member: shared.member.clone(),
            committed: state.committed().to_repr(),
            marks,
        };
        let offset = self.append(partition, state.agent(), &record).await?;
        self.read_to(partition, offset + 1).await?;
        let view = lock(&shared.view);
        match &view.claims[partition] {
            Some(claim) if claim.member == shared.member && claim.offset < offset => Ok(()),
            _ => Err(ClusterError::Unavailable(format!(
                "control partition {partition} changed hands while the batch was written; \
                 send it again (it will be recognised)"
            ))),
        }
    }

    /// Leaves the group: partitions are given up (after their batches in
    /// flight), the others take them over. Blocking.
    pub fn leave(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
        tracing::info!(member = %self.shared.member, "left the aggregator cluster");
    }

    fn not_here(&self, agent: &str, partition: usize) -> ClusterError {
        let shared = &self.shared;
        let view = lock(&shared.view);
        match &view.claims[partition] {
            // A claim of this node's previous run names its own URL: no
            // redirect to itself, the takeover is under way.
            Some(claim)
                if claim.member != shared.member && claim.url != shared.config.advertise_url =>
            {
                ClusterError::Elsewhere {
                    agent: agent.to_owned(),
                    url: claim.url.clone(),
                }
            }
            _ => ClusterError::Unavailable(format!(
                "control partition {partition} of agent `{agent}` is being taken over; retry shortly"
            )),
        }
    }

    /// The current end of a control partition.
    async fn control_end(&self, partition: usize) -> Result<u64, ClusterError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            shared
                .probe
                .fetch_watermarks(
                    &shared.config.control_topic,
                    partition as i32,
                    KAFKA_TIMEOUT,
                )
                .map(|(_, high)| high.max(0) as u64)
        })
        .await
        .map_err(|e| ClusterError::Unavailable(e.to_string()))?
        .map_err(|e| ClusterError::Unavailable(format!("control topic: {e}")))
    }

    async fn read_to(&self, partition: usize, end: u64) -> Result<(), ClusterError> {
        wait_read(&self.shared, partition, end).await
    }

    async fn append(
        &self,
        partition: usize,
        key: &str,
        record: &Control,
    ) -> Result<u64, ClusterError> {
        append(&self.shared, partition, key, record).await
    }
}

async fn wait_read(shared: &Shared, partition: usize, end: u64) -> Result<(), ClusterError> {
    let mut progress = shared.progress.subscribe();
    let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        if lock(&shared.view).position[partition] >= end {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, progress.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(ClusterError::Unavailable(format!(
                    "the control reader is behind on partition {partition}"
                )))
            }
        }
    }
}

async fn append(
    shared: &Shared,
    partition: usize,
    key: &str,
    record: &Control,
) -> Result<u64, ClusterError> {
    let payload = serde_json::to_vec(record).unwrap_or_default();
    let delivery = shared
        .producer
        .send(
            FutureRecord::to(&shared.config.control_topic)
                .partition(partition as i32)
                .key(key)
                .payload(&payload),
            Duration::from_secs(0),
        )
        .await;
    match delivery {
        Ok(delivered) => Ok(delivered.offset.max(0) as u64),
        Err((error, _)) => Err(ClusterError::Unavailable(format!(
            "writing to the control topic: {error}"
        ))),
    }
}

/// Held while a batch of a control partition is being committed; a
/// partition being given away waits for its leases.
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    partition: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn take(shared: &Arc<Shared>, partition: usize) -> Option<Self> {
        let owned = lock(&shared.owned);
        if owned.get(&partition) != Some(&Ownership::Owned) {
            return None;
        }
        // Counted under the ownership lock: a revocation either sees it or
        // has already removed the partition.
        shared.in_flight[partition].fetch_add(1, Ordering::SeqCst);
        Some(Self {
            shared: Arc::clone(shared),
            partition,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.in_flight[self.partition].fetch_sub(1, Ordering::SeqCst);
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

/// Reads every control partition from its start, forever.
fn start_reader(
    shared: &Arc<Shared>,
    kafka: &KafkaConfig,
) -> Result<std::thread::JoinHandle<()>, ClusterStartError> {
    let consumer: BaseConsumer<TracingContext> = client_config(kafka, "control-reader")
        .set("group.id", format!("{}-control-reader", kafka.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "20")
        .create_with_context(TracingContext)?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..shared.partitions {
        assignment.add_partition_offset(
            &shared.config.control_topic,
            p as i32,
            Offset::Beginning,
        )?;
    }
    consumer.assign(&assignment)?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("control-reader".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                match polled {
                    Ok(message) => {
                        let partition = message.partition().max(0) as usize;
                        if partition < shared.partitions {
                            lock(&shared.view).apply(
                                partition,
                                message.offset().max(0) as u64,
                                message.payload(),
                            );
                            shared.progress.send_modify(|n| *n += 1);
                        }
                    }
                    Err(error) => tracing::warn!(%error, "control topic read failed; retrying"),
                }
            }
        })
        .map_err(ClusterStartError::Thread)
}

/// The consumer-group member: its rebalances decide what this aggregator
/// owns.
struct Membership {
    shared: Arc<Shared>,
}

impl ClientContext for Membership {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        TracingContext.log(level, facility, message);
    }
}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<usize> = list
                .elements()
                .iter()
                .map(|e| e.partition().max(0) as usize)
                .collect();
            give_up(&self.shared, &revoked);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // Membership only: the control reader reads the records.
            let _ = consumer.pause(list);
            let assigned: Vec<usize> = list
                .elements()
                .iter()
                .map(|e| e.partition().max(0) as usize)
                .filter(|&p| p < self.shared.partitions)
                .collect();
            {
                let mut owned = lock(&self.shared.owned);
                for &p in &assigned {
                    owned.entry(p).or_insert(Ownership::TakingOver);
                }
            }
            self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
            tracing::info!(partitions = ?assigned, "control partitions assigned");
            let _ = self.shared.takeovers.send(assigned);
        }
    }
}

/// Stops taking batches for `partitions` and waits for those in flight.
fn give_up(shared: &Shared, partitions: &[usize]) {
    {
        let mut owned = lock(&shared.owned);
        for p in partitions {
            owned.remove(p);
        }
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for &p in partitions {
        while p < shared.partitions && shared.in_flight[p].load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                tracing::warn!(partition = p, "batches still in flight as the partition is given up; they will be answered 503");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !partitions.is_empty() {
        tracing::info!(?partitions, "control partitions given up");
    }
}

fn start_membership(
    shared: &Arc<Shared>,
    kafka: &KafkaConfig,
) -> Result<std::thread::JoinHandle<()>, ClusterStartError> {
    let consumer: BaseConsumer<Membership> = client_config(kafka, "member")
        .set("group.id", &shared.config.group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range")
        .create_with_context(Membership {
            shared: Arc::clone(shared),
        })?;
    consumer.subscribe(&[&shared.config.control_topic])?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("cluster-member".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                // Records never come (assignments are paused); this serves
                // the rebalance callbacks.
                let _ = consumer.poll(Duration::from_millis(100));
            }
            // Leaving: the revocation gives the partitions up (after their
            // batches), then the group rebalances without this member.
            consumer.unsubscribe();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !consumer.assignment().is_ok_and(|a| a.count() == 0)
            {
                let _ = consumer.poll(Duration::from_millis(50));
            }
            let owned: Vec<usize> = lock(&shared.owned).keys().copied().collect();
            give_up(&shared, &owned);
            drop(consumer);
        })
        .map_err(ClusterStartError::Thread)
}

/// Takes over the partitions the group assigns: claim, read back, serve.
async fn take_over(shared: Arc<Shared>, mut assigned: mpsc::UnboundedReceiver<Vec<usize>>) {
    while let Some(partitions) = assigned.recv().await {
        let mut pending = partitions;
        while !pending.is_empty() {
            let mut failed = Vec::new();
            for p in pending {
                if lock(&shared.owned).get(&p) != Some(&Ownership::TakingOver) {
                    continue; // revoked meanwhile
                }
                match take_over_one(&shared, p).await {
                    Ok(found) => {
                        let mut owned = lock(&shared.owned);
                        if let Some(o) = owned.get_mut(&p) {
                            *o = Ownership::Owned;
                            tracing::info!(
                                partition = p,
                                unsaved_records_found = found,
                                "control partition taken over"
                            );
                        }
                    }
                    Err(error) => {
                        tracing::warn!(partition = p, %error, "taking over a control partition failed; retrying");
                        failed.push(p);
                    }
                }
            }
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            pending = failed;
        }
    }
}

/// Claims partition `p` and brings what the log holds of its agents into
/// the cluster's state. Returns how many records were found that no state
/// listed.
async fn take_over_one(shared: &Arc<Shared>, p: usize) -> Result<usize, ClusterError> {
    let claim = Control::Claim {
        member: shared.member.clone(),
        url: shared.config.advertise_url.clone(),
    };
    let offset = append(shared, p, "claim", &claim).await?;
    wait_read(shared, p, offset + 1).await?;
    let from = lock(&shared.view).marks[p].clone();
    // Records of this partition's agents the states do not list: written by
    // an owner that crashed before saving their state.
    let reader = Arc::clone(shared);
    let found: HashMap<String, Vec<u64>> = tokio::task::spawn_blocking(move || {
        let mut found: HashMap<String, Vec<u64>> = HashMap::new();
        let view_known = |agent: &str, seq: u64| {
            lock(&reader.view)
                .committed
                .get(agent)
                .is_some_and(|s| s.contains(seq))
        };
        reader
            .log
            .read_back_from(&from, &mut |r: CommittedRecord| {
                if partition_of(&r.agent, reader.partitions) == p && !view_known(&r.agent, r.seq) {
                    found.entry(r.agent).or_default().push(r.seq);
                }
            })
            .map(|_| found)
    })
    .await
    .map_err(|e| ClusterError::Unavailable(e.to_string()))?
    .map_err(|e| ClusterError::Unavailable(format!("reading the data topics back: {e}")))?;
    let mut records = 0;
    let agents: HashSet<&String> = found.keys().collect();
    for agent in agents {
        let mut set = lock(&shared.view)
            .committed
            .get(agent.as_str())
            .cloned()
            .unwrap_or_default();
        for &seq in &found[agent] {
            set.insert(seq);
            records += 1;
        }
        let state = Control::State {
            agent: agent.clone(),
            member: shared.member.clone(),
            committed: set.to_repr(),
            marks: BTreeMap::new(),
        };
        let at = append(shared, p, agent, &state).await?;
        wait_read(shared, p, at + 1).await?;
    }
    let view = lock(&shared.view);
    match &view.claims[p] {
        Some(c) if c.member == shared.member => Ok(records),
        _ => Err(ClusterError::Unavailable(format!(
            "another aggregator claimed partition {p} meanwhile"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_spread_over_the_partitions_stably() {
        // Fixed values: every aggregator, on any platform, must agree.
        assert_eq!(partition_of("gw-01", 6), partition_of("gw-01", 6));
        let mut seen = HashSet::new();
        for i in 0..60 {
            let p = partition_of(&format!("gw-{i:02}"), 6);
            assert!(p < 6);
            seen.insert(p);
        }
        assert_eq!(seen.len(), 6, "60 agents reach every one of 6 partitions");
        assert_eq!(partition_of("", 6), (0xcbf2_9ce4_8422_2325u64 % 6) as usize);
    }

    #[test]
    fn the_view_keeps_the_latest_claim_and_unions_states() {
        let mut view = View {
            position: vec![0; 2],
            claims: vec![None; 2],
            marks: vec![BTreeMap::new(); 2],
            ..View::default()
        };
        let claim = |m: &str| {
            serde_json::to_vec(&Control::Claim {
                member: m.into(),
                url: format!("http://{m}"),
            })
            .unwrap()
        };
        let state = |seqs: &[u64], mark: u64| {
            let mut set = SeqSet::new();
            seqs.iter().for_each(|&s| {
                set.insert(s);
            });
            serde_json::to_vec(&Control::State {
                agent: "gw".into(),
                member: "a".into(),
                committed: set.to_repr(),
                marks: BTreeMap::from([("w/0".to_owned(), mark)]),
            })
            .unwrap()
        };
        view.apply(1, 0, Some(&claim("a")));
        view.apply(1, 1, Some(&state(&[0, 1, 2], 10)));
        view.apply(1, 2, Some(&claim("b")));
        view.apply(1, 3, Some(&state(&[5], 12)));
        view.apply(1, 4, Some(b"not json"));
        assert_eq!(view.position[1], 5);
        assert_eq!(view.unreadable, 1);
        let latest = view.claims[1].as_ref().unwrap();
        assert_eq!((latest.offset, latest.member.as_str()), (2, "b"));
        let set = &view.committed["gw"];
        assert!([0, 1, 2, 5].iter().all(|&s| set.contains(s)));
        assert!(!set.contains(3));
        assert_eq!(view.marks[1]["w/0"], 12);
    }
}
