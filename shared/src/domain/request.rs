//! A delivery request as the marketing platform sends it: template, audience, class and timing.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::bigquery::BigqueryAudience;
use super::{Class, RequestId};

/// Inline audiences are meant for realtime events; larger audiences belong in Cloud Storage.
pub const MAX_INLINE_RECIPIENTS: usize = 10_000;
/// Largest request body accepted, in bytes: Pub/Sub's limit on a message's data, so that whatever
/// can be published can also be posted to the API. 10,000 inline recipients with a few hundred
/// bytes of parameters each fit.
pub const MAX_REQUEST_BYTES: usize = 10_000_000;
/// Longest accepted request id (the caller's idempotency key).
pub const MAX_ID_LEN: usize = 200;

/// One recipient of a delivery: an address plus the parameters its template uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    pub email: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
}

/// What a delivery sends: a template stored at the ESP, or the content itself
/// with `{{placeholders}}` rendered per recipient by the ESP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Template {
    Stored {
        id: String,
    },
    Inline {
        subject: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        html: Option<String>,
    },
}

/// Who receives a delivery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    /// Recipients listed in the request itself (realtime events).
    Inline(Vec<Recipient>),
    /// CSV or NDJSON files in Cloud Storage; a CSV header names `email` and the parameter columns.
    Gcs(GcsAudience),
    /// A BigQuery query or table, exported to Cloud Storage and streamed.
    Bigquery(BigqueryAudience),
}

impl Audience {
    pub fn kind(&self) -> &'static str {
        match self {
            Audience::Inline(_) => "inline",
            Audience::Gcs(_) => "gcs",
            Audience::Bigquery(_) => "bigquery",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcsAudience {
    /// `gs://bucket/object` URIs, read in order.
    pub uris: Vec<String>,
    /// File format; guessed from each object's extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Ndjson,
}

/// A delivery request as the marketing platform sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryRequest {
    /// The caller's idempotency key: the same id twice makes one request.
    pub id: RequestId,
    pub class: Class,
    /// Higher first.
    #[serde(default)]
    pub priority: i32,
    pub template: Template,
    pub audience: Audience,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Why a request was refused. The text is meant for the request's sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    /// The request's id, when the message carried a usable one.
    pub id: Option<RequestId>,
    pub reason: String,
}

impl DeliveryRequest {
    /// Parses and validates a request body. A rejection keeps the id when one could be read.
    pub fn parse(body: &[u8]) -> Result<Self, Rejection> {
        if body.len() > MAX_REQUEST_BYTES {
            #[derive(Deserialize)]
            struct IdOnly {
                id: Option<String>,
            }
            let id = serde_json::from_slice::<IdOnly>(body)
                .ok()
                .and_then(|r| r.id)
                .filter(|id| valid_id(id).is_ok());
            return Err(Rejection {
                id: id.map(RequestId::from),
                reason: format!(
                    "request is {} bytes, more than the limit of {MAX_REQUEST_BYTES}",
                    body.len()
                ),
            });
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Rejection { id: None, reason: format!("request is not valid JSON: {e}") })?;
        let id =
            value.get("id").and_then(Value::as_str).filter(|id| valid_id(id).is_ok()).map(RequestId::from);
        if let Some(path) = nul_at(&value, &mut String::new()) {
            return Err(Rejection {
                id,
                reason: format!("{path} holds a NUL character (\\u0000), which no text field may hold"),
            });
        }
        let request: DeliveryRequest = serde_json::from_value(value)
            .map_err(|e| Rejection { id: id.clone(), reason: format!("invalid request: {e}") })?;
        request.validate().map_err(|reason| Rejection { id, reason })?;
        Ok(request)
    }

    /// Checks what serde cannot: sizes, ranges and consistency.
    pub fn validate(&self) -> Result<(), String> {
        valid_id(self.id.as_str())?;
        if let (Some(nb), Some(dl)) = (self.not_before, self.deadline)
            && dl <= nb
        {
            return Err("deadline must be later than not_before".into());
        }
        match &self.template {
            Template::Stored { id } if id.trim().is_empty() => {
                return Err("template id is empty".into());
            }
            Template::Inline { subject, text, html } => {
                if subject.trim().is_empty() {
                    return Err("template subject is empty".into());
                }
                if text.is_none() && html.is_none() {
                    return Err("template needs a text or an html body".into());
                }
            }
            Template::Stored { .. } => {}
        }
        let placeholders = super::template::placeholders(&self.template)?;
        if let Audience::Inline(list) = &self.audience {
            for (i, recipient) in list.iter().enumerate() {
                if let Some(name) =
                    super::template::missing_value(&self.template, &placeholders, &recipient.params)
                {
                    return Err(format!(
                        "the template uses `{name}`, which recipient {i} of the inline audience has no value for \
                         (give it in params, or a default in the template: {{{{ {name} | default('') }}}})"
                    ));
                }
            }
        }
        match &self.audience {
            Audience::Inline(list) if list.is_empty() => Err("inline audience is empty".into()),
            Audience::Inline(list) if list.len() > MAX_INLINE_RECIPIENTS => Err(format!(
                "inline audience has {} recipients, more than {MAX_INLINE_RECIPIENTS}: put it in Cloud Storage",
                list.len()
            )),
            Audience::Gcs(gcs) if gcs.uris.is_empty() => Err("gcs audience names no uris".into()),
            Audience::Gcs(gcs) => gcs.uris.iter().try_for_each(|uri| GcsUri::parse(uri).map(drop)),
            Audience::Bigquery(bigquery) => bigquery.validate(),
            Audience::Inline(_) => Ok(()),
        }
    }
}

/// The JSON pointer of the first string (or key) holding a NUL character, which PostgreSQL
/// cannot store in text.
fn nul_at(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(if path.is_empty() { "/".into() } else { path.clone() }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("/{i}"));
            let found = nul_at(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('/');
            path.push_str(&key.replace('~', "~0").replace('/', "~1"));
            let found = if key.contains('\0') { Some(path.clone()) } else { nul_at(item, path) };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("id is longer than {MAX_ID_LEN} characters"));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err("id may hold only letters, digits and - _ . :".into());
    }
    Ok(())
}

