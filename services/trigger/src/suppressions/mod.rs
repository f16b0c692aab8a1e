//! The suppression list as the API and the unsubscribe endpoint change it: one entry per address
//! and scope, kept under the address's key (see `haishin_shared::suppression`), with why and where
//! from. Reading it when chunks are built and sent is `haishin_shared::suppression`'s.
//!
//! - this module: what an entry is, checking what a caller gives, and the reads and writes;
//! - [`import`]: addresses read from files in Cloud Storage, added in batches.

pub mod import;

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use haishin_shared::store::{Result, Store};
use haishin_shared::suppression::{GLOBAL, address_key};
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder};

use crate::intake::records::storable;
use crate::prepare::recipient::valid_email;

/// Suppressions one page holds when the caller does not say.
pub const DEFAULT_PAGE: i64 = 50;
/// Most suppressions one page holds.
pub const MAX_PAGE: i64 = 500;
/// Longest scope accepted, in bytes.
const MAX_SCOPE: usize = 500;
/// Longest source kept, in characters.
const MAX_SOURCE: usize = 200;

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The recipient unsubscribed (the one-click link, or through the caller).
    Unsubscribed,
    Bounced,
    Complained,
    /// Put by an operator.
    Manual,
    /// Read from a file by `POST /v1/suppressions:import`.
    Imported,
}

impl Reason {
    pub const ALL: [Reason; 5] =
        [Reason::Unsubscribed, Reason::Bounced, Reason::Complained, Reason::Manual, Reason::Imported];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unsubscribed => "unsubscribed",
            Reason::Bounced => "bounced",
            Reason::Complained => "complained",
            Reason::Manual => "manual",
            Reason::Imported => "imported",
        }
    }
}

impl FromStr for Reason {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            format!("reason `{text}` is not one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One suppression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suppression {
    /// The address's key: case folded, the domain in IDNA ASCII form.
    pub address: String,
    pub scope: String,
    pub reason: Reason,
    pub source: String,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    address: String,
    scope: String,
    reason: String,
    source: String,
    created_at: DateTime<Utc>,
}

impl Row {
    fn entry(self) -> Suppression {
        Suppression {
            reason: self.reason.parse().unwrap_or(Reason::Manual),
            address: self.address,
            scope: self.scope,
            source: self.source,
            created_at: self.created_at,
        }
    }
}

/// An address as a caller gives it: its key when it is an address at all.
pub fn address(text: &str) -> std::result::Result<String, String> {
    let text = text.trim();
    if valid_email(text) {
        Ok(address_key(text))
    } else {
        Err(format!("`{}` is not an email address", text.chars().take(300).collect::<String>()))
    }
}

/// A scope as a caller gives it: `global`, or a label `key:value` with a key.
pub fn scope(text: &str) -> std::result::Result<String, String> {
    let valid = text == GLOBAL || text.split_once(':').is_some_and(|(key, _)| !key.is_empty());
    if !valid {
        return Err(format!("scope `{text}` is neither `global` nor a label `key:value`"));
    }
    if text.len() > MAX_SCOPE || text.contains('\0') {
        return Err(format!("scope is longer than {MAX_SCOPE} bytes or holds a NUL character"));
    }
    Ok(text.to_owned())
}

/// A source as a caller gives it, kept storable and short.
pub fn source(text: &str) -> String {
    storable(&text.chars().take(MAX_SOURCE).collect::<String>())
}

/// Suppresses `address` (a key) in `scope`, or changes the reason and source of the suppression
/// already there. True when it is new.
pub async fn put(
    store: &Store,
    address: &str,
    scope: &str,
    reason: Reason,
    source: &str,
) -> Result<(bool, Suppression)> {
    #[derive(sqlx::FromRow)]
    struct Put {
        created: bool,
        #[sqlx(flatten)]
        row: Row,
    }
    let put: Put = sqlx::query_as(
        "INSERT INTO suppressions (address, scope, reason, source) VALUES ($1, $2, $3, $4)
         ON CONFLICT (address, scope) DO UPDATE SET reason = EXCLUDED.reason, source = EXCLUDED.source
         RETURNING (xmax = 0) AS created, address, scope, reason, source, created_at",
    )
    .bind(address)
    .bind(scope)
    .bind(reason.as_str())
    .bind(source)
    .fetch_one(store.pool())
    .await?;
    Ok((put.created, put.row.entry()))
}

/// Suppresses each of `addresses` (keys) in `scope`, leaving suppressions already there as they
/// are. Returns how many are new.
pub async fn add_many<'e>(
    db: impl sqlx::PgExecutor<'e>,
    addresses: &[String],
    scope: &str,
    reason: Reason,
    source: &str,
) -> Result<u64> {
    if addresses.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "INSERT INTO suppressions (address, scope, reason, source)
         SELECT address, $2, $3, $4 FROM unnest($1::text[]) AS address
         ON CONFLICT (address, scope) DO NOTHING",
    )
    .bind(addresses)
    .bind(scope)
    .bind(reason.as_str())
    .bind(source)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Every suppression of `address` (a key), one per scope.
