//! The agent's configuration, in two stages: the raw TOML structs (serde,
//! unknown keys rejected, kebab-case, `"5s"` durations) and the checked
//! [`AgentConfig`], whose errors name the file and the key.
//!
//! Each section's raw struct and its defaults live with the part it configures
//! (`window`, `anomaly`, `ingest::mqtt`, `ingest::broker`, `ingest::modbus`);
//! this module composes them, applies environment overrides for secrets and
//! runs every section's checks.
//!
//! Environment overrides: `MILLRACE_AGENT_ID` replaces `agent.id`,
//! `MILLRACE_DATA_DIR` replaces `agent.data-dir`, `MILLRACE_MQTT_PASSWORD`
//! replaces `mqtt.password`, `MILLRACE_UPLINK_TOKEN` replaces `uplink.token`.

use crate::anomaly::AnomalyConfig;
use crate::ingest::broker::BrokerConfig;
use crate::ingest::modbus::ModbusConfig;
use crate::ingest::mqtt::MqttConfig;
use crate::store::{JournalConfig, OutboxConfig, StoreConfig};
use crate::uplink::UplinkConfig;
use crate::window::WindowConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A config error: the file, and what is wrong with which key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {detail}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub detail: String,
}

/// `[agent]`: who this gateway is and where it keeps its state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentSection {
    /// The agent id: names this gateway in every record and at the aggregator.
    pub id: String,
    /// Where the journal and the outbox live (systemd: `/var/lib/millrace`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Capacity of the channel from the sources to the window engine, in
    /// events. When full, sources wait (Modbus polls slip, MQTT acks wait).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/millrace")
}

/// 4 096 events (about 330 KiB): the pipeline drains it 1 024 at a time, so a
/// larger channel adds memory and latency, not throughput.
fn default_channel_capacity() -> usize {
    4_096
}

/// The whole agent config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    pub agent: AgentSection,
    #[serde(default)]
    pub window: WindowConfig,
    #[serde(default)]
    pub anomaly: AnomalyConfig,
    /// An external MQTT broker to subscribe to.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// The embedded MQTT broker.
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// Modbus TCP and RTU devices.
    #[serde(default)]
    pub modbus: Option<ModbusConfig>,
    /// OPC UA servers (cargo feature `opcua`).
    #[serde(default)]
    pub opcua: Option<crate::ingest::opcua::OpcUaConfig>,
    /// The store-and-forward buffer of records bound for the aggregator.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// The reading journal (crash recovery of open windows).
    #[serde(default)]
    pub journal: JournalConfig,
    /// The aggregator to forward to. Without it, records go to the tap only.
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
    /// `/metrics` and `/healthz`; none without this section.
    #[serde(default)]
    pub http: Option<crate::telemetry::HttpConfig>,
}

impl AgentConfig {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |detail: String| ConfigError {
            file: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let credentials = std::env::var("CREDENTIALS_DIRECTORY").ok();
        let text =
            millrace_protocol::secret::expand_credentials_directory(&text, credentials.as_deref())
                .map_err(err)?;
        let mut cfg = Self::parse(&text).map_err(err)?;
        if let Ok(id) = std::env::var("MILLRACE_AGENT_ID") {
            cfg.agent.id = id;
        }
        if let Ok(dir) = std::env::var("MILLRACE_DATA_DIR") {
            cfg.agent.data_dir = PathBuf::from(dir);
        }
        if let Some(m) = cfg.mqtt.as_mut() {
            m.apply_env_overrides();
            m.load_secret_files().map_err(err)?;
        }
        if let Some(o) = cfg.opcua.as_mut() {
            o.load_secrets().map_err(err)?;
        }
        if let Some(u) = cfg.uplink.as_mut() {
            u.apply_env_overrides();
            u.load_secret_files().map_err(err)?;
            if u.token
                .as_deref()
                .is_some_and(millrace_protocol::secret::is_placeholder)
            {
                tracing::warn!("uplink.token is the placeholder of the example config: the aggregator refuses it; generate one (e.g. `openssl rand -hex 24`)");
            }
        }
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Parses TOML text; the error names the key and the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Checks every section; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let id = &self.agent.id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "agent.id: {id:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
            ));
        }
        if self.agent.channel_capacity == 0 {
            return Err("agent.channel-capacity: must be at least 1".into());
        }
        self.window
            .validate()
            .map_err(|e| format!("window.{}: {}", e.key, e.reason))?;
        self.anomaly
            .validate()
            .map_err(|e| format!("anomaly.{}: {}", e.key, e.reason))?;
        // The source sections' errors carry their full key path.
        let keyed = |key: String, reason: String| format!("{key}: {reason}");
        if let Some(m) = &self.mqtt {
            m.validate().map_err(|e| keyed(e.key, e.reason))?;
        }
        if let Some(b) = &self.broker {
            b.validate().map_err(|e| keyed(e.key, e.reason))?;
        }
        if let Some(m) = &self.modbus {
            m.validate().map_err(|e| keyed(e.key, e.message))?;
        }
        if let Some(o) = &self.opcua {
            o.validate().map_err(|(key, reason)| keyed(key, reason))?;
            if !o.servers.is_empty() && !cfg!(feature = "opcua") {
                return Err("opcua: this build has no OPC UA support; build millrace-agent with the cargo feature `opcua`".into());
            }
        }
        self.store().validate().map_err(|e| e.to_string())?;
        if let Some(u) = &self.uplink {
            u.validate()
                .map_err(|(key, reason)| format!("{key}: {reason}"))?;
        }
        if self.mqtt.is_none()
            && self.broker.as_ref().is_none_or(|b| !b.enabled)
            && self.modbus.as_ref().is_none_or(|m| m.devices.is_empty())
            && self.opcua.as_ref().is_none_or(|o| o.servers.is_empty())
        {
            return Err(
                "no source configured: add [mqtt], an enabled [broker], [[modbus.devices]] or [[opcua.servers]]"
                    .into(),
            );
        }
        Ok(())
    }

    /// The store's config: `[outbox]` and `[journal]`.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            outbox: self.outbox.clone(),
            journal: self.journal.clone(),
        }
    }

    /// One line for `check-config`: what this config will run.
    pub fn summary(&self) -> String {
        format!(
            "agent {}, mqtt: {}, embedded broker: {}, modbus devices: {}, opcua servers: {}, uplink: {}",
            self.agent.id,
            if self.mqtt.is_some() { "yes" } else { "no" },
            if self.broker.as_ref().is_some_and(|b| b.enabled) {
                "yes"
            } else {
                "no"
            },
            self.modbus.as_ref().map_or(0, |m| m.devices.len()),
            self.opcua.as_ref().map_or(0, |o| o.servers.len()),
            self.uplink
                .as_ref()
                .map_or("none (tap only)", |u| u.url.first()),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every agent config shipped in `config/` is what `check-config` accepts.
    #[test]
    fn shipped_agent_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("agent") && name.ends_with(".toml") {
                if let Err(e) = AgentConfig::load(&path) {
                    panic!("{name}: {e}");
                }
                checked.push(name);
            }
        }
        checked.sort();
        assert!(
            checked.contains(&"agent.toml".to_string())
                && checked.contains(&"agent-sparkplug.toml".to_string())
                && checked.contains(&"agent-opcua.toml".to_string()),
            "{checked:?}"
        );
    }
}
