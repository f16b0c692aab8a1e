//! Rendering an inline template per recipient, for message-based providers.
//!
//! The placeholders are the ones the API documents, `{{name}}`, filled from the recipient's
//! `params` by [minijinja](https://docs.rs/minijinja) (so `{{ name }}`, `{{ user.city }}` and
//! Jinja's `{% if coupon %}…{% endif %}` work too). The subject and the text body are rendered
//! as they are; the HTML body escapes every value it inserts. A placeholder the recipient's
//! params do not define is an error that names it, never an empty string; only a test such as
//! `{% if coupon %}` may look at an undefined value.
//!
//! A stored template (`{"id": …}`) lives at an ESP and cannot be rendered here: it needs a
//! list-based provider.

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};

use super::OutgoingMessage;
use super::mime::Sender;
use crate::domain::{Recipient, Template};

/// Who a deployment's messages come from, and where their unsubscribe links point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderSettings {
    /// The `From` header: `news@shop.example` or `Shop <news@shop.example>`. Its domain is
    /// the domain of every `Message-ID`.
    pub from: String,
    /// The envelope sender (where bounces go); the `From` address when absent.
    pub envelope_from: Option<String>,
    /// The deployment's one-click unsubscribe endpoint (`https://…`); each message's
    /// `List-Unsubscribe` is this URL with the recipient's token appended as a path segment.
    pub unsubscribe_base_url: String,
}

/// One recipient's rendered subject and bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedContent {
    /// On one line: line breaks a value brought in are replaced by spaces.
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// Why a message could not be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The delivery names a template stored at an ESP.
    #[error(
        "template `{id}` is stored at the esp: a stored template needs a list-based provider, \
         message-based providers send inline templates only"
    )]
    StoredTemplate { id: String },
    /// The template does not parse.
    #[error("the template's {part} does not parse: {detail}")]
    Syntax { part: &'static str, detail: String },
    /// The template uses a placeholder the recipient's params do not define.
    #[error("the template's {part} uses `{name}`, which the recipient's params do not define")]
    Undefined { part: &'static str, name: String },
    /// Rendering failed otherwise (a filter applied to the wrong kind of value).
    #[error("the template's {part} cannot be rendered: {detail}")]
    Render { part: &'static str, detail: String },
    /// The recipient's address cannot be used in a message.
    #[error("the recipient's address is not usable: {0}")]
    Recipient(String),
    /// The deployment's sender settings cannot work.
    #[error("sender settings: {0}")]
    Settings(String),
    /// The message could not be assembled.
    #[error("the message cannot be built: {0}")]
    Build(String),
}

impl RenderError {
    /// True when the error is this recipient's alone (its params or its address), so that the
    /// recipient is counted `failed` and the rest of the delivery goes on.
    pub fn is_per_recipient(&self) -> bool {
        matches!(self, Self::Undefined { .. } | Self::Render { .. } | Self::Recipient(_) | Self::Build(_))
    }
}

/// The parts of an inline template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Subject => "subject",
            Part::Text => "text",
            Part::Html => "html",
        }
    }
}

/// An inline template compiled once per delivery, rendering a message per recipient.
#[derive(Debug)]
pub struct MessageRenderer {
    env: Environment<'static>,
    /// Each part the template has, with the placeholders it uses in the order they appear.
    parts: Vec<(Part, Vec<String>)>,
    sender: Sender,
    /// The delivery request the messages belong to, named in their `X-Haishin-Request` header.
    request: Option<String>,
}

impl MessageRenderer {
    /// Compiles the template's parts; fails for a stored template, a part that does not parse
    /// or sender settings that cannot work.
    pub fn new(template: &Template, settings: &RenderSettings) -> Result<Self, RenderError> {
        let (subject, text, html) = match template {
            Template::Stored { id } => return Err(RenderError::StoredTemplate { id: id.clone() }),
            Template::Inline { subject, text, html } => (subject, text, html),
        };
        let sender = Sender::new(settings)?;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|name| if name == "html" { AutoEscape::Html } else { AutoEscape::None });
        let mut parts = Vec::new();
        for (part, source) in
            [(Part::Subject, Some(subject)), (Part::Text, text.as_ref()), (Part::Html, html.as_ref())]
        {
            let Some(source) = source else { continue };
            env.add_template_owned(part.name(), source.clone())
                .map_err(|e| RenderError::Syntax { part: part.name(), detail: e.to_string() })?;
            let template = env.get_template(part.name()).expect("the template was just added");
            let mut names: Vec<String> = template.undeclared_variables(true).into_iter().collect();
            names.sort_by_key(|name| (source.find(name.as_str()).unwrap_or(usize::MAX), name.clone()));
            parts.push((part, names));
        }
        Ok(Self { env, parts, sender, request: None })
    }

    /// Renders the subject and bodies with one recipient's params.
    pub fn render_content(&self, params: &Map<String, Json>) -> Result<RenderedContent, RenderError> {
        let context = Value::from(Serde(params));
        let mut content = RenderedContent { subject: String::new(), text: None, html: None };
        for (part, names) in &self.parts {
            let template = self.env.get_template(part.name()).expect("every part was added");
            let rendered = template.render(&context).map_err(|e| {
                let missing = names.iter().find(|name| lookup(params, name).is_none());
                match (e.kind(), missing) {
                    (ErrorKind::UndefinedError, Some(name)) | (ErrorKind::InvalidOperation, Some(name)) => {
                        RenderError::Undefined { part: part.name(), name: name.clone() }
                    }
                    _ => RenderError::Render { part: part.name(), detail: e.to_string() },
                }
            })?;
            match part {
                Part::Subject => content.subject = one_line(&rendered),
                Part::Text => content.text = Some(rendered),
                Part::Html => content.html = Some(rendered),
            }
        }
        Ok(content)
    }

    /// Renders one recipient's whole message. `idempotency_key` is stable for this recipient of
    /// this delivery (its `Message-ID` is derived from it); `unsubscribe_token` identifies the
    /// recipient to the unsubscribe endpoint.
    pub fn render(
        &self,
        recipient: &Recipient,
        idempotency_key: &str,
        unsubscribe_token: &str,
    ) -> Result<OutgoingMessage, RenderError> {
        let content = self.render_content(&recipient.params)?;
        self.sender.build(
            &content,
            &recipient.email,
            idempotency_key,
            unsubscribe_token,
            self.request.as_deref(),
        )
    }

    /// Names `request` in every message rendered, so that the provider's bounce and complaint
    /// reports can be counted against it.
    pub fn for_request(mut self, request: &str) -> Self {
        self.request = Some(request.to_owned());
        self
    }
}

