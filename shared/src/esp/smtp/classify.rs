//! What an SMTP failure means for the message and for the rest of its batch (the module doc
//! of [`super`] lists the rules).

use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::response::Response;

use crate::esp::message::{Attempt, redact_addresses};
use crate::esp::{EspError, MessageOutcome, error_chain};

/// Reply codes that refuse a login: no message can pass until the settings change.
const LOGIN_REFUSED: [u16; 4] = [530, 534, 535, 538];

/// An SMTP failure, reduced to what decides its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// The server answered the message's exchange with a negative reply.
    Reply { code: u16, text: String },
    /// The client would not send this message (an extension it needs is missing).
    Client(String),
    /// A timeout, a dropped connection or a garbled reply; `handed_over` once the message's
    /// content started to go out.
    Broken { handed_over: bool, detail: String },
    /// No usable connection (refused, TLS, greeting, login); nothing was sent.
    Setup { permanent: bool, detail: String },
}

impl Failure {
    pub(super) fn detail(&self) -> String {
        match self {
            Failure::Reply { code, text } => format!("smtp {code}: {text}"),
            Failure::Client(detail) | Failure::Broken { detail, .. } | Failure::Setup { detail, .. } => {
                detail.clone()
            }
        }
    }
}

/// A failed step of a message's exchange (before its content went out).
pub(super) fn failure_of(error: &SmtpError) -> Failure {
    if let Some(code) = error.status() {
        let text = std::error::Error::source(error).map(|s| redact_addresses(&s.to_string()));
        return Failure::Reply { code: u16::from(code), text: text.unwrap_or_default() };
    }
    let detail = redact_addresses(&error_chain(error));
    if error.is_client() { Failure::Client(detail) } else { Failure::Broken { handed_over: false, detail } }
}

/// A connection that could not be set up.
pub(super) fn setup_failure(error: &SmtpError) -> Failure {
    let detail = match failure_of(error) {
        Failure::Reply { code, text } => format!("smtp {code}: {text}"),
        other => other.detail(),
    };
    let permanent =
        error.status().is_some_and(|code| LOGIN_REFUSED.contains(&u16::from(code))) || error.is_client();
    Failure::Setup { permanent, detail: format!("no usable connection to the smtp server: {detail}") }
}

/// The outcome of the message, and whether the batch goes on.
pub(super) fn attempt(failure: Failure) -> Attempt {
    let deferred = |reason: &str| MessageOutcome::Deferred { reason: reason.to_owned(), retry_after: None };
    match failure {
        Failure::Reply { code, text } => {
            let reason = format!("smtp {code}: {text}");
            match code {
                421 => Attempt::Halt { outcome: deferred(&reason), error: EspError::Transient(reason) },
                c if LOGIN_REFUSED.contains(&c) => Attempt::Halt {
                    outcome: deferred(&reason),
                    error: EspError::Permanent(format!("the smtp server refused the login: {reason}")),
                },
                400..=499 => Attempt::Done(deferred(&reason)),
                _ => Attempt::Done(MessageOutcome::Refused { reason }),
            }
        }
        Failure::Client(detail) => Attempt::Done(MessageOutcome::Refused { reason: detail }),
        Failure::Broken { handed_over: false, detail } => {
            let reason = format!("the smtp exchange broke off before the message went out: {detail}");
            Attempt::Halt { outcome: deferred(&reason), error: EspError::Transient(reason) }
        }
        Failure::Broken { handed_over: true, detail } => Attempt::Halt {
            outcome: MessageOutcome::Unknown {
                reason: format!(
                    "the smtp exchange broke off after the message went out, it may be accepted: {detail}"
                ),
            },
            error: EspError::Transient(format!("the smtp connection broke off: {detail}")),
        },
        Failure::Setup { permanent, detail } => Attempt::Halt {
            outcome: deferred(&detail),
            error: if permanent { EspError::Permanent(detail) } else { EspError::Transient(detail) },
        },
    }
}

/// The server's id for an accepted message: the queue id when it says `queued as ID`
/// (Postfix, Exim, aiosmtpd handlers), else its reply.
pub(super) fn queue_id(response: &Response) -> String {
    let text = response.message().collect::<Vec<_>>().join(" ");
    if let Some((_, rest)) = text.split_once("queued as ")
        && let Some(id) = rest.split_whitespace().next()
    {
        return id.trim_end_matches(['.', ')', ',']).to_owned();
    }
    format!("{} {text}", response.code()).chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Attempt {
        attempt(Failure::Reply { code, text: "5.1.1 <*@example.com> no such user".into() })
    }

    #[test]
    fn a_4xx_reply_defers_the_message_and_the_batch_goes_on() {
        assert!(matches!(reply(451), Attempt::Done(MessageOutcome::Deferred { .. })));
        assert!(matches!(reply(452), Attempt::Done(MessageOutcome::Deferred { .. })));
    }

    #[test]
    fn a_5xx_reply_refuses_the_message_with_the_reply_as_reason() {
        let Attempt::Done(MessageOutcome::Refused { reason }) = reply(550) else { panic!("refused") };
        assert_eq!(reason, "smtp 550: 5.1.1 <*@example.com> no such user");
        assert!(matches!(reply(554), Attempt::Done(MessageOutcome::Refused { .. })));
    }

    #[test]
    fn a_closing_server_or_a_refused_login_stops_the_batch() {
        assert!(matches!(reply(421), Attempt::Halt { error: EspError::Transient(_), .. }));
        assert!(matches!(
            reply(535),
            Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, error: EspError::Permanent(_) }
        ));
        let refused_login = Failure::Setup { permanent: true, detail: "smtp 535".into() };
        assert!(matches!(attempt(refused_login), Attempt::Halt { error: EspError::Permanent(_), .. }));
        let no_connection = Failure::Setup { permanent: false, detail: "connection refused".into() };
        assert!(matches!(
            attempt(no_connection),
            Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, error: EspError::Transient(_) }
        ));
    }

    #[test]
    fn a_break_before_the_content_defers_and_after_it_is_unknown() {
        let before = Failure::Broken { handed_over: false, detail: "no answer to RCPT".into() };
        assert!(matches!(attempt(before), Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, .. }));
        let after = Failure::Broken { handed_over: true, detail: "no answer to the message".into() };
        assert!(matches!(attempt(after), Attempt::Halt { outcome: MessageOutcome::Unknown { .. }, .. }));
        assert!(matches!(
            attempt(Failure::Client("no SMTPUTF8".into())),
            Attempt::Done(MessageOutcome::Refused { .. })
        ));
    }

    #[test]
    fn the_queue_id_is_taken_from_the_reply_when_the_server_names_it() {
        let ok = |line: &str| queue_id(&format!("250 {line}\r\n").parse::<Response>().unwrap());
        assert_eq!(ok("2.0.0 Ok: queued as 4F2C81E2"), "4F2C81E2");
        assert_eq!(ok("OK"), "250 OK");
    }
}
