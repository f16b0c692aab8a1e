//! The partition objects of the shards this instance spread lately, kept in memory as they were
//! written, so that a cut whose shards were all spread here reads them without listing or
//! reading Cloud Storage. The first groups of a large audience are cut by the instance that has
//! just spread them, moments later: their objects are on the way to the request's first
//! uploads, and each list or read is a round trip (tens of milliseconds on Cloud Storage).
//!
//! A shard's objects are the same whenever it is spread (they depend on the rows alone), so
//! what is kept is what Cloud Storage holds. Bounded in bytes (`PREPARE_KEPT_BYTES`): a shard
//! larger than half of it is not kept, and the oldest go first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use haishin_shared::domain::RequestId;

/// A shard's objects, partition by partition, each partition's in the order written.
pub(super) type ShardObjects = Vec<Vec<Bytes>>;

/// The objects of shards spread lately, by request and shard.
#[derive(Debug, Clone)]
pub(super) struct Kept {
    inner: Arc<Mutex<Inner>>,
    /// Bytes kept at most, all shards together.
    most: usize,
}

#[derive(Debug, Default)]
struct Inner {
    shards: VecDeque<(RequestId, u32, Arc<ShardObjects>)>,
    bytes: usize,
}

impl Kept {
    /// Keeps at most `most` bytes.
    pub(super) fn new(most: usize) -> Self {
        Self { inner: Arc::default(), most }
    }

    /// The largest shard kept.
    pub(super) fn shard_most(&self) -> usize {
        self.most / 2
    }

    /// Keeps a shard's objects (replacing any kept before for it), the oldest shards making
    /// room.
    pub(super) fn keep(&self, request: &RequestId, shard: u32, objects: ShardObjects) {
        let bytes = size_of(&objects);
        if bytes > self.shard_most() {
            return;
        }
        let mut inner = self.inner.lock().expect("kept shards lock");
        inner.forget(request, shard);
        while inner.bytes + bytes > self.most {
            let Some((_, _, oldest)) = inner.shards.pop_front() else { break };
            inner.bytes -= size_of(&oldest);
        }
        inner.bytes += bytes;
        inner.shards.push_back((request.clone(), shard, Arc::new(objects)));
    }

    /// Lets a request's shards go: its audience is prepared.
    pub(super) fn forget_request(&self, request: &RequestId) {
        let mut inner = self.inner.lock().expect("kept shards lock");
        let before = std::mem::take(&mut inner.shards);
        inner.bytes = 0;
        for (r, shard, objects) in before {
            if &r != request {
                inner.bytes += size_of(&objects);
                inner.shards.push_back((r, shard, objects));
            }
        }
    }

    /// The objects of each of the request's `shards`, if every one of them is kept.
    pub(super) fn all_of(
        &self,
        request: &RequestId,
        shards: std::ops::Range<u32>,
    ) -> Option<Vec<Arc<ShardObjects>>> {
        let inner = self.inner.lock().expect("kept shards lock");
        shards
            .map(|shard| {
                inner.shards.iter().find(|(r, s, _)| r == request && *s == shard).map(|(_, _, o)| o.clone())
            })
            .collect()
    }
}

impl Inner {
    fn forget(&mut self, request: &RequestId, shard: u32) {
        if let Some(at) = self.shards.iter().position(|(r, s, _)| r == request && *s == shard) {
            let (_, _, objects) = self.shards.remove(at).expect("found above");
            self.bytes -= size_of(&objects);
        }
    }
}

fn size_of(objects: &ShardObjects) -> usize {
    objects.iter().flatten().map(Bytes::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOST: usize = 1_000;

    fn shard(bytes: usize) -> ShardObjects {
        vec![vec![Bytes::from(vec![b'x'; bytes])], Vec::new()]
    }

    #[test]
    fn a_cut_finds_its_shards_only_when_every_one_is_kept() {
        let kept = Kept::new(MOST);
        let (a, b) = (RequestId::from("a"), RequestId::from("b"));
        kept.keep(&a, 0, shard(10));
        kept.keep(&a, 1, shard(20));
        kept.keep(&b, 0, shard(30));
        assert_eq!(kept.all_of(&a, 0..2).map(|s| s.len()), Some(2));
        assert!(kept.all_of(&a, 0..3).is_none(), "shard 2 was not spread here");
        assert!(kept.all_of(&b, 1..2).is_none());
        kept.forget_request(&a);
        assert!(kept.all_of(&a, 0..1).is_none(), "prepared: let go");
        assert!(kept.all_of(&b, 0..1).is_some());
    }

    #[test]
    fn the_oldest_shards_make_room_and_a_shard_kept_again_counts_once() {
        let kept = Kept::new(MOST);
        let id = RequestId::from("r");
        let quarter = MOST / 4;
        for shard_no in 0..4 {
            kept.keep(&id, shard_no, shard(quarter));
        }
        kept.keep(&id, 3, shard(quarter));
        assert!(kept.all_of(&id, 0..4).is_some(), "four quarters fit");
        kept.keep(&id, 4, shard(quarter));
        assert!(kept.all_of(&id, 0..1).is_none(), "the oldest went");
        assert!(kept.all_of(&id, 1..5).is_some());
        kept.keep(&id, 5, shard(MOST / 2 + 1));
        assert!(kept.all_of(&id, 5..6).is_none(), "too large to keep");
        assert!(kept.all_of(&id, 1..5).is_some(), "and nothing made room for it");
    }
}
