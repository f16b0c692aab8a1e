//! The adaptive limit: the slots granted follow the provider's real limit when it is lower than
//! the configured one (an ESP shared with another system, or a limit the provider lowered).
//!
//! The service that makes the calls reports each 429 on the slot row with how many other calls
//! were in progress (`refused_in_flight`; see the list-uploader). Each dispatch round, holding
//! the row, takes the reports into account by one rule, [`AdaptiveLimit`]:
//! - **multiplicative decrease**: a refusal while fewer calls were in progress than the slots
//!   granted lowers them to three quarters (rounded up, by one at least), never below 1. A
//!   refusal while as many or more were in progress says nothing new (those calls were granted
//!   before the last decrease), nor does one with no other call in progress (no concurrency limit
//!   explains it: a fault, or a rate);
//! - **additive increase**: after [`PROBE_AFTER`] without a change, one slot more, never above
//!   the configured limit. A probe past the real limit costs one refused call, and the decrease
//!   that follows.

use std::time::Duration;

use haishin_shared::store::Result;
use sqlx::{Postgres, Transaction};

/// How long the slots granted stay unchanged before one more is tried.
/// A probe past the real limit costs one refused call: at a minute, about one call in 300 at a
/// limit of 5 calls of 1.65 s (uploads and their sends).
pub const PROBE_AFTER: Duration = Duration::from_secs(60);

/// The slots granted against the configured limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveLimit {
    pub configured: u32,
    pub effective: u32,
}

impl AdaptiveLimit {
    /// The slots granted from the row's `effective_limit` (none: the configured limit), kept
    /// between 1 and the configured limit, which may have changed since.
    pub fn new(configured: u32, stored: Option<i32>) -> Self {
        let configured = configured.max(1);
        let effective = stored.map_or(configured, |n| u32::try_from(n).unwrap_or(1).clamp(1, configured));
        Self { configured, effective }
    }

    /// After the provider refused a call for its limit while `others` other calls were in
    /// progress.
    pub fn refused(self, others: u32) -> Self {
        if others == 0 || others >= self.effective {
            return self;
        }
        let lowered = self.effective - (self.effective / 4).max(1);
        Self { effective: lowered.max(1), ..self }
    }

    /// After `quiet_for` without a change: one slot more once [`PROBE_AFTER`] has passed.
    pub fn quiet(self, quiet_for: Duration) -> Self {
        if quiet_for >= PROBE_AFTER && self.effective < self.configured {
            return Self { effective: self.effective + 1, ..self };
        }
        self
    }

    /// The rule over one round: the refusals reported since the last round (the fewest calls in
    /// progress at one of them), else the quiet interval.
    pub fn next(self, refused_in_flight: Option<u32>, quiet_for: Duration) -> Self {
        match refused_in_flight {
            Some(others) => self.refused(others),
            None => self.quiet(quiet_for),
        }
    }

    /// What the row stores: none at the configured limit, so that a new configured limit applies
    /// at once.
    fn stored(self) -> Option<i32> {
        (self.effective < self.configured).then(|| i32::try_from(self.effective).unwrap_or(i32::MAX))
    }
}

