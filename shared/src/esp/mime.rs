//! Building one recipient's MIME message from its rendered content, with lettre's builder.
//!
//! Every message has `From`, `To`, `Subject` (RFC 2047 encoded words when it is not ASCII),
//! `Date`, a `Message-ID` derived from the recipient's idempotency key (the same recipient of
//! the same delivery always gets the same id, so a provider or a mailbox can spot a repeat), and
//! the one-click unsubscribe headers of RFC 8058. The body is `multipart/alternative` when the
//! template has both a text and an HTML body, else the one part it has; bodies are
//! quoted-printable or base64 as lettre chooses, so the message is 7-bit clean.

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use reqwest::Url;
use sha2::{Digest, Sha256};

use super::OutgoingMessage;
use super::render::{RenderError, RenderSettings, RenderedContent};

const LIST_UNSUBSCRIBE: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe");
const LIST_UNSUBSCRIBE_POST: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe-Post");
/// The header naming the delivery request a message belongs to, so that the provider's bounce and
/// complaint reports (which can carry the original headers) are counted against it.
pub const REQUEST_HEADER: &str = "X-Haishin-Request";

/// A deployment's sender settings, checked once.
#[derive(Clone, Debug)]
pub(super) struct Sender {
    from: Mailbox,
    envelope_from: Address,
    unsubscribe_base: Url,
}

impl Sender {
    pub(super) fn new(settings: &RenderSettings) -> Result<Self, RenderError> {
        let from: Mailbox =
            settings.from.parse().map_err(|e| RenderError::Settings(format!("from address: {e}")))?;
        let envelope_from = match &settings.envelope_from {
            Some(address) => {
                address.parse().map_err(|e| RenderError::Settings(format!("envelope sender: {e}")))?
            }
            None => from.email.clone(),
        };
        let unsubscribe_base = Url::parse(&settings.unsubscribe_base_url)
            .map_err(|e| RenderError::Settings(format!("unsubscribe base url: {e}")))?;
        if unsubscribe_base.scheme() != "https" || unsubscribe_base.cannot_be_a_base() {
            return Err(RenderError::Settings(
                "unsubscribe base url: RFC 8058 one-click unsubscribe needs an https:// url".into(),
            ));
        }
        if unsubscribe_base.query().is_some() || unsubscribe_base.fragment().is_some() {
            return Err(RenderError::Settings("unsubscribe base url: must have no query or fragment".into()));
        }
        Ok(Self { from, envelope_from, unsubscribe_base })
    }

    /// The recipient's unsubscribe URL: the base with the token as one more path segment.
    pub(super) fn unsubscribe_url(&self, token: &str) -> String {
        let mut url = self.unsubscribe_base.clone();
        url.path_segments_mut().expect("checked: the base url can be a base").pop_if_empty().push(token);
        url.into()
    }

    /// The whole message for one recipient.
    pub(super) fn build(
        &self,
        content: &RenderedContent,
        to: &str,
        idempotency_key: &str,
        unsubscribe_token: &str,
        request: Option<&str>,
    ) -> Result<OutgoingMessage, RenderError> {
        let to: Address = to.parse().map_err(|e| RenderError::Recipient(format!("{e}")))?;
        let message_id = message_id(idempotency_key, self.from.email.domain());
        let builder = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.clone()))
            .subject(content.subject.clone())
            .date_now()
            .message_id(Some(message_id.clone()))
            .raw_header(HeaderValue::new(
                LIST_UNSUBSCRIBE,
                format!("<{}>", self.unsubscribe_url(unsubscribe_token)),
            ))
            .raw_header(HeaderValue::new(LIST_UNSUBSCRIBE_POST, "List-Unsubscribe=One-Click".into()));
        let builder = match request {
            Some(request) => builder.raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(REQUEST_HEADER),
                request.to_owned(),
            )),
            None => builder,
        };
        let message = match (&content.text, &content.html) {
            (Some(text), Some(html)) => {
                builder.multipart(MultiPart::alternative_plain_html(text.clone(), html.clone()))
            }
            (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
            (None, Some(html)) => builder.singlepart(SinglePart::html(html.clone())),
            (None, None) => builder.header(ContentType::TEXT_PLAIN).body(String::new()),
        }
        .map_err(|e| RenderError::Build(e.to_string()))?;
        Ok(OutgoingMessage {
            idempotency_key: idempotency_key.to_owned(),
            request: request.map(str::to_owned),
            envelope_from: self.envelope_from.to_string(),
            to: to.to_string(),
            message_id,
            mime: message.formatted(),
        })
    }
}

/// The `Message-ID` of a recipient's message: a hash of its idempotency key at the sender's
/// domain, `<32 hex digits@domain>`.
pub fn message_id(idempotency_key: &str, domain: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("<{hex}@{domain}>")
}

#[cfg(test)]
mod tests {
    use super::super::MessageRenderer;
    use super::*;
    use crate::domain::{Recipient, Template};
    use mailparse::{MailHeaderMap, parse_mail};
    use serde_json::json;

    fn settings() -> RenderSettings {
        RenderSettings {
            from: "Shop <news@shop.example>".into(),
            envelope_from: Some("bounces@shop.example".into()),
            unsubscribe_base_url: "https://mail.shop.example/u/".into(),
        }
    }

