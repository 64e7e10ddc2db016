//! What serde's YAML reading does not say: the line of a key given twice.
//!
//! A duplicate key is an error there, but a top-level one comes without a position.
//! This scans the text's block mappings (the only style the configs use) for a key
//! repeated in one mapping and names both lines.

use crate::CfgError;
use std::collections::HashMap;

/// A key given twice in one block mapping: the key, its first line and the repeat's
/// (1-based).
pub fn duplicate_key(text: &str) -> Option<(String, usize, usize)> {
    // One scope per open mapping: the indentation of its keys and the keys seen.
    let mut scopes: Vec<(usize, HashMap<String, usize>)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            continue;
        }
        let mut indent = raw.len() - trimmed.len();
        let mut body = trimmed;
        let mut item = false;
        // `- key: v` opens a new mapping inside a list item
        while let Some(rest) = body.strip_prefix("- ") {
            let rest_trimmed = rest.trim_start();
            indent += body.len() - rest_trimmed.len();
            body = rest_trimmed;
            item = true;
        }
        while scopes.last().is_some_and(|(ind, _)| *ind > indent) {
            scopes.pop();
        }
        if item && scopes.last().is_some_and(|(ind, _)| *ind == indent) {
            scopes.pop();
        }
        let Some(key) = key_of(body) else { continue };
        if scopes.last().map(|(ind, _)| *ind) != Some(indent) {
            scopes.push((indent, HashMap::new()));
        }
        let keys = &mut scopes.last_mut().expect("pushed above").1;
        if let Some(&first) = keys.get(&key) {
            return Some((key, first, i + 1));
        }
        keys.insert(key, i + 1);
    }
    None
}

/// The key of a `key: value` (or `key:`) line, unquoted.
fn key_of(body: &str) -> Option<String> {
    if body.starts_with(['{', '[', '|', '>', '&', '*', '!']) {
        return None;
    }
    let at = body
        .char_indices()
        .find(|&(i, c)| c == ':' && body[i + 1..].chars().next().is_none_or(|n| n == ' '))?
        .0;
    let key = body[..at].trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty()).then(|| key.to_string())
}

/// [`duplicate_key`] as a config error naming the key and both lines.
pub fn check_duplicate_keys(text: &str) -> Result<(), CfgError> {
    match duplicate_key(text) {
        Some((key, first, again)) => Err(CfgError::new(
            &key,
            format!("given twice, at line {first} and again at line {again}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_repeats_in_one_mapping_only() {
        let top = "architecture: standard\nd_sae: 64\n# d_sae: 1\nlr: 0.1\nd_sae: 32\n";
        assert_eq!(duplicate_key(top), Some(("d_sae".into(), 2, 5)));
        // the same key in sibling mappings and list items is fine
        let nested = "a:\n  x: 1\n  y: 2\nb:\n  x: 3\nl:\n  - x: 1\n    y: 2\n  - x: 3\n";
        assert_eq!(duplicate_key(nested), None);
        let inner = "sweep:\n  k: [1, 2]\n  lr: 1\n  k: [3]\n";
        assert_eq!(duplicate_key(inner), Some(("k".into(), 2, 4)));
        let item = "l:\n  - x: 1\n    x: 2\n";
        assert_eq!(duplicate_key(item), Some(("x".into(), 2, 3)));
        // a colon inside a value, a URL, a quoted key
        let values = "url: http://a/b\ntime: \"12:30\"\n\"q\": 1\nq: 2\n";
        assert_eq!(duplicate_key(values), Some(("q".into(), 3, 4)));
        let e = check_duplicate_keys(top).unwrap_err();
        assert_eq!(e.field, "d_sae");
        assert_eq!(e.message, "given twice, at line 2 and again at line 5");
    }
}
