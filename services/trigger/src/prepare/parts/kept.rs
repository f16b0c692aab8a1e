//! The partition objects of the shards this instance spread lately, kept in memory as they were
//! written, so that a cut whose shards were all spread here reads them without listing or
//! reading Cloud Storage. The first groups of a large audience are cut by the instance that has
//! just spread them, moments later: their objects are on the way to the request's first
//! uploads, and each list or read is a round trip (tens of milliseconds on Cloud Storage).
//!
//! A shard's objects are the same whenever it is spread (they depend on the rows alone), so
//! what is kept is what Cloud Storage holds. Bounded in bytes (`PREPARE_KEPT_BYTES`): a cut
//! reads every shard up to its own, so a request's shards are kept from its first on, as long
//! as they fit (other requests' shards making room, the oldest first). Only the first shards of
//! an audience are small enough, and only their cuts lie on the way to the first uploads.

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

    /// Whether a shard of `request` with about `row_bytes` of rows may be kept: its objects, a
    /// line of JSON for each row, take about three times its rows' bytes, and they must fit
    /// beside the request's shards kept already (those of other requests make room).
    pub(super) fn may_keep(&self, request: &RequestId, row_bytes: u64) -> bool {
        let inner = self.inner.lock().expect("kept shards lock");
        let own = inner.bytes_of(request) as u64;
        row_bytes.saturating_mul(3) + own <= self.most as u64
    }

    /// The most bytes of a shard's objects kept.
    pub(super) fn shard_most(&self) -> usize {
        self.most
    }

    /// Keeps a shard's objects (replacing any kept before for it), other requests' shards
    /// making room, the oldest first. A cut reads every shard up to its own, so the request's
    /// earlier shards are never let go for a later one: one that does not fit beside them is
    /// not kept.
    pub(super) fn keep(&self, request: &RequestId, shard: u32, objects: ShardObjects) {
        let bytes = size_of(&objects);
        let mut inner = self.inner.lock().expect("kept shards lock");
        inner.forget(request, shard);
        if inner.bytes_of(request) + bytes > self.most {
            return;
        }
        while inner.bytes + bytes > self.most {
            let Some(at) = inner.shards.iter().position(|(r, _, _)| r != request) else { return };
            let (_, _, oldest) = inner.shards.remove(at).expect("found above");
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
    fn bytes_of(&self, request: &RequestId) -> usize {
        self.shards.iter().filter(|(r, _, _)| r == request).map(|(_, _, o)| size_of(o)).sum()
    }

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
    fn other_requests_make_room_but_a_request_s_earlier_shards_never_do() {
        let kept = Kept::new(MOST);
        let (old, new) = (RequestId::from("old"), RequestId::from("new"));
        let quarter = MOST / 4;
        kept.keep(&old, 0, shard(quarter));
        kept.keep(&old, 1, shard(quarter));
        kept.keep(&new, 0, shard(quarter));
        kept.keep(&new, 1, shard(quarter));
        assert!(kept.all_of(&old, 0..2).is_some() && kept.all_of(&new, 0..2).is_some(), "all fit");
        kept.keep(&new, 2, shard(quarter));
        assert!(kept.all_of(&old, 0..1).is_none(), "the oldest of another request went");
        assert!(kept.all_of(&new, 0..3).is_some());
        assert!(kept.may_keep(&new, quarter as u64 / 3) && !kept.may_keep(&new, quarter as u64 / 3 + 1));
        kept.keep(&new, 3, shard(quarter * 2));
        assert!(kept.all_of(&new, 3..4).is_none(), "not beside the request's earlier shards");
        assert!(kept.all_of(&new, 0..3).is_some(), "which stay");
        assert!(kept.all_of(&old, 1..2).is_some(), "nor did another request's make room for it");
        kept.keep(&new, 1, shard(quarter));
        assert!(kept.all_of(&new, 0..3).is_some(), "a shard kept again counts once");
    }
}
