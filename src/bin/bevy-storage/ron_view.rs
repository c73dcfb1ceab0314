//! RON payloads for people and for scripts: a faithful pretty-printer, and a conversion to
//! JSON that keeps enum variant names (the shape `serde_json` itself would give the value).
//!
//! Both work on a small token tree of the text rather than on `ron::Value`, which drops enum
//! variant names (`Warrior(level: 3)` would become `{"level": 3}`). The text is first checked
//! to be valid RON with `ron::Value`, and `ron::Value` is the fallback of the conversion.

use serde_json::{Map, Value as Json};

/// One piece of an item: `name`, `:`, `"text"`, `3.5`, or a bracketed group.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Atom(String),
    Colon,
    Group(char, Vec<Item>),
}

/// What stands between two commas of a group: `name: value`, `Some(3)`, `"text"` ...
type Item = Vec<Part>;

const FLAT_WIDTH: usize = 60;

/// Checks that `text` is valid RON.
pub fn is_valid(text: &str) -> bool {
    ron::from_str::<ron::Value>(text).is_ok()
}

/// Pretty-prints a RON document: one field per line, short groups kept on one line.
/// `None` if the text is not RON this reader understands.
pub fn pretty(text: &str) -> Option<String> {
    let item = parse(text)?;
    let mut out = String::new();
    write_item(&item, 0, &mut out);
    Some(out)
}

/// Converts a RON document to JSON: structs and maps become objects, sequences and tuples
/// arrays, `Some(x)` is `x`, `None` and `()` are `null`, enum variants are externally tagged
/// (`"Idle"`, `{"Warrior": {"level": 3}}`), non-finite floats are `null`. Falls back to
/// `ron::Value` (which loses variant names) for text the token tree cannot place.
pub fn to_json(text: &str) -> Option<Json> {
    parse(text).and_then(|item| item_json(&item)).or_else(|| {
        ron::from_str::<ron::Value>(text)
            .ok()
            .map(|v| value_json(&v))
    })
}

/// The parts of a world snapshot's RON body, `(entities, [(type path, rows, values)],
/// [(type path, values)])`, each value as compact RON text with its struct and variant names.
pub type SnapshotBody = (
    Vec<u64>,
    Vec<(String, Vec<u32>, Vec<String>)>,
    Vec<(String, Vec<String>)>,
);

/// Splits a snapshot's RON body into [`SnapshotBody`]; `None` if it has another shape.
pub fn snapshot_body(text: &str) -> Option<SnapshotBody> {
    let item = parse(text)?;
    let [Part::Group('(', parts)] = item.as_slice() else {
        return None;
    };
    let [entities, columns, resources] = parts.as_slice() else {
        return None;
    };
    let list = |item: &Item| -> Option<Vec<Item>> {
        match item.as_slice() {
            [Part::Group('[', items)] => Some(items.clone()),
            _ => None,
        }
    };
    let number = |item: &Item| -> Option<u64> {
        match item.as_slice() {
            [Part::Atom(a)] => a.parse().ok(),
            _ => None,
        }
    };
    let string = |item: &Item| -> Option<String> {
        match item.as_slice() {
            [Part::Atom(a)] => ron::from_str::<String>(a).ok(),
            _ => None,
        }
    };
    let texts = |item: &Item| -> Option<Vec<String>> {
        Some(
            list(item)?
                .iter()
                .map(|value| {
                    let mut out = String::new();
                    flat_item(value, &mut out);
                    out
                })
                .collect(),
        )
    };
    let tuple = |item: &Item| -> Option<Vec<Item>> {
        match item.as_slice() {
            [Part::Group('(', items)] => Some(items.clone()),
            _ => None,
        }
    };
    let entities = list(entities)?
        .iter()
        .map(number)
        .collect::<Option<Vec<u64>>>()?;
    let mut out_columns = Vec::new();
    for column in list(columns)? {
        let [path, rows, values] = tuple(&column)?.try_into().ok()?;
        let rows = list(&rows)?
            .iter()
            .map(|r| number(r).and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()?;
        out_columns.push((string(&path)?, rows, texts(&values)?));
    }
    let mut out_resources = Vec::new();
    for resource in list(resources)? {
        let [path, values] = tuple(&resource)?.try_into().ok()?;
        out_resources.push((string(&path)?, texts(&values)?));
    }
    Some((entities, out_columns, out_resources))
}

fn parse(text: &str) -> Option<Item> {
    let tokens = tokenize(text)?;
    let mut pos = 0;
    let (items, end) = parse_items(&tokens, &mut pos)?;
    // The document is exactly one item, not closed by a bracket.
    if end.is_some() || items.len() != 1 {
        return None;
    }
    items.into_iter().next()
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open(char),
    Close(char),
    Comma,
    Colon,
    Atom(String),
}

fn tokenize(text: &str) -> Option<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                if i >= chars.len() {
                    return None;
                }
                i += 2;
            }
            '(' | '[' | '{' => {
                tokens.push(Token::Open(c));
                i += 1;
            }
            ')' | ']' | '}' => {
                tokens.push(Token::Close(c));
                i += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                i += 1;
            }
            ':' => {
                tokens.push(Token::Colon);
                i += 1;
            }
            _ => {
                let start = i;
                loop {
                    match chars.get(i) {
                        Some('"') => {
                            let prefix: String = chars[start..i].iter().collect();
                            i = skip_string(&chars, i, &prefix)?;
                            break;
                        }
                        Some('\'') => {
                            i = skip_quoted(&chars, i, '\'')?;
                            break;
                        }
                        Some(&c) if !c.is_whitespace() && !"()[]{},:".contains(c) && c != '/' => {
                            i += 1;
                        }
                        _ => break,
                    }
                }
                if i == start {
                    return None;
                }
                tokens.push(Token::Atom(chars[start..i].iter().collect()));
            }
        }
    }
    Some(tokens)
}

