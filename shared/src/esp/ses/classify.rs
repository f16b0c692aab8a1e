//! What a failed `SendEmail` means for the message and for the rest of its batch (the module
//! doc of [`super`] lists the rules).

use aws_sdk_sesv2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sesv2::operation::send_email::SendEmailError;

use crate::esp::message::{Attempt, redact_addresses};
use crate::esp::{EspError, MessageOutcome, error_chain};

/// A failed `SendEmail`, reduced to what decides its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// SES answered with an error.
    Service { code: String, message: String, status: u16 },
    /// The request never left: it could not be built, or no connection could be made.
    NotSent(String),
    /// The request went out but no usable answer came back.
    Lost(String),
}

pub(super) fn failure_of(error: &SdkError<SendEmailError>) -> Failure {
    let detail = redact_addresses(&error_chain(error));
    match error {
        SdkError::ServiceError(service) => Failure::Service {
            code: service.err().code().unwrap_or("Unknown").to_owned(),
            message: redact_addresses(service.err().message().unwrap_or_default()),
            status: service.raw().status().as_u16(),
        },
        SdkError::ConstructionFailure(_) => Failure::NotSent(detail),
        SdkError::DispatchFailure(_) if connection_refused(error) => Failure::NotSent(detail),
        _ => Failure::Lost(detail),
    }
}

/// True when the connection itself was refused, so that the request never left.
fn connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// What a failure means for the message and for the rest of its batch (see the module doc).
pub(super) fn classify(failure: Failure) -> Attempt {
    let deferred = |reason: &str| MessageOutcome::Deferred { reason: reason.to_owned(), retry_after: None };
    match failure {
        Failure::Service { code, message, status } => {
            let reason = format!("ses {code} ({status}): {message}");
            match code.as_str() {
                "TooManyRequestsException"
                | "LimitExceededException"
                | "Throttling"
                | "ThrottlingException"
                | "TooManyRequests" => Attempt::Halt {
                    outcome: deferred(&reason),
                    error: EspError::RateLimited { retry_after: None },
                },
                _ if status == 429 => Attempt::Halt {
                    outcome: deferred(&reason),
                    error: EspError::RateLimited { retry_after: None },
                },
                "AccountSuspendedException" | "SendingPausedException" => Attempt::Halt {
                    outcome: MessageOutcome::Refused { reason: reason.clone() },
                    error: EspError::Permanent(reason),
                },
                "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
                    Attempt::Halt { outcome: deferred(&reason), error: EspError::Transient(reason) }
                }
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "InvalidSignatureException"
                | "MissingAuthenticationToken" => Attempt::Halt {
                    outcome: deferred(&reason),
                    error: EspError::Permanent(format!("ses refused the credentials: {reason}")),
                },
                _ if status == 504 => Attempt::Halt {
                    outcome: MessageOutcome::Unknown { reason: format!("{reason}; ses may have sent it") },
                    error: EspError::Transient(reason),
                },
                _ if status >= 500 => {
                    Attempt::Halt { outcome: deferred(&reason), error: EspError::Transient(reason) }
                }
                _ => Attempt::Done(MessageOutcome::Refused { reason }),
            }
        }
        Failure::NotSent(detail) => {
            let reason = format!("the ses request was not sent: {detail}");
            Attempt::Halt { outcome: deferred(&reason), error: EspError::Transient(reason) }
        }
        Failure::Lost(detail) => Attempt::Halt {
            outcome: MessageOutcome::Unknown {
                reason: format!(
                    "no answer from ses after the request went out, it may have sent it: {detail}"
                ),
            },
            error: EspError::Transient(format!("ses did not answer: {detail}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(code: &str, status: u16) -> Attempt {
        classify(Failure::Service { code: code.into(), message: "no".into(), status })
    }

    #[test]
    fn throttling_defers_the_message_and_stops_the_batch_as_rate_limited() {
        for code in ["TooManyRequestsException", "LimitExceededException", "Throttling"] {
            assert!(
                matches!(
                    service(code, 400),
                    Attempt::Halt {
                        outcome: MessageOutcome::Deferred { .. },
                        error: EspError::RateLimited { .. }
                    }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            service("Whatever", 429),
            Attempt::Halt { error: EspError::RateLimited { .. }, .. }
        ));
    }

    #[test]
    fn a_rejected_message_is_refused_and_the_batch_goes_on() {
        for code in ["MessageRejected", "MailFromDomainNotVerifiedException", "BadRequestException"] {
            let Attempt::Done(MessageOutcome::Refused { reason }) = service(code, 400) else {
                panic!("{code}")
            };
            assert!(reason.starts_with(&format!("ses {code} (400)")), "{reason}");
        }
    }

    #[test]
    fn a_suspended_account_or_refused_credentials_stop_the_batch_for_good() {
        assert!(matches!(
            service("AccountSuspendedException", 400),
            Attempt::Halt { outcome: MessageOutcome::Refused { .. }, error: EspError::Permanent(_) }
        ));
        assert!(matches!(
            service("AccessDeniedException", 403),
            Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, error: EspError::Permanent(_) }
        ));
    }

    #[test]
    fn a_5xx_is_transient_but_a_gateway_timeout_is_unknown() {
        assert!(matches!(
            service("InternalFailure", 500),
            Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, error: EspError::Transient(_) }
        ));
        assert!(matches!(
            service("GatewayTimeout", 504),
            Attempt::Halt { outcome: MessageOutcome::Unknown { .. }, .. }
        ));
    }

    #[test]
    fn a_lost_answer_is_unknown_and_an_unsent_request_is_deferred() {
        assert!(matches!(
            classify(Failure::Lost("timeout".into())),
            Attempt::Halt { outcome: MessageOutcome::Unknown { .. }, .. }
        ));
        assert!(matches!(
            classify(Failure::NotSent("connection refused".into())),
            Attempt::Halt { outcome: MessageOutcome::Deferred { .. }, error: EspError::Transient(_) }
        ));
    }

    #[test]
    fn a_refused_connection_is_found_in_the_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("dispatch failure")]
        struct Wrapper(#[source] std::io::Error);
        let refused = Wrapper(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(connection_refused(&refused));
        assert!(!connection_refused(&Wrapper(std::io::Error::other("reset"))));
    }
}
