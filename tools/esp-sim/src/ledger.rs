//! The ledger: uploaded lists, accepted sends and who was delivered to.
//!
//! Memory stays modest for tens of millions of recipients: a list keeps one 64-bit hash per
//! recipient, and a request keeps the set of address hashes it was sent to (about 9 to 18
//! bytes per distinct recipient) plus a small map of the few addresses sent to more than
//! once. Addresses themselves are kept only for small lists and up to `keep_addresses_max`
//! per request.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, DefaultHasher, Hasher};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::report::{DeliveredRecipient, DeliveryCounts, RequestDeliveries, RequestReport};

/// Hashes of addresses are already uniform: use them as they are.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByHash = BuildHasherDefault<PassThrough>;

/// The hash that identifies an address: case and surrounding spaces do not matter, since
/// `A@Example.com` and `a@example.com` reach the same mailbox.
pub(crate) fn address_hash(email: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    let mut buf = [0u8; 64];
    for chunk in email.trim().as_bytes().chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        hasher.write(lower);
    }
    hasher.finish()
}

/// Whether an address is at `domain` (case-insensitive).
pub(crate) fn at_domain(email: &str, domain: &str) -> bool {
    email.trim().rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
}

/// An uploaded list, reduced to what a send needs.
#[derive(Debug)]
pub(crate) struct ListData {
    /// One hash per recipient, in upload order.
    pub(crate) hashes: Vec<u64>,
    /// Indexes (ascending) of recipients at the bounce domain.
    pub(crate) bounced: Vec<u32>,
    /// The addresses and their parameters, for small lists only.
    pub(crate) addresses: Option<Vec<Kept>>,
}

/// An address kept for `/_sim/deliveries`, with the parameters it was given (raw JSON).
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) email: Box<str>,
    pub(crate) params: Option<Box<str>>,
}

impl ListData {
    pub(crate) fn len(&self) -> usize {
        self.hashes.len()
    }
}

/// An accepted send.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) accepted_at: DateTime<Utc>,
    pub(crate) delivered: u64,
    pub(crate) bounced: u64,
}

#[derive(Debug)]
struct RequestLedger {
    id: String,
    counts: DeliveryCounts,
    first_send_at: DateTime<Utc>,
    last_send_at: DateTime<Utc>,
    /// Address hashes sent to at least once.
    seen: HashSet<u64, ByHash>,
    /// Sends beyond the first, for the few addresses that had any.
    extra: HashMap<u64, u32, ByHash>,
    /// Addresses kept for `/_sim/deliveries` (with the parameters of their first send), and
    /// whether they bounce.
    addresses: HashMap<u64, (Kept, bool), ByHash>,
    addresses_complete: bool,
}

/// Lists, sends and deliveries. Guarded by one mutex; every operation is short.
#[derive(Debug)]
pub(crate) struct Ledger {
    lists: Vec<Arc<ListData>>,
    lists_by_key: HashMap<String, u32>,
    deliveries: Vec<Delivery>,
    /// The first accepted send of each idempotency key.
    deliveries_by_key: HashMap<String, u32>,
    requests: Vec<RequestLedger>,
    request_index: HashMap<String, u32>,
    keep_addresses_max: usize,
}

const LIST_PREFIX: &str = "lst-";
const DELIVERY_PREFIX: &str = "dlv-";

impl Ledger {
    pub(crate) fn new(keep_addresses_max: usize) -> Self {
        Self {
            lists: Vec::new(),
            lists_by_key: HashMap::new(),
            deliveries: Vec::new(),
            deliveries_by_key: HashMap::new(),
            requests: Vec::new(),
            request_index: HashMap::new(),
            keep_addresses_max,
        }
    }

    /// Stores a list, or returns the list already stored under the same key.
    pub(crate) fn store_list(&mut self, key: &str, list: ListData) -> String {
        let index = match self.lists_by_key.get(key) {
            Some(&index) => index,
            None => {
                let index = u32::try_from(self.lists.len()).expect("fewer than 4 billion lists");
                self.lists.push(Arc::new(list));
                self.lists_by_key.insert(key.to_owned(), index);
                index
            }
        };
        format!("{LIST_PREFIX}{:08}", index + 1)
    }

    pub(crate) fn list(&self, list_id: &str) -> Option<Arc<ListData>> {
        let index = parse_id(list_id, LIST_PREFIX)?;
        self.lists.get(index).cloned()
    }