/// Skips a string starting at the `"` at `i`; `prefix` is what stands before it (`b`, `r#`...).
fn skip_string(chars: &[char], i: usize, prefix: &str) -> Option<usize> {
    let raw = prefix.trim_start_matches('b');
    if let Some(hashes) = raw.strip_prefix('r') {
        if !hashes.chars().all(|c| c == '#') {
            return None;
        }
        let closing: Vec<char> = std::iter::once('"').chain(hashes.chars()).collect();
        let mut j = i + 1;
        while j + closing.len() <= chars.len() {
            if chars[j..j + closing.len()] == closing[..] {
                return Some(j + closing.len());
            }
            j += 1;
        }
        return None;
    }
    if !prefix.is_empty() && prefix != "b" {
        return None;
    }
    skip_quoted(chars, i, '"')
}

/// Skips a `quote`-delimited literal with backslash escapes starting at `i`.
fn skip_quoted(chars: &[char], i: usize, quote: char) -> Option<usize> {
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 2,
            c if c == quote => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Parses items up to the next closing bracket (returned) or the end of the tokens (`None`).
fn parse_items(tokens: &[Token], pos: &mut usize) -> Option<(Vec<Item>, Option<char>)> {
    let mut items = Vec::new();
    let mut current: Item = Vec::new();
    while let Some(token) = tokens.get(*pos) {
        *pos += 1;
        match token {
            Token::Atom(a) => current.push(Part::Atom(a.clone())),
            Token::Colon => current.push(Part::Colon),
            Token::Comma => {
                if current.is_empty() {
                    return None;
                }
                items.push(std::mem::take(&mut current));
            }
            Token::Open(open) => {
                let (inner, end) = parse_items(tokens, pos)?;
                if end != Some(closer(*open)) {
                    return None;
                }
                current.push(Part::Group(*open, inner));
            }
            Token::Close(c) => {
                if !current.is_empty() {
                    items.push(current);
                }
                return Some((items, Some(*c)));
            }
        }
    }
    if !current.is_empty() {
        items.push(current);
    }
    Some((items, None))
}

fn closer(open: char) -> char {
    match open {
        '(' => ')',
        '[' => ']',
        _ => '}',
    }
}

fn flat_item(item: &[Part], out: &mut String) {
    let mut previous_atom = false;
    for part in item {
        match part {
            Part::Atom(a) => {
                if previous_atom {
                    out.push(' ');
                }
                out.push_str(a);
            }
            Part::Colon => out.push_str(": "),
            Part::Group(open, items) => {
                out.push(*open);
                for (n, inner) in items.iter().enumerate() {
                    if n > 0 {
                        out.push_str(", ");
                    }
                    flat_item(inner, out);
                }
                out.push(closer(*open));
            }
        }
        previous_atom = matches!(part, Part::Atom(_));
    }
}

fn write_item(item: &[Part], indent: usize, out: &mut String) {
    let mut previous_atom = false;
    for part in item {
        match part {
            Part::Atom(a) => {
                if previous_atom {
                    out.push(' ');
                }
                out.push_str(a);
            }
            Part::Colon => out.push_str(": "),
            Part::Group(open, items) => {
                let mut flat = String::new();
                flat_item(std::slice::from_ref(part), &mut flat);
                let nested = items
                    .iter()
                    .flatten()
                    .any(|p| matches!(p, Part::Group(_, inner) if !inner.is_empty()));
                if items.is_empty() || (flat.chars().count() <= FLAT_WIDTH && !nested) {
                    out.push_str(&flat);
                } else {
                    out.push(*open);
                    out.push('\n');
                    for inner in items {
                        push_indent(indent + 1, out);
                        write_item(inner, indent + 1, out);
                        out.push_str(",\n");
                    }
                    push_indent(indent, out);
                    out.push(closer(*open));
                }
            }
        }
        previous_atom = matches!(part, Part::Atom(_));
    }
}

fn push_indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn item_json(item: &[Part]) -> Option<Json> {
    match item {
        [Part::Atom(a)] => atom_json(a),
        [Part::Group(open, items)] => group_json(*open, items),
        [Part::Atom(name), Part::Group('(', items)] if is_ident(name) => {
            if name == "Some" && items.len() == 1 {
                return item_json(&items[0]);
            }
            let inner = group_json('(', items)?;
            let mut object = Map::new();
            object.insert(ident(name).to_owned(), inner);
            Some(Json::Object(object))
        }
        _ => None,
    }
}

fn group_json(open: char, items: &[Item]) -> Option<Json> {
    match open {
        '[' => items
            .iter()
            .map(|i| item_json(i))
            .collect::<Option<_>>()
            .map(Json::Array),
        '{' => {
            let mut object = Map::new();
            for item in items {
                let colon = item.iter().position(|p| *p == Part::Colon)?;
                let (key, value) = (&item[..colon], &item[colon + 1..]);
                let key = match item_json(key)? {
                    Json::String(s) => s,
                    _ => {
                        let mut text = String::new();
                        flat_item(key, &mut text);
                        text
                    }
                };
                object.insert(key, item_json(value)?);
            }
            Some(Json::Object(object))
        }
        _ => {
            let named = |item: &Item| matches!(item.as_slice(), [Part::Atom(a), Part::Colon, _, ..] if is_ident(a));
            if items.is_empty() {
                Some(Json::Null)
            } else if items.iter().all(named) {
                let mut object = Map::new();
                for item in items {
                    let Part::Atom(name) = &item[0] else {
                        return None;
                    };
                    object.insert(ident(name).to_owned(), item_json(&item[2..])?);
                }
                Some(Json::Object(object))
            } else if items.len() == 1 {
                item_json(&items[0])
            } else {
                items
                    .iter()
                    .map(|i| item_json(i))
                    .collect::<Option<_>>()
                    .map(Json::Array)
            }
        }
    }
}

fn is_ident(atom: &str) -> bool {
    let name = ident(atom);
    name.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_alphanumeric() || c == '_')
}

