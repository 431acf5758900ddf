//! Read access to the dashboard: a bearer token, HTTP basic auth, a session
//! cookie, or open.
//!
//! A browser opens the page once as `/?access_token=…`; the page trades the
//! token for a session (`POST /api/v1/session`, answered with an `HttpOnly`,
//! `SameSite=Strict` cookie), removes it from the address bar and from then
//! on sends only the cookie, so the token never travels in another URL (an
//! `EventSource` cannot set headers). `?access_token=` is accepted for the
//! page itself only. Sessions live in memory for 12 hours; secrets are
//! compared in constant time.

use super::config::DashboardAuth;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required")]
    Missing,
    #[error("credentials not accepted")]
    Rejected,
}

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "millrace_session";
/// How long a session lasts.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// Sessions kept at most; beyond, the oldest go first.
const MAX_SESSIONS: usize = 1000;

/// The open browser sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    open: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Sessions {
    /// A new session id (32 random bytes, hex).
    pub fn create(&self) -> std::io::Result<String> {
        use std::io::Read;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = std::time::Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, started| now.duration_since(*started) < SESSION_TTL);
        if open.len() >= MAX_SESSIONS {
            if let Some(oldest) = open.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                open.remove(&oldest);
            }
        }
        open.insert(id.clone(), now);
        Ok(id)
    }

    /// Ends every session.
    pub fn clear(&self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn is_valid(&self, id: &str) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        // Every open session is compared, in constant time.
        open.iter().fold(false, |found, (known, started)| {
            found | (eq(known.as_bytes(), id.as_bytes()) && started.elapsed() < SESSION_TTL)
        })
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// Checks a request's credentials against `auth`.
pub fn check(
    auth: &DashboardAuth,
    sessions: &Sessions,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(), AuthError> {
    if auth.is_open() {
        return Ok(());
    }
    if let Some(id) = session_cookie(headers) {
        if sessions.is_valid(id) {
            return Ok(());
        }
    }
    let header_value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    // In a URL only to open the page; the page trades it for a session.
    let query_token = uri.query().filter(|_| uri.path() == "/").and_then(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "access_token")
            .map(|(_, v)| v)
    });
    if let (Some(expected), Some(given)) = (&auth.token, query_token) {
        return accept(eq(expected.as_bytes(), given.as_bytes()));
    }
    let Some(value) = header_value else {
        return Err(AuthError::Missing);
    };
    let (scheme, credentials) = value.split_once(' ').ok_or(AuthError::Rejected)?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        let expected = auth.token.as_ref().ok_or(AuthError::Rejected)?;
        return accept(eq(expected.as_bytes(), credentials.as_bytes()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let (user, password) = auth.basic.as_ref().ok_or(AuthError::Rejected)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .map_err(|_| AuthError::Rejected)?;
        let expected = format!("{user}:{password}");
        return accept(eq(expected.as_bytes(), &decoded));
    }
    Err(AuthError::Rejected)
}

fn accept(ok: bool) -> Result<(), AuthError> {
    if ok {
        Ok(())
    } else {
        Err(AuthError::Rejected)
    }
}

fn eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `401` answer, with the challenge a browser understands.
pub fn refuse(auth: &DashboardAuth, error: AuthError) -> Response {
    let challenge = if auth.basic.is_some() {
        "Basic realm=\"millrace\", charset=\"UTF-8\""
    } else {
        "Bearer"
    };
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": error.to_string() })),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> DashboardAuth {
        DashboardAuth {
            token: Some("read-only-token-1".into()),
            basic: Some(("ops".into(), "secret-password".into())),
        }
    }

    fn with_header(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn token_basic_and_query_are_accepted() {
        let uri: Uri = "/api/v1/fleet".parse().unwrap();
        assert_eq!(
            check(
                &auth(),
                &Sessions::default(),
                &with_header("Bearer read-only-token-1"),
                &uri
            ),
            Ok(())
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:secret-password");
        assert_eq!(
            check(
                &auth(),
                &Sessions::default(),
                &with_header(&format!("Basic {basic}")),
                &uri
            ),
            Ok(())
        );
        let uri: Uri = "/?x=1&access_token=read-only-token-1".parse().unwrap();
        assert_eq!(
            check(&auth(), &Sessions::default(), &HeaderMap::new(), &uri),
            Ok(())
        );
        // Beyond the page, a token in the URL is refused.
        let uri: Uri = "/api/v1/events?access_token=read-only-token-1"
            .parse()
            .unwrap();
        assert_eq!(
            check(&auth(), &Sessions::default(), &HeaderMap::new(), &uri),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn wrong_or_missing_credentials_are_refused() {
        let uri: Uri = "/".parse().unwrap();
        assert_eq!(
            check(&auth(), &Sessions::default(), &HeaderMap::new(), &uri),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(
                &auth(),
                &Sessions::default(),
                &with_header("Bearer read-only-token-2"),
                &uri
            ),
            Err(AuthError::Rejected)
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:wrong");
        assert_eq!(
            check(
                &auth(),
                &Sessions::default(),
                &with_header(&format!("Basic {basic}")),
                &uri
            ),
            Err(AuthError::Rejected)
        );
        assert_eq!(
            check(
                &auth(),
                &Sessions::default(),
                &with_header("Basic !!!"),
                &uri
            ),
            Err(AuthError::Rejected)
        );
        assert_eq!(
            check(
                &DashboardAuth::default(),
                &Sessions::default(),
                &HeaderMap::new(),
                &uri
            ),
            Ok(())
        );
    }
}
