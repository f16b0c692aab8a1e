//! Checking an inline template at intake: that each part parses, and which placeholders it uses.
//!
//! The syntax is the one rendering uses (minijinja: `{{name}}`, `{{ user.city }}`,
//! `{% if coupon %}…{% endif %}`, `{{ coupon | default("none") }}`), so a template that passes
//! here renders later.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use super::Template;

/// The inline parts of a template, by name.
fn parts(template: &Template) -> Vec<(&'static str, &str)> {
    match template {
        Template::Stored { .. } => Vec::new(),
        Template::Inline { subject, text, html } => {
            let mut parts = vec![("subject", subject.as_str())];
            parts.extend(text.as_deref().map(|t| ("text", t)));
            parts.extend(html.as_deref().map(|h| ("html", h)));
            parts
        }
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env
}

/// The top-level names an inline template's placeholders use; an error names the part that does
/// not parse, and why.
pub fn placeholders(template: &Template) -> Result<BTreeSet<String>, String> {
    let env = environment();
    let mut names = BTreeSet::new();
    for (part, source) in parts(template) {
        let parsed = env.template_from_str(source).map_err(|e| {
            format!("template {part} does not parse: {}", e.detail().unwrap_or("syntax error"))
        })?;
        names.extend(parsed.undeclared_variables(false));
    }
    Ok(names)
}

/// The first placeholder among `names` that `params` leave without a value, when the template
/// really needs it: a placeholder only tested (`{% if coupon %}`) or given a default
/// (`{{ coupon | default("") }}`) may be missing.
pub fn missing_value(
    template: &Template,
    names: &BTreeSet<String>,
    params: &Map<String, Value>,
) -> Option<String> {
    let missing: Vec<&String> = names.iter().filter(|name| !params.contains_key(*name)).collect();
    if missing.is_empty() {
        return None;
    }
    let env = environment();
    let sources: Vec<_> =
        parts(template).into_iter().filter_map(|(_, s)| env.template_from_str(s).ok()).collect();
    // Each missing name alone: the others are given a value, so a failure is this one's.
    missing.iter().find_map(|name| {
        let mut context = params.clone();
        for other in missing.iter().filter(|other| *other != name) {
            context.insert((*other).clone(), Value::String(String::new()));
        }
        let context = minijinja::Value::from(minijinja::value::Serde(&context));
        sources.iter().any(|t| t.render(&context).is_err()).then(|| (*name).clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(subject: &str, text: &str) -> Template {
        Template::Inline { subject: subject.into(), text: Some(text.into()), html: None }
    }

    #[test]
    fn placeholders_are_read_from_every_part() {
        let names = placeholders(&inline("{{name}}, it's back", "{{ product }} at {{ url }}")).unwrap();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["name", "product", "url"]);
    }

    #[test]
    fn a_placeholder_never_closed_is_a_syntax_error_naming_the_part() {
        let err = placeholders(&inline("Hi {{name", "ok")).unwrap_err();
        assert!(err.starts_with("template subject does not parse"), "{err}");
        assert!(placeholders(&inline("ok", "{% if x %}never ended")).unwrap_err().contains("text"));
    }

    #[test]
    fn a_missing_value_is_named_unless_the_template_can_do_without_it() {
        let template = inline("{{name}}", "{% if coupon %}{{ coupon }}{% endif %} {{ code | default('-') }}");
        let names = placeholders(&template).unwrap();
        let params = |pairs: &[(&str, &str)]| -> Map<String, Value> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect()
        };
        assert_eq!(missing_value(&template, &names, &params(&[("name", "A")])), None);
        assert_eq!(missing_value(&template, &names, &params(&[("coupon", "C")])), Some("name".into()));
        assert_eq!(missing_value(&template, &names, &params(&[])), Some("name".into()));
    }
}
