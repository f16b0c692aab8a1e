//! Bounces and complaints reported by the mail provider after a message was handed over.
//!
//! `POST /webhooks/ses` (Amazon SES through SNS) and `POST /webhooks/sendgrid` (SendGrid's Event
//! Webhook) take the provider's reports once their signature is verified; anything unsigned,
//! wrongly signed or from an unexpected topic is refused with 401 and changes nothing. Each
//! bounce or complaint is kept once per provider event id in `feedback` (a webhook delivered
//! twice counts once). A new hard bounce suppresses the address everywhere (`bounced`), a new
//! complaint too (`complained`); a soft bounce is recorded only. The request's status and its
//! BigQuery log count them, and the kill switch weighs them.
//!
//! - this module: the settings, the routes' state and [`record`];
//! - [`sns`]: SNS message verification and SES notifications;
//! - [`sendgrid`]: SendGrid's signature and events;
//! - `routes::feedback`: the routes, served by the trigger and by the public entry.

pub mod sendgrid;
pub mod sns;

use std::sync::Arc;

use axum::extract::FromRef;
use chrono::{DateTime, Utc};
use haishin_shared::store::{Result, Store};
use haishin_shared::suppression::{GLOBAL, address_key};

use crate::AppState;
use crate::suppressions::{self, Reason};
use sendgrid::SendGridKey;
use sns::SnsVerifier;

/// Where the provider's webhooks are accepted from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FeedbackArgs {
    /// SNS topics whose SES notifications `POST /webhooks/ses` accepts (comma-separated ARNs).
    /// Unset: the route answers 404.
    #[arg(long, env = "SNS_TOPIC_ARNS", value_delimiter = ',')]
    pub sns_topic_arns: Vec<String>,
    /// Where SNS signing certificates and subscription URLs may be fetched from (default: only
    /// `https://sns.<region>.amazonaws.com`); for a local stand-in of SNS.
    #[arg(long, env = "SNS_CERTIFICATE_ORIGIN")]
    pub sns_certificate_origin: Option<String>,
    /// SendGrid's Event Webhook verification key (base64 DER, as SendGrid shows it, or PEM).
    /// Unset: `POST /webhooks/sendgrid` answers 404.
    #[arg(long, env = "SENDGRID_WEBHOOK_PUBLIC_KEY")]
    pub sendgrid_webhook_public_key: Option<String>,
}

/// What the feedback routes need.
#[derive(Debug, Clone)]
pub struct FeedbackState {
    pub store: Store,
    pub sns: Option<Arc<SnsVerifier>>,
    pub sendgrid: Option<SendGridKey>,
}

impl FeedbackState {
    /// Checks the settings; a key that cannot be read stops the service from starting.
    pub fn new(store: Store, args: &FeedbackArgs) -> anyhow::Result<Self> {
        let topics: Vec<String> =
            args.sns_topic_arns.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
        let sns = if topics.is_empty() {
            None
        } else {
            Some(Arc::new(SnsVerifier::new(topics, args.sns_certificate_origin.as_deref())?))
        };
        let sendgrid = args
            .sendgrid_webhook_public_key
            .as_deref()
            .map(SendGridKey::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(Self { store, sns, sendgrid })
    }
}

impl FromRef<AppState> for FeedbackState {
    fn from_ref(state: &AppState) -> Self {
        state.feedback.clone()
    }
}

/// What a report says of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The address does not exist: suppressed.
    Bounce,
    /// Refused for now (mailbox full, blocked): recorded only.
    SoftBounce,
    /// Marked as spam: suppressed.
    Complaint,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Bounce => "bounce",
            Kind::SoftBounce => "soft_bounce",
            Kind::Complaint => "complaint",
        }
    }

    fn suppression(self) -> Option<Reason> {
        match self {
            Kind::Bounce => Some(Reason::Bounced),
            Kind::SoftBounce => None,
            Kind::Complaint => Some(Reason::Complained),
        }
    }
}

/// One bounce or complaint of one recipient.
#[derive(Debug, Clone)]
pub struct Feedback {
    /// The provider's id of the event: the same report delivered twice has the same id.
    pub event_id: String,
    pub kind: Kind,
    /// The provider's classification or reason, shortened.
    pub detail: Option<String>,
    /// The request the message belonged to, when the provider passed it back.
    pub request_id: Option<String>,
    pub email: String,
    pub occurred_at: DateTime<Utc>,
}

/// Why a webhook post was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not signed, wrongly signed, or not from an accepted sender: 401.
    Unauthorized(String),
    /// Signed but unreadable: 400.
    Malformed(String),
    /// The route is not configured on this deployment: 404.
    NotConfigured(&'static str),
    /// Something it depends on is down (the database, SNS's certificate); the provider retries: 503.
    Unavailable(String),
}

/// What [`record`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recorded {
    /// Reports not seen before.
    pub recorded: u64,
    /// Reports seen before (a redelivery), left as they were.
    pub repeated: u64,
    /// Suppressions added.
    pub suppressed: u64,
}

/// Keeps each report of `provider` (`ses`, `sendgrid`) once and suppresses the addresses of new
/// hard bounces and complaints, with the provider as their source, all in one transaction: one
/// insert of every report, then one suppression insert per reason.
pub async fn record(store: &Store, provider: &str, reports: &[Feedback]) -> Result<Recorded> {
    let event_ids: Vec<String> = reports.iter().map(|r| r.event_id.chars().take(300).collect()).collect();
    let kinds: Vec<&str> = reports.iter().map(|r| r.kind.as_str()).collect();
    let details: Vec<Option<&str>> = reports.iter().map(|r| r.detail.as_deref()).collect();
    let request_ids: Vec<Option<String>> =
        reports.iter().map(|r| r.request_id.as_deref().map(|id| id.chars().take(200).collect())).collect();
    let addresses: Vec<String> = reports.iter().map(|r| address_key(&r.email)).collect();
    let occurred: Vec<DateTime<Utc>> = reports.iter().map(|r| r.occurred_at).collect();
    let mut tx = store.pool().begin().await?;
    // The reports not seen before, as (kind, address).
    let new: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO feedback (provider, event_id, kind, detail, request_id, address, occurred_at)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                 $7::timestamptz[])
         ON CONFLICT (provider, event_id) DO NOTHING RETURNING kind, address",
    )
    .bind(provider)
    .bind(&event_ids)
    .bind(&kinds)
    .bind(&details)
    .bind(&request_ids)
    .bind(&addresses)
    .bind(&occurred)
    .fetch_all(&mut *tx)
    .await?;
    let mut suppressed = 0;
    for kind in [Kind::Bounce, Kind::Complaint] {
        let Some(reason) = kind.suppression() else { continue };
        let of_kind: Vec<String> =
            new.iter().filter(|(k, _)| k == kind.as_str()).map(|(_, address)| address.clone()).collect();
        suppressed += suppressions::add_many(&mut *tx, &of_kind, GLOBAL, reason, provider).await?;
    }
    tx.commit().await?;
    let recorded = new.len() as u64;
    Ok(Recorded { recorded, repeated: reports.len() as u64 - recorded, suppressed })
}
