//! Identifiers of requests and chunks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A delivery request's id: the caller's idempotency key (the same id twice is one request).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct RequestId(String);

/// A chunk's id, derived from its request and its place in the audience: preparing the same
/// request again yields the same ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct ChunkId(String);

impl ChunkId {
    /// The id of a request's `seq`-th chunk.
    pub fn new(request: &RequestId, seq: u32) -> Self {
        Self(format!("{request}~{seq:06}"))
    }
}

macro_rules! text_id {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

text_id!(RequestId);
text_id!(ChunkId);

/// The Cloud Storage object that holds the recipients of a request's `seq`-th chunk (NDJSON).
pub fn chunk_object(request: &RequestId, seq: u32) -> String {
    format!("requests/{request}/chunks/{seq:06}.ndjson")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_follow_the_request_and_the_sequence() {
        let request = RequestId::from("r-1");
        assert_eq!(ChunkId::new(&request, 7).as_str(), "r-1~000007");
        assert_eq!(chunk_object(&request, 7), "requests/r-1/chunks/000007.ndjson");
    }
}