pub async fn of_address(store: &Store, address: &str) -> Result<Vec<Suppression>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT address, scope, reason, source, created_at FROM suppressions WHERE address = $1 ORDER BY scope",
    )
    .bind(address)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(Row::entry).collect())
}

/// Lifts the suppression of `address` (a key) in `scope`. True when there was one.
pub async fn delete(store: &Store, address: &str, scope: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM suppressions WHERE address = $1 AND scope = $2")
        .bind(address)
        .bind(scope)
        .execute(store.pool())
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Which suppressions to list; `None` filters nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub scope: Option<String>,
    pub reason: Option<Reason>,
}

/// A page of suppressions, newest first, and the token of the next one.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub suppressions: Vec<Suppression>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Where a page starts: after this suppression, in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    created_at: DateTime<Utc>,
    address: String,
    scope: String,
}

impl Cursor {
    /// Reads a `next_page_token`; `None` for one this service never wrote.
    pub fn parse(token: &str) -> Option<Self> {
        let json = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (micros, address, scope): (i64, String, String) = serde_json::from_slice(&json).ok()?;
        Some(Self { created_at: DateTime::from_timestamp_micros(micros)?, address, scope })
    }

    /// The token: the time in microseconds (the database's precision), the address and the scope,
    /// as base64url JSON (addresses and scopes hold any character).
    fn token(&self) -> String {
        let json = serde_json::to_vec(&(self.created_at.timestamp_micros(), &self.address, &self.scope))
            .expect("a number and strings serialise");
        URL_SAFE_NO_PAD.encode(json)
    }
}

/// Up to `page_size` suppressions that pass `filter`, after `after`, newest first.
pub async fn list(store: &Store, filter: &Filter, page_size: i64, after: Option<&Cursor>) -> Result<Page> {
    let page_size = page_size.clamp(1, MAX_PAGE);
    let mut query: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT address, scope, reason, source, created_at FROM suppressions WHERE true");
    if let Some(scope) = &filter.scope {
        query.push(" AND scope = ").push_bind(scope);
    }
    if let Some(reason) = filter.reason {
        query.push(" AND reason = ").push_bind(reason.as_str());
    }
    if let Some(cursor) = after {
        query.push(" AND (created_at, address, scope) < (").push_bind(cursor.created_at);
        query.push(", ").push_bind(&cursor.address).push(", ").push_bind(&cursor.scope).push(")");
    }
    query.push(" ORDER BY created_at DESC, address DESC, scope DESC LIMIT ").push_bind(page_size + 1);
    let rows: Vec<Row> = query.build_query_as().fetch_all(store.pool()).await?;
    let mut suppressions: Vec<Suppression> = rows.into_iter().map(Row::entry).collect();
    let next_page_token = if suppressions.len() as i64 > page_size {
        suppressions.truncate(page_size as usize);
        suppressions.last().map(|last| {
            Cursor { created_at: last.created_at, address: last.address.clone(), scope: last.scope.clone() }
                .token()
        })
    } else {
        None
    };
    Ok(Page { suppressions, next_page_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_scopes_and_reasons_are_checked() {
        assert_eq!(address(" User@BÜCHER.example ").unwrap(), "user@xn--bcher-kva.example");
        assert!(address("not an address").unwrap_err().contains("not an email address"));
        assert_eq!(scope("global").unwrap(), "global");
        assert_eq!(scope("category:promotions").unwrap(), "category:promotions");
        for bad in ["", "promotions", ":x", "Global"] {
            assert!(scope(bad).is_err(), "{bad}");
        }
        assert_eq!("bounced".parse::<Reason>(), Ok(Reason::Bounced));
        assert!("spam".parse::<Reason>().unwrap_err().contains("unsubscribed, bounced"));
    }

    #[test]
    fn a_page_token_reads_back_and_a_forged_one_is_refused() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            address: "a+b@example.com".into(),
            scope: "category:x y".into(),
        };
        assert_eq!(Cursor::parse(&cursor.token()), Some(cursor));
        for forged in ["", "not a token", "e30"] {
            assert_eq!(Cursor::parse(forged), None, "{forged}");
        }
    }
}