/// A `gs://bucket/object` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsUri {
    pub bucket: String,
    pub object: String,
}

impl GcsUri {
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri.strip_prefix("gs://").ok_or_else(|| format!("`{uri}` is not a gs:// uri"))?;
        match rest.split_once('/') {
            Some((bucket, object)) if !bucket.is_empty() && !object.is_empty() => {
                Ok(Self { bucket: bucket.to_owned(), object: object.to_owned() })
            }
            _ => Err(format!("`{uri}` names no object")),
        }
    }
}

impl fmt::Display for GcsUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gs://{}/{}", self.bucket, self.object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DeliveryRequest, Rejection> {
        DeliveryRequest::parse(json.as_bytes())
    }

    const TEMPLATE: &str = r#""template":{"subject":"Hi {{name}}","text":"Hello"}"#;

    #[test]
    fn a_well_formed_realtime_request_parses() {
        let r = parse(&format!(
            r#"{{"id":"evt-1","class":"realtime","priority":3,{TEMPLATE},
               "audience":{{"inline":[{{"email":"a@example.com","params":{{"name":"A"}}}}]}},
               "labels":{{"campaign":"restock"}}}}"#
        ))
        .unwrap();
        assert_eq!(r.class, Class::Realtime);
        assert_eq!(r.priority, 3);
        assert!(matches!(r.audience, Audience::Inline(ref l) if l.len() == 1));
    }

    #[test]
    fn bad_json_is_rejected_without_an_id() {
        let err = parse("{not json").unwrap_err();
        assert_eq!(err.id, None);
        assert!(err.reason.contains("not valid JSON"), "{}", err.reason);
    }

    #[test]
    fn unknown_class_is_rejected_with_its_id() {
        let err = parse(&format!(
            r#"{{"id":"r-2","class":"urgent",{TEMPLATE},"audience":{{"inline":[{{"email":"a@example.com"}}]}}}}"#
        ))
        .unwrap_err();
        assert_eq!(err.id.as_ref().map(RequestId::as_str), Some("r-2"));
        assert!(err.reason.contains("urgent"), "{}", err.reason);
    }

    #[test]
    fn a_request_without_audience_names_the_missing_field() {
        let err = parse(&format!(r#"{{"id":"r-3","class":"batch",{TEMPLATE}}}"#)).unwrap_err();
        assert_eq!(err.id.as_ref().map(RequestId::as_str), Some("r-3"));
        assert!(err.reason.contains("audience"), "{}", err.reason);
    }

    #[test]
    fn deadline_before_start_is_rejected() {
        let err = parse(&format!(
            r#"{{"id":"r-4","class":"batch",{TEMPLATE},"audience":{{"gcs":{{"uris":["gs://b/a.csv"]}}}},
               "not_before":"2026-01-02T00:00:00Z","deadline":"2026-01-01T00:00:00Z"}}"#
        ))
        .unwrap_err();
        assert!(err.reason.contains("deadline"), "{}", err.reason);
    }

    #[test]
    fn gcs_uris_must_name_an_object() {
        let err = parse(&format!(
            r#"{{"id":"r-5","class":"batch",{TEMPLATE},"audience":{{"gcs":{{"uris":["gs://bucket-only"]}}}}}}"#
        ))
        .unwrap_err();
        assert!(err.reason.contains("names no object"), "{}", err.reason);
    }

    #[test]
    fn text_that_postgresql_cannot_store_is_rejected_with_its_place() {
        let err = parse(&format!(
            r#"{{"id":"r-6","class":"batch",{TEMPLATE},"audience":{{"inline":[{{"email":"a@example.com","params":{{"name":"A\u0000B"}}}}]}}}}"#
        ))
        .unwrap_err();
        assert_eq!(err.id.as_ref().map(RequestId::as_str), Some("r-6"));
        assert!(err.reason.contains("/audience/inline/0/params/name"), "{}", err.reason);
        let lone_surrogate =
            parse(r#"{"id":"r-7","class":"batch","template":{"subject":"\ud800"}}"#).unwrap_err();
        assert!(lone_surrogate.reason.contains("not valid JSON"), "{}", lone_surrogate.reason);
    }

    #[test]
    fn a_body_over_the_limit_is_rejected_naming_the_limit() {
        let err = parse(&" ".repeat(MAX_REQUEST_BYTES + 1)).unwrap_err();
        assert!(err.reason.contains("10000000"), "{}", err.reason);
    }

    #[test]
    fn an_unusable_id_is_not_kept() {
        let err = parse(r#"{"id":"has space","class":"batch"}"#).unwrap_err();
        assert_eq!(err.id, None);
    }
}