/// The value at a dotted path (`user.city`) of the params, if any.
fn lookup<'a>(params: &'a Map<String, Json>, path: &str) -> Option<&'a Json> {
    let mut parts = path.split('.');
    let mut value = params.get(parts.next()?)?;
    for key in parts {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

/// A subject on one line: a header cannot hold a line break, and one in a value must not start
/// a new header.
fn one_line(text: &str) -> String {
    text.split(['\r', '\n']).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> RenderSettings {
        RenderSettings {
            from: "Shop <news@shop.example>".into(),
            envelope_from: None,
            unsubscribe_base_url: "https://mail.shop.example/unsubscribe".into(),
        }
    }

    fn inline(subject: &str, text: Option<&str>, html: Option<&str>) -> Template {
        Template::Inline { subject: subject.into(), text: text.map(Into::into), html: html.map(Into::into) }
    }

    fn params(value: &Json) -> Map<String, Json> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn html_escapes_the_values_it_inserts_and_text_does_not() {
        let renderer = MessageRenderer::new(
            &inline("{{name}}, it's back", Some("Hi {{name}}"), Some("<p>Hi {{ name }}</p>")),
            &settings(),
        )
        .unwrap();
        let content = renderer.render_content(&params(&json!({"name": "<b>Tom & Jerry</b>"}))).unwrap();
        assert_eq!(content.subject, "<b>Tom & Jerry</b>, it's back");
        assert_eq!(content.text.as_deref(), Some("Hi <b>Tom & Jerry</b>"));
        assert_eq!(content.html.as_deref(), Some("<p>Hi &lt;b&gt;Tom &amp; Jerry&lt;&#x2f;b&gt;</p>"));
    }

    #[test]
    fn an_undefined_placeholder_is_an_error_naming_it() {
        let renderer =
            MessageRenderer::new(&inline("Hello {{name}}", Some("Your code: {{ code }}"), None), &settings())
                .unwrap();
        let err = renderer.render_content(&params(&json!({"name": "A"}))).unwrap_err();
        assert_eq!(err, RenderError::Undefined { part: "text", name: "code".into() });
        assert!(err.to_string().contains("`code`"), "{err}");
        assert!(err.is_per_recipient());
        let nested = MessageRenderer::new(&inline("{{ user.city }}", Some("x"), None), &settings()).unwrap();
        let err = nested.render_content(&params(&json!({"user": {"name": "A"}}))).unwrap_err();
        assert_eq!(err, RenderError::Undefined { part: "subject", name: "user.city".into() });
    }

    #[test]
    fn an_optional_param_can_be_tested_without_being_defined() {
        let renderer = MessageRenderer::new(
            &inline("Hi", Some("{% if coupon %}Code {{ coupon }}{% else %}No code{% endif %}"), None),
            &settings(),
        )
        .unwrap();
        assert_eq!(renderer.render_content(&Map::new()).unwrap().text.as_deref(), Some("No code"));
        let with = renderer.render_content(&params(&json!({"coupon": "X1"}))).unwrap();
        assert_eq!(with.text.as_deref(), Some("Code X1"));
    }

    #[test]
    fn numbers_render_and_a_line_break_cannot_start_a_header() {
        let renderer =
            MessageRenderer::new(&inline("{{n}} items {{evil}}", Some("x"), None), &settings()).unwrap();
        let content = renderer.render_content(&params(&json!({"n": 3, "evil": "a\r\nBcc: x@y.z"}))).unwrap();
        assert_eq!(content.subject, "3 items a Bcc: x@y.z");
    }

    #[test]
    fn a_stored_template_needs_a_list_based_provider() {
        let err = MessageRenderer::new(&Template::Stored { id: "welcome".into() }, &settings()).unwrap_err();
        assert!(err.to_string().contains("needs a list-based provider"), "{err}");
        assert!(!err.is_per_recipient());
    }

    #[test]
    fn a_template_that_does_not_parse_names_its_part() {
        let err =
            MessageRenderer::new(&inline("ok", None, Some("<p>{{ name </p>")), &settings()).unwrap_err();
        assert!(matches!(err, RenderError::Syntax { part: "html", .. }), "{err}");
    }
}
