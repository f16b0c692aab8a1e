//! Suppressions: addresses that are not to be sent to, globally or for one kind of mail.
//!
//! An address is kept in the form recipients are de-duplicated in ([`address_key`]), and never in
//! any other: `User@BÜCHER.example` and `user@xn--bcher-kva.example` are one suppression. A
//! suppression's scope is `global` (no mail at all) or a label `key:value` (`category:promotions`),
//! which holds for every request whose labels hold that pair.
//!
//! A suppression is applied twice: when a request's chunks are built (the recipient is skipped,
//! counted `suppressed`), and again just before a chunk goes to the provider (an address
//! suppressed after preparation is not sent; the chunk counts it `suppressed`). The first asks
//! [`suppressed_among`] once for a whole chunk or batch, never once per recipient; the second
//! does the same for a small chunk, and looks only at the suppressions the first may not have
//! seen for a list about to be uploaded ([`SinceBuilt`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Deref;

use serde_json::value::RawValue;

use crate::domain::RequestId;
use crate::store::{Result, Store};

/// The scope of a suppression that holds for every request.
pub const GLOBAL: &str = "global";

/// The form two addresses are compared in: full Unicode case folding (so `Straße` and `STRASSE`
/// are one), and the domain in its IDNA ASCII form (so `bücher.example` and
/// `xn--bcher-kva.example` are one). Repeated recipients are found, and suppressions matched, on
/// this key; the address is sent as written.
pub fn address_key(email: &str) -> String {
    let email = email.trim();
    if email.is_ascii() {
        // Most addresses: ASCII folds to lower case, and an ASCII domain without a punycode
        // label is its own ASCII form (or one IDNA refuses, which is kept as it is).
        let folded = email.to_ascii_lowercase();
        match folded.rsplit_once('@') {
            Some((_, domain)) if domain.split('.').any(|label| label.starts_with("xn--")) => {}
            _ => return folded,
        }
    }
    unicode_key(email)
}

/// The key by Unicode case folding and IDNA, which any address may take.
fn unicode_key(email: &str) -> String {
    let folded = caseless::default_case_fold_str(email.trim());
    match folded.rsplit_once('@') {
        Some((local, domain)) => {
            let domain = idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_owned());
            format!("{local}@{domain}")
        }
        None => folded,
    }
}

/// The scopes that hold for a request with these labels: `global`, and `key:value` for each label.
pub fn scopes_of(labels: &BTreeMap<String, String>) -> Vec<String> {
    std::iter::once(GLOBAL.to_owned())
        .chain(labels.iter().map(|(key, value)| format!("{key}:{value}")))
        .collect()
}

/// Which of `keys` (each an [`address_key`]) are suppressed in any of `scopes`: one query.
pub async fn suppressed_among(store: &Store, keys: &[&str], scopes: &[String]) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT address FROM suppressions WHERE address = ANY($1) AND scope = ANY($2)",
    )
    .bind(keys)
    .bind(scopes)
    .fetch_all(store.pool())
    .await?;
    Ok(found.into_iter().collect())
}

/// The suppressions of a set of addresses, in every scope, read with one query, to be matched in
/// memory against each request's scopes: the check of a group of requests taken in together.
#[derive(Debug, Default)]
pub struct KnownSuppressions(HashMap<String, Vec<String>>);

impl KnownSuppressions {
    /// The suppressions of `keys` (each an [`address_key`]).
    pub async fn of(store: &Store, keys: &[&str]) -> Result<Self> {
        if keys.is_empty() {
            return Ok(Self::default());
        }
        let found: Vec<(String, String)> =
            sqlx::query_as("SELECT address, scope FROM suppressions WHERE address = ANY($1)")
                .bind(keys)
                .fetch_all(store.pool())
                .await?;
        let mut known: HashMap<String, Vec<String>> = HashMap::new();
        for (address, scope) in found {
            known.entry(address).or_default().push(scope);
        }
        Ok(Self(known))
    }

    /// Which of `keys` are suppressed in any of `scopes`, as [`suppressed_among`] would say.
    pub fn among(&self, keys: &[&str], scopes: &[String]) -> HashSet<String> {
        keys.iter()
            .filter(|key| self.0.get(**key).is_some_and(|held| held.iter().any(|s| scopes.contains(s))))
            .map(|key| (*key).to_owned())
            .collect()
    }
}

/// Which of `keys` are suppressed in a scope that holds for `request` (`global`, or one of its
/// labels): one query, for the checks made just before the provider.
pub async fn suppressed_for_request(
    store: &Store,
    request: &RequestId,
    keys: &[&str],
) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT s.address FROM suppressions s
         WHERE s.address = ANY($1)
           AND s.scope IN (SELECT 'global'
                           UNION ALL
                           SELECT l.key || ':' || l.value FROM requests r, jsonb_each_text(r.labels) AS l
                           WHERE r.id = $2)",
    )
    .bind(keys)
    .bind(request)
    .fetch_all(store.pool())
    .await?;
    Ok(found.into_iter().collect())
}

/// How long before a request was received a suppression may have been written and still not be
/// seen by the check its chunks got when they were built. A suppression is written by one
/// statement (an import's lines by one `INSERT`), whose time is its transaction's start: one
/// written before that margin was committed long before any of the request's chunks was built.
const BUILD_CHECK_MARGIN_SECS: i64 = 600;

/// Most suppressions written since a request's chunks were built that are matched in memory;
/// beyond that, the chunk's addresses are asked for in full.
const RECENT_MOST: i64 = 1_000;