    /// Records an accepted send: every recipient of the list is delivered to (or bounced),
    /// again if it already was. Returns the delivery id.
    pub(crate) fn record_send(
        &mut self,
        key: &str,
        request_id: &str,
        list: &ListData,
        now: DateTime<Utc>,
    ) -> String {
        let keep_max = self.keep_addresses_max;
        let request = self.request_mut(request_id, now);
        let mut delivered = 0u64;
        let mut bounced = 0u64;
        let mut bounces = list.bounced.iter().copied().peekable();
        let keep = request.addresses_complete && list.addresses.is_some();
        for (i, &hash) in list.hashes.iter().enumerate() {
            let is_bounce = bounces.next_if_eq(&(i as u32)).is_some();
            if is_bounce {
                bounced += 1;
            } else {
                delivered += 1;
            }
            if request.seen.insert(hash) {
                if keep && request.addresses.len() < keep_max {
                    if let Some(addresses) = &list.addresses {
                        request.addresses.insert(hash, (addresses[i].clone(), is_bounce));
                    }
                } else {
                    request.addresses_complete = false;
                }
            } else {
                *request.extra.entry(hash).or_insert(0) += 1;
            }
        }
        let unique = request.seen.len() as u64;
        let c = &mut request.counts;
        c.total += delivered + bounced;
        c.delivered += delivered;
        c.bounced += bounced;
        c.unique = unique;
        c.duplicates = c.total - c.unique;
        c.sends += 1;
        request.last_send_at = now;

        let index = u32::try_from(self.deliveries.len()).expect("fewer than 4 billion sends");
        self.deliveries.push(Delivery { accepted_at: now, delivered, bounced });
        self.deliveries_by_key.entry(key.to_owned()).or_insert(index);
        format!("{DELIVERY_PREFIX}{:08}", index + 1)
    }

    fn request_mut(&mut self, request_id: &str, now: DateTime<Utc>) -> &mut RequestLedger {
        let index = match self.request_index.get(request_id) {
            Some(&index) => index as usize,
            None => {
                let index = self.requests.len();
                self.requests.push(RequestLedger {
                    id: request_id.to_owned(),
                    counts: DeliveryCounts::default(),
                    first_send_at: now,
                    last_send_at: now,
                    seen: HashSet::default(),
                    extra: HashMap::default(),
                    addresses: HashMap::default(),
                    addresses_complete: true,
                });
                self.request_index.insert(
                    request_id.to_owned(),
                    u32::try_from(index).expect("fewer than 4 billion requests"),
                );
                index
            }
        };
        &mut self.requests[index]
    }

    /// The first accepted send with this idempotency key.
    pub(crate) fn find_by_key(&self, key: &str) -> Option<(String, &Delivery)> {
        let &index = self.deliveries_by_key.get(key)?;
        Some((format!("{DELIVERY_PREFIX}{:08}", index + 1), &self.deliveries[index as usize]))
    }

    pub(crate) fn delivery(&self, delivery_id: &str) -> Option<&Delivery> {
        self.deliveries.get(parse_id(delivery_id, DELIVERY_PREFIX)?)
    }

    pub(crate) fn totals(&self) -> DeliveryCounts {
        let mut t = DeliveryCounts::default();
        for r in &self.requests {
            t.total += r.counts.total;
            t.unique += r.counts.unique;
            t.duplicates += r.counts.duplicates;
            t.delivered += r.counts.delivered;
            t.bounced += r.counts.bounced;
            t.sends += r.counts.sends;
        }
        t
    }

    pub(crate) fn request_reports(&self) -> impl Iterator<Item = (String, RequestReport)> + '_ {
        self.requests.iter().map(|r| {
            (
                r.id.clone(),
                RequestReport {
                    counts: r.counts,
                    first_send_at: r.first_send_at,
                    last_send_at: r.last_send_at,
                },
            )
        })
    }

    pub(crate) fn request_deliveries(&self, request_id: &str) -> Option<RequestDeliveries> {
        let r = &self.requests[*self.request_index.get(request_id)? as usize];
        let mut recipients: Vec<DeliveredRecipient> = r
            .addresses
            .iter()
            .map(|(hash, (kept, bounced))| DeliveredRecipient {
                email: kept.email.to_string(),
                count: 1 + r.extra.get(hash).copied().unwrap_or(0),
                bounced: *bounced,
                params: kept.params.as_deref().and_then(|p| serde_json::from_str(p).ok()),
            })
            .collect();
        recipients.sort_by(|a, b| a.email.cmp(&b.email));
        Some(RequestDeliveries {
            request_id: r.id.clone(),
            counts: r.counts,
            addresses_complete: r.addresses_complete,
            recipients,
        })
    }
}