    fn recipient(email: &str, name: &str) -> Recipient {
        Recipient { email: email.into(), params: json!({"name": name}).as_object().unwrap().clone() }
    }

    fn both() -> Template {
        Template::Inline {
            subject: "{{name}}さん、再入荷しました".into(),
            text: Some("Hi {{name}}, it's back.".into()),
            html: Some("<p>Hi {{name}}, it's <b>back</b>.</p>".into()),
        }
    }

    #[test]
    fn a_message_with_text_and_html_is_multipart_alternative_with_every_header() {
        let renderer = MessageRenderer::new(&both(), &settings()).unwrap().for_request("r-1");
        let message = renderer.render(&recipient("ann@example.com", "Ann"), "r-1~000001:7", "tok-1").unwrap();
        assert!(message.mime.is_ascii(), "the message is 7-bit clean");
        assert_eq!(message.envelope_from, "bounces@shop.example");
        assert_eq!(message.to, "ann@example.com");

        let raw = String::from_utf8(message.mime.clone()).unwrap();
        assert!(raw.contains("Subject: =?utf-8?b?"), "non-ASCII subject as RFC 2047 words: {raw}");
        let parsed = parse_mail(&message.mime).unwrap();
        let headers = &parsed.headers;
        assert_eq!(headers.get_first_value("Subject").unwrap(), "Annさん、再入荷しました");
        assert_eq!(headers.get_first_value("To").unwrap(), "ann@example.com");
        assert_eq!(headers.get_first_value("From").unwrap(), "Shop <news@shop.example>");
        assert_eq!(headers.get_first_value("Message-ID").unwrap(), message.message_id);
        assert!(mailparse::dateparse(&headers.get_first_value("Date").unwrap()).is_ok());
        assert_eq!(
            headers.get_first_value("List-Unsubscribe").unwrap(),
            "<https://mail.shop.example/u/tok-1>"
        );
        assert_eq!(headers.get_first_value("List-Unsubscribe-Post").unwrap(), "List-Unsubscribe=One-Click");
        assert_eq!(headers.get_first_value(REQUEST_HEADER).unwrap(), "r-1");
        assert_eq!(parsed.ctype.mimetype, "multipart/alternative");
        let kinds: Vec<&str> = parsed.subparts.iter().map(|p| p.ctype.mimetype.as_str()).collect();
        assert_eq!(kinds, ["text/plain", "text/html"]);
        assert_eq!(parsed.subparts[0].get_body().unwrap().trim_end(), "Hi Ann, it's back.");
        assert_eq!(parsed.subparts[1].get_body().unwrap().trim_end(), "<p>Hi Ann, it's <b>back</b>.</p>");
    }

    #[test]
    fn a_message_with_one_body_is_a_single_part() {
        let template = Template::Inline { subject: "Hi".into(), text: None, html: Some("<p>ü</p>".into()) };
        let renderer = MessageRenderer::new(&template, &settings()).unwrap();
        let message = renderer.render(&recipient("bo@example.com", "Bo"), "k", "t").unwrap();
        let parsed = parse_mail(&message.mime).unwrap();
        assert_eq!(parsed.ctype.mimetype, "text/html");
        assert_eq!(parsed.ctype.charset, "utf-8");
        assert_eq!(parsed.get_body().unwrap().trim_end(), "<p>ü</p>");
    }

    #[test]
    fn the_message_id_follows_the_idempotency_key() {
        let renderer = MessageRenderer::new(&both(), &settings()).unwrap();
        let ann = recipient("ann@example.com", "Ann");
        let first = renderer.render(&ann, "r-1~000001:7", "t").unwrap();
        let again = renderer.render(&ann, "r-1~000001:7", "t").unwrap();
        let other = renderer.render(&ann, "r-1~000001:8", "t").unwrap();
        assert_eq!(first.message_id, again.message_id);
        assert_ne!(first.message_id, other.message_id);
        assert_eq!(first.message_id.len(), "<@shop.example>".len() + 32);
        assert!(first.message_id.ends_with("@shop.example>"), "{}", first.message_id);
    }

    #[test]
    fn the_unsubscribe_token_is_one_encoded_path_segment() {
        let sender = Sender::new(&settings()).unwrap();
        assert_eq!(sender.unsubscribe_url("a/b c"), "https://mail.shop.example/u/a%2Fb%20c");
    }

    #[test]
    fn sender_settings_that_cannot_work_are_refused() {
        let mut bad = settings();
        bad.unsubscribe_base_url = "http://mail.shop.example/u".into();
        assert!(Sender::new(&bad).unwrap_err().to_string().contains("https"));
        let mut bad = settings();
        bad.from = "not an address".into();
        assert!(matches!(Sender::new(&bad), Err(RenderError::Settings(_))));
    }

    #[test]
    fn an_unusable_recipient_address_fails_that_recipient_only() {
        let renderer = MessageRenderer::new(&both(), &settings()).unwrap();
        let err = renderer.render(&recipient("no-at-sign", "X"), "k", "t").unwrap_err();
        assert!(matches!(err, RenderError::Recipient(_)), "{err}");
        assert!(err.is_per_recipient());
    }
}
