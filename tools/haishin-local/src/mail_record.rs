//! What a mail server recorded, when a scenario runs on SMTP or SES: the report's delivery
//! figures come from here, never from Haishin's database.
//!
//! - SMTP: the JSON-lines file that `tests/smtp_recorder.py` (aiosmtpd) writes, one line per
//!   message it accepted, with its envelope and what Python's email parser read in it.
//! - SES: moto's sent-message store (`GET /moto-api/data.json`, `ses.RawMessage`), one raw MIME
//!   message per `SendEmail`.
//!
//! Each message is checked as a recipient would see it: one per recipient, the subject rendered
//! with that recipient's parameters, a `multipart/alternative` or text body, and the RFC 8058
//! headers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// Where the server's record is.
#[derive(Debug, Clone)]
pub enum MailRecord {
    /// An SMTP recorder's file.
    SmtpFile(PathBuf),
    /// moto's API.
    Moto { endpoint: String },
}

/// One message as the server holds it.
#[derive(Debug, Clone)]
struct Received {
    recipient: String,
    subject: String,
    unsubscribe_headers: bool,
    /// The parser found no defect (SMTP only; moto keeps the raw message, read here by header).
    well_formed: bool,
    at: Option<DateTime<Utc>>,
}

/// What the server received, in the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MailServerReport {
    /// Where the figures come from.
    pub source: String,
    pub messages: u64,
    pub distinct_recipients: u64,
    /// Messages beyond the first to one recipient.
    pub duplicates: u64,
    /// Messages without `List-Unsubscribe` and `List-Unsubscribe-Post: List-Unsubscribe=One-Click`.
    pub without_unsubscribe_headers: u64,
    /// Messages whose subject is not the template rendered with their recipient's parameters.
    pub misrendered: u64,
    /// Messages the server's parser found defects in.
    pub malformed: u64,
    /// Distinct recipients per request.
    #[serde(skip)]
    pub per_request: BTreeMap<String, u64>,
    /// When each request's first and last messages arrived, where the server says.
    #[serde(skip)]
    pub first_at: BTreeMap<String, DateTime<Utc>>,
    #[serde(skip)]
    pub last_at: BTreeMap<String, DateTime<Utc>>,
}

impl MailServerReport {
    /// True when each recipient got one well-formed, rendered message with the headers.
    pub fn clean(&self) -> bool {
        self.duplicates == 0
            && self.without_unsubscribe_headers == 0
            && self.misrendered == 0
            && self.malformed == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "{} messages to {} recipients ({} duplicates, {} misrendered, {} malformed, {} without the RFC 8058 headers), from {}",
            self.messages,
            self.distinct_recipients,
            self.duplicates,
            self.misrendered,
            self.malformed,
            self.without_unsubscribe_headers,
            self.source
        )
    }
}

impl MailRecord {
    /// Reads the record and checks each message; `seed` names the scenario's requests.
    pub async fn read(&self, seed: u64) -> anyhow::Result<MailServerReport> {
        let (source, messages) = match self {
            MailRecord::SmtpFile(path) => {
                (format!("the SMTP server's record {}", path.display()), smtp_file(path)?)
            }
            MailRecord::Moto { endpoint } => {
                (format!("moto's sent messages at {endpoint}"), moto(endpoint).await?)
            }
        };
        let mut report = MailServerReport { source, messages: messages.len() as u64, ..Default::default() };
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for message in &messages {
            *seen.entry(message.recipient.clone()).or_default() += 1;
            report.without_unsubscribe_headers += u64::from(!message.unsubscribe_headers);
            report.malformed += u64::from(!message.well_formed);
            if expected_subject(&message.recipient).is_some_and(|s| s != message.subject) {
                report.misrendered += 1;
            }
            if let Some(request) = request_of(&message.recipient, seed) {
                if seen[&message.recipient] == 1 {
                    *report.per_request.entry(request.clone()).or_default() += 1;
                }
                if let Some(at) = message.at {
                    let first = report.first_at.entry(request.clone()).or_insert(at);
                    *first = (*first).min(at);
                    let last = report.last_at.entry(request).or_insert(at);
                    *last = (*last).max(at);
                }
            }
        }
        report.distinct_recipients = seen.len() as u64;
        report.duplicates = seen.values().map(|n| n - 1).sum();
        Ok(report)
    }
}

/// The request a scenario's recipient belongs to: `c{n}-user{i}@…` is campaign `n`,
/// `rt{e}-{k}@…` realtime event `e` (see `scenario::generate_audience` and `run::drive`).
fn request_of(address: &str, seed: u64) -> Option<String> {
    let local = address.split('@').next()?;
    if let Some(rest) = local.strip_prefix('c') {
        let (n, _) = rest.split_once("-user")?;
        return Some(format!("campaign-{}-{seed}", n.parse::<u32>().ok()?));
    }
    let (event, _) = local.strip_prefix("rt")?.split_once('-')?;
    Some(format!("event-{}-{seed}", event.parse::<u32>().ok()?))
}