/// `lst-00000001` → 0.
fn parse_id(id: &str, prefix: &str) -> Option<usize> {
    let n: usize = id.strip_prefix(prefix)?.parse().ok()?;
    n.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(emails: &[&str], keep: bool) -> ListData {
        ListData {
            hashes: emails.iter().map(|e| address_hash(e)).collect(),
            bounced: emails
                .iter()
                .enumerate()
                .filter(|(_, e)| at_domain(e, "bounce.invalid"))
                .map(|(i, _)| i as u32)
                .collect(),
            addresses: keep
                .then(|| emails.iter().map(|e| Kept { email: Box::from(*e), params: None }).collect()),
        }
    }

    #[test]
    fn addresses_differing_only_in_case_or_spaces_are_one_recipient() {
        assert_eq!(address_hash("A@Example.COM "), address_hash("a@example.com"));
        assert_ne!(address_hash("a@example.com"), address_hash("b@example.com"));
        let long = format!("{}@example.com", "x".repeat(200));
        assert_eq!(address_hash(&long.to_uppercase()), address_hash(&long));
        assert_ne!(address_hash(&long), address_hash(&format!("y{long}")));
    }

    #[test]
    fn a_second_send_of_a_list_counts_duplicates() {
        let mut ledger = Ledger::new(10);
        let l = list(&["a@x.com", "b@x.com", "c@bounce.invalid"], true);
        let now = Utc::now();
        ledger.record_send("k1", "r1", &l, now);
        ledger.record_send("k1", "r1", &l, now);
        let d = ledger.request_deliveries("r1").unwrap();
        assert_eq!(d.counts.total, 6);
        assert_eq!(d.counts.unique, 3);
        assert_eq!(d.counts.duplicates, 3);
        assert_eq!(d.counts.bounced, 2);
        assert_eq!(d.counts.delivered, 4);
        assert_eq!(d.counts.sends, 2);
        assert!(d.addresses_complete);
        assert_eq!(d.recipients.len(), 3);
        assert!(d.recipients.iter().all(|r| r.count == 2));
        assert!(d.recipients[2].bounced && !d.recipients[0].bounced);
    }

    #[test]
    fn the_same_address_in_two_requests_is_no_duplicate() {
        let mut ledger = Ledger::new(10);
        let l = list(&["a@x.com"], false);
        ledger.record_send("k1", "r1", &l, Utc::now());
        ledger.record_send("k2", "r2", &l, Utc::now());
        assert_eq!(ledger.totals().duplicates, 0);
        assert_eq!(ledger.totals().unique, 2);
        let d = ledger.request_deliveries("r1").unwrap();
        assert!(!d.addresses_complete);
        assert!(d.recipients.is_empty());
    }

    #[test]
    fn addresses_are_kept_up_to_the_limit_only() {
        let mut ledger = Ledger::new(2);
        ledger.record_send("k", "r", &list(&["a@x.com", "b@x.com", "c@x.com"], true), Utc::now());
        let d = ledger.request_deliveries("r").unwrap();
        assert_eq!(d.recipients.len(), 2);
        assert!(!d.addresses_complete);
        assert_eq!(d.counts.unique, 3);
    }

    #[test]
    fn lists_are_idempotent_by_key_and_ids_resolve() {
        let mut ledger = Ledger::new(0);
        let first = ledger.store_list("k", list(&["a@x.com"], false));
        let again = ledger.store_list("k", list(&["b@x.com", "c@x.com"], false));
        let other = ledger.store_list("k2", list(&["b@x.com"], false));
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(ledger.list(&first).unwrap().len(), 1);
        assert!(ledger.list("lst-00000000").is_none());
        assert!(ledger.list("lst-00000009").is_none());
        assert!(ledger.list("nope").is_none());
    }

    #[test]
    fn a_key_finds_its_first_send() {
        let mut ledger = Ledger::new(0);
        let l = list(&["a@x.com"], false);
        let first = ledger.record_send("k", "r", &l, Utc::now());
        let second = ledger.record_send("k", "r", &l, Utc::now());
        assert_ne!(first, second);
        assert_eq!(ledger.find_by_key("k").unwrap().0, first);
        assert!(ledger.find_by_key("other").is_none());
        assert!(ledger.delivery(&second).is_some());
    }
}