/// The suppressions a chunk's build-time check may not have seen: those of the request's scopes
/// written since shortly before it was received ([`BUILD_CHECK_MARGIN_SECS`]). Most of the time
/// there are none or a few, and the check just before a large chunk's upload needs neither the
/// chunk's addresses parsed nor a query for all of them.
#[derive(Debug, Clone)]
pub struct SinceBuilt {
    /// Their address keys; `None` when there are more than [`RECENT_MOST`].
    keys: Option<HashSet<String>>,
}

impl SinceBuilt {
    /// One query, which can run while the chunk is read.
    pub async fn of_request(store: &Store, request: &RequestId) -> Result<Self> {
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT s.address FROM requests r
             JOIN suppressions s
               ON s.created_at >= r.received_at - make_interval(secs => $2)
              AND s.scope IN (SELECT 'global'
                              UNION ALL
                              SELECT l.key || ':' || l.value FROM jsonb_each_text(r.labels) AS l)
             WHERE r.id = $1
             LIMIT $3",
        )
        .bind(request)
        .bind(BUILD_CHECK_MARGIN_SECS as f64)
        .bind(RECENT_MOST + 1)
        .fetch_all(store.pool())
        .await?;
        let keys = (found.len() as i64 <= RECENT_MOST).then(|| found.into_iter().collect());
        Ok(Self { keys })
    }

    /// The recipients (chunk object lines) not suppressed for `request`, and how many were left
    /// out: matched against the suppressions written since the build, or, when there are many,
    /// with one query for all the chunk's addresses.
    pub async fn leave_out<R: Deref<Target = RawValue>>(
        &self,
        store: &Store,
        request: &RequestId,
        recipients: Vec<R>,
    ) -> Result<(Vec<R>, i64)> {
        match &self.keys {
            Some(recent) if recent.is_empty() => Ok((recipients, 0)),
            Some(recent) => {
                let keys = recipients.iter().map(|r| email_of(r).map(|e| address_key(&e))).collect();
                Ok(keep_unsuppressed(recipients, keys, recent))
            }
            None => leave_out_suppressed(store, request, recipients).await,
        }
    }
}

/// The recipients (chunk object lines) not suppressed for `request`, and how many were left out:
/// the check made just before a small chunk's recipients go to the provider, one query for their
/// few addresses (cheaper than [`SinceBuilt`]'s look at every recent suppression).
pub async fn leave_out_suppressed<R: Deref<Target = RawValue>>(
    store: &Store,
    request: &RequestId,
    recipients: Vec<R>,
) -> Result<(Vec<R>, i64)> {
    let keys: Vec<Option<String>> = recipients.iter().map(|r| email_of(r).map(|e| address_key(&e))).collect();
    let asked: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
    let suppressed = suppressed_for_request(store, request, &asked).await?;
    Ok(keep_unsuppressed(recipients, keys, &suppressed))
}

/// The recipients whose key (in the same order) is not in `suppressed`, and how many were not.
fn keep_unsuppressed<R>(
    recipients: Vec<R>,
    keys: Vec<Option<String>>,
    suppressed: &HashSet<String>,
) -> (Vec<R>, i64) {
    if suppressed.is_empty() {
        return (recipients, 0);
    }
    let before = recipients.len();
    let kept: Vec<_> = recipients
        .into_iter()
        .zip(keys)
        .filter(|(_, key)| key.as_ref().is_none_or(|k| !suppressed.contains(k)))
        .map(|(recipient, _)| recipient)
        .collect();
    let left_out = (before - kept.len()) as i64;
    (kept, left_out)
}

/// The address of a recipient as a chunk object holds it (`{"email": …, "params": …}`), without
/// reading the rest; `None` for a line that is not one.
pub fn email_of(line: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Email {
        email: String,
    }
    serde_json::from_str::<Email>(line.get()).ok().map(|e| e.email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ascii_address_gets_the_key_the_unicode_path_gives() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"aZ09.-_@+ !~%xn--XN--";
        let mut addresses: Vec<String> = (0..20_000)
            .map(|_| {
                let len = 1 + next() % 24;
                (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char).collect()
            })
            .collect();
        addresses.extend(
            [
                "User@Example.COM",
                " a@b.c ",
                "a@xn--bcher-kva.example",
                "A@XN--BCHER-KVA.example",
                "a@b..c",
                "a@-b.c",
                "a@",
            ]
            .map(String::from),
        );
        for address in &addresses {
            assert_eq!(address_key(address), unicode_key(address), "{address:?}");
        }
    }

    #[test]
    fn one_address_has_one_key_through_case_and_the_domain_s_encoding() {
        assert_eq!(address_key("user@BÜCHER.example"), address_key("user@bücher.example"));
        assert_eq!(address_key("user@bücher.example"), address_key("USER@xn--bcher-kva.example"));
        assert_eq!(address_key("user@bücher.example"), "user@xn--bcher-kva.example");
        assert_eq!(address_key("Straße@example.com"), address_key("STRASSE@EXAMPLE.COM"));
        assert_eq!(address_key(" a@example.com "), "a@example.com");
        assert_ne!(address_key("a@example.com"), address_key("b@example.com"));
    }

    #[test]
    fn a_request_s_scopes_are_global_and_each_label() {
        let labels = BTreeMap::from([("category".to_owned(), "promotions".to_owned())]);
        assert_eq!(scopes_of(&labels), ["global", "category:promotions"]);
        assert_eq!(scopes_of(&BTreeMap::new()), ["global"]);
    }
}
