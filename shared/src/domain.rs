//! The units of work: delivery requests, their audiences and templates, and chunks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Inline audiences are meant for realtime events; larger audiences belong in Cloud Storage.
pub const MAX_INLINE_RECIPIENTS: usize = 10_000;
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

/// The class of a delivery request: realtime events overtake batch campaigns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Realtime,
    Batch,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Realtime => "realtime",
            Class::Batch => "batch",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "realtime" => Ok(Class::Realtime),
            "batch" => Ok(Class::Batch),
            other => Err(format!("unknown class `{other}`")),
        }
    }
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BigqueryAudience {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

/// A delivery request as the marketing platform sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryRequest {
    /// The caller's idempotency key: the same id twice makes one request.
    pub id: String,
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
    pub id: Option<String>,
    pub reason: String,
}

impl DeliveryRequest {
    /// Parses and validates a request body. A rejection keeps the id when one could be read.
    pub fn parse(body: &[u8]) -> Result<Self, Rejection> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Rejection { id: None, reason: format!("request is not valid JSON: {e}") })?;
        let id = value.get("id").and_then(Value::as_str).filter(|id| valid_id(id).is_ok()).map(str::to_owned);
        let request: DeliveryRequest = serde_json::from_value(value)
            .map_err(|e| Rejection { id: id.clone(), reason: format!("invalid request: {e}") })?;
        request.validate().map_err(|reason| Rejection { id, reason })?;
        Ok(request)
    }

    /// Checks what serde cannot: sizes, ranges and consistency.
    pub fn validate(&self) -> Result<(), String> {
        valid_id(&self.id)?;
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
        match &self.audience {
            Audience::Inline(list) if list.is_empty() => Err("inline audience is empty".into()),
            Audience::Inline(list) if list.len() > MAX_INLINE_RECIPIENTS => Err(format!(
                "inline audience has {} recipients, more than {MAX_INLINE_RECIPIENTS}: put it in Cloud Storage",
                list.len()
            )),
            Audience::Gcs(gcs) if gcs.uris.is_empty() => Err("gcs audience names no uris".into()),
            Audience::Gcs(gcs) => gcs.uris.iter().try_for_each(|uri| GcsUri::parse(uri).map(drop)),
            Audience::Bigquery(_) => {
                Err("bigquery audiences are not supported by this deployment: export to Cloud Storage and use a gcs audience".into())
            }
            Audience::Inline(_) => Ok(()),
        }
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

macro_rules! states {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok($name::$variant),)+ other => Err(format!("unknown state `{other}`")) }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

states! {
    /// Where a request stands: `received → preparing → dispatching → completed | failed | expired | cancelled`,
    /// or `rejected` when it never entered the pipeline.
    RequestState {
        Received => "received",
        Preparing => "preparing",
        Dispatching => "dispatching",
        Completed => "completed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
        Rejected => "rejected",
    }
}

impl RequestState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Expired | Self::Cancelled | Self::Rejected)
    }
}

states! {
    /// Where a chunk stands: `pending → queued → uploading → uploaded → sending → sent → completed`,
    /// or `failed`, `expired`, `cancelled`, and `unknown` where a send's outcome could not be established.
    ChunkState {
        Pending => "pending",
        Queued => "queued",
        Uploading => "uploading",
        Uploaded => "uploaded",
        Sending => "sending",
        Sent => "sent",
        Completed => "completed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
        Unknown => "unknown",
    }
}

impl ChunkState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Expired | Self::Cancelled | Self::Unknown)
    }
}

/// The deterministic id of a request's `seq`-th chunk.
pub fn chunk_id(request_id: &str, seq: u32) -> String {
    format!("{request_id}~{seq:06}")
}

/// The Cloud Storage object that holds a chunk's recipients (NDJSON).
pub fn chunk_object(request_id: &str, seq: u32) -> String {
    format!("requests/{request_id}/chunks/{seq:06}.ndjson")
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
        assert_eq!(err.id.as_deref(), Some("r-2"));
        assert!(err.reason.contains("urgent"), "{}", err.reason);
    }

    #[test]
    fn a_request_without_audience_names_the_missing_field() {
        let err = parse(&format!(r#"{{"id":"r-3","class":"batch",{TEMPLATE}}}"#)).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("r-3"));
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
    fn an_unusable_id_is_not_kept() {
        let err = parse(r#"{"id":"has space","class":"batch"}"#).unwrap_err();
        assert_eq!(err.id, None);
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in ChunkState::ALL {
            assert_eq!(s.as_str().parse::<ChunkState>().unwrap(), *s);
        }
        for s in RequestState::ALL {
            assert_eq!(s.as_str().parse::<RequestState>().unwrap(), *s);
        }
    }
}
