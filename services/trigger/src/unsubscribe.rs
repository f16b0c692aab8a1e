//! One-click unsubscribe (RFC 8058), what the `List-Unsubscribe` URL of each message leads to.
//!
//! `POST /unsubscribe/{token}` with the body `List-Unsubscribe=One-Click` suppresses the token's
//! address in the token's scope, with no session and nothing else asked: that is what mail
//! clients send when the reader presses their unsubscribe button. `GET` shows a page with a
//! button that makes the same POST, and changes nothing by itself: mail scanners follow links.
//! A token that is malformed, was not signed with `UNSUBSCRIBE_SECRET`, was altered or has
//! expired is refused (400 or 403), and nothing changes. Tokens never reach the logs.
//!
//! - this module: the routes' state, the token check, the body check and the pages;
//! - `routes::unsubscribe`: the routes, also served alone by the public entry (`public`).

use axum::extract::FromRef;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use haishin_shared::store::Store;
use haishin_shared::unsubscribe::{TokenClaims, TokenError, TokenKey};
use serde_json::json;

use crate::AppState;

/// What the unsubscribe routes need: the database and the key tokens are checked with (`None`
/// when `UNSUBSCRIBE_SECRET` is not set: the routes then answer 404).
#[derive(Clone, Debug)]
pub struct UnsubscribeState {
    pub store: Store,
    pub key: Option<TokenKey>,
}

impl FromRef<AppState> for UnsubscribeState {
    fn from_ref(state: &AppState) -> Self {
        Self { store: state.store.clone(), key: state.unsubscribe.clone() }
    }
}

/// Where an unsubscribe came from, kept as the suppression's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The mail client's one-click POST.
    OneClick,
    /// The button of the confirmation page.
    Page,
}

impl Via {
    pub fn source(self) -> &'static str {
        match self {
            Via::OneClick => "one-click",
            Via::Page => "unsubscribe-page",
        }
    }
}

/// An answer of the unsubscribe routes other than success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Token(TokenError),
    /// The POST body is not `List-Unsubscribe=One-Click`.
    Body,
    /// No key is set up on this deployment.
    Disabled,
    /// The database is down.
    Unavailable,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Token(TokenError::Malformed) | Refusal::Body => StatusCode::BAD_REQUEST,
            Refusal::Token(_) => StatusCode::FORBIDDEN,
            Refusal::Disabled => StatusCode::NOT_FOUND,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn text(&self) -> String {
        match self {
            Refusal::Token(err) => format!("{err}: nothing was changed"),
            Refusal::Body => {
                "a one-click unsubscribe posts the body List-Unsubscribe=One-Click (RFC 8058)".into()
            }
            Refusal::Disabled => "one-click unsubscribe is not set up on this deployment".into(),
            Refusal::Unavailable => "the unsubscribe could not be recorded now; please try again".into(),
        }
    }

    /// The answer: JSON for a caller that asks for it, a small page otherwise.
    pub fn answer(&self, headers: &HeaderMap) -> Response {
        let text = self.text();
        if wants_json(headers) {
            return (self.status(), axum::Json(json!({ "error": text }))).into_response();
        }
        let body = format!("<h1>This link cannot unsubscribe you</h1>\n<p>{}.</p>", escape(&text));
        page(self.status(), &body)
    }
}

impl UnsubscribeState {
    /// The claims of a token this deployment signed, if it has not expired.
    pub fn check(&self, token: &str) -> Result<TokenClaims, Refusal> {
        let key = self.key.as_ref().ok_or(Refusal::Disabled)?;
        key.verify(token, chrono::Utc::now()).map_err(Refusal::Token)
    }
}

/// Whether a POST body is a one-click unsubscribe (`application/x-www-form-urlencoded` or
/// `multipart/form-data`, as RFC 8058 allows), and where it came from.
pub fn one_click(headers: &HeaderMap, body: &[u8]) -> Option<Via> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.to_ascii_lowercase().starts_with("multipart/form-data") {
        let text = String::from_utf8_lossy(body);
        let named = |name: &str| text.contains(&format!("name=\"{name}\""));
        return (named("List-Unsubscribe") && text.contains("One-Click"))
            .then(|| if named("source") { Via::Page } else { Via::OneClick });
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    let has = |key: &str, value: &str| pairs.iter().any(|(k, v)| k == key && v == value);
    has("List-Unsubscribe", "One-Click")
        .then(|| if has("source", "page") { Via::Page } else { Via::OneClick })
}

fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    accept.contains("application/json") && !accept.contains("text/html")
}

/// What the reader is asked to confirm.
pub fn confirmation(claims: &TokenClaims) -> Response {
    let body = format!(
        "<h1>Unsubscribe?</h1>\n<p>Stop sending {what} to <b>{address}</b>.</p>\n\
         <form method=\"post\">\n<input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\n\
         <input type=\"hidden\" name=\"source\" value=\"page\">\n<button type=\"submit\">Unsubscribe</button>\n</form>",
        what = escape(&describe(&claims.scope)),
        address = escape(&masked(&claims.address)),
    );
    page(StatusCode::OK, &body)
}

/// What the reader sees once unsubscribed (a mail client's POST gets it too, and ignores it).
pub fn done(headers: &HeaderMap, claims: &TokenClaims) -> Response {
    if wants_json(headers) {
        return (StatusCode::OK, axum::Json(json!({ "unsubscribed": true, "scope": claims.scope })))
            .into_response();
    }
    let body = format!(
        "<h1>You are unsubscribed</h1>\n<p>No more {what} will be sent to <b>{address}</b>.</p>",
        what = escape(&describe(&claims.scope)),
        address = escape(&masked(&claims.address)),
    );
    page(StatusCode::OK, &body)
}

/// `global`: mail of any kind; `category:news`: the mail labelled so.
fn describe(scope: &str) -> String {
    match scope.split_once(':') {
        Some((key, value)) => format!("mail of {key} “{value}”"),
        None => "mail of any kind".to_owned(),
    }
}

/// The address with most of its local part hidden, for a page anyone holding the link may see.
fn masked(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page that is never cached, indexed, framed or sent on as a referrer (its URL holds a token).
fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>Unsubscribe</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}\
         button{{font-size:1rem;padding:.5rem 1.5rem}}</style></head>\n<body>\n{body}\n</body></html>\n"
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Option<Via> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        one_click(&headers, body.as_bytes())
    }

    #[test]
    fn the_one_click_body_is_recognised() {
        assert_eq!(form("List-Unsubscribe=One-Click"), Some(Via::OneClick));
        assert_eq!(form("List-Unsubscribe=One-Click&source=page"), Some(Via::Page));
        assert_eq!(form(""), None);
        assert_eq!(form("List-Unsubscribe=Yes"), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=x"));
        let body =
            "--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert_eq!(one_click(&headers, body.as_bytes()), Some(Via::OneClick));
    }

    #[test]
    fn the_page_shows_little_of_the_address_and_escapes_what_it_shows() {
        assert_eq!(masked("alice@example.com"), "a***@example.com");
        assert_eq!(escape("<b>\"x\" & 'y'</b>"), "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;");
        assert_eq!(describe("category:news"), "mail of category “news”");
        assert_eq!(describe("global"), "mail of any kind");
    }
}
