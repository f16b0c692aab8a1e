//! At-least-once redelivery of acknowledged work, shared by the Pub/Sub and Cloud Tasks
//! stand-ins.
//!
//! Pub/Sub push and Cloud Tasks both deliver at least once: an acknowledged push or a task that
//! succeeded can still come again. A [`Redelivery`] policy makes the stand-ins do that on
//! purpose, so that a test or a chaos run exercises the receiver's de-duplication. It is off by
//! default. The decisions come from a small seedable generator per subscription or queue, so a
//! seeded run redelivers the same share in the same order.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Error;

/// The default spread of redeliveries after the acknowledgement.
const DEFAULT_WINDOW: Duration = Duration::from_secs(2);

/// How much acknowledged work is delivered a second time, and how late.
///
/// The default is off (probability 0), as the stand-ins were before; a chaos run turns it on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Redelivery {
    /// The share of acknowledged pushes (or completed tasks) delivered once more, from 0.0
    /// (never, the default) to 1.0 (every one).
    pub probability: f64,
    /// The redelivery comes after a uniformly random delay between zero and this, counted from
    /// the acknowledgement (default 2 s).
    pub window: Duration,
}

impl Default for Redelivery {
    fn default() -> Self {
        Self { probability: 0.0, window: DEFAULT_WINDOW }
    }
}

impl Redelivery {
    /// Redelivers this share of acknowledged work within the default window (2 s).
    pub fn with_probability(probability: f64) -> Self {
        Self { probability, ..Self::default() }
    }

    /// Refuses a probability outside 0.0 to 1.0.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if (0.0..=1.0).contains(&self.probability) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "redelivery probability {} is not between 0 and 1",
                self.probability
            )))
        }
    }
}

/// The redelivery settings of a stand-in: the policy of subscriptions or queues that have none
/// of their own, and the seed of their generators.
#[derive(Debug, Default)]
pub(crate) struct RedeliveryDefaults {
    inner: Mutex<(Redelivery, Option<u64>)>,
}

impl RedeliveryDefaults {
    pub(crate) fn policy(&self) -> Redelivery {
        self.inner.lock().expect("redelivery defaults lock").0
    }

    pub(crate) fn seed(&self) -> Option<u64> {
        self.inner.lock().expect("redelivery defaults lock").1
    }

    pub(crate) fn set_policy(&self, policy: Redelivery) {
        self.inner.lock().expect("redelivery defaults lock").0 = policy;
    }

    pub(crate) fn set_seed(&self, seed: u64) {
        self.inner.lock().expect("redelivery defaults lock").1 = Some(seed);
    }
}

/// One subscription's or queue's redelivery policy (when it has its own) and generator.
#[derive(Debug)]
pub(crate) struct Redeliverer {
    /// Mixed into the seed, so that two subscriptions seeded alike still differ.
    name_hash: u64,
    own: Mutex<Option<Redelivery>>,
    rng: Mutex<StdRng>,
}

impl Redeliverer {
    /// A redeliverer for `name`, seeded from `seed` (from the system's randomness when `None`).
    pub(crate) fn new(name: &str, own: Option<Redelivery>, seed: Option<u64>) -> Self {
        let name_hash = fnv1a(name);
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ name_hash),
            None => StdRng::from_os_rng(),
        };
        Self { name_hash, own: Mutex::new(own), rng: Mutex::new(rng) }
    }

    /// Sets (or, with `None`, clears) this subscription's or queue's own policy.
    pub(crate) fn set_policy(&self, own: Option<Redelivery>) {
        *self.own.lock().expect("redelivery policy lock") = own;
    }

    /// Restarts the generator from `seed`.
    pub(crate) fn reseed(&self, seed: u64) {
        *self.rng.lock().expect("redelivery rng lock") = StdRng::seed_from_u64(seed ^ self.name_hash);
    }

    /// Decides whether work acknowledged now comes again: after the returned delay, or never
    /// (`None`). `default` applies unless this subscription or queue has its own policy.
    pub(crate) fn roll(&self, default: Redelivery) -> Option<Duration> {
        let policy = self.own.lock().expect("redelivery policy lock").unwrap_or(default);
        if policy.probability <= 0.0 {
            return None;
        }
        let mut rng = self.rng.lock().expect("redelivery rng lock");
        let (chance, spread): (f64, f64) = (rng.random(), rng.random());
        (chance < policy.probability).then(|| policy.window.mul_f64(spread))
    }
}

/// FNV-1a, a stable hash of a name (std's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    text.bytes()
        .fold(0xCBF2_9CE4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "projects/p/subscriptions/s";

    fn rolls(redeliverer: &Redeliverer, policy: Redelivery, n: usize) -> Vec<Option<Duration>> {
        (0..n).map(|_| redeliverer.roll(policy)).collect()
    }

    #[test]
    fn off_never_redelivers_and_always_redelivers_within_the_window() {
        let redeliverer = Redeliverer::new(NAME, None, Some(1));
        assert!(rolls(&redeliverer, Redelivery::default(), 1000).iter().all(Option::is_none));
        let always = Redelivery { probability: 1.0, window: Duration::from_millis(500) };
        for delay in rolls(&redeliverer, always, 1000) {
            assert!(delay.is_some_and(|d| d <= Duration::from_millis(500)), "{delay:?}");
        }
    }

    #[test]
    fn the_share_redelivered_is_close_to_the_probability() {
        let redeliverer = Redeliverer::new(NAME, None, Some(7));
        let hits = rolls(&redeliverer, Redelivery::with_probability(0.25), 10_000)
            .iter()
            .filter(|r| r.is_some())
            .count();
        assert!((2300..2700).contains(&hits), "{hits} of 10000");
    }

    #[test]
    fn a_seed_makes_the_decisions_repeatable_and_names_tell_generators_apart() {
        let policy = Redelivery::with_probability(0.5);
        let first = rolls(&Redeliverer::new(NAME, None, Some(42)), policy, 64);
        let again = rolls(&Redeliverer::new(NAME, None, Some(42)), policy, 64);
        let other = rolls(&Redeliverer::new("projects/p/subscriptions/t", None, Some(42)), policy, 64);
        let reseeded = Redeliverer::new(NAME, None, None);
        reseeded.reseed(42);
        assert_eq!(first, again);
        assert_eq!(first, rolls(&reseeded, policy, 64));
        assert_ne!(first, other);
    }

    #[test]
    fn an_own_policy_overrides_the_default_until_cleared() {
        let redeliverer = Redeliverer::new(NAME, Some(Redelivery::with_probability(1.0)), Some(3));
        assert!(redeliverer.roll(Redelivery::default()).is_some());
        redeliverer.set_policy(None);
        assert!(redeliverer.roll(Redelivery::default()).is_none());
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        assert!(Redelivery::with_probability(1.0).check().is_ok());
        assert!(Redelivery::with_probability(-0.1).check().is_err());
        assert!(Redelivery::with_probability(f64::NAN).check().is_err());
    }
}
