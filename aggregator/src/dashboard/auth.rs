//! Read access to the dashboard: a bearer token, HTTP basic auth, or open.
//!
//! A token may also come as `?access_token=` because a browser's
//! `EventSource` cannot set headers. Secrets are compared in constant time.

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

/// Checks a request's credentials against `auth`.
pub fn check(auth: &DashboardAuth, headers: &HeaderMap, uri: &Uri) -> Result<(), AuthError> {
    if auth.is_open() {
        return Ok(());
    }
    let header_value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let query_token = uri.query().and_then(|q| {
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
            check(&auth(), &with_header("Bearer read-only-token-1"), &uri),
            Ok(())
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:secret-password");
        assert_eq!(
            check(&auth(), &with_header(&format!("Basic {basic}")), &uri),
            Ok(())
        );
        let uri: Uri = "/api/v1/events?x=1&access_token=read-only-token-1"
            .parse()
            .unwrap();
        assert_eq!(check(&auth(), &HeaderMap::new(), &uri), Ok(()));
    }

    #[test]
    fn wrong_or_missing_credentials_are_refused() {
        let uri: Uri = "/".parse().unwrap();
        assert_eq!(
            check(&auth(), &HeaderMap::new(), &uri),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(&auth(), &with_header("Bearer read-only-token-2"), &uri),
            Err(AuthError::Rejected)
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:wrong");
        assert_eq!(
            check(&auth(), &with_header(&format!("Basic {basic}")), &uri),
            Err(AuthError::Rejected)
        );
        assert_eq!(
            check(&auth(), &with_header("Basic !!!"), &uri),
            Err(AuthError::Rejected)
        );
        assert_eq!(
            check(&DashboardAuth::default(), &HeaderMap::new(), &uri),
            Ok(())
        );
    }
}
