//! Forwarding to the service: the request as it came, the answer as it goes, bodies streamed.

use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

use crate::Error;

/// Headers that belong to one connection and are not forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The service behind a front door, and the client that reaches it.
#[derive(Debug)]
pub(super) struct Backend {
    /// The service's URL without a trailing slash.
    url: String,
    http: reqwest::Client,
    timeout: Duration,
}

impl Backend {
    /// A backend at `url` (http or https), with requests cut off after `timeout`.
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        let parsed = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Error::InvalidArgument(format!("backend {url:?} is not an http(s) URL")))?;
        // A proxy passes redirects on rather than following them.
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self { url: parsed.as_str().trim_end_matches('/').to_owned(), http, timeout })
    }

    /// Sends `request` on, path, query, method, headers and body as they are (but for
    /// hop-by-hop headers), and streams the answer back; the status to answer when the service
    /// cannot be reached (503), breaks off (502) or is too slow (504).
    pub(super) async fn send(&self, request: Request) -> Result<Response, StatusCode> {
        let (parts, body) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        let mut outgoing = self
            .http
            .request(parts.method, format!("{}{path_and_query}", self.url))
            .headers(headers)
            .timeout(self.timeout);
        if !body.is_end_stream() {
            outgoing = outgoing.body(reqwest::Body::wrap_stream(body.into_data_stream()));
        }
        let response = outgoing.send().await.map_err(|err| {
            let status = if err.is_connect() {
                StatusCode::SERVICE_UNAVAILABLE
            } else if err.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            tracing::debug!(backend = self.url, error = %err, status = status.as_u16(), "Service did not answer.");
            status
        })?;
        let status = response.status();
        let mut headers = response.headers().clone();
        strip_hop_by_hop(&mut headers);
        let mut answer = Response::new(Body::from_stream(response.bytes_stream()));
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}

/// An error page in the shape of Google's front end: a short HTML document.
pub(super) fn error_page(status: StatusCode, message: &str) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = message.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let html = format!(
        "<html><head><meta http-equiv=\"content-type\" content=\"text/html;charset=utf-8\">\n\
         <title>{code} {reason}</title></head>\n\
         <body text=#000000 bgcolor=#ffffff>\n<h1>Error: {reason}</h1>\n<h2>{message}</h2>\n<h2></h2>\n\
         </body></html>\n",
        code = status.as_u16(),
    );
    let mut page = Response::new(Body::from(html));
    *page.status_mut() = status;
    page.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=UTF-8"));
    page
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut names: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    names.extend(HOP_BY_HOP.iter().map(|name| HeaderName::from_static(name)));
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "5"),
            ("x-private", "1"),
            ("x-kept", "1"),
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }

        strip_hop_by_hop(&mut headers);

        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }
}
