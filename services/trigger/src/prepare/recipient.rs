//! Checking one recipient: its address and the size of its parameters.

use haishin_shared::domain::Recipient;

/// Longest accepted address (RFC 5321 path limit).
pub(super) const MAX_EMAIL_LEN: usize = 254;
/// Largest accepted parameter set per recipient, in bytes of JSON.
pub(super) const MAX_PARAMS_BYTES: usize = 8 * 1024;

/// Why a row was skipped; the names are the keys of the request's `skipped` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    InvalidEmail,
    MissingColumn,
    Malformed,
    Oversize,
    Duplicate,
    /// The address is suppressed in a scope that holds for the request (`global`, or one of
    /// its labels): see `haishin_shared::suppression`.
    Suppressed,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::InvalidEmail => "invalid_email",
            Skip::MissingColumn => "missing_column",
            Skip::Malformed => "malformed",
            Skip::Oversize => "oversize",
            Skip::Duplicate => "duplicate",
            Skip::Suppressed => "suppressed",
        }
    }
}

/// Checks an address: one `@`, a non-empty local part, a dotted domain, no spaces, sane length.
pub(crate) fn valid_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL_LEN || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.rsplit_once('@') else { return false };
    !local.is_empty()
        && local.len() <= 64
        && !local.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-')
}

/// Validates one recipient; the address is trimmed.
pub(super) fn check(mut recipient: Recipient) -> Result<Recipient, Skip> {
    recipient.email = recipient.email.trim().to_owned();
    if !valid_email(&recipient.email) {
        return Err(Skip::InvalidEmail);
    }
    let params_len = serde_json::to_vec(&recipient.params).map_or(usize::MAX, |v| v.len());
    if params_len > MAX_PARAMS_BYTES {
        return Err(Skip::Oversize);
    }
    Ok(recipient)
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use super::*;

    #[test]
    fn addresses_are_checked_for_shape() {
        for ok in ["a@example.com", "first.last+tag@sub.example.co.jp", "x@a-b.io"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "no-at.example.com",
            "@example.com",
            "a@nodot",
            "a b@example.com",
            "a@.example.com",
            "a@example..com",
            "a@b@example.com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn oversize_parameters_are_skipped() {
        let mut params = Map::new();
        params.insert("blob".into(), Value::String("x".repeat(MAX_PARAMS_BYTES + 1)));
        assert_eq!(check(Recipient { email: "a@example.com".into(), params }), Err(Skip::Oversize));
    }

    #[test]
    fn addresses_are_trimmed() {
        let r = check(Recipient { email: "  a@example.com ".into(), params: Map::new() }).unwrap();
        assert_eq!(r.email, "a@example.com");
    }
}