/// Takes the lock every dispatch round holds (see [`super::hold_dispatch`]), applies the rule to
/// what was reported since the last round, and returns the slots this round may grant.
pub(super) async fn hold_slots(tx: &mut Transaction<'_, Postgres>, configured: u32) -> Result<AdaptiveLimit> {
    let (stored, refused, quiet_for): (Option<i32>, Option<i32>, f64) = sqlx::query_as(
        "SELECT effective_limit, refused_in_flight,
                greatest(extract(epoch FROM now() - limit_changed_at), 0)::float8
         FROM dispatch_slots WHERE api = 'upload' FOR UPDATE",
    )
    .fetch_one(&mut **tx)
    .await?;
    let before = AdaptiveLimit::new(configured, stored);
    let refused = refused.map(|n| u32::try_from(n).unwrap_or(0));
    let after = before.next(refused, Duration::from_secs_f64(quiet_for));
    if after != before || refused.is_some() || stored != before.stored() {
        sqlx::query(
            "UPDATE dispatch_slots SET effective_limit = $1, refused_in_flight = NULL,
                 limit_changed_at = CASE WHEN $2 THEN now() ELSE limit_changed_at END
             WHERE api = 'upload'",
        )
        .bind(after.stored())
        .bind(after != before)
        .execute(&mut **tx)
        .await?;
    }
    if after != before {
        tracing::info!(
            configured = after.configured,
            from = before.effective,
            to = after.effective,
            refused_in_flight = refused,
            "Slots granted changed."
        );
    }
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(effective: u32) -> AdaptiveLimit {
        AdaptiveLimit { configured: 8, effective }
    }

    #[test]
    fn a_refusal_below_the_slots_granted_lowers_them_by_a_quarter_never_below_one() {
        assert_eq!(at(8).refused(7), at(6));
        assert_eq!(at(6).refused(5), at(5));
        assert_eq!(at(3).refused(2), at(2));
        assert_eq!(at(2).refused(1), at(1));
        let floor = AdaptiveLimit { configured: 1, effective: 1 };
        assert_eq!(floor.refused(0), floor);
    }

    #[test]
    fn a_refusal_explained_by_calls_granted_before_or_by_no_limit_changes_nothing() {
        assert_eq!(at(6).refused(7), at(6), "calls granted before the decrease");
        assert_eq!(at(6).refused(6), at(6));
        assert_eq!(at(8).refused(0), at(8), "no other call: a fault or a rate, not a limit");
    }

    #[test]
    fn a_quiet_interval_adds_one_slot_up_to_the_configured_limit() {
        assert_eq!(at(5).quiet(PROBE_AFTER - Duration::from_millis(1)), at(5));
        assert_eq!(at(5).quiet(PROBE_AFTER), at(6));
        assert_eq!(at(8).quiet(PROBE_AFTER * 10), at(8));
        assert_eq!(at(5).next(Some(4), PROBE_AFTER * 2), at(4), "a refusal goes before a probe");
    }

    #[test]
    fn the_stored_limit_is_kept_within_the_configured_one() {
        assert_eq!(AdaptiveLimit::new(8, None), at(8));
        assert_eq!(AdaptiveLimit::new(8, Some(5)), at(5));
        assert_eq!(AdaptiveLimit::new(4, Some(6)).effective, 4, "the configured limit was lowered");
        assert_eq!(AdaptiveLimit::new(8, Some(0)).effective, 1);
        assert_eq!(at(8).stored(), None);
        assert_eq!(at(5).stored(), Some(5));
    }

    /// A real limit of 5 under a configured 8, a round a second: the slots drop to 5 in two
    /// refusals, probe 6 every interval, and fall back to 5 at once.
    #[test]
    fn slots_follow_a_lower_real_limit_and_probe_back_up_slowly() {
        let real = 5;
        let mut limit = at(8);
        let (mut now, mut changed) = (Duration::ZERO, Duration::ZERO);
        let mut refusals = 0;
        let mut granted = Vec::new();
        for _ in 0..240 {
            now += Duration::from_secs(1);
            // Every slot granted is used: the call beyond the real limit is refused, with the
            // real limit's calls in progress.
            let refused = (limit.effective > real).then_some(real);
            refusals += u32::from(refused.is_some());
            let next = limit.next(refused, now - changed);
            if next != limit {
                changed = now;
            }
            limit = next;
            granted.push(limit.effective);
        }
        assert_eq!(&granted[..2], [6, 5]);
        assert!(granted.iter().all(|&n| (5..=6).contains(&n)), "{granted:?}");
        // Two refusals to come down, then one per probe: 240 s hold 3 probes.
        assert_eq!(refusals, 2 + 3, "{granted:?}");
        assert_eq!(granted.iter().filter(|&&n| n == 5).count(), 240 - 4);
    }
}
