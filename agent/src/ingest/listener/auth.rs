//! Who may publish to the ingest listener, and where.
//!
//! `[[broker.users]]` lists devices with an Argon2 password hash (made by
//! `millrace-agent hash-password`) and the topic filters each may publish
//! to. With users configured, a `CONNECT` without a known user name and the
//! right password is refused (`CONNACK` "bad user name or password") and
//! counted; a publish outside the user's filters is acknowledged but not
//! read, counted and logged (MQTT 3.1.1 has no negative acknowledgement, and
//! refusing it would make the device resend it for ever). Without users, a
//! listener beyond loopback needs `allow-anonymous = true` (checked by the
//! config). Checking a password costs a few milliseconds and a few MiB;
//! checks run one at a time, off the async threads.
//!
//! With `[broker.tls] client-ca-file`, a device's verified certificate can
//! stand for its password: it must name the `CONNECT`'s user name as a DNS
//! subject alternative name (a certificate naming another user is refused,
//! so one device's certificate never opens another's topics). Users without
//! `password-hash` log in only that way.

use super::super::broker::BrokerUser;
use super::super::decode::topic_matches;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Topic filters one connection may publish to; `None`: any topic.
pub type Acl = Option<Arc<[String]>>;

/// The listener's users.
#[derive(Debug)]
pub struct Auth {
    users: HashMap<String, (Option<String>, Arc<[String]>)>,
    allow_anonymous: bool,
    checks: Semaphore,
}

/// Why a `CONNECT` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No user name, and anonymous devices are not allowed.
    Anonymous,
    UnknownUser,
    WrongPassword,
    /// The client certificate does not name the `CONNECT`'s user.
    CertificateOfAnotherUser,
}

impl Auth {
    pub fn new(users: &[BrokerUser], allow_anonymous: bool) -> Self {
        Self {
            users: users
                .iter()
                .map(|u| {
                    let filters: Arc<[String]> = u.publish.clone().into();
                    (u.name.clone(), (u.password_hash.clone(), filters))
                })
                .collect(),
            allow_anonymous: allow_anonymous || users.is_empty(),
            checks: Semaphore::new(1),
        }
    }

    /// Checks a `CONNECT`'s credentials and the connection's verified client
    /// certificate, if any; the publish filters of the user.
    pub async fn check(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        certificate: Option<&CertificateDer<'_>>,
    ) -> Result<Acl, Refused> {
        let Some(name) = username else {
            return if self.allow_anonymous {
                Ok(None)
            } else {
                Err(Refused::Anonymous)
            };
        };
        let Some((hash, filters)) = self.users.get(name) else {
            return Err(Refused::UnknownUser);
        };
        if let Some(certificate) = certificate {
            return if names(certificate, name) {
                Ok(Some(Arc::clone(filters)))
            } else {
                Err(Refused::CertificateOfAnotherUser)
            };
        }
        let (Some(hash), Some(password)) = (hash, password) else {
            return Err(Refused::WrongPassword);
        };
        let _one_at_a_time = self
            .checks
            .acquire()
            .await
            .map_err(|_| Refused::WrongPassword)?;
        let (hash, password) = (hash.clone(), password.to_vec());
        let ok = tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .unwrap_or(false);
        if ok {
            Ok(Some(Arc::clone(filters)))
        } else {
            Err(Refused::WrongPassword)
        }
    }
}

/// Whether `certificate` names `user` (a DNS subject alternative name).
fn names(certificate: &CertificateDer<'_>, user: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(certificate) else {
        return false;
    };
    ServerName::try_from(user).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password, &h)
            .is_ok()
    })
}

/// Whether `acl` lets a connection publish to `topic`.
pub fn may_publish(acl: &Acl, topic: &str) -> bool {
    acl.as_ref()
        .is_none_or(|filters| filters.iter().any(|f| topic_matches(f, topic)))
}

/// An Argon2id hash of `password` (7 MiB, 5 passes: sized for a gateway)
/// with a random salt, as a PHC string for `password-hash`.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use std::io::Read;
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("reading /dev/urandom for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let params = argon2::Params::new(7 * 1024, 5, 1, None).map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    argon
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str, publish: &[&str]) -> BrokerUser {
        BrokerUser {
            name: name.into(),
            password_hash: Some(hash_password(password.as_bytes()).unwrap()),
            publish: publish.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn users_passwords_and_publish_filters() {
        let auth = Auth::new(
            &[user("press-1", "s3cret-pass", &["plant/press-1/#"])],
            false,
        );
        let acl = auth
            .check(Some("press-1"), Some(b"s3cret-pass"), None)
            .await
            .unwrap();
        assert!(may_publish(&acl, "plant/press-1/temp"));
        assert!(!may_publish(&acl, "plant/pump-2/temp"));
        assert_eq!(
            auth.check(Some("press-1"), Some(b"wrong"), None).await,
            Err(Refused::WrongPassword)
        );
        assert_eq!(
            auth.check(Some("press-1"), None, None).await,
            Err(Refused::WrongPassword)
        );
        assert_eq!(
            auth.check(Some("nobody"), Some(b"s3cret-pass"), None).await,
            Err(Refused::UnknownUser)
        );
        assert_eq!(auth.check(None, None, None).await, Err(Refused::Anonymous));
        // No users: anonymous, any topic.
        let open = Auth::new(&[], false);
        assert!(may_publish(
            &open.check(None, None, None).await.unwrap(),
            "any/topic"
        ));
    }
}