fn ident(atom: &str) -> &str {
    atom.strip_prefix("r#").unwrap_or(atom)
}

fn atom_json(atom: &str) -> Option<Json> {
    match atom {
        "true" => return Some(Json::Bool(true)),
        "false" => return Some(Json::Bool(false)),
        "None" => return Some(Json::Null),
        _ => {}
    }
    if is_ident(atom) && !matches!(atom, "inf" | "NaN") {
        // A unit enum variant (or unit struct name): serde_json writes it as a string.
        return Some(Json::String(ident(atom).to_owned()));
    }
    ron::from_str::<ron::Value>(atom)
        .ok()
        .map(|v| value_json(&v))
}

/// `ron::Value` → JSON (loses enum variant names, which `ron::Value` does not keep).
fn value_json(value: &ron::Value) -> Json {
    use ron::Value as V;
    match value {
        V::Bool(b) => Json::Bool(*b),
        V::Char(c) => Json::String(c.to_string()),
        V::String(s) => Json::String(s.clone()),
        V::Bytes(b) => Json::Array(b.iter().map(|&x| Json::from(x)).collect()),
        V::Number(n) => number_json(n),
        V::Option(None) | V::Unit => Json::Null,
        V::Option(Some(v)) => value_json(v),
        V::Seq(items) => Json::Array(items.iter().map(value_json).collect()),
        V::Map(map) => Json::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        V::String(s) => s.clone(),
                        other => ron::to_string(other).unwrap_or_else(|_| format!("{other:?}")),
                    };
                    (key, value_json(v))
                })
                .collect(),
        ),
    }
}

