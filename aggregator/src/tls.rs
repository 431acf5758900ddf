//! HTTPS for the aggregator, with optional client certificates (mutual TLS).
//!
//! ```toml
//! [tls]
//! cert-file = "/etc/millrace/aggregator.crt"   # PEM chain, leaf first
//! key-file = "/etc/millrace/aggregator.key"    # PEM private key
//! client-ca-file = "/etc/millrace/agents-ca.crt"  # optional: mutual TLS
//! client-cert = "required"                     # or "optional" (default "required")
//! ```
//!
//! With `client-ca-file`, an agent may prove who it is by its certificate,
//! signed by that CA, whose subject alternative name (a DNS name) is the
//! agent id: the token then becomes optional for that agent. A request with
//! both must agree: a certificate of one agent with the token of another is
//! refused. With `client-cert = "required"` a client without a certificate
//! from that CA does not get past the handshake.
//!
//! SIGHUP reads the files again: a renewed certificate or a changed client
//! CA applies to the next connection, without a restart.
//!
//! What it is not: no revocation lists (short-lived certificates are the way
//! to revoke).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[tls]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: ClientCert,
}

/// Whether a client must present a certificate (with `client-ca-file`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCert {
    #[default]
    Required,
    /// A client may come with a certificate or with a token only.
    Optional,
}

/// The server config in use, replaced as a whole on reload.
pub type Reloadable = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// The verified client certificate of a connection, if any: a request
/// extension the ingest handler reads.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(pub Option<CertificateDer<'static>>);

impl PeerCertificate {
    /// Whether the certificate names `agent` (a DNS subject alternative name).
    pub fn names(&self, agent: &str) -> bool {
        let Some(der) = &self.0 else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
            return false;
        };
        ServerName::try_from(agent)
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// The rustls server config (ring provider) from the PEM files; the error
/// names the file.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| format!("{}: {e}", tls.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match tls.client_cert {
                ClientCert::Required => verifier,
                ClientCert::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", tls.key_file.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
