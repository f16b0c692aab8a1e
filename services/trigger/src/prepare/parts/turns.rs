//! Permits handed out smallest key first: the shards of several requests waiting in one instance
//! are spread in the order of their index, so that every request's first, small shard (and with
//! it its first chunks) goes before any request's larger ones. Arrival order breaks ties.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A number of permits, each waiter served by the smallest key (then the first to ask).
#[derive(Clone, Debug)]
pub(super) struct Turns {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    free: usize,
    arrivals: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    key: u32,
    arrival: u64,
    give: oneshot::Sender<Turn>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.arrival) == (other.key, other.arrival)
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.key, self.arrival).cmp(&(other.key, other.arrival))
    }
}

/// A permit held: given to the next waiter when dropped. One given to a waiter that stopped
/// waiting is dropped with the channel, and so passed on in turn.
#[derive(Debug)]
pub(super) struct Turn {
    turns: Option<Arc<Mutex<Inner>>>,
}

impl Turns {
    pub(super) fn new(permits: usize) -> Self {
        let inner = Inner { free: permits, arrivals: 0, waiting: BinaryHeap::new() };
        Self { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Waits for a permit; among those waiting, the smallest `key` gets the next one.
    pub(super) async fn take(&self, key: u32) -> Turn {
        let waiting = {
            let mut inner = self.inner.lock().expect("turns lock");
            if inner.free > 0 && inner.waiting.is_empty() {
                inner.free -= 1;
                return Turn { turns: Some(self.inner.clone()) };
            }
            let (give, take) = oneshot::channel();
            let arrival = inner.arrivals;
            inner.arrivals += 1;
            inner.waiting.push(Reverse(Waiter { key, arrival, give }));
            // A permit freed while the heap was empty goes to the smallest waiter now.
            if inner.free > 0 {
                inner.free -= 1;
                hand_on(&mut inner, &self.inner);
            }
            take
        };
        waiting.await.expect("a waiter is only dropped with a permit sent to it")
    }
}

/// Gives one permit to the smallest waiter still waiting, or frees it.
fn hand_on(inner: &mut Inner, shared: &Arc<Mutex<Inner>>) {
    while let Some(Reverse(waiter)) = inner.waiting.pop() {
        match waiter.give.send(Turn { turns: Some(shared.clone()) }) {
            Ok(()) => return,
            // That waiter stopped waiting: the permit comes back here, not through its drop.
            Err(mut unsent) => unsent.turns = None,
        }
    }
    inner.free += 1;
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(shared) = self.turns.take() {
            let mut inner = shared.lock().expect("turns lock");
            hand_on(&mut inner, &shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_smallest_key_waiting_goes_next_then_the_first_to_ask() {
        let turns = Turns::new(1);
        let held = turns.take(9).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (name, key) in [("c-shard-2", 2), ("a-shard-0", 0), ("b-shard-2", 2), ("d-shard-1", 1)] {
            let (turns, order) = (turns.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _turn = turns.take(key).await;
                order.lock().unwrap().push(name);
            }));
            // Each asks before the next, so that arrival order is known.
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a-shard-0", "d-shard-1", "c-shard-2", "b-shard-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_does_not_keep_a_permit() {
        let turns = Turns::new(1);
        let held = turns.take(0).await;
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(1), turns.take(0)).await;
        assert!(gave_up.is_err(), "no permit was free");
        drop(held);
        // The permit is free again: two takes in a row, each after the other's drop.
        drop(turns.take(5).await);
        let again = tokio::time::timeout(std::time::Duration::from_secs(1), turns.take(5)).await;
        assert!(again.is_ok(), "the permit came back");
    }

    #[tokio::test(start_paused = true)]
    async fn as_many_hold_at_once_as_there_are_permits() {
        let turns = Turns::new(2);
        let (a, b) = (turns.take(3).await, turns.take(1).await);
        let third = tokio::time::timeout(std::time::Duration::from_millis(1), turns.take(0)).await;
        assert!(third.is_err(), "both permits are held");
        drop(a);
        let third = tokio::time::timeout(std::time::Duration::from_secs(1), turns.take(0)).await;
        assert!(third.is_ok());
        drop(b);
    }
}
