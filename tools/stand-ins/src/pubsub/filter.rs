//! Pub/Sub's subscription filter language, on message attributes.
//!
//! Supported: `attributes.KEY = "V"`, `attributes.KEY != "V"` (true when the key is absent),
//! `attributes:KEY`, `hasPrefix(attributes.KEY, "P")`, `NOT` (or `-`), `AND`, `OR` and
//! parentheses. As in Pub/Sub, `AND` and `OR` cannot be mixed without parentheses, and a
//! filter is at most 256 bytes.

use std::collections::HashMap;

/// The longest filter Pub/Sub accepts, in bytes.
const MAX_FILTER_LEN: usize = 256;

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    Has(String),
    Equals(String, String),
    HasPrefix(String, String),
    Not(Box<Filter>),
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

impl Filter {
    /// Parses `text`, or says why it is not a filter.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_FILTER_LEN {
            return Err(format!("filter is longer than {MAX_FILTER_LEN} bytes"));
        }
        let mut parser = Parser { tokens: tokenize(text)?, at: 0 };
        let filter = parser.expression()?;
        match parser.peek() {
            None => Ok(filter),
            Some(token) => Err(format!("unexpected {token:?} in filter")),
        }
    }

    /// Whether a message with these attributes passes.
    pub(crate) fn matches(&self, attributes: &HashMap<String, String>) -> bool {
        match self {
            Self::Has(key) => attributes.contains_key(key),
            Self::Equals(key, value) => attributes.get(key) == Some(value),
            Self::HasPrefix(key, prefix) => {
                attributes.get(key).is_some_and(|v| v.starts_with(prefix.as_str()))
            }
            Self::Not(inner) => !inner.matches(attributes),
            Self::And(all) => all.iter().all(|f| f.matches(attributes)),
            Self::Or(any) => any.iter().any(|f| f.matches(attributes)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Str(String),
    Dot,
    Colon,
    Comma,
    Eq,
    Ne,
    Minus,
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '.' | ':' | ',' | '=' | '-' | '(' | ')' => {
                chars.next();
                tokens.push(match c {
                    '.' => Token::Dot,
                    ':' => Token::Colon,
                    ',' => Token::Comma,
                    '=' => Token::Eq,
                    '-' => Token::Minus,
                    '(' => Token::Open,
                    _ => Token::Close,
                });
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("expected `!=`".into());
                }
                tokens.push(Token::Ne);
            }
            '"' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => value.push(chars.next().ok_or("unterminated string in filter")?),
                        Some(c) => value.push(c),
                        None => return Err("unterminated string in filter".into()),
                    }
                }
                tokens.push(Token::Str(value));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::new();
                while let Some(&c) = chars.peek().filter(|c| c.is_alphanumeric() || **c == '_' || **c == '-')
                {
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
            other => return Err(format!("unexpected character {other:?} in filter")),
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn expect(&mut self, want: &Token) -> Result<(), String> {
        match self.next() {
            Some(got) if &got == want => Ok(()),
            got => Err(format!("expected {want:?} in filter, found {got:?}")),
        }
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w == word)
    }

    /// term (AND term)* | term (OR term)*
    fn expression(&mut self) -> Result<Filter, String> {
        let first = self.term()?;
        let operator = match self.peek() {
            Some(Token::Word(w)) if w == "AND" || w == "OR" => w.clone(),
            _ => return Ok(first),
        };
        let mut terms = vec![first];
        while self.is_word(&operator) {
            self.next();
            terms.push(self.term()?);
        }
        if self.is_word("AND") || self.is_word("OR") {
            return Err("AND and OR must be grouped with parentheses".into());
        }
        Ok(if operator == "AND" { Filter::And(terms) } else { Filter::Or(terms) })
    }

    fn term(&mut self) -> Result<Filter, String> {
        match self.next() {
            Some(Token::Word(w)) if w == "NOT" => Ok(Filter::Not(Box::new(self.term()?))),
            Some(Token::Minus) => Ok(Filter::Not(Box::new(self.term()?))),
            Some(Token::Open) => {
                let inner = self.expression()?;
                self.expect(&Token::Close)?;
                Ok(inner)
            }
            Some(Token::Word(w)) if w == "attributes" => match self.next() {
                Some(Token::Colon) => Ok(Filter::Has(self.key()?)),
                Some(Token::Dot) => {
                    let key = self.key()?;
                    let negate = match self.next() {
                        Some(Token::Eq) => false,
                        Some(Token::Ne) => true,
                        other => return Err(format!("expected `=` or `!=` in filter, found {other:?}")),
                    };
                    let equals = Filter::Equals(key, self.string()?);
                    Ok(if negate { Filter::Not(Box::new(equals)) } else { equals })
                }
                other => Err(format!("expected `.` or `:` after attributes, found {other:?}")),
            },
            Some(Token::Word(w)) if w == "hasPrefix" => {
                self.expect(&Token::Open)?;
                self.expect(&Token::Word("attributes".into()))?;
                self.expect(&Token::Dot)?;
                let key = self.key()?;
                self.expect(&Token::Comma)?;
                let prefix = self.string()?;
                self.expect(&Token::Close)?;
                Ok(Filter::HasPrefix(key, prefix))
            }
            other => Err(format!("unexpected {other:?} in filter")),
        }
    }

    /// An attribute key: a bare word or a string literal.
    fn key(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(w) | Token::Str(w)) => Ok(w),
            other => Err(format!("expected an attribute key in filter, found {other:?}")),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Str(s)) => Ok(s),
            other => Err(format!("expected a string literal in filter, found {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn equality_and_inequality_treat_a_missing_key_as_not_equal() {
        let realtime = Filter::parse(r#"attributes.class = "realtime""#).unwrap();
        let not_realtime = Filter::parse(r#"attributes.class != "realtime""#).unwrap();
        for (message, is_realtime) in [
            (attrs(&[("class", "realtime")]), true),
            (attrs(&[("class", "batch")]), false),
            (attrs(&[]), false),
        ] {
            assert_eq!(realtime.matches(&message), is_realtime, "{message:?}");
            assert_eq!(not_realtime.matches(&message), !is_realtime, "{message:?}");
        }
    }

    #[test]
    fn presence_negation_and_conjunction_combine() {
        let filter =
            Filter::parse(r#"NOT attributes:test AND attributes.class = "batch" AND -attributes:x"#).unwrap();
        assert!(filter.matches(&attrs(&[("class", "batch")])));
        assert!(!filter.matches(&attrs(&[("class", "batch"), ("test", "")])));
        assert!(!filter.matches(&attrs(&[("class", "batch"), ("x", "1")])));
        assert!(!filter.matches(&attrs(&[("class", "realtime")])));
    }

    #[test]
    fn prefix_disjunction_and_parentheses_work() {
        let filter = Filter::parse(
            r#"(hasPrefix(attributes.kind, "chunk-") OR attributes:urgent) AND attributes.x != "1""#,
        )
        .unwrap();
        assert!(filter.matches(&attrs(&[("kind", "chunk-sent")])));
        assert!(filter.matches(&attrs(&[("urgent", "yes")])));
        assert!(!filter.matches(&attrs(&[("kind", "request")])));
        assert!(!filter.matches(&attrs(&[("urgent", "yes"), ("x", "1")])));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in [
            "attributes.class = realtime",
            r#"attributes.a = "1" AND attributes.b = "2" OR attributes:c"#,
            r#"attributes.class = "realtime"#,
            "class = \"x\"",
            "(attributes:a",
            "",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
        assert!(Filter::parse(&format!("attributes:{}", "k".repeat(300))).is_err());
    }
}
