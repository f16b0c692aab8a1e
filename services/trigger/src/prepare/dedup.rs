//! Finding repeated recipients within a request, exactly (full address keys, never hashes: two
//! different addresses are never taken for one) and in memory that does not grow with the
//! audience.
//!
//! - An inline audience is bounded by the request's size limit: its keys are kept in memory.
//! - A file audience can hold tens of millions of recipients: its keys go to the database
//!   (`audience_keys`), a chunk's worth at a time, each with the place where it first appeared.
//!   A key already there with another place is a repeat. A prepare step repeated after an
//!   interruption finds its own keys with its own places and keeps them, so it makes the same
//!   chunks again; two steps reading different parts of one audience at once agree on which
//!   occurrence is the first, whichever inserts it first.

use std::collections::{HashMap, HashSet};

use haishin_shared::domain::RequestId;
use haishin_shared::store::{Result, Store};

/// Where the keys seen so far are kept.
pub(super) enum Seen {
    Memory(HashSet<String>),
    Database,
}

impl Seen {
    pub(super) fn for_inline(inline: bool) -> Self {
        if inline { Seen::Memory(HashSet::new()) } else { Seen::Database }
    }

    /// Which of `batch` (key, place) are first occurrences in the request, in order: `true` for a
    /// first occurrence, `false` for a repeat (of an earlier row, or of one earlier in the batch).
    pub(super) async fn first_occurrences(
        &mut self,
        store: &Store,
        request: &RequestId,
        batch: &[(&str, i64)],
    ) -> Result<Vec<bool>> {
        let mut in_batch: HashSet<&str> = HashSet::with_capacity(batch.len());
        let mut first: Vec<bool> = batch.iter().map(|(key, _)| in_batch.insert(key)).collect();
        match self {
            Seen::Memory(seen) => {
                for (is_first, (key, _)) in first.iter_mut().zip(batch) {
                    if *is_first {
                        *is_first = seen.insert((*key).to_owned());
                    }
                }
            }
            Seen::Database => {
                let (keys, places): (Vec<&str>, Vec<i64>) =
                    batch.iter().zip(&first).filter(|(_, f)| **f).map(|(kp, _)| *kp).unzip();
                if keys.is_empty() {
                    return Ok(first);
                }
                let new: Vec<String> = sqlx::query_scalar(
                    "INSERT INTO audience_keys (request_id, address, first_row)
                     SELECT $1, address, place FROM unnest($2::text[], $3::bigint[]) AS t(address, place)
                     ON CONFLICT (request_id, address) DO NOTHING RETURNING address",
                )
                .bind(request)
                .bind(&keys)
                .bind(&places)
                .fetch_all(store.pool())
                .await?;
                if new.len() < keys.len() {
                    // Some keys were there already: from an earlier row (a repeat), or from this
                    // very row in an interrupted attempt (not a repeat).
                    let new: HashSet<&str> = new.iter().map(String::as_str).collect();
                    let known: Vec<&str> = keys.iter().copied().filter(|k| !new.contains(k)).collect();
                    let stored: HashMap<String, i64> = sqlx::query_as(
                        "SELECT address, first_row FROM audience_keys WHERE request_id = $1 AND address = ANY($2)",
                    )
                    .bind(request)
                    .bind(&known)
                    .fetch_all(store.pool())
                    .await?
                    .into_iter()
                    .collect();
                    for (is_first, (key, place)) in first.iter_mut().zip(batch) {
                        if *is_first && !new.contains(key) {
                            *is_first = stored.get(*key) == Some(place);
                        }
                    }
                }
            }
        }
        Ok(first)
    }
}