fn number_json(n: &ron::Number) -> Json {
    use ron::Number as N;
    match *n {
        N::I8(v) => Json::from(v),
        N::I16(v) => Json::from(v),
        N::I32(v) => Json::from(v),
        N::I64(v) => Json::from(v),
        N::U8(v) => Json::from(v),
        N::U16(v) => Json::from(v),
        N::U32(v) => Json::from(v),
        N::U64(v) => Json::from(v),
        other => serde_json::Number::from_f64(other.into_f64()).map_or(Json::Null, Json::Number),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    enum Class {
        Idle,
        Warrior { level: u32 },
        Mage(u8, u8),
        Rogue(String),
    }

    #[derive(Serialize)]
    struct Player {
        name: String,
        classes: Vec<Class>,
        pos: (f32, f32),
        pet: Option<String>,
        mount: Option<u8>,
        scores: BTreeMap<u8, String>,
        tags: BTreeMap<String, bool>,
        unit: (),
        letter: char,
        nan: f64,
        r#type: i64,
    }

    fn sample() -> Player {
        Player {
            name: "Ada \"the (brave)\", 1st: {ok}".into(),
            classes: vec![
                Class::Idle,
                Class::Warrior { level: 3 },
                Class::Mage(1, 2),
                Class::Rogue("x".into()),
            ],
            pos: (1.5, -2.0),
            pet: Some("Rex".into()),
            mount: None,
            scores: [(1, "a".to_owned()), (2, "b".to_owned())].into(),
            tags: [("brave".to_owned(), true)].into(),
            unit: (),
            letter: ',',
            nan: f64::NAN,
            r#type: -7,
        }
    }

    #[test]
    fn json_matches_serde_json_shape() {
        let player = sample();
        let text = ron::to_string(&player).unwrap();
        assert!(is_valid(&text));
        let json = to_json(&text).unwrap();
        let mut expected = serde_json::to_value(&player).unwrap();
        expected["scores"] = serde_json::json!({"1": "a", "2": "b"});
        assert_eq!(json, expected, "{text}");
    }

    #[test]
    fn pretty_output_is_the_same_ron() {
        let text = ron::to_string(&sample()).unwrap();
        let pretty = pretty(&text).unwrap();
        assert!(pretty.contains("\n    name: \"Ada \\\"the (brave)\\\", 1st: {ok}\",\n"));
        assert!(pretty.contains("Warrior(level: 3)"), "{pretty}");
        let again: ron::Value = ron::from_str(&pretty).unwrap();
        assert_eq!(again, ron::from_str::<ron::Value>(&text).unwrap());
        assert_eq!(pretty.lines().last(), Some(")"));
    }

    #[test]
    fn odd_literals_and_garbage() {
        assert_eq!(
            to_json("r#\"raw \"quoted\"\"#"),
            Some(Json::from("raw \"quoted\""))
        );
        assert_eq!(
            to_json("[b\"ab\", 'x', 0x10]").unwrap(),
            serde_json::json!([[97, 98], "x", 16])
        );
        assert_eq!(pretty("(x:1,y:2)").unwrap(), "(x: 1, y: 2)");
        assert_eq!(pretty("(a: [1, 2])").unwrap(), "(\n    a: [1, 2],\n)");
        assert_eq!(pretty("()").unwrap(), "()");
        for bad in ["(a: 1", "a: 1)", "\"open", "(a: 1,,)", "1, 2"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