/// The subject the scenario's template renders for a recipient: `{{name}}, something for you`
/// with the name the audience gives it (`User i` for campaign rows, `Fan k` for event recipients).
fn expected_subject(address: &str) -> Option<String> {
    let local = address.split('@').next()?;
    let name = if let Some((_, i)) = local.split_once("-user") {
        format!("User {}", i.parse::<u64>().ok()?)
    } else {
        format!("Fan {}", local.rsplit_once('-')?.1.parse::<u32>().ok()?)
    };
    Some(format!("{name}, something for you"))
}

fn smtp_file(path: &Path) -> anyhow::Result<Vec<Received>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line).context("a line of the SMTP record")?;
        let text = |key: &str| record[key].as_str().unwrap_or_default().to_owned();
        let unsubscribe_headers = record["list_unsubscribe"].is_string()
            && record["list_unsubscribe_post"] == "List-Unsubscribe=One-Click";
        let well_formed = record["defects"].as_array().is_some_and(|d| d.is_empty())
            && record["date_valid"] == true
            && record["message_id"].is_string();
        let at =
            record["received_at"].as_f64().and_then(|s| DateTime::from_timestamp_micros((s * 1e6) as i64));
        for recipient in record["rcpt_tos"].as_array().into_iter().flatten() {
            messages.push(Received {
                recipient: recipient.as_str().unwrap_or_default().to_owned(),
                subject: text("subject"),
                unsubscribe_headers,
                well_formed,
                at,
            });
        }
    }
    Ok(messages)
}

async fn moto(endpoint: &str) -> anyhow::Result<Vec<Received>> {
    let data: Value = reqwest::get(format!("{}/moto-api/data.json", endpoint.trim_end_matches('/')))
        .await
        .context("reading moto's sent messages")?
        .error_for_status()?
        .json()
        .await?;
    let mut messages = Vec::new();
    for sent in data["ses"]["RawMessage"].as_array().into_iter().flatten() {
        let raw = sent["raw_data"].as_str().unwrap_or_default();
        let headers = raw.split("\r\n\r\n").next().unwrap_or_default();
        let header = |name: &str| {
            headers
                .split("\r\n")
                .find_map(|line| line.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
                .map(|(_, v)| v.trim().to_owned())
        };
        let unsubscribe_headers = header("List-Unsubscribe").is_some()
            && header("List-Unsubscribe-Post").as_deref() == Some("List-Unsubscribe=One-Click");
        let well_formed =
            header("Message-ID").is_some() && header("Date").is_some() && header("MIME-Version").is_some();
        // moto lists the To header's addresses after the envelope's: one recipient once.
        let mut to: Vec<&str> =
            sent["destinations"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        to.sort_unstable();
        to.dedup();
        for recipient in to {
            messages.push(Received {
                recipient: recipient.to_owned(),
                subject: header("Subject").unwrap_or_default(),
                unsubscribe_headers,
                well_formed,
                at: None,
            });
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_names_its_request_and_its_subject() {
        assert_eq!(request_of("c0-user12@example.com", 7).as_deref(), Some("campaign-0-7"));
        assert_eq!(request_of("rt3-1@example.com", 7).as_deref(), Some("event-3-7"));
        assert_eq!(request_of("someone@example.com", 7), None);
        assert_eq!(expected_subject("c1-user12@example.com").as_deref(), Some("User 12, something for you"));
        assert_eq!(expected_subject("rt3-2@example.com").as_deref(), Some("Fan 2, something for you"));
    }

    #[test]
    fn the_smtp_record_is_read_per_recipient() {
        let path = std::env::temp_dir().join(format!("haishin-mail-record-{}.jsonl", std::process::id()));
        let good = serde_json::json!({"rcpt_tos": ["c0-user1@example.com"], "subject": "User 1, something for you",
            "list_unsubscribe": "<https://x/u/t>", "list_unsubscribe_post": "List-Unsubscribe=One-Click",
            "defects": [], "date_valid": true, "message_id": "<a@x>", "received_at": 1.5});
        let twice = serde_json::json!({"rcpt_tos": ["c0-user1@example.com"], "subject": "User 9, something for you",
            "defects": ["bad"], "date_valid": true, "message_id": "<b@x>"});
        std::fs::write(&path, format!("{good}\n{twice}\n")).unwrap();
        let report = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(MailRecord::SmtpFile(path.clone()).read(0))
            .unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!((report.messages, report.distinct_recipients, report.duplicates), (2, 1, 1));
        assert_eq!((report.misrendered, report.malformed, report.without_unsubscribe_headers), (1, 1, 1));
        assert_eq!(report.per_request["campaign-0-0"], 1);
        assert!(!report.clean());
    }
}
