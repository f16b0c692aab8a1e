//! The class of a request, and where requests and chunks stand.
//!
//! Each is an enum stored as its lowercase name in a `TEXT` column. Reading a value that no
//! variant names is an error ([`UnknownValue`]), never a silent default.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A stored or received name that no variant of `kind` has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident ($kind:literal) { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { kind: $kind, value: other.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <str as Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<'_, Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(<&str as Decode<'r, Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}

text_enum! {
    /// The class of a delivery request: realtime events overtake batch campaigns.
    Class ("class") {
        Realtime => "realtime",
        Batch => "batch",
    }
}

text_enum! {
    /// Where a request stands: `received → preparing → dispatching → completed | failed | expired | cancelled`,
    /// or `rejected` when it never entered the pipeline.
    RequestState ("request state") {
        Received => "received",
        Preparing => "preparing",
        Dispatching => "dispatching",
        Completed => "completed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
        Rejected => "rejected",
    }
}

impl RequestState {
    /// The states a request never leaves.
    pub const FINAL: &'static [RequestState] =
        &[Self::Completed, Self::Failed, Self::Expired, Self::Cancelled, Self::Rejected];

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }
}

text_enum! {
    /// Where a chunk stands: `pending → queued → uploading → uploaded → sending → sent → completed`,
    /// or `failed`, `expired`, `cancelled`, and `unknown` where a send's outcome could not be established.
    ChunkState ("chunk state") {
        Pending => "pending",
        Queued => "queued",
        Uploading => "uploading",
        Uploaded => "uploaded",
        Sending => "sending",
        Sent => "sent",
        Completed => "completed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
        Unknown => "unknown",
    }
}

impl ChunkState {
    /// The states a chunk never leaves: its recipients have their outcome.
    pub const FINAL: &'static [ChunkState] =
        &[Self::Completed, Self::Failed, Self::Expired, Self::Cancelled, Self::Unknown];
    /// The states that hold one of the ESP's upload slots.
    pub const HOLDING_UPLOAD_SLOT: &'static [ChunkState] = &[Self::Queued, Self::Uploading];
    /// The states that hold one of a message-based provider's send slots: from dispatch (there is
    /// no upload) until the last message is handed over.
    pub const HOLDING_SEND_SLOT: &'static [ChunkState] = &[Self::Uploaded, Self::Sending];

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_text() {
        for s in ChunkState::ALL {
            assert_eq!(s.as_str().parse::<ChunkState>().unwrap(), *s);
        }
        for s in RequestState::ALL {
            assert_eq!(s.as_str().parse::<RequestState>().unwrap(), *s);
        }
        for c in Class::ALL {
            assert_eq!(c.as_str().parse::<Class>().unwrap(), *c);
        }
    }

    #[test]
    fn an_unknown_name_is_an_error_that_names_it() {
        let err = "lost".parse::<ChunkState>().unwrap_err();
        assert_eq!(err.to_string(), "unknown chunk state `lost`");
        assert!("urgent".parse::<Class>().is_err());
    }

    #[test]
    fn final_states_are_exactly_those_never_left() {
        let final_chunks: Vec<_> = ChunkState::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(final_chunks.len(), ChunkState::FINAL.len());
        assert!(!ChunkState::Sent.is_final() && ChunkState::Unknown.is_final());
        assert!(RequestState::Rejected.is_final() && !RequestState::Dispatching.is_final());
    }
}
